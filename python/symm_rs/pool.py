"""The memory pools symm_rs allocates from, and how allocations are routed into them.

Every pool is a ``torch.cuda.MemPool`` on the same ``ncclMemAlloc`` plugs, so every segment is
in the one segment table. Pools are kept apart by *peer set* (the ranks of the group whose
context allocates, ``symm_rs.groups.peer_set``): registration is collective, and only the ranks
of one group are sure to allocate the same sequence. A sub-group's allocations (TP ``{0,1}``
and ``{2,3}`` grow differently) never land in the world's pool, and each segment is registered
only by the communicators over its own ranks.

* one **shared pool** per device, thread and peer set, for allocations made outside CUDA-graph
  captures (torch routes only one thread at a time into a pool, so each thread that enters a
  context gets its own; every rank's thread allocates the same sequence, so placement stays
  symmetric). Each shared pool is a *lane* of the segment table: a registration takes the
  segments of one lane, in that lane's order, so threads that allocate for the same ranks at
  once never interleave their registrations differently on different ranks. A pool outlives its
  thread: the next thread that needs one for the same device and ranks takes it over (pools
  are never destroyed behind the user's back: torch aborts the process when a pool is destroyed
  while any thread routes allocations);
* one **capture pool** per (device, graph pool, peer set): allocations made inside a capture
  into graph pool P come from capture pool S(P), and so do blocks freed during that capture.
  Eager code never receives a block of S(P) once a capture has used it, so no block a live graph
  writes is ever handed to code outside that graph's replays. Captures that share P share S(P),
  as they share P (torch's rule for a shared graph pool). Before its first capture, S(P) also
  serves the warm-up runs made while P is set (``set_graph_pool``), so that the capture reuses
  warmed, registered segments and its collectives run NCCL's symmetric kernels.

Routing uses torch's allocator routing (``_cuda_beginAllocateCurrentThreadToPool``): this
thread's allocations, on every stream, go to the pool. torch >= 2.10 consults the newest route
first, so a capture's own route is left untouched underneath; older torch consults the oldest
first, and the capture's route has to be paused (see ``Route``). Every route symm_rs opens is
counted by the native gate, and ``destroy_pool``/``release_graph_pool`` refuse to destroy a
pool while one is open.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from symm_rs import _native
from symm_rs.errors import SymmetricMemoryError
from symm_rs.library import require_windows

log = logging.getLogger("symm_rs")

PoolId = tuple[int, int]


def require_routing() -> None:
    """Raises unless torch has a GPU and the routing functions symm_rs uses (the native
    context's, looked up once in Rust: ``_native.routing_functions``)."""
    if not torch.cuda.is_available():
        raise SymmetricMemoryError(
            "symmetric memory needs a CUDA GPU, and torch sees none; "
            "pass disabled=True to run this code path without one"
        )
    _native.routing_functions()


@dataclass
class CapturePool:
    """S(P): the symmetric pool of the captures into graph pool P."""

    pool: Any
    graph_pool: PoolId
    # Set by the first capture that allocates from it; eager code is never routed here after.
    sealed: bool = False


@dataclass
class _Pools:
    allocator: Any = None  # keeps torch's CUDAPluggableAllocator (and our plugs) referenced
    shared: dict[tuple[int, int, int], Any] = field(default_factory=dict)
    capture: dict[tuple[int, PoolId, int], CapturePool] = field(default_factory=dict)
    inner_route_wins: dict[int, bool] = field(default_factory=dict)
    # The route-order probe's pools, kept: destroying a pool can abort the process.
    probes: list[Any] = field(default_factory=list)
    # The lane of each shared pool (by pool id); capture pools are lane 0 (every lane's).
    lanes: dict[PoolId, int] = field(default_factory=dict)
    # Times pools were freed (destroy_pool, release_graph_pool): ranks compare it before they
    # register, since a rank that freed alone has different windows than its peers.
    frees: int = 0


_lock = threading.RLock()
_pools = _Pools()
_lane_ids = itertools.count(1)  # 0 is the native "every lane" tag


def _new_pool(device: int) -> Any:
    if _pools.allocator is None:
        require_routing()
        require_windows()
        _pools.allocator = torch.cuda.memory.CUDAPluggableAllocator(
            _native.__file__, "symm_rs_alloc", "symm_rs_free"
        )
    # A MemPool belongs to the device current when it is made.
    with torch.cuda.device(device):
        return torch.cuda.MemPool(_pools.allocator.allocator())


def shared_pool(device: Optional[int] = None, peer_set: int = 0) -> Any:
    """This thread's ``torch.cuda.MemPool`` on ``device`` (default: the current one) whose
    segments come from ``ncclMemAlloc``, for allocations outside CUDA-graph captures by groups
    of ``peer_set`` (a ``Group.peer_set``; the default 0 is a pool every group registers)."""
    index = torch.cuda.current_device() if device is None else int(device)
    key = (index, threading.get_ident(), int(peer_set))
    pool = _pools.shared.get(key)
    if pool is None:
        with _lock:
            pool = _pools.shared.get(key)
            if pool is None:
                pool = _pools.shared[key] = _orphaned_pool(index, int(peer_set)) or _new_pool(index)
                _pools.lanes.setdefault(pool_id(pool), next(_lane_ids))
                log.info(
                    "symmetric pool on cuda:%d (MemPool id %s) for this thread", index, pool.id
                )
    return pool


def _orphaned_pool(device: int, peer_set: int) -> Optional[Any]:
    """A shared pool whose thread has ended, taken over (with its lane and cached blocks) by
    the calling thread instead of making another: pools are never destroyed behind the user's
    back, so this is what keeps their number at the most threads alive at once."""
    alive = {t.ident for t in threading.enumerate()}
    for key in list(_pools.shared):
        if key[0] == device and key[2] == peer_set and key[1] not in alive:
            return _pools.shared.pop(key)
    return None


def lane_of(pool: Any) -> int:
    """The segment-table lane of a symm_rs pool (0, every lane, for capture pools)."""
    return _pools.lanes.get(pool_id(pool), 0)


def frees() -> int:
    """How many times this process freed symm_rs pools (``destroy_pool``,
    ``release_graph_pool``)."""
    return _pools.frees


def is_shared_pool(device: int, pool: Any, peer_set: int = 0) -> bool:
    """Whether ``pool`` is this thread's shared pool on ``device`` for ``peer_set`` (never
    creates one)."""
    return _pools.shared.get((device, threading.get_ident(), peer_set)) is pool


def capture_pool(device: int, graph_pool: PoolId, peer_set: int = 0) -> CapturePool:
    """S(``graph_pool``) of ``peer_set`` on ``device``, created on first use and kept until
    ``destroy_pool`` or ``release_graph_pool``: graphs that used it write into its blocks on
    every replay."""
    key = (device, graph_pool, int(peer_set))
    found = _pools.capture.get(key)
    if found is None:
        with _lock:
            found = _pools.capture.get(key)
            if found is None:
                found = _pools.capture[key] = CapturePool(_new_pool(device), graph_pool)
                log.info("capture pool for graph pool %s created on cuda:%d", graph_pool, device)
    return found


def inner_route_wins(device: int) -> bool:
    """Whether torch routes an allocation to the most recently begun pool (torch >= 2.10) or
    to the first (older torch). Probed once per device with two small private pools; inside a
    capture, where probing would allocate into the graph, the answer is the safe one."""
    known = _pools.inner_route_wins.get(device)
    if known is not None:
        return known
    if torch.cuda.is_current_stream_capturing() or not hasattr(torch.cuda.MemPool, "snapshot"):
        return False
    with _lock:
        known = _pools.inner_route_wins.get(device)
        if known is not None:
            return known
        with torch.cuda.device(device):
            outer, inner = torch.cuda.MemPool(), torch.cuda.MemPool()
        # Kept for the life of the process: destroying a pool while another thread routes its
        # allocations aborts the process inside torch.
        _pools.probes += [outer, inner]
        _native.route_opened()
        try:
            with torch.cuda.use_mem_pool(outer, device), torch.cuda.use_mem_pool(inner, device):
                probe = torch.empty(1, device=torch.device("cuda", device))
        finally:
            _native.route_closed()
        address = probe.data_ptr()
        wins = any(
            int(s["address"]) <= address < int(s["address"]) + int(s["total_size"])
            for s in inner.snapshot()
        )
        del probe
        _pools.inner_route_wins[device] = wins
        return wins


@dataclass
class Route:
    """This thread's allocations on ``device`` routed to ``pool`` until ``end``. When the
    capture's own route would win over ours (older torch), it is paused and, at ``end``,
    resumed for this thread (all its streams), as SGLang does."""

    device: int
    pool: Any
    paused: Optional[PoolId] = None

    @property
    def lane(self) -> int:
        return lane_of(self.pool)

    @classmethod
    def begin(cls, device: int, pool: Any, pause: Optional[PoolId] = None) -> Route:
        begin_thread, end_route, _ = _native.routing_functions()
        # Counted before it begins: no pool may be destroyed while a route is open.
        _native.route_opened()
        try:
            if pause is not None:
                try:
                    end_route(device, pause)
                except RuntimeError as e:
                    raise SymmetricMemoryError(
                        f"the CUDA-graph capture in progress does not allocate from graph pool "
                        f"{pause} ({e}); pass the pool the capture uses (torch.cuda.graph(g, "
                        "pool=p) and symm_rs.set_graph_pool(p))"
                    ) from None
            begin_thread(device, pool.id)
        except BaseException:
            _native.route_closed()
            raise
        return cls(device, pool, pause)

    def end(self) -> None:
        begin_thread, end_route, release_route = _native.routing_functions()
        try:
            end_route(self.device, self.pool.id)
            release_route(self.device, self.pool.id)
            if self.paused is not None:
                begin_thread(self.device, self.paused)
                # begin counted one more use of the graph's pool; its graph holds the real one.
                release_route(self.device, self.paused)
        finally:
            _native.route_closed()


def stats() -> Any:
    """Segments, bytes, windows per communicator, failure counters and postponed
    registrations, read from the segment table (no pool snapshot): a ``symm_rs._native.Stats``
    with one attribute per figure (``.as_dict()`` for logging)."""
    return _native.stats()


def all_pools() -> list[Any]:
    """Every MemPool symm_rs made (shared and capture pools)."""
    return [*_pools.shared.values(), *(c.pool for c in _pools.capture.values())]


def pool_usage() -> dict[str, int]:
    """Bytes symm_rs's pools hold and how many of them live tensors use (from torch's pool
    snapshots: fine for monitoring, too slow for a hot path)."""
    segments = [s for pool in all_pools() for s in pool.snapshot()]
    return {
        "pool_bytes": sum(int(s["total_size"]) for s in segments),
        "in_use_bytes": sum(int(s["allocated_size"]) for s in segments),
    }


def _require_no_live_tensors(pools: list[Any]) -> None:
    gc.collect()
    alive = [
        block
        for pool in pools
        for segment in pool.snapshot()
        for block in segment.get("blocks", [])
        if block.get("state") == "active_allocated"
    ]
    if alive:
        raise SymmetricMemoryError(
            f"{len(alive)} tensor(s) allocated from symm_rs's pools are still alive "
            f"({sum(int(b['size']) for b in alive)} bytes); drop them (and any CUDA graph "
            "captured with them) first"
        )


@contextlib.contextmanager
def _no_routes_open(what: str) -> Iterator[None]:
    """Holds off every symm_rs route while pools are destroyed, or raises when one is open:
    torch aborts the process (an internal assert) when a pool is destroyed while any thread
    routes allocations."""
    if not _native.begin_pool_drop():
        raise SymmetricMemoryError(
            f"{what} while {_native.open_routes()} use_symmetric_memory route(s) are open (on "
            "this or another thread): torch would abort the process. Call it when no context "
            "is active"
        )
    try:
        yield
    finally:
        _native.end_pool_drop()


def _free(pools: list[Any]) -> int:
    """Drops the last references to ``pools`` (no longer in the registry); torch then hands
    their segments to the free plug. Returns how many segments were freed."""
    before = _native.stats().segments_freed
    _native.pools_changed()  # no thread may route natively into a pool id it cached
    # Work still queued on the segments must finish before their windows are unmapped.
    torch.cuda.synchronize()
    for key in [pool_id(p) for p in pools]:
        _pools.lanes.pop(key, None)
    del pools[:]  # the last references: torch hands the segments to the free plug
    gc.collect()
    torch.cuda.synchronize()
    _pools.frees += 1
    return _native.stats().segments_freed - before


def destroy_pool() -> int:
    """Frees every segment of symm_rs's pools, deregistering each window before its memory is
    released (local to this rank). No tensor allocated from them, and no CUDA graph that
    captured into them, may still be alive. Returns how many segments were freed.

    Raises:
        SymmetricMemoryError: tensors from the pools are alive.
    """
    with _lock:
        pools = all_pools()
        if not pools:
            # Counted all the same: ranks compare how often they called it, pools or not.
            _pools.frees += 1
            return 0
        _require_no_live_tensors(pools)
        with _no_routes_open("destroy_pool()"):
            _pools.shared.clear()
            _pools.capture.clear()
            return _free(pools)


def release_graph_pool(graph_pool: Any) -> int:
    """Frees the capture pool of ``graph_pool`` (on every device), once the graphs captured
    into it are gone. Returns how many segments were freed.

    Raises:
        SymmetricMemoryError: tensors from that pool are alive.
    """
    wanted = pool_id(graph_pool)
    with _lock:
        keys = [k for k in _pools.capture if k[1] == wanted]
        pools = [_pools.capture[k].pool for k in keys]
        if not pools:
            _pools.frees += 1  # counted all the same, as destroy_pool
            return 0
        _require_no_live_tensors(pools)
        with _no_routes_open("release_graph_pool()"):
            for k in keys:
                del _pools.capture[k]
            return _free(pools)


def pool_id(pool: Any) -> PoolId:
    """A graph pool as torch's id tuple: from ``graph_pool_handle()``, a ``MemPool``, or a
    ``CUDAGraph`` (its ``pool()``).

    Raises:
        TypeError: none of those.
    """
    if isinstance(pool, torch.cuda.CUDAGraph):
        pool = pool.pool()
    candidate = getattr(pool, "id", pool)
    if (
        isinstance(candidate, tuple)
        and len(candidate) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in candidate)
    ):
        return (int(candidate[0]), int(candidate[1]))
    raise TypeError(
        "a graph pool must be what torch.cuda.graph_pool_handle() returns, a "
        f"torch.cuda.MemPool, or a torch.cuda.CUDAGraph; got {type(pool).__name__}"
    )


@contextlib.contextmanager
def allocating_for(peer_set: int, lane: int) -> Iterator[None]:
    """The segments this thread allocates meanwhile are tagged with ``peer_set`` and
    ``lane``."""
    previous = _native.allocate_for(peer_set, lane)
    try:
        yield
    finally:
        _native.allocate_for(*previous)


def seal(pool: Any, peer_set: int, note: str) -> None:
    """Sealed mode: from now on a new segment for ``pool`` (of ``peer_set``) fails at once,
    on the rank that would grow it, with torch's out-of-memory error carrying ``note``,
    instead of growing a pool whose new segment would need a registration its peers might
    not make."""
    _native.seal_pool(peer_set, lane_of(pool), note)


def grow(device: int, pool: Any, nbytes: int, small_bytes: int, peer_set: int = 0) -> None:
    """Allocates then frees, routed into ``pool`` (of ``peer_set``), one ``nbytes`` block
    (large requests get a segment of their own size) and ``small_bytes`` of 1 MiB blocks
    (requests under 1 MiB come from 2 MiB segments), leaving them cached on the current
    stream."""
    on = torch.device("cuda", device)
    with allocating_for(peer_set, lane_of(pool)):
        route = Route.begin(device, pool)
        try:
            big = torch.empty(nbytes, dtype=torch.uint8, device=on) if nbytes else None
            small = [
                torch.empty(1 << 20, dtype=torch.uint8, device=on) for _ in range(small_bytes >> 20)
            ]
            del big, small
        finally:
            route.end()
    log.info("symmetric pool grown by %d + %d bytes on cuda:%d", nbytes, small_bytes, device)
