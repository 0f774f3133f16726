#!/usr/bin/env bash
# make dist: what a release publishes, into dist/ (DIST_DIR): an abi3 wheel per target tagged
# manylinux_2_28 (torch's own tag: a host that installs torch installs this), and the sdist.
#
# The wheel is linked by zig (maturin --zig, the ziglang wheel from PyPI) against glibc 2.28's
# symbol versions, so no manylinux container is needed. Targets: this machine's, plus
# aarch64-unknown-linux-gnu (GH200/GB200) when rustup has that target installed
# (`rustup target add aarch64-unknown-linux-gnu`); DIST_TARGETS overrides the list.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
OUT="${DIST_DIR:-dist}"
COMPATIBILITY=manylinux_2_28
"$PYTHON" -m pip install -q -r scripts/dist-requirements.txt

# maturin from the interpreter's environment (it looks for zig there too), else from PATH.
maturin="$(dirname "$(command -v "$PYTHON")")/maturin"
[ -x "$maturin" ] || maturin=maturin
# maturin runs `zig`; the ziglang wheel provides it as `python -m ziglang`.
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$(command -v "$PYTHON")" > "$shim/zig"
chmod +x "$shim/zig"

host="$(rustc -vV | sed -n 's/^host: //p')"
if [ -z "${DIST_TARGETS:-}" ]; then
    DIST_TARGETS="$host"
    if [ "$host" != aarch64-unknown-linux-gnu ] \
        && rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
        DIST_TARGETS="$DIST_TARGETS aarch64-unknown-linux-gnu"
    else
        echo "dist: no aarch64 wheel: rustup target add aarch64-unknown-linux-gnu to build one here"
    fi
fi

rm -rf "$OUT"
mkdir -p "$OUT"
for target in $DIST_TARGETS; do
    echo "dist: wheel for $target ($COMPATIBILITY)"
    PATH="$shim:$PATH" "$maturin" build --release --locked --zig --target "$target" \
        --compatibility "$COMPATIBILITY" -o "$OUT"
done
"$maturin" sdist -o "$OUT"
ls -l "$OUT"
