"""symm_rs: NCCL symmetric memory for PyTorch, with a prebuilt Rust core.

import symm_rs
with symm_rs.use_symmetric_memory(group):
    buf = torch.empty(n, dtype=torch.bfloat16, device="cuda")
# buf lies in a symmetric window of group's communicator: NCCL runs its symmetric kernels.
"""

import logging

from symm_rs._native import (
    NcclError,
    NcclLibraryError,
    RegistrationError,
    SymmetricMemoryError,
    __version__,
)
from symm_rs.comm import Communicator, NotSymmetricWarning, nccl_group, set_window_check
from symm_rs.cp import (
    ZigzagLayout,
    cp_all_gather_reorganized_into_tensor_kv_cache,
    cp_all_gather_rerange_kv_cache,
    zigzag_layout,
    zigzag_split,
)
from symm_rs.groups import resolve_comm
from symm_rs.library import library_info, nccl_library, nccl_version
from symm_rs.memory import (
    check_layout,
    destroy_pool,
    is_symmetric,
    pool_usage,
    register,
    release,
    reserve,
    shared_pool,
    stats,
    use_symmetric_memory,
    verify_pending,
)

# Quiet by default: applications opt in with logging.getLogger("symm_rs").
logging.getLogger("symm_rs").addHandler(logging.NullHandler())

__all__ = [
    "Communicator",
    "NcclError",
    "NcclLibraryError",
    "NotSymmetricWarning",
    "RegistrationError",
    "SymmetricMemoryError",
    "ZigzagLayout",
    "__version__",
    "check_layout",
    "cp_all_gather_reorganized_into_tensor_kv_cache",
    "cp_all_gather_rerange_kv_cache",
    "destroy_pool",
    "is_symmetric",
    "library_info",
    "nccl_group",
    "nccl_library",
    "nccl_version",
    "pool_usage",
    "register",
    "release",
    "reserve",
    "resolve_comm",
    "set_window_check",
    "shared_pool",
    "stats",
    "use_symmetric_memory",
    "verify_pending",
    "zigzag_layout",
    "zigzag_split",
]
