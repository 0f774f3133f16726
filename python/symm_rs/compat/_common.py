"""What both engine shims answer the same way: which tensors are symmetric, and which pool the
contexts of a thread allocate from."""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from symm_rs import _native, groups, pool


def capturing() -> bool:
    """Whether a CUDA-graph capture is under way on the current stream (``False`` without a
    GPU, where torch's own question raises)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def extent_in_window(ptr: int, nbytes: int, comm: Optional[int] = None) -> bool:
    """Whether ``[ptr, ptr + nbytes)`` lies inside one registered window: of ``comm`` when
    given, else of the innermost active context's communicator on this thread, else of any
    communicator."""
    if nbytes <= 0:
        return False
    if comm is None:
        comm = _native.innermost_comm()
    if comm is not None:
        return bool(_native.is_registered(ptr, nbytes, comm))
    return bool(_native.window_comms(ptr, nbytes))


def storage_in_window(tensor: torch.Tensor, comm: Optional[int] = None) -> bool:
    """Whether ``tensor``'s whole storage (the block the engines ask about: they compare its
    start with pool block addresses) lies inside one registered window (``extent_in_window``).
    A block of a pool segment no communicator registered yet (a capture's new segment, or one
    of another group's pool) answers ``False``: NCCL would not run its symmetric kernels on it."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
        return False
    storage = tensor.untyped_storage()
    return extent_in_window(storage.data_ptr(), storage.nbytes(), comm)


def comm_of(group: Any) -> Optional[int]:
    """The communicator address behind an engine's group object, or ``None`` when it has none
    (never raises: callers fall back to asking about any communicator)."""
    try:
        return groups.resolve_comm(group) or None
    except (TypeError, ValueError):
        return None


class _Last(threading.local):
    def __init__(self) -> None:
        self.group: Any = None


_last = _Last()


def note_group(group: Any) -> None:
    """Remembers the group of the context this thread entered last (``context_pool``)."""
    _last.group = group


def context_pool(active: Any = None) -> Any:
    """The ``MemPool`` this thread's contexts allocate from outside CUDA-graph captures: that of
    ``active`` (the innermost active context's group), else of the group this thread's last
    context used. Before any context, the device's any-group pool: segments allocated into it
    are registered by the next context exit of every group on this device."""
    group = active if active is not None else _last.group
    resolved = None if group is None else groups.resolve(group)
    if resolved is None:
        return pool.shared_pool()
    return pool.shared_pool(resolved.device, resolved.peer_set)
