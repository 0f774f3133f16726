"""Shared fixtures of the CPU tests.

The stand-in libnccl (tests/stand_in/stand_in_nccl.c) is compiled once per session, in two
variants: with the window symbols, and without them (``-DSTAND_IN_NO_WINDOWS``). Nothing here
imports torch or symm_rs: the stand-in tests run symm_rs in subprocesses that must not either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The repository's tooling beside the package (benches/symm_rs_bench: the benchmark harness and
# the rank launcher): importable by the tests, as it is from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benches"))

STAND_IN_DIR = Path(__file__).parent / "stand_in"
STAND_IN_SOURCE = STAND_IN_DIR / "stand_in_nccl.c"


def _c_compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _compile(compiler: str, source: Path, output: Path, *flags: str) -> Path:
    command = [compiler, "-shared", "-fPIC", "-O2", *flags, "-o", str(output), str(source)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling {source.name} took over 120 s: {' '.join(command)}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return output


@pytest.fixture(scope="session")
def stand_in_build(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the compiled stand-ins: ``windows``, ``no_windows`` and ``not_nccl`` (a shared
    object with no NCCL symbol at all)."""
    compiler = _c_compiler()
    if compiler is None:
        pytest.skip("no C compiler (cc, gcc or clang; or $CC) to build the stand-in libnccl")
    out = tmp_path_factory.mktemp("stand_in")
    not_nccl_source = out / "not_nccl.c"
    not_nccl_source.write_text("int not_nccl(void) { return 0; }\n")
    return {
        "windows": _compile(compiler, STAND_IN_SOURCE, out / "libnccl_stand_in.so"),
        "no_windows": _compile(
            compiler,
            STAND_IN_SOURCE,
            out / "libnccl_stand_in_no_windows.so",
            "-DSTAND_IN_NO_WINDOWS",
        ),
        "not_nccl": _compile(compiler, not_nccl_source, out / "libnot_nccl.so"),
    }


@pytest.fixture(scope="session")
def stand_in_lib(stand_in_build: dict[str, Path]) -> Path:
    """The stand-in libnccl at version 2.28.9 with window symbols."""
    return stand_in_build["windows"]


@pytest.fixture(scope="session")
def stand_in_no_windows_lib(stand_in_build: dict[str, Path]) -> Path:
    """The stand-in without ncclCommWindowRegister/Deregister."""
    return stand_in_build["no_windows"]
