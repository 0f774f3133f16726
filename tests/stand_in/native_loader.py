"""Loads ``symm_rs._native`` without importing the ``symm_rs`` package (whose ``__init__``
imports torch, and torch loads its own libnccl.so.2, which symm_rs would then always use).

Only for subprocesses of the stand-in tests: ``find_spec("symm_rs")`` locates the package
without executing it; the extension file is then loaded directly.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

NATIVE_ENV = "SYMM_RS_TEST_NATIVE"


def native_path() -> str:
    """The ``_native`` extension of the installed ``symm_rs``, or ``$SYMM_RS_TEST_NATIVE``."""
    override = os.environ.get(NATIVE_ENV)
    if override:
        return override
    spec = importlib.util.find_spec("symm_rs")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("symm_rs is not installed (find_spec('symm_rs') found nothing)")
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "_native*.so")))
        if found:
            return found[0]
    raise RuntimeError(
        f"no _native*.so in {list(spec.submodule_search_locations)}: build and install symm_rs"
    )


def load_native() -> ModuleType:
    """Executes the extension as ``symm_rs._native``; never imports torch or ``symm_rs``."""
    if "symm_rs._native" in sys.modules:
        return sys.modules["symm_rs._native"]
    path = native_path()
    loader = importlib.machinery.ExtensionFileLoader("symm_rs._native", path)
    spec = importlib.util.spec_from_file_location("symm_rs._native", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["symm_rs._native"] = module
    return module
