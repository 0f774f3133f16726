#!/usr/bin/env bash
# Runs every GPU suite on 2 GPUs (the first two) and on 4, writing JSON summaries to $1
# (default tests/gpu/results). Usage on a GPU host with symm_rs importable:
#   tests/gpu/run_all.sh [OUT_DIR] [SUITE...]
set -u
out=${1:-tests/gpu/results}
shift || true
suites=${*:-suite_core suite_comm suite_cp suite_safety suite_alignment}
here=$(cd "$(dirname "$0")" && pwd)
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
status=0
# NCCL's watchdog prints long traces when a case leaves ranks out of step; the JSON has the story.
noise='^\[rank.*(ProcessGroupNCCL|Watchdog)|^frame #|^Exception raised|terminate called|what\(\)'
for world in 2 4; do
  if [ "$gpus" -lt "$world" ]; then
    echo "skipping $world-GPU runs: $gpus GPU(s) visible"
    continue
  fi
  visible=$(seq -s, 0 $((world - 1)))
  for suite in $suites; do
    CUDA_VISIBLE_DEVICES=$visible PYTHONUNBUFFERED=1 timeout 300 \
      python3 "$here/harness.py" "$suite" --world-size "$world" --out "$out" --timeout 280 2>&1 \
      | grep -vE "$noise" | grep -E "^ *(passed|failed|skipped)|^suite_|rank [0-9]+:" \
      || status=1
  done
done
if [ "$gpus" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 python3 "$here/run_examples.py" --nproc 2 --out "$out" || status=1
fi
exit $status
