#!/usr/bin/env bash
# Runs GPU suites with every rank on one GPU (harness --shared-gpu), each result file tagged with
# the NCCL version in use, on the one-GPU device kind. Usage (symm_rs importable):
#   tests/gpu/run_shared.sh OUT_DIR TAG WORLD SUITE...
# Exits non-zero when any suite fails; each suite's JSON under OUT_DIR tells the story.
set -u -o pipefail
out=$1 tag=$2 world=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# NCCL's watchdog prints long traces when a case leaves ranks out of step; the JSON has the story.
noise='^\[rank.*(ProcessGroupNCCL|Watchdog)|^frame #|^Exception raised|terminate called|what\(\)'
status=0
for suite in "$@"; do
  PYTHONUNBUFFERED=1 timeout 300 python3 "$here/harness.py" "$suite" --world-size "$world" \
    --shared-gpu --out "$out" --timeout 240 --tag "$tag" 2>&1 | grep -vE "$noise" \
    | grep -E "^ *(passed|failed|skipped)|^suite_|rank [0-9]+:" | cut -c1-400
  rc=$?
  if [ "$rc" -ne 0 ]; then echo "FAILED: $suite ($world ranks, $tag, exit $rc)"; status=1; fi
done
exit $status
