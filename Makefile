# The project's checks; CI (.ci/run) calls `make test`, the command README.md gives.
PYTHON ?= python3
WHEEL_DIR ?= target/wheels

.PHONY: fmt lint wheel install test test-rust test-python bench gpu-tests

fmt:
	cargo fmt --all
	ruff format python tests benches examples

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python -- -D warnings
	ruff check python tests benches examples
	ruff format --check python tests benches examples

wheel:
	rm -rf $(WHEEL_DIR)
	maturin build --release -o $(WHEEL_DIR)

install: wheel
	$(PYTHON) -m pip install --force-reinstall --no-deps $(WHEEL_DIR)/*.whl

test-rust:
	cargo test

test-python: install
	$(PYTHON) -m pytest tests

test: lint test-rust test-python

bench:
	cargo bench --bench registration

# On a host with 2 or 4 GPUs: every GPU suite, JSON summaries into tests/gpu/results.
gpu-tests:
	tests/gpu/run_all.sh tests/gpu/results
