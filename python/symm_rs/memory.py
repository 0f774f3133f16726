"""The shared symmetric pool and the context that routes allocations into it.

One ``torch.cuda.MemPool`` backed by ``ncclMemAlloc`` serves every group of the process. Inside
``use_symmetric_memory(group)`` the current thread allocates from it; on exit every pool segment
the group's communicator has not registered yet is registered, in allocation order, as a
symmetric window. Registration is collective: every rank of the group must leave the context the
same way, having allocated the same sizes in the same order.
"""

from __future__ import annotations

import atexit
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from symm_rs import _native
from symm_rs.groups import resolve
from symm_rs.library import require_windows

log = logging.getLogger("symm_rs")

_C: Any = torch._C
# Renamed across torch releases; resolve once so the hot path is a plain call.
_begin_thread = getattr(_C, "_cuda_beginAllocateCurrentThreadToPool", None)
_begin_stream = getattr(_C, "_cuda_beginAllocateCurrentStreamToPool", None)
_end_pool = getattr(_C, "_cuda_endAllocateToPool", None) or getattr(
    _C, "_cuda_endAllocateCurrentStreamToPool", None
)
_release_pool = getattr(_C, "_cuda_releasePool", None)


@dataclass
class _Pool:
    pool: Any
    allocator: Any  # keeps torch's CUDAPluggableAllocator (and our plugs) referenced


class _ThreadState(threading.local):
    """Per-thread nesting: torch refuses to route one thread to the same pool twice, so only
    the outermost context switches pools; every level still registers its own group."""

    def __init__(self) -> None:
        self.depth = 0
        self.device = -1
        self.paused_graph_pool: Optional[tuple[int, int]] = None


_pool_lock = threading.Lock()
_pool: Optional[_Pool] = None
_thread = _ThreadState()
# Communicators whose registration waits for the end of a CUDA-graph capture, in first-seen
# order (the same order on every rank, so the deferred registrations line up).
_deferred: dict[int, None] = {}
_deferred_lock = threading.Lock()


# At interpreter exit the communicators holding windows may already be destroyed; deregistering
# on them would touch freed memory, so the free plug then leaves segments to the OS.
atexit.register(_native.mark_exiting)


def _require_gpu() -> None:
    if not torch.cuda.is_available():
        raise _native.SymmetricMemoryError(
            "symmetric memory needs a CUDA GPU, and torch sees none; "
            "pass disabled=True to run this code path without one"
        )
    missing = [
        name
        for name, fn in (
            ("_cuda_beginAllocateCurrentThreadToPool", _begin_thread),
            ("_cuda_endAllocateToPool", _end_pool),
            ("_cuda_releasePool", _release_pool),
        )
        if fn is None
    ]
    if missing:
        raise _native.SymmetricMemoryError(
            f"torch {torch.__version__} lacks {', '.join(missing)}; symm_rs needs torch >= 2.8"
        )


def shared_pool() -> Any:
    """The process-wide ``torch.cuda.MemPool`` whose segments come from ``ncclMemAlloc``."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _require_gpu()
                require_windows()
                allocator = torch.cuda.memory.CUDAPluggableAllocator(
                    _native.__file__, "symm_rs_alloc", "symm_rs_free"
                )
                _pool = _Pool(torch.cuda.MemPool(allocator.allocator()), allocator)
    return _pool.pool


def destroy_pool() -> int:
    """Frees every segment of the shared pool, deregistering each window before its memory is
    released. Collective when windows exist (all ranks call it). Returns how many segments were
    freed. No tensor allocated from the pool may still be alive; the next
    ``use_symmetric_memory`` starts a new pool.

    Raises:
        SymmetricMemoryError: called inside ``use_symmetric_memory``, or pool tensors are alive.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            return 0
        if _thread.depth:
            raise _native.SymmetricMemoryError("destroy_pool() called inside use_symmetric_memory")
        gc.collect()
        alive = [
            block
            for segment in _pool.pool.snapshot()
            for block in segment.get("blocks", [])
            if block.get("state") == "active_allocated"
        ]
        if alive:
            raise _native.SymmetricMemoryError(
                f"{len(alive)} tensor(s) allocated from the symmetric pool are still alive "
                f"({sum(b['size'] for b in alive)} bytes); drop them before destroy_pool()"
            )
        before = int(_native.stats()["segments_freed"])
        doomed, _pool = _pool, None
    del doomed
    gc.collect()
    torch.cuda.synchronize()
    return int(_native.stats()["segments_freed"]) - before


def _capturing_graph_pool(graph_pool: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    if not torch.cuda.is_current_stream_capturing():
        return None
    if graph_pool is not None:
        return graph_pool
    getter = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if getter is None:
        raise _native.SymmetricMemoryError(
            "use_symmetric_memory inside a CUDA-graph capture needs the capture's pool on this "
            f"torch ({torch.__version__}): pass graph_pool=graph.pool()"
        )
    pool = getter().pool()
    return (int(pool[0]), int(pool[1]))


def _flush_deferred() -> None:
    """Registers the communicators whose registration a capture postponed."""
    if not _deferred:
        return
    with _deferred_lock:
        pending = list(_deferred)
        _deferred.clear()
    for comm in pending:
        _native.register_pending(comm)


def _annotated_oom(error: BaseException) -> Optional[BaseException]:
    reason = _native.take_last_error()
    if reason is None:
        return None
    return torch.OutOfMemoryError(f"{error}\nsymm_rs: the symmetric pool could not grow: {reason}")


class use_symmetric_memory:
    """Allocate from the symmetric pool, and register new segments with ``group`` on exit.

    Arguments:
        group: the group whose collectives will use the buffers (see ``symm_rs.groups``).
        disabled: make the context a no-op (as a one-rank group does).
        graph_pool: the capture's pool id, only needed inside a CUDA-graph capture on a torch
            without ``CUDAGraph.get_currently_capturing_graph``.

    Raises:
        TypeError: ``group`` is not a kind symm_rs accepts.
        SymmetricMemoryError: no GPU, or torch too old.
        NcclLibraryError: the NCCL in use cannot register symmetric windows.
        RegistrationError / NcclError: registration failed on exit.
    """

    __slots__ = ("_comm", "_device", "_graph_pool", "_group", "_outermost", "_pool", "disabled")

    def __init__(
        self,
        group: object,
        disabled: bool = False,
        graph_pool: Optional[tuple[int, int]] = None,
    ) -> None:
        self._group = group
        self.disabled = bool(disabled)
        self._graph_pool = graph_pool
        self._comm = 0
        self._device = -1
        self._pool: Any = None
        self._outermost = False

    def __enter__(self) -> use_symmetric_memory:
        if self.disabled:
            return self
        resolved = resolve(self._group)
        if resolved is None:
            return self
        _require_gpu()
        self._comm = resolved.comm
        self._pool = shared_pool()
        state = _thread
        self._outermost = state.depth == 0
        if self._outermost:
            device = torch.cuda.current_device()
            graph_pool = _capturing_graph_pool(self._graph_pool)
            if graph_pool is not None:
                # The capture's own pool would win the allocator's routing; pause it.
                _end_pool(device, graph_pool)
            _begin_thread(device, self._pool.id)
            state.device = device
            state.paused_graph_pool = graph_pool
        state.depth += 1
        self._device = state.device
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._pool is None:
            return
        state = _thread
        state.depth -= 1
        if self._outermost:
            _end_pool(self._device, self._pool.id)
            _release_pool(self._device, self._pool.id)
            if state.paused_graph_pool is not None:
                _begin_stream(self._device, state.paused_graph_pool)
                # begin counted one more use of the capture's pool; its graph holds the real one.
                _release_pool(self._device, state.paused_graph_pool)
                state.paused_graph_pool = None
        comm, self._pool = self._comm, None
        if exc_type is not None:
            if isinstance(exc, torch.OutOfMemoryError):
                annotated = _annotated_oom(exc)
                if annotated is not None:
                    raise annotated from exc
            return
        if torch.cuda.is_current_stream_capturing():
            with _deferred_lock:
                _deferred.setdefault(comm, None)
            return
        _flush_deferred()
        _native.register_pending(comm)


def register(group: object) -> int:
    """Registers now every pool segment ``group`` has not registered yet (collective).

    Also runs registrations a CUDA-graph capture postponed. Returns how many windows were made.
    """
    _flush_deferred()
    resolved = resolve(group)
    if resolved is None:
        return 0
    return int(_native.register_pending(resolved.comm))


def release(group: object) -> int:
    """Deregisters every window ``group`` holds. Call it before destroying the group's
    communicator (``destroy_process_group``, ``Communicator.close``). Returns how many."""
    resolved = resolve(group)
    if resolved is None:
        return 0
    return int(_native.release_comm(resolved.comm))


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """``(first byte, byte length)`` a tensor's elements occupy."""
    if tensor.numel() == 0:
        return (tensor.data_ptr(), 0)
    # torch strides are never negative, so the first element is the lowest address.
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.data_ptr(), span * tensor.element_size())


def is_symmetric(tensor: torch.Tensor, group: object) -> bool:
    """Whether every byte of ``tensor`` lies inside one symmetric window of ``group``.

    A one-rank group has no windows, so the answer is then ``False``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    resolved = resolve(group)
    if resolved is None or not tensor.is_cuda or tensor.numel() == 0:
        return False
    ptr, nbytes = _extent(tensor)
    return bool(_native.is_registered(ptr, nbytes, resolved.comm))


def stats() -> dict[str, Any]:
    """Segments, bytes, windows per communicator, and failure counters of the symmetric pool."""
    out = dict(_native.stats())
    out["deferred_registrations"] = len(_deferred)
    return out


def segments() -> Iterator[tuple[int, int, int, int]]:
    """``(ptr, size, device, windows)`` of every pool segment, in allocation order."""
    yield from _native.stats()["segment_list"]
