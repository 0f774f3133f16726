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
import logging
from typing import TYPE_CHECKING, Any

from symm_rs import env as _env

if TYPE_CHECKING:
    from symm_rs._native import (
        NcclError,
        NcclLibraryError,
        RegistrationError,
        SymmetricMemoryError,
        __version__,
    )
    from symm_rs.agreement import AgreementError, check_layout, verify_pending
    from symm_rs.capability import (
        NoSymmetricKernelsWarning,
        SymmetricKernels,
        symmetric_kernels,
    )
    from symm_rs.comm import Communicator, NotSymmetricWarning, nccl_group, set_window_check
    from symm_rs.context import (
        NcclVersionWarning,
        graph_capture,
        is_registered,
        is_symmetric,
        register,
        reserve,
        set_graph_pool,
        use_symmetric_memory,
    )
    from symm_rs.cp import (
        ZigzagLayout,
        cp_all_gather_reorganized_into_tensor_kv_cache,
        cp_all_gather_rerange_kv_cache,
        zigzag_layout,
        zigzag_split,
    )
    from symm_rs.groups import release, resolve_comm
    from symm_rs.library import library_info, nccl_library, nccl_version
    from symm_rs.policy import PolicyTable, calibrate
    from symm_rs.pool import destroy_pool, pool_usage, release_graph_pool, shared_pool, stats
    from symm_rs.watchdog import describe_registration_in_progress

# Quiet by default: applications opt in with logging.getLogger("symm_rs").
logging.getLogger("symm_rs").addHandler(logging.NullHandler())

# Once per process, before anything reads a value: a bad one warns (raises under SYMM_RS_STRICT=1)
# here, naming the variable, rather than on first use deep inside a collective call.
_env.check_on_import()

# Public name -> the submodule that defines it. The native module's names are lazy too, so that
# ``python -m symm_rs --help`` loads no extension (and works where it cannot load).
_LAZY: dict[str, str] = {
    "NcclError": "_native",
    "NcclLibraryError": "_native",
    "RegistrationError": "_native",
    "SymmetricMemoryError": "_native",
    "__version__": "_native",
    "AgreementError": "agreement",
    "check_layout": "agreement",
    "verify_pending": "agreement",
    "NoSymmetricKernelsWarning": "capability",
    "SymmetricKernels": "capability",
    "symmetric_kernels": "capability",
    "Communicator": "comm",
    "NotSymmetricWarning": "comm",
    "nccl_group": "comm",
    "set_window_check": "comm",
    "NcclVersionWarning": "context",
    "graph_capture": "context",
    "is_registered": "context",
    "is_symmetric": "context",
    "register": "context",
    "reserve": "context",
    "set_graph_pool": "context",
    "use_symmetric_memory": "context",
    "ZigzagLayout": "cp",
    "cp_all_gather_reorganized_into_tensor_kv_cache": "cp",
    "cp_all_gather_rerange_kv_cache": "cp",
    "zigzag_layout": "cp",
    "zigzag_split": "cp",
    "release": "groups",
    "resolve_comm": "groups",
    "library_info": "library",
    "nccl_library": "library",
    "nccl_version": "library",
    "PolicyTable": "policy",
    "calibrate": "policy",
    "destroy_pool": "pool",
    "pool_usage": "pool",
    "release_graph_pool": "pool",
    "shared_pool": "pool",
    "stats": "pool",
    "describe_registration_in_progress": "watchdog",
}
# Submodules reachable as attributes (``symm_rs.cp.zigzag_layout``) without importing them first.
_SUBMODULES = frozenset(
    (
        "_native agreement bench capability cli comm compat context cp doctor env groups launch "
        "memory library nccl_log ops policy pool registration watchdog"
    ).split()
)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"symm_rs.{module}"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"symm_rs.{name}")
    raise AttributeError(f"module 'symm_rs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)


__all__ = [
    "AgreementError",
    "Communicator",
    "NcclError",
    "NcclLibraryError",
    "NcclVersionWarning",
    "NoSymmetricKernelsWarning",
    "NotSymmetricWarning",
    "PolicyTable",
    "RegistrationError",
    "SymmetricKernels",
    "SymmetricMemoryError",
    "ZigzagLayout",
    "__version__",
    "calibrate",
    "check_layout",
    "cp_all_gather_reorganized_into_tensor_kv_cache",
    "cp_all_gather_rerange_kv_cache",
    "describe_registration_in_progress",
    "destroy_pool",
    "graph_capture",
    "is_registered",
    "is_symmetric",
    "library_info",
    "nccl_group",
    "nccl_library",
    "nccl_version",
    "pool_usage",
    "register",
    "release",
    "release_graph_pool",
    "reserve",
    "resolve_comm",
    "set_graph_pool",
    "set_window_check",
    "shared_pool",
    "stats",
    "symmetric_kernels",
    "use_symmetric_memory",
    "verify_pending",
    "zigzag_layout",
    "zigzag_split",
]
