#!/usr/bin/env bash
# The committed GPU benchmarks: 2 and 4 GPUs, then 4 GPUs with NCCL_SYM_CTAS=16 (the size
# policy comparison). Usage on the GPU host: benches/run_gpu_benches.sh [OUT_DIR]
set -u
out=${1:-benches/results}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
export PYTHONUNBUFFERED=1
CUDA_VISIBLE_DEVICES=0,1 timeout 240 python3 -m symm_rs bench --world-size 2 --out "$out"
if [ "$gpus" -ge 4 ]; then
  timeout 240 python3 -m symm_rs bench --world-size 4 --out "$out"
  timeout 240 python3 -m symm_rs bench --world-size 4 --out "$out" --tag _ctas16 \
    --env NCCL_SYM_CTAS=16 --sections collectives
fi
