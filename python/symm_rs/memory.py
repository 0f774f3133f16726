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
import os
import re
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from symm_rs import _native
from symm_rs.groups import forget, resolve
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
                log.info("symmetric pool created (MemPool id %s)", _pool.pool.id)
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
    log.debug("registering for %d communicator(s) after a CUDA-graph capture", len(pending))
    for comm in pending:
        _native.register_pending(comm)


_VERIFY_RECORD = 16  # int64s per rank: count, total bytes, fingerprint, first 13 sizes
_NCCL_INT64 = 4  # ncclInt64
_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512M"``, ``"1048576"`` as a byte count.

    Raises:
        ValueError: the text is not a size.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4GiB, 512MiB or 1048576)")
    return int(match.group(1)) * _SIZE_SUFFIX[match.group(2)]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _all_gather_ints(comm: int, nranks: int, device: int, record: list[int]) -> list[list[int]]:
    """Every rank's ``record`` (same length on all ranks), gathered over ``comm`` on the
    current stream; for symm_rs's small cross-rank checks. Collective."""
    on = torch.device("cuda", device)
    send = torch.tensor(record, dtype=torch.int64, device=on)
    recv = torch.empty(nranks * len(record), dtype=torch.int64, device=on)
    stream = torch.cuda.current_stream(on).cuda_stream
    _native.all_gather_on(comm, send.data_ptr(), recv.data_ptr(), len(record), _NCCL_INT64, stream)
    return recv.view(nranks, len(record)).tolist()


def verify_pending(comm: int) -> None:
    """Checks that every rank of ``comm`` is about to register the same segment sizes, so a
    disagreement is an error on every rank instead of a hang inside NCCL. Collective: one
    small all-gather on ``comm``.

    Raises:
        RegistrationError: the ranks disagree; the message names each rank's segments.
    """
    sizes = list(_native.pending_sizes(comm))
    nranks = int(_native.comm_size(comm))
    record = [len(sizes), sum(sizes), zlib.crc32(repr(sizes).encode())]
    record += sizes[: _VERIFY_RECORD - 3]
    record += [-1] * (_VERIFY_RECORD - len(record))
    rows = _all_gather_ints(comm, nranks, int(_native.comm_device(comm)), record)
    if all(row == rows[0] for row in rows):
        return

    def describe(row: list[int]) -> str:
        shown = [x for x in row[3:] if x >= 0]
        more = "" if row[0] <= len(shown) else f" +{row[0] - len(shown)} more"
        return f"{row[0]} segment(s), {row[1]} bytes, sizes {shown}{more}"

    groups: dict[str, list[int]] = {}
    for rank, row in enumerate(rows):
        groups.setdefault(describe(row), []).append(rank)
    detail = "; ".join(f"rank(s) {ranks}: {what}" for what, ranks in groups.items())
    raise _native.RegistrationError(
        f"ranks of communicator {comm:#x} disagree on the segments to register, which would "
        f"hang every rank inside ncclCommWindowRegister: {detail}. Every rank must allocate "
        "the same sizes in the same order inside use_symmetric_memory (reserve() up front "
        "avoids growth at run time)"
    )


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
        verify: before registering, check that every rank is about to register the same
            segment sizes (one small all-gather); default from ``SYMM_RS_VERIFY``.

    Inside a CUDA-graph capture, allocations still come from the pool (the capture's own pool
    is paused), but registration is deferred to the next exit outside a capture, or to
    ``symm_rs.register(group)``: NCCL cannot register while a stream is capturing. A collective
    captured on a buffer that is not registered yet runs NCCL's regular kernels; ``reserve``
    up front (or a warm-up pass before capture) makes capture reuse registered segments.

    Raises:
        TypeError: ``group`` is not a kind symm_rs accepts.
        SymmetricMemoryError: no GPU, or torch too old.
        NcclLibraryError: the NCCL in use cannot register symmetric windows.
        RegistrationError / NcclError: registration failed on exit.
    """

    __slots__ = (
        "_comm",
        "_device",
        "_graph_pool",
        "_group",
        "_outermost",
        "_pool",
        "disabled",
        "verify",
    )

    def __init__(
        self,
        group: object,
        disabled: bool = False,
        graph_pool: Optional[tuple[int, int]] = None,
        verify: Optional[bool] = None,
    ) -> None:
        self._group = group
        self.disabled = bool(disabled)
        self._graph_pool = graph_pool
        self.verify = _env_flag("SYMM_RS_VERIFY") if verify is None else bool(verify)
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
        if _env_reservation and not torch.cuda.is_current_stream_capturing():
            _grow_pool_from_env()
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
        if self.verify:
            verify_pending(comm)
        made = _native.register_pending(comm)
        if made:
            log.debug("registered %d new segment(s) with communicator %#x", made, comm)


_env_reservation = os.environ.get("SYMM_RS_RESERVE", "").strip()
_reserved_bytes = 0


def _grow_pool_from_env() -> None:
    """The first context of the process grows the pool by ``SYMM_RS_RESERVE`` bytes (while
    allocations already route to the pool; that context's exit registers it)."""
    global _env_reservation
    text, _env_reservation = _env_reservation, ""
    _grow(parse_bytes(text))


def _grow(nbytes: int, small_bytes: int = 8 << 20) -> None:
    """Allocates then frees, inside the pool routing, one ``nbytes`` block (one segment: large
    requests get a segment of their own size) and ``small_bytes`` of 1 MiB blocks (requests
    under 1 MiB come from separate 2 MiB segments), leaving them cached in the pool."""
    global _reserved_bytes
    device = torch.cuda.current_device()
    big = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
    small = [
        torch.empty(1 << 20, dtype=torch.uint8, device=device) for _ in range(small_bytes >> 20)
    ]
    del big, small
    _reserved_bytes += nbytes + small_bytes
    log.info("symmetric pool grown by %d + %d bytes", nbytes, small_bytes)


def reserve(nbytes: int, group: object, small_bytes: int = 8 << 20) -> int:
    """Grows the symmetric pool once, up front, and registers it with ``group``, so steady-state
    allocations find cached, registered memory and never call ``ncclMemAlloc`` or register.

    One segment of ``nbytes`` serves requests of 1 MiB and more (torch splits it); requests
    under 1 MiB come from ``small_bytes`` of 2 MiB segments. Collective over ``group``.
    Returns how many new segments were made. ``SYMM_RS_RESERVE=4GiB`` does the same at the
    first ``use_symmetric_memory`` of the process.

    Raises:
        ValueError: ``nbytes`` or ``small_bytes`` is negative.
    """
    if nbytes < 0 or small_bytes < 0:
        raise ValueError(f"nbytes and small_bytes must be >= 0; got {nbytes}, {small_bytes}")
    before = int(_native.stats()["segments_tracked"])
    with use_symmetric_memory(group) as context:
        if context._pool is None:
            return 0
        _grow(nbytes, small_bytes)
    return int(_native.stats()["segments_tracked"]) - before


def pool_usage() -> dict[str, int]:
    """Bytes the symmetric pool holds and how many of them live tensors use (from torch's pool
    snapshot: fine for monitoring, too slow for a hot path)."""
    if _pool is None:
        return {"pool_bytes": 0, "in_use_bytes": 0, "reserved_bytes": _reserved_bytes}
    segments = _pool.pool.snapshot()
    return {
        "pool_bytes": sum(int(s["total_size"]) for s in segments),
        "in_use_bytes": sum(int(s["allocated_size"]) for s in segments),
        "reserved_bytes": _reserved_bytes,
    }


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
    forget(group)
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


def check_layout(tensors: Sequence[torch.Tensor], group: object) -> None:
    """Checks that each tensor sits at the same segment position and offset on every rank of
    ``group``, which symmetric kernels assume (they address a peer's copy at the local offset).
    Collective: one small all-gather. A debugging aid, not a per-call check.

    Raises:
        RegistrationError: some tensor's placement differs between ranks; the message says
            which tensor and each rank's placement.
    """
    resolved = resolve(group)
    if resolved is None:
        return
    record: list[int] = []
    for tensor in tensors:
        ptr, nbytes = _extent(tensor)
        index, offset = _native.segment_position(ptr, nbytes) or (-1, -1)
        record += [index, offset, nbytes]
    rows = _all_gather_ints(
        resolved.comm, resolved.size, torch.cuda.current_device(), record or [0]
    )
    for i in range(len(tensors)):
        placements = [tuple(row[3 * i : 3 * i + 3]) for row in rows]
        if any(p != placements[0] for p in placements) or placements[0][0] < 0:
            shown = ", ".join(
                f"rank {r}: segment {p[0]} offset {p[1]} ({p[2]} bytes)"
                for r, p in enumerate(placements)
            )
            raise _native.RegistrationError(
                f"tensor {i} is not placed symmetrically ({shown}); symmetric kernels would "
                "read the wrong memory on peers. Allocate the same sizes in the same order on "
                "every rank, and do not free symmetric tensors that other streams still use"
            )


def stats() -> dict[str, Any]:
    """Segments, bytes, windows per communicator, and failure counters of the symmetric pool."""
    out = dict(_native.stats())
    out["deferred_registrations"] = len(_deferred)
    out.update(pool_usage())
    return out
