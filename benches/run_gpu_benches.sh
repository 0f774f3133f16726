#!/usr/bin/env bash
# The committed GPU benchmarks. Usage on the GPU host (symm_rs importable):
#   benches/run_gpu_benches.sh [OUT_DIR [STEP...]]
# Steps, in this order by default. Each command runs under its own timeout, and any one step
# stays under 600 s (one device call); the whole default set took well under that on H200s
# before the baselines were added, but when a call's budget is tight, run the steps apart:
#   bench      2 GPUs, then 4: every section (bench_<N>gpu<TAG>.json)
#   ctas16     4 GPUs, NCCL_SYM_CTAS=16, collectives (the size policy comparison)
#   baselines  2 GPUs, then 4: collectives and torch_nccl at 1 KiB..64 MiB, side by side with
#              PyTorch's own symmetric memory (bench_<N>gpu<TAG>_baselines.json)
#   decode     benches/decode_step.py on 2 (and 4) GPUs, with the torch symm-mem paths
# BENCH_TAG (default empty) is added to every bench file name, e.g. BENCH_TAG=_h200.
# NVLink multicast stays off: NCCL (NVLS), torch's symmetric memory and NVSHMEM.
set -u
out=${1:-benches/results}
[ $# -gt 0 ] && shift
steps=${*:-bench ctas16 baselines decode}
tag=${BENCH_TAG:-}
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
worlds=2
[ "$gpus" -ge 4 ] && worlds="2 4"
status=0
bench() {  # WORLD ARGS...: one bench run, on the first WORLD GPUs
  local world=$1
  shift
  echo "== bench, $world GPUs: $*"
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((world - 1))) timeout 280 \
    python3 -m symm_rs bench --world-size "$world" --out "$out" --timeout 240 "$@" || status=1
}
for step in $steps; do
  case $step in
    bench)
      for w in $worlds; do bench "$w" --tag "$tag"; done ;;
    ctas16)
      if [ "$gpus" -ge 4 ]; then
        bench 4 --tag "${tag}_ctas16" --env NCCL_SYM_CTAS=16 --sections collectives
      fi ;;
    baselines)
      for w in $worlds; do
        bench "$w" --tag "${tag}_baselines" --sizes 1K,8K,64K,512K,4M,32M,64M \
          --sections collectives torch_nccl
      done ;;
    decode)
      echo "== decode_step: $worlds GPUs"
      # shellcheck disable=SC2086
      timeout 500 python3 "$here/decode_step.py" --world-sizes $worlds --out "$out" || status=1 ;;
    *)
      echo "unknown step: $step (bench, ctas16, baselines, decode)" >&2
      status=2 ;;
  esac
done
exit $status
