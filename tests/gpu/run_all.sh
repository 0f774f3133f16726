#!/usr/bin/env bash
# Runs every GPU suite on 2 GPUs (the first two) and on 4, the transport suite three ways, and
# the examples, writing JSON summaries to $1 (default tests/gpu/results). Exits non-zero when any
# suite fails. Usage on a GPU host with symm_rs importable:
#   tests/gpu/run_all.sh [OUT_DIR] [SUITE...]
# WORLDS="2" (or "4") runs one world size only; EXAMPLES=0 skips the examples. Both exist so one
# run fits a device call's time limit. SHARED_GPU=1 runs every world size's ranks on the GPUs
# there are (one is enough; each rank its own NCCL_HOSTID: see harness.py), skipping the
# NVLink-only cases, the transport suite and the examples. TAG=_x ends every result file's name
# with _x (the NCCL version of the run, say), before a variant's own tag.
set -u -o pipefail
out=${1:-tests/gpu/results}
shift || true
suites=${*:-suite_core suite_comm suite_cp suite_safety suite_alignment suite_engine suite_compile suite_never_hang}
here=$(cd "$(dirname "$0")" && pwd)
# NVLink multicast stays off on shared GPU hosts (the device's KINDS.md says why).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
status=0
# NCCL's watchdog prints long traces when a case leaves ranks out of step; the JSON has the story.
noise='^\[rank.*(ProcessGroupNCCL|Watchdog)|^frame #|^Exception raised|terminate called|what\(\)'

shared=${SHARED_GPU:-0}
run_suite() {  # world suite [tag [VAR=value...]]: the variables are set for that run only
  local world=$1 suite=$2 tag=${3:-}
  shift 3 2>/dev/null || shift $#
  local visible mode=()
  if [ "$shared" = 1 ]; then
    visible=${CUDA_VISIBLE_DEVICES:-0}
    mode=(--shared-gpu)
  else
    visible=$(seq -s, 0 $((world - 1)))
  fi
  env "$@" CUDA_VISIBLE_DEVICES="$visible" PYTHONUNBUFFERED=1 timeout 300 \
    python3 "$here/harness.py" "$suite" --world-size "$world" --out "$out" --timeout 240 \
    --tag "${TAG:-}$tag" "${mode[@]}" 2>&1 | grep -vE "$noise" \
    | grep -E "^ *(passed|failed|skipped)|^suite_|rank [0-9]+:"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "FAILED: $suite on $world GPUs $tag (exit $rc)"; status=1; fi
}

for world in ${WORLDS:-2 4}; do
  if [ "$shared" != 1 ] && [ "$gpus" -lt "$world" ]; then
    echo "skipping $world-GPU runs: $gpus GPU(s) visible"
    continue
  fi
  for suite in $suites; do
    run_suite "$world" "$suite"
  done
  # The never-hang scenarios again with torch's expandable segments on (engines set it to cut
  # fragmentation): symm_rs's pool must behave the same beside them.
  case " $suites " in *" suite_never_hang "*)
    run_suite "$world" suite_never_hang _expandable PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  esac
  [ "$shared" = 1 ] && continue
  # Where NCCL can and cannot run symmetric kernels: NVLink, forced network, P2P off (SHM on).
  for variant in nvlink network p2p_off; do
    log=$(mktemp -d)
    case $variant in
      nvlink) extra=() ;;
      network) extra=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1) ;;
      p2p_off) extra=(NCCL_P2P_DISABLE=1) ;;
    esac
    run_suite "$world" suite_transport "_$variant" SYMM_RS_TRANSPORT_LOG_DIR="$log" "${extra[@]}"
  done
done
if [ "$shared" != 1 ] && [ "$gpus" -ge 2 ] && [ "${EXAMPLES:-1}" != 0 ]; then
  CUDA_VISIBLE_DEVICES=0,1 python3 "$here/run_examples.py" --nproc 2 --out "$out" || status=1
fi
exit $status
