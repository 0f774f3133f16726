"""The CP copy kernel's committed PTX (rust/src/cuda/batched_copy.ptx) is what
scripts/compile_ptx.py makes from rust/src/cuda/batched_copy.cu: always by the source digest in
its header, and byte for byte where the pinned NVRTC is installed. The build only embeds the PTX,
so a kernel edited without ``make ptx`` would otherwise ship stale."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "compile_ptx", ROOT / "scripts" / "compile_ptx.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ptx_was_made_from_this_source() -> None:
    script = _script()
    source, ptx = script.SOURCE.read_text(), script.PTX.read_text()
    assert ptx.startswith(script.header(source)), "stale PTX: run `make ptx`"


def test_the_ptx_targets_sm_80_for_drivers_from_cuda_12_4() -> None:
    ptx = _script().PTX.read_text()
    version = re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M)
    assert version is not None
    assert (int(version[1]), int(version[2])) <= (8, 4)
    assert re.search(r"^\.target sm_80$", ptx, re.M)
    assert ".visible .entry symm_rs_batched_copy(" in ptx
    assert "\0" not in ptx  # the crate appends the NUL the driver needs


def test_the_ptx_is_what_the_pinned_nvrtc_makes() -> None:
    script = _script()
    try:
        nvrtc = script.load_nvrtc()
    except RuntimeError as e:
        pytest.skip(f"no NVRTC {script.NVRTC_VERSION}: {e}")
    assert script.compile_ptx(script.SOURCE.read_text(), nvrtc) == script.PTX.read_text()
