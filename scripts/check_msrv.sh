#!/usr/bin/env bash
# Builds the crate (with and without the Python feature, tests and benches included) with the
# minimum Rust that Cargo.toml's rust-version promises. Needs that toolchain installed
# (`rustup toolchain install <version> --profile minimal`); says so and exits 0 when it is not, so
# that a machine without it can still run `make msrv` on the way to other checks.
set -euo pipefail
cd "$(dirname "$0")/.."

msrv="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)"
if ! rustup run "$msrv" rustc --version >/dev/null 2>&1; then
    echo "check_msrv: Rust $msrv is not installed (rustup toolchain install $msrv --profile minimal); skipped"
    exit 0
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/msrv}"
for features in "" "--features python"; do
    # shellcheck disable=SC2086
    cargo "+$msrv" check --locked --all-targets $features
done
echo "check_msrv: the crate builds with Rust $msrv ($(rustup run "$msrv" rustc --version))"
