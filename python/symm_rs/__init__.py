"""symm_rs: NCCL symmetric memory for PyTorch, with a prebuilt Rust core.

import symm_rs
with symm_rs.use_symmetric_memory(group):
    buf = torch.empty(n, dtype=torch.bfloat16, device="cuda")
# buf lies in a symmetric window of group's communicator: NCCL runs its symmetric kernels.

``import symm_rs`` is cheap: it imports neither torch nor the native module, and checks the
``SYMM_RS_*`` variables (``symm_rs.env``). Each public name is loaded from its submodule on first
use (PEP 562), and the submodules that need torch import it then.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from symm_rs import _moved
from symm_rs import env as _env

# Quiet by default: applications opt in with logging.getLogger("symm_rs").
logging.getLogger("symm_rs").addHandler(logging.NullHandler())

# Once per process, before anything reads a value: a bad one warns (raises under SYMM_RS_STRICT=1)
# here, naming the variable, rather than on first use deep inside a collective call.
_env.check_on_import()

# The public face, by the submodule that defines each name: written once, here; ``__all__`` and
# the lazy loader below both come from it. The native module's names are lazy too, so that
# ``python -m symm_rs --help`` loads no extension (and works where it cannot load).
_PUBLIC: dict[str, tuple[str, ...]] = {
    "_native": ("__version__",),
    "context": (
        "use_symmetric_memory",
        "register",
        "reserve",
        "is_symmetric",
        "is_registered",
        "set_graph_pool",
        "graph_capture",
    ),
    "groups": ("release",),
    "pool": ("destroy_pool", "release_graph_pool", "stats"),
    "comm": ("Communicator", "nccl_group"),
    "library": ("library_info", "LibraryInfo"),
    "capability": ("symmetric_kernels",),
    "watchdog": ("describe_registration_in_progress",),
    "cp": (
        "cp_all_gather_reorganized_into_tensor_kv_cache",
        "cp_all_gather_rerange_kv_cache",
        "zigzag_layout",
    ),
    "errors": (
        "SymmetricMemoryError",
        "NcclLibraryError",
        "NcclError",
        "RegistrationError",
        "AgreementError",
    ),
}
__all__ = sorted(name for names in _PUBLIC.values() for name in names)
_HOME = {name: module for module, names in _PUBLIC.items() for name in names}

# Names that left the public face in this release, and where they live now (CHANGELOG.md).
_MOVED = {
    "shared_pool": "pool",
    "pool_usage": "pool",
    "resolve_comm": "groups",
    "verify_pending": "checks",
    "check_layout": "checks",
    "set_window_check": "comm",
    "nccl_version": "library",
    "nccl_library": "library",
    "PolicyTable": "policy",
    "calibrate": "calibration",
    "ZigzagLayout": "zigzag",
    "zigzag_split": "zigzag",
    "SymmetricKernels": "capability",
    "NcclVersionWarning": "errors",
    "NoSymmetricKernelsWarning": "errors",
    "NotSymmetricWarning": "errors",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"symm_rs.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    # A submodule reached as an attribute (``symm_rs.cp.zigzag_layout``) is imported now.
    if not name.startswith("__") and importlib.util.find_spec(f"symm_rs.{name}") is not None:
        return importlib.import_module(f"symm_rs.{name}")
    return _moved.moved("symm_rs", name, _MOVED)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
