#!/usr/bin/env bash
# Prints the interpreter for one end of the Python range pyproject.toml admits (`oldest` or
# `newest`), or nothing and exit status 1 when this machine has none: `pythonX.Y` on PATH, else
# pyenv's newest X.Y.* build (pyenv's shims only run the versions it has selected).
set -euo pipefail
cd "$(dirname "$0")/.."

spec="$(sed -n 's/^requires-python = ">=3\.\([0-9]*\),<3\.\([0-9]*\)"$/\1 \2/p' pyproject.toml)"
read -r low high <<<"$spec"
case "${1:-}" in
    oldest) minor="$low" ;;
    newest) minor="$((high - 1))" ;;
    *) echo "usage: $0 oldest|newest" >&2; exit 2 ;;
esac
want="3.$minor"
works() { [ -n "$1" ] && "$1" -c "import sys, venv; assert sys.version_info[:2] == (3, $minor)" 2>/dev/null; }

candidate="$(command -v "python$want" || true)"
if works "$candidate"; then echo "$candidate"; exit 0; fi
for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$want".* 2>/dev/null | sort -V -r); do
    if works "$candidate/bin/python$want"; then echo "$candidate/bin/python$want"; exit 0; fi
done
echo "python_for: no Python $want on this machine (PATH or pyenv)" >&2
exit 1
