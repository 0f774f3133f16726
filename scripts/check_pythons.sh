#!/usr/bin/env bash
# README's two commands (and make dist dist-check) on the oldest and newest Python that
# pyproject.toml admits, each in a fresh clone and virtualenv (scripts/fresh_setup.sh), where this
# machine has that interpreter (scripts/python_for.sh). Writes
# tests/results/fresh_setup_py<X.Y>.txt per end; says which ends it could not run.
#
# scripts/check_pythons.sh [oldest] [newest]   (both when none is named)
set -euo pipefail
cd "$(dirname "$0")/.."

status=0
ends=("$@")
[ ${#ends[@]} -eq 0 ] && ends=(oldest newest)
for end in "${ends[@]}"; do
    if ! python="$(scripts/python_for.sh "$end")"; then
        echo "check_pythons: $end: skipped, no interpreter here"
        continue
    fi
    version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    echo "check_pythons: $end: Python $version ($python)"
    if scripts/fresh_setup.sh --python "$python" --out "tests/results/fresh_setup_py$version.txt"; then
        echo "check_pythons: $end: Python $version passed"
    else
        echo "check_pythons: $end: Python $version FAILED (tests/results/fresh_setup_py$version.txt)"
        status=1
    fi
done
exit "$status"
