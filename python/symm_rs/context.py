"""``use_symmetric_memory``: route allocations into symm_rs's pools, register on exit.

Inside the context the current thread allocates from the symmetric pool of the group's device
(the communicator's device, whatever device the thread is on; the thread is switched to it for
the duration). On exit every pool segment the group's communicator has not registered yet is
registered, in allocation order, as a symmetric window. Registration is collective: every rank
of the group must leave the context the same way, having allocated the same sizes in the same
order. Inside a CUDA-graph capture allocations come from the capture pool of the capture's graph
pool (see ``symm_rs.pool``) and registration waits until the capture is over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch

from symm_rs import _native, agreement, env
from symm_rs.capability import known_verdict, should_register
from symm_rs.groups import Group, is_process_group, on_forget, resolve
from symm_rs.library import known_nccl_issues, library_info
from symm_rs.pool import (
    PoolId,
    Route,
    capture_pool,
    grow,
    inner_route_wins,
    is_shared_pool,
    pool_id,
    require_routing,
    shared_pool,
)

log = logging.getLogger("symm_rs")


class NcclVersionWarning(UserWarning):
    """The NCCL in use has a known defect that affects symmetric memory (once per process)."""


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
    raise _native.SymmetricMemoryError(
        "use_symmetric_memory inside a CUDA-graph capture needs the capture's graph pool, and "
        f"torch {torch.__version__} cannot tell it: call symm_rs.set_graph_pool(pool) (or "
        "enter symm_rs.graph_capture(pool)) with the pool you pass to torch.cuda.graph(g, "
        "pool=pool), or pass graph_pool=pool"
    )


# -- process state ------------------------------------------------------------------------

# Groups whose registration a capture or an NCCL group postponed (in first-seen order).
_deferred: dict[int, Group] = {}
_deferred_lock = threading.Lock()
_env_reservation = True  # SYMM_RS_RESERVE is applied once, at the first eager context
_warned_versions = False
# A released or forgotten communicator must not stay in the native resolution cache.
on_forget(_native.forget_group)


def _defer(group: Group) -> None:
    with _deferred_lock:
        _deferred.setdefault(group.comm, group)
    _native.defer_registration(group.comm)


def flush_deferred(verify: bool = False) -> None:
    """Registers the groups whose registration a capture or an NCCL group postponed."""
    if not _deferred:
        return
    order = _native.take_deferred()
    with _deferred_lock:
        pending = [_deferred.pop(comm) for comm in order if comm in _deferred]
        _deferred.clear()
    log.debug("registering for %d communicator(s) postponed by a capture", len(pending))
    for group in pending:
        _register(group, verify)


def _warn_known_issues() -> None:
    global _warned_versions
    if _warned_versions:
        return
    _warned_versions = True
    for issue in known_nccl_issues(tuple(library_info()["version"])):
        warnings.warn(issue, NcclVersionWarning, stacklevel=4)


def _register(group: Group, verify: bool, timeout: Optional[float] = None) -> int:
    if not should_register(group, timeout):
        return 0
    _warn_known_issues()
    if verify:
        agreement.verify_pending(group, timeout)
    made = int(_native.register_pending(group.comm, group.peer_set))
    if made:
        log.debug("registered %d new segment(s) with %s", made, group.name)
    return made


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
# and exit run in Rust. The functions below are the rules it calls for everything else.
use_symmetric_memory = _native.use_symmetric_memory


def _resolve_for_context(group: object) -> tuple[Optional[Group], Optional[str]]:
    """``group`` resolved, and how the native side may cache the answer: ``"fixed"`` (the
    object or address always means this communicator), ``"pynccl"``/``"comm"`` (re-read that
    attribute to confirm), or ``None`` (do not cache)."""
    resolved = resolve(group)
    if isinstance(group, (int, Group)) or is_process_group(group):
        return resolved, "fixed"
    if getattr(group, "pynccl_comm", None) is not None:
        return resolved, "pynccl"
    if hasattr(group, "comm"):
        return resolved, "comm"
    return resolved, None


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
) -> tuple[Optional[_Entered], Any]:
    """Routes this thread for a context on ``group`` when the native fast path cannot: the
    first context of a thread, a thread on another device, a capture, a graph pool set, or a
    context nested in one for other ranks. Returns the route (``None``: a nested context keeps
    the route around it, because this torch puts the oldest route first) and, when it is this
    thread's shared pool on a thread already on the group's device, that pool's id, which later
    contexts route to natively."""
    global _routing_checked
    if not _routing_checked:
        require_routing()
        _routing_checked = True
    if nested and not inner_route_wins(group.device):
        return None, None
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
    return _Entered(route, restore), route.pool.id if plain else None


def _enter_failed(group: Group, error: BaseException, timeout: Optional[float]) -> None:
    """A verifying context failed to enter: its peers learn why instead of waiting."""
    agreement.report_failure(group, "verify", _reason(error), timeout)


def _exit_failed(
    group: Group, verify: bool, timeout: Optional[float], error: BaseException
) -> None:
    """The block raised: tell verifying peers, and say why the pool could not grow on OOM."""
    if verify and not torch.cuda.is_current_stream_capturing():
        agreement.report_failure(group, "verify", _reason(error), timeout)
    if isinstance(error, torch.OutOfMemoryError):
        annotated = _annotated_oom(error)
        if annotated is not None:
            raise annotated from error


def _exit_register(group: Group, verify: bool, timeout: Optional[float]) -> None:
    """The exit that has something to do: postpone inside a capture or an NCCL group, else
    register what was postponed and what is new."""
    if torch.cuda.is_current_stream_capturing() or _native.in_group():
        _defer(group)
        return
    flush_deferred(verify)
    _register(group, verify, timeout)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _apply_env_reservation(group: Group) -> None:
    """The first eager context of the process grows the shared pool by ``SYMM_RS_RESERVE``
    (routed into it right away; that context's exit registers it)."""
    global _env_reservation
    if not _env_reservation or torch.cuda.is_current_stream_capturing():
        return
    _env_reservation = False
    nbytes = env.read_bytes(env.RESERVE)
    if nbytes:
        device, peers = group.device, group.peer_set
        grow(device, shared_pool(device, peers), nbytes, 8 << 20, peers)


def register(group: object) -> int:
    """Registers now every pool segment ``group`` has not registered yet (collective), after
    the registrations a CUDA-graph capture postponed. Returns how many windows were made."""
    flush_deferred()
    resolved = resolve(group)
    if resolved is None:
        return 0
    return _register(resolved, verify=False)


def reserve(
    nbytes: int, group: object, small_bytes: int = 8 << 20, graph_pool: Optional[Any] = None
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
        raise _native.SymmetricMemoryError("reserve() cannot run during a CUDA-graph capture")
    before = _native.stats().segments_tracked
    with torch.cuda.device(resolved.device):
        device, peers = resolved.device, resolved.peer_set
        pool = (
            shared_pool(device, peers)
            if graph_pool is None
            else capture_pool(device, pool_id(graph_pool), peers).pool
        )
        grow(device, pool, nbytes, small_bytes, peers)
    flush_deferred()
    _register(resolved, verify=False)
    return _native.stats().segments_tracked - before


def _in_window(tensor: torch.Tensor, group: object) -> Optional[Group]:
    """``group`` resolved, when every byte of ``tensor`` lies inside one of its windows."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    resolved = resolve(group)
    if resolved is None or not tensor.is_cuda or tensor.numel() == 0:
        return None
    ptr, nbytes = agreement.extent(tensor)
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
