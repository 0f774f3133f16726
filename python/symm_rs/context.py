"""``use_symmetric_memory``: route allocations into symm_rs's pools, register on exit.

Inside the context the current thread allocates from the symmetric pool of the group's device
(the communicator's device, whatever device the thread is on; the thread is switched to it for
the duration). On exit every segment of that pool the group's communicator has not registered
yet is registered, in allocation order, as a symmetric window, after the ranks agreed on what
they register (``symm_rs.registration``): ranks that allocated differently, failed, or never
arrive make every rank raise within the timeout instead of hanging. Inside a CUDA-graph capture
allocations come from the capture pool of the capture's graph pool (see ``symm_rs.pool``), and
their registration waits for that communicator's next exit outside a capture.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, Optional

import torch

from symm_rs import _native, agreement, env, registration
from symm_rs.capability import known_verdict
from symm_rs.checks import extent
from symm_rs.errors import SymmetricMemoryError
from symm_rs.groups import Group, kind_of, resolve
from symm_rs.pool import (
    PoolId,
    Route,
    allocating_for,
    capture_pool,
    grow,
    inner_route_wins,
    is_shared_pool,
    lane_of,
    pool_id,
    require_routing,
    shared_pool,
)
from symm_rs.pool import seal as seal_pool

log = logging.getLogger("symm_rs")


# -- graph pools ----------------------------------------------------------------------------
# The graph pool set for the captures that follow lives in the native module, where the
# common context path reads it without Python.


def set_graph_pool(pool: Any) -> None:
    """The graph pool the CUDA-graph captures that follow use (``torch.cuda.graph(g,
    pool=pool)``), as engines set it once per capture session; ``None`` clears it. Contexts
    inside those captures allocate from its capture pool without a ``graph_pool`` argument, and
    contexts before its first capture warm that pool up."""
    _native.set_graph_pool_id(None if pool is None else pool_id(pool))


def graph_pool() -> Optional[PoolId]:
    """The graph pool ``set_graph_pool`` set, if any."""
    return _native.graph_pool_id()


@contextlib.contextmanager
def graph_capture(pool: Any) -> Iterator[PoolId]:
    """``set_graph_pool(pool)`` for the duration of the block, then the previous setting."""
    previous = _native.graph_pool_id()
    current = pool_id(pool)
    _native.set_graph_pool_id(current)
    try:
        yield current
    finally:
        _native.set_graph_pool_id(previous)


def _capturing_graph_pool(explicit: Optional[Any]) -> tuple[PoolId, Any]:
    """The pool of the capture under way, and its graph when torch can name it."""
    if explicit is not None:
        return pool_id(explicit), None
    getter = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if getter is not None:
        graph = getter()
        return pool_id(graph.pool()), graph
    graph_pool_id = _native.graph_pool_id()
    if graph_pool_id is not None:
        return graph_pool_id, None
    raise SymmetricMemoryError(
        "use_symmetric_memory inside a CUDA-graph capture needs the capture's graph pool, and "
        f"torch {torch.__version__} cannot tell it: call symm_rs.set_graph_pool(pool) (or "
        "enter symm_rs.graph_capture(pool)) with the pool you pass to torch.cuda.graph(g, "
        "pool=pool), or pass graph_pool=pool"
    )


# -- process state ------------------------------------------------------------------------

_env_reservation = True  # SYMM_RS_RESERVE is applied once, at the first eager context


class _InNcclGroup(threading.local):
    """Registrations this thread's contexts postponed inside ``symm_rs.nccl_group()`` (NCCL
    writes a window only at the outermost group end), made when it ends, in order."""

    def __init__(self) -> None:
        self.postponed: list[tuple[Group, int, bool, Optional[float]]] = []


_in_nccl_group = _InNcclGroup()


def register_postponed_in_nccl_group() -> None:
    """Called when this thread's outermost ``nccl_group()`` ends."""
    postponed, _in_nccl_group.postponed = _in_nccl_group.postponed, []
    for group, lane, verify, timeout in postponed:
        registration.register(group, lane, verify, timeout)


def _annotated_oom(error: BaseException) -> Optional[BaseException]:
    reason = _native.take_last_error()
    if reason is None:
        return None
    return torch.OutOfMemoryError(f"{error}\nsymm_rs: the symmetric pool could not grow: {reason}")


def _route_for(group: Group, explicit: Optional[Any]) -> Route:
    """Where this thread's allocations go for a context on ``group``."""
    device, peers = group.device, group.peer_set
    if torch.cuda.is_current_stream_capturing():
        graph_pool_id, graph = _capturing_graph_pool(explicit)
        target = capture_pool(device, graph_pool_id, peers)
        target.sealed = True
        if graph is not None and hasattr(graph, "_retain_pool"):
            graph._retain_pool(target.pool)  # the graph keeps the pool its blocks live in
        pause = None if inner_route_wins(device) else graph_pool_id
        return Route.begin(device, target.pool, pause)
    inner_route_wins(device)  # probed now, outside any capture, for the captures to come
    graph_pool_id = _native.graph_pool_id()
    if graph_pool_id is not None:
        warm = capture_pool(device, graph_pool_id, peers)
        if not warm.sealed:
            # Before its first capture, S(P) serves the warm-up, which the capture then reuses.
            return Route.begin(device, warm.pool)
    return Route.begin(device, shared_pool(device, peers))


# The context manager is native (``symm_rs._native.use_symmetric_memory``): the common enter
# and exit run in Rust, and everything else comes here, through ``_enter`` and ``_exit`` (the
# only two functions the native side calls on a group's first use; handed over below, once).
use_symmetric_memory = _native.use_symmetric_memory


def _verify_default() -> bool:
    """What ``verify=None`` means: ``SYMM_RS_VERIFY``, read now."""
    return env.read_verify()


def _verifying(verify: Optional[bool]) -> bool:
    return _verify_default() if verify is None else verify


def _target(group: object) -> Any:
    """``group`` resolved as the native context keeps it (a ``_native.ContextTarget``; its
    ``group`` is None for a one-rank group). Its kind tells the native cache how to confirm it
    later."""
    kind = kind_of(group)
    resolved = resolve(group)
    if resolved is None:
        return _native.ContextTarget(kind, None)
    return _native.ContextTarget(kind, resolved, resolved.comm, resolved.device, resolved.peer_set)


def _enter(
    group: object,
    target: Any,
    graph_pool: Any,
    outer: Any,
    verify: Optional[bool],
    timeout: Optional[float],
) -> Any:
    """What the native context cannot do alone on enter: resolve ``group`` (when ``target`` is
    None: its first use, or a cache miss), then route this thread, unless the context around
    (``outer``) already routes where this one allocates. Returns a ``_native.Entered``.

    A refused enter (another device than the context around it, no GPU, a capture with no
    known pool) is posted to the group's peers first, when the ranks agree before registering,
    so that a peer waiting for this rank learns why at once."""
    if target is None:
        target = _target(group)
        if target.group is None:
            return _native.Entered(target)
    resolved = target.group
    nested = outer is not None
    try:
        if nested and not outer.route_needed(target):
            return _native.Entered(target)
        if nested:
            route, shared, lane = _enter_slow(resolved, graph_pool, nested=True)
        else:
            # Tagged before routing: the first context may grow the pool at once.
            with allocating_for(resolved.peer_set, 0):
                route, shared, lane = _enter_slow(resolved, graph_pool)
    except BaseException as error:
        if _verifying(verify):
            _enter_failed(resolved, error, timeout)
        raise
    return _native.Entered(target, route, shared, lane)


def _exit(
    group: Group,
    lane: int,
    verify: Optional[bool],
    timeout: Optional[float],
    error: Optional[BaseException],
) -> None:
    """What the native context cannot do alone on exit: register what this context allocated
    (the agreement first), or, when the block raised ``error``, report it to the peers."""
    if error is not None:
        _exit_failed(group, lane, _verifying(verify), timeout, error)
    else:
        _exit_register(group, lane, _verifying(verify), timeout)


class _Entered:
    """A route begun by ``_enter_slow``; ``end()`` ends it and puts the thread back on the
    device it was on."""

    __slots__ = ("restore_device", "route")

    def __init__(self, route: Route, restore_device: Optional[int]) -> None:
        self.route = route
        self.restore_device = restore_device

    def end(self) -> None:
        try:
            self.route.end()
        finally:
            if self.restore_device is not None:
                torch.cuda.set_device(self.restore_device)


_routing_checked = False


def _enter_slow(
    group: Group, explicit_graph_pool: Optional[Any], nested: bool = False
) -> tuple[Optional[_Entered], Any, int]:
    """Routes this thread for a context on ``group`` when the native fast path cannot: the
    first context of a thread, a thread on another device, a capture, a graph pool set, or a
    context nested in one for other ranks. Returns the route (``None``: a nested context keeps
    the route around it, because this torch puts the oldest route first); when it is this
    thread's shared pool on a thread already on the group's device, that pool's id, which later
    contexts route to natively; and the lane of the pool routed into."""
    global _routing_checked
    if not _routing_checked:
        require_routing()
        _routing_checked = True
    if nested and not inner_route_wins(group.device):
        return None, None, 0
    current = torch.cuda.current_device()
    if current != group.device:
        # The communicator decides the device: a worker thread that never called set_device
        # is on device 0, and its buffers must still land where the communicator runs.
        torch.cuda.set_device(group.device)
    try:
        if not nested:
            _apply_env_reservation(group)
        route = _route_for(group, explicit_graph_pool)
    except BaseException:
        if current != group.device:
            torch.cuda.set_device(current)
        raise
    restore = current if current != group.device else None
    plain = (
        not nested
        and restore is None
        and route.paused is None
        and is_shared_pool(group.device, route.pool, group.peer_set)
    )
    return _Entered(route, restore), route.pool.id if plain else None, route.lane


def _enter_failed(group: Group, error: BaseException, timeout: Optional[float]) -> None:
    """A context failed to enter: a peer that waits for this rank learns why at once."""
    agreement.notice_failure(group, _reason(error))


def _postponing() -> bool:
    return torch.cuda.is_current_stream_capturing() or _native.in_group()


def _exit_failed(
    group: Group, lane: int, verify: bool, timeout: Optional[float], error: BaseException
) -> None:
    """The block raised. Where this rank would have registered, it takes its part in that
    round as a failure, so peers raise at once with its reason; where it would not, it posts a
    notice a waiting peer reads. On OOM, says why the pool could not grow."""
    if verify and not _postponing():
        reason = _reason(error)
        if _native.is_up_to_date(group.comm, lane):
            agreement.notice_failure(group, reason)
        else:
            agreement.report_failure(group, "registration", reason, timeout)
    if isinstance(error, torch.OutOfMemoryError):
        annotated = _annotated_oom(error)
        if annotated is not None:
            raise annotated from error


def _exit_register(group: Group, lane: int, verify: bool, timeout: Optional[float]) -> None:
    """The exit that has something to register: inside a capture it waits for this
    communicator's next exit outside one (NCCL cannot register during a capture); inside an
    NCCL group, for the group's end; else it registers now, after the ranks agreed."""
    if torch.cuda.is_current_stream_capturing():
        _native.defer_registration(group.comm)
        return
    if _native.in_group():
        _native.defer_registration(group.comm)
        _in_nccl_group.postponed.append((group, lane, verify, timeout))
        return
    registration.register(group, lane, verify, timeout)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _apply_env_reservation(group: Group) -> None:
    """The first eager context of the process grows the shared pool by ``SYMM_RS_RESERVE``
    (routed into it right away; that context's exit registers it), and with ``SYMM_RS_SEAL=1``
    seals it."""
    global _env_reservation
    if not _env_reservation or torch.cuda.is_current_stream_capturing():
        return
    _env_reservation = False
    nbytes = env.read_bytes(env.RESERVE)
    if nbytes:
        device, peers = group.device, group.peer_set
        target = shared_pool(device, peers)
        grow(device, target, nbytes, 8 << 20, peers)
        if env.read_flag(env.SEAL):
            seal_pool(target, peers, _seal_note(group, nbytes, "SYMM_RS_RESERVE"))


def _seal_note(group: Group, nbytes: int, how: str) -> str:
    return (
        f"the symmetric pool of {group.name} is sealed (sealed mode) after {how} reserved "
        f"{nbytes} bytes, and growing it would need a registration its peers might not make; "
        f"reserve more up front ({how})"
    )


def register(group: object, timeout: Optional[float] = None) -> int:
    """Registers now every pool segment ``group`` has not registered yet, from every pool of
    its ranks (also what a capture postponed), after the ranks agreed on it. Collective; call
    it from one thread per rank. Returns how many windows were made."""
    resolved = resolve(group)
    if resolved is None:
        return 0
    return registration.register(resolved, _native.ALL_LANES, True, timeout)


def reserve(
    nbytes: int,
    group: object,
    small_bytes: int = 8 << 20,
    graph_pool: Optional[Any] = None,
    seal: bool = False,
) -> int:
    """Grows the symmetric pool of ``group``'s ranks once, up front, on the current stream, and
    registers it with ``group``, so steady-state allocations find cached, registered memory
    and never call ``ncclMemAlloc`` or register. With ``graph_pool``, grows the capture pool
    of that graph pool instead, so that captures into it reuse registered memory from their
    first allocation.

    One segment of ``nbytes`` serves requests of 1 MiB and more (torch splits it); requests
    under 1 MiB come from ``small_bytes`` of 2 MiB segments. Collective over ``group``.
    Returns how many new segments were made. ``SYMM_RS_RESERVE=4GiB`` grows the shared pool
    at the first ``use_symmetric_memory`` of the process.

    ``seal=True`` (sealed mode; ``SYMM_RS_SEAL=1`` for ``SYMM_RS_RESERVE``) then seals that
    pool: an allocation that would grow it later fails at once on the rank that makes it, with
    torch's out-of-memory error saying to reserve more, instead of needing a registration its
    peers might not make. A later ``reserve`` on a sealed pool grows it and seals it again.

    Raises:
        ValueError: ``nbytes`` or ``small_bytes`` is negative.
        SymmetricMemoryError: called during a CUDA-graph capture.
    """
    if nbytes < 0 or small_bytes < 0:
        raise ValueError(f"nbytes and small_bytes must be >= 0; got {nbytes}, {small_bytes}")
    resolved = resolve(group)
    if resolved is None:
        return 0
    if torch.cuda.is_current_stream_capturing():
        raise SymmetricMemoryError("reserve() cannot run during a CUDA-graph capture")
    before = _native.stats().segments_tracked
    device, peers = resolved.device, resolved.peer_set
    with torch.cuda.device(device):
        target = (
            shared_pool(device, peers)
            if graph_pool is None
            else capture_pool(device, pool_id(graph_pool), peers).pool
        )
        lane = lane_of(target)
        was_sealed = bool(_native.unseal_pool(peers, lane))
        grow(device, target, nbytes, small_bytes, peers)
        if seal or was_sealed:
            seal_pool(target, peers, _seal_note(resolved, nbytes, "reserve()"))
    registration.register(resolved, lane or _native.ALL_LANES)
    return _native.stats().segments_tracked - before


def _in_window(tensor: torch.Tensor, group: object) -> Optional[Group]:
    """``group`` resolved, when every byte of ``tensor`` lies inside one of its windows."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    resolved = resolve(group)
    if resolved is None or not tensor.is_cuda or tensor.numel() == 0:
        return None
    ptr, nbytes = extent(tensor)
    return resolved if _native.is_registered(ptr, nbytes, resolved.comm) else None


def is_registered(tensor: torch.Tensor, group: object) -> bool:
    """Whether every byte of ``tensor`` lies inside one symmetric window of ``group``."""
    return _in_window(tensor, group) is not None


def is_symmetric(tensor: torch.Tensor, group: object) -> bool:
    """Whether a collective of ``group`` on ``tensor`` can run NCCL's symmetric kernels: the
    tensor lies inside one window of the group's communicator, and that communicator can run
    them (``symm_rs.symmetric_kernels``). A one-rank group has no windows: ``False``."""
    resolved = _in_window(tensor, group)
    return resolved is not None and known_verdict(resolved) is not False


# Once, at import: the functions the native context calls (it looks none up by name).
_native.set_context_rules(_enter, _exit, _verify_default)
