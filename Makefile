# The project's checks. README.md's second set-up command is `pip install '.[dev]' && make test`;
# CI (.ci/run) runs exactly that, in a fresh virtualenv. Every Python tool runs as
# `$(PYTHON) -m TOOL`, so the tools of the interpreter (virtualenv) that runs make are used.
PYTHON ?= python3
WHEEL_DIR ?= target/wheels
PY_DIRS = python tests benches examples scripts

.PHONY: fmt lint wheel install test test-rust test-python bench bench-harness gpu-tests ptx dist dist-check msrv

fmt:
	cargo fmt --all
	$(PYTHON) -m ruff format $(PY_DIRS)

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	$(PYTHON) -m ruff check $(PY_DIRS)
	$(PYTHON) -m ruff format --check $(PY_DIRS)

wheel:
	rm -rf $(WHEEL_DIR)
	$(PYTHON) -m maturin build --release -o $(WHEEL_DIR)

install: wheel
	$(PYTHON) -m pip install --force-reinstall --no-deps $(WHEEL_DIR)/*.whl

test-rust:
	cargo test

# The CPU tests, tests/test_house.py among them (file sizes, the one crossing, the one tables).
test-python: install
	$(PYTHON) -m pytest tests

test: lint test-rust test-python

bench:
	cargo bench --bench registration

# The benchmark harness on 2+ GPUs (benches/symm_rs_bench: beside the package, not in it); the
# same as `symm-rs bench` run in this checkout. Options through ARGS, e.g. ARGS=--quick.
bench-harness:
	PYTHONPATH=benches $(PYTHON) -m symm_rs_bench $(ARGS)

# What a release publishes, into dist/: manylinux_2_28 abi3 wheels (zig from PyPI links them;
# aarch64 too when rustup has that target) and the sdist. dist-check checks them (tag, symbol
# versions, a clean install without Rust or torch, a wheel built from the sdist); CI runs both.
dist:
	PYTHON=$(PYTHON) scripts/dist.sh

dist-check:
	$(PYTHON) scripts/check_dist.py dist

# The crate with the minimum Rust that Cargo.toml's rust-version promises (when installed).
msrv:
	scripts/check_msrv.sh

# On a host with 2 or 4 GPUs: every GPU suite, JSON summaries into tests/gpu/results.
gpu-tests:
	tests/gpu/run_all.sh tests/gpu/results

# The CP copy kernel's PTX (rust/src/cuda/batched_copy.ptx) from its source, after editing
# batched_copy.cu: needs `pip install nvidia-cuda-nvrtc-cu12==12.4.127` (and, for the ptxas
# check, nvidia-cuda-nvcc-cu12). The build itself only embeds the committed PTX.
ptx:
	$(PYTHON) scripts/compile_ptx.py --ptxas
