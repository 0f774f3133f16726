#!/usr/bin/env bash
# README's set-up figures from a fresh run of its own commands. A fresh clone of this HEAD in a
# temporary folder, with an empty pip cache and cargo home (everything is downloaded), runs
# `bash .ci/run`: a fresh virtualenv, README's two commands, then `make dist dist-check`, each
# timed. The transcript, headed by the machine, the times, the virtualenv's size and the test
# counts, goes to tests/results/fresh_setup.txt (--out).
#
# scripts/fresh_setup.sh [--python PYTHON] [--out FILE]   (PYTHON: as CI's choice when absent)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python=""
out="$root/tests/results/fresh_setup.txt"
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python="$2"; shift 2 ;;
        --out) out="$(realpath -m "$2")"; shift 2 ;;
        *) echo "usage: $0 [--python PYTHON] [--out FILE]" >&2; exit 2 ;;
    esac
done

work="$(mktemp -d /tmp/symm_rs_fresh.XXXXXX)"
trap 'rm -rf "$work"' EXIT
commit="$(git -C "$root" rev-parse HEAD)"
git clone -q --no-checkout "$root" "$work/clone"
git -C "$work/clone" checkout -q "$commit"
export PIP_CACHE_DIR="$work/pip-cache" CARGO_HOME="$work/cargo-home"
export CI_VENV="$work/venv"
[ -n "$python" ] && export CI_PYTHON="$python"

log="$work/log"
started="$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
set +e
(cd "$work/clone" && bash .ci/run) >"$log" 2>&1
status=$?
set -e

venv_python="$CI_VENV/bin/python"
help_times=""
for _ in 1 2 3; do
    t0="$(date +%s%N)"
    "$venv_python" -m symm_rs --help >/dev/null
    ms=$((($(date +%s%N) - t0) / 1000000))
    help_times+="$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000))) "
done
loaded="$("$venv_python" -c '
import runpy, sys
sys.argv = ["symm-rs", "--help"]
try:
    runpy.run_module("symm_rs", run_name="__main__")
except SystemExit:
    pass
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m == "symm_rs._native"))
' 2>/dev/null | tail -1)"

{
    echo "# date: $started"
    echo "# commit: $commit (a fresh clone)"
    echo "# machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB, $(uname -m), no GPU"
    echo "# interpreter: $(sed -n 's/^+ CI interpreter: //p' "$log")"
    echo "# toolchain: $(rustc --version), $(cc --version | head -1), $(make --version | head -1)"
    echo "# empty pip cache (PIP_CACHE_DIR) and cargo home (CARGO_HOME): everything is downloaded"
    echo "# command: bash .ci/run (a fresh virtualenv, README's two commands, make dist dist-check)"
    echo "# exit status: $status"
    sed -n 's/^+ took \(.*\)/# took \1/p' "$log"
    echo "# tests: $(grep -E '^=+ .*(passed|failed).* in ' "$log" | tail -1 | tr -d '=' | xargs)"
    echo "# virtualenv: $(du -sh "$CI_VENV" | cut -f1), pip cache: $(du -sh "$PIP_CACHE_DIR" 2>/dev/null | cut -f1 || echo none)"
    echo "# python -m symm_rs --help, wall seconds of 3 runs: $help_times"
    echo "# torch or native module loaded by --help: $loaded"
    echo
    # pip's progress bars redraw one line many times: keep the last state of each.
    sed -e 's/\r/\n/g' "$log" | grep -v -E '^\s*(━|\|)' | sed -e 's/[[:space:]]*$//'
} >"$out"
head -16 "$out"
exit "$status"
