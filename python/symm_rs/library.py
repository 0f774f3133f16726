"""Which libnccl symm_rs uses, and what it can do.

The library is loaded once per process by the Rust core: the ``libnccl.so.2`` already loaded
(torch's) first, then ``SYMM_RS_NCCL_LIBRARY``, then the NVIDIA wheels found on ``sys.path``,
then the system's. This module only finds the wheel candidates and caches the description.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any

from symm_rs import _native

_WHEEL_LIBRARY = os.path.join("nvidia", "nccl", "lib", "libnccl.so.2")
log = logging.getLogger("symm_rs")
_lock = threading.Lock()
_info: dict[str, Any] | None = None


def wheel_candidates() -> list[str]:
    """``nvidia/nccl/lib/libnccl.so.2`` under every ``sys.path`` entry that has one."""
    found: list[str] = []
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), _WHEEL_LIBRARY)
        if os.path.isfile(candidate) and candidate not in found:
            found.append(candidate)
    return found


def library_info() -> dict[str, Any]:
    """Loads NCCL if needed and describes it: path, origin, version, window support, notes.

    Raises:
        NcclLibraryError: no usable libnccl was found.
    """
    global _info
    if _info is None:
        with _lock:
            if _info is None:
                info = dict(_native.load_nccl(wheel_candidates()))
                log.info(
                    "NCCL %s from %s (%s)",
                    ".".join(map(str, info["version"])),
                    info["path"],
                    info["origin"],
                )
                for note in info["notes"]:
                    log.warning("%s", note)
                _info = info
    return _info


def nccl_version() -> tuple[int, int, int]:
    """``(major, minor, patch)`` of the libnccl symm_rs uses."""
    major, minor, patch = library_info()["version"]
    return (major, minor, patch)


def nccl_library() -> str:
    """Absolute path of the libnccl symm_rs uses."""
    return str(library_info()["path"])


def require_windows() -> None:
    """Raises ``NcclLibraryError`` unless the library can register symmetric windows."""
    info = library_info()
    if not info["windows_supported"]:
        raise _native.NcclLibraryError(info["windows_problem"])
