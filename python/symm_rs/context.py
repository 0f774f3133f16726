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
from symm_rs.groups import Group, resolve
from symm_rs.library import known_nccl_issues, library_info
from symm_rs.pool import (
    PoolId,
    Route,
    capture_pool,
    grow,
    inner_route_wins,
    pool_id,
    require_routing,
    shared_pool,
)

log = logging.getLogger("symm_rs")


class NcclVersionWarning(UserWarning):
    """The NCCL in use has a known defect that affects symmetric memory (once per process)."""


# -- graph pools ----------------------------------------------------------------------------

_graph_pool: Optional[PoolId] = None


def set_graph_pool(pool: Any) -> None:
    """The graph pool the CUDA-graph captures that follow use (``torch.cuda.graph(g,
    pool=pool)``), as engines set it once per capture session; ``None`` clears it. Contexts
    inside those captures allocate from its capture pool without a ``graph_pool`` argument, and
    contexts before its first capture warm that pool up."""
    global _graph_pool
    _graph_pool = None if pool is None else pool_id(pool)


def graph_pool() -> Optional[PoolId]:
    """The graph pool ``set_graph_pool`` set, if any."""
    return _graph_pool


@contextlib.contextmanager
def graph_capture(pool: Any) -> Iterator[PoolId]:
    """``set_graph_pool(pool)`` for the duration of the block, then the previous setting."""
    global _graph_pool
    previous, _graph_pool = _graph_pool, pool_id(pool)
    try:
        yield _graph_pool
    finally:
        _graph_pool = previous


def _capturing_graph_pool(explicit: Optional[Any]) -> tuple[PoolId, Any]:
    """The pool of the capture under way, and its graph when torch can name it."""
    if explicit is not None:
        return pool_id(explicit), None
    getter = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if getter is not None:
        graph = getter()
        return pool_id(graph.pool()), graph
    if _graph_pool is not None:
        return _graph_pool, None
    raise _native.SymmetricMemoryError(
        "use_symmetric_memory inside a CUDA-graph capture needs the capture's graph pool, and "
        f"torch {torch.__version__} cannot tell it: call symm_rs.set_graph_pool(pool) (or "
        "enter symm_rs.graph_capture(pool)) with the pool you pass to torch.cuda.graph(g, "
        "pool=pool), or pass graph_pool=pool"
    )


# -- per-thread state -----------------------------------------------------------------------


class _ThreadState(threading.local):
    """Per-thread nesting: torch refuses to route one thread to the same pool twice, so only
    the outermost context routes; every level still registers its own group."""

    def __init__(self) -> None:
        self.depth = 0
        self.route: Optional[Route] = None
        self.restore_device: Optional[int] = None


_thread = _ThreadState()
# Groups whose registration a capture or an NCCL group postponed (in first-seen order).
_deferred: dict[int, Group] = {}
_deferred_lock = threading.Lock()
_env_reservation = True  # SYMM_RS_RESERVE is applied once, at the first eager context
_warned_versions = False
_routing_checked = False


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
    made = int(_native.register_pending(group.comm))
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
    device = group.device
    if torch.cuda.is_current_stream_capturing():
        graph_pool_id, graph = _capturing_graph_pool(explicit)
        target = capture_pool(device, graph_pool_id)
        target.sealed = True
        if graph is not None and hasattr(graph, "_retain_pool"):
            graph._retain_pool(target.pool)  # the graph keeps the pool its blocks live in
        pause = None if inner_route_wins(device) else graph_pool_id
        return Route.begin(device, target.pool, pause)
    inner_route_wins(device)  # probed now, outside any capture, for the captures to come
    if _graph_pool is not None:
        warm = capture_pool(device, _graph_pool)
        if not warm.sealed:
            # Before its first capture, S(P) serves the warm-up, which the capture then reuses.
            return Route.begin(device, warm.pool)
    return Route.begin(device, shared_pool(device))


class use_symmetric_memory:
    """Allocate from the symmetric pool, and register new segments with ``group`` on exit.

    Arguments:
        group: the group whose collectives will use the buffers (see ``symm_rs.groups``).
        disabled: make the context a no-op (as a one-rank group does).
        graph_pool: the capture's graph pool, overriding ``set_graph_pool`` and what torch
            reports; only consulted inside a CUDA-graph capture.
        verify: before registering, check that every rank is about to register the same
            segment sizes (bounded by ``timeout``); default from ``SYMM_RS_VERIFY``.
        timeout: seconds the verification waits for peers (default ``SYMM_RS_TIMEOUT``, 30).

    The object may be entered again after it exits (engines pause and resume a context).

    Raises:
        TypeError: ``group`` is not a kind symm_rs accepts.
        SymmetricMemoryError: no GPU, torch too old, or a capture whose pool is unknown.
        NcclLibraryError: the NCCL in use cannot register symmetric windows.
        RegistrationError / NcclError: registration or verification failed on exit.
    """

    __slots__ = ("_group", "_owner", "_resolved", "disabled", "graph_pool", "timeout", "verify")

    def __init__(
        self,
        group: object,
        disabled: bool = False,
        graph_pool: Optional[Any] = None,
        verify: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> None:
        self._group = group
        self.disabled = bool(disabled)
        self.graph_pool = graph_pool
        self.verify = env.read_flag(env.VERIFY) if verify is None else bool(verify)
        self.timeout = timeout
        self._resolved: Optional[Group] = None
        self._owner = False

    def __enter__(self) -> use_symmetric_memory:
        if self.disabled:
            return self
        if self._resolved is not None:
            raise _native.SymmetricMemoryError(
                "this use_symmetric_memory object is already active; enter it again only "
                "after it exits"
            )
        group = resolve(self._group)
        if group is None:
            return self
        try:
            self._owner = _enter(group, self.graph_pool)
        except BaseException as e:
            if self.verify:
                agreement.report_failure(group, "verify", _reason(e), self.timeout)
            raise
        self._resolved = group
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        group, self._resolved = self._resolved, None
        if group is None:
            return
        _leave(self._owner)
        if exc_type is not None:
            if self.verify and not torch.cuda.is_current_stream_capturing():
                agreement.report_failure(group, "verify", _reason(exc), self.timeout)
            if isinstance(exc, torch.OutOfMemoryError):
                annotated = _annotated_oom(exc)
                if annotated is not None:
                    raise annotated from exc
            return
        if torch.cuda.is_current_stream_capturing() or _native.in_group():
            _defer(group)
            return
        flush_deferred(self.verify)
        _register(group, self.verify, self.timeout)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:500]


def _enter(group: Group, explicit_graph_pool: Optional[Any]) -> bool:
    """Routes this thread into the right pool (outermost context only); returns whether this
    context owns the routing."""
    state = _thread
    if state.depth > 0:
        if state.route is not None and state.route.device != group.device:
            raise _native.SymmetricMemoryError(
                f"a use_symmetric_memory context for cuda:{group.device} cannot nest inside one "
                f"for cuda:{state.route.device}"
            )
        state.depth += 1
        return False
    global _routing_checked
    if not _routing_checked:
        require_routing()
        _routing_checked = True
    current = torch.cuda.current_device()
    if current != group.device:
        # The communicator decides the device: a worker thread that never called set_device
        # is on device 0, and its buffers must still land where the communicator runs.
        torch.cuda.set_device(group.device)
    try:
        _apply_env_reservation(group)
        state.route = _route_for(group, explicit_graph_pool)
    except BaseException:
        if current != group.device:
            torch.cuda.set_device(current)
        raise
    state.restore_device = current if current != group.device else None
    state.depth = 1
    return True


def _leave(owner: bool) -> None:
    state = _thread
    state.depth -= 1
    if not owner:
        return
    route, state.route = state.route, None
    if route is not None:
        route.end()
    if state.restore_device is not None:
        torch.cuda.set_device(state.restore_device)
        state.restore_device = None


def _apply_env_reservation(group: Group) -> None:
    """The first eager context of the process grows the shared pool by ``SYMM_RS_RESERVE``
    (routed into it right away; that context's exit registers it)."""
    global _env_reservation
    if not _env_reservation or torch.cuda.is_current_stream_capturing():
        return
    _env_reservation = False
    nbytes = env.read_bytes(env.RESERVE)
    if nbytes:
        grow(group.device, shared_pool(group.device), nbytes, 8 << 20)


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
    """Grows a symmetric pool once, up front, on the current stream, and registers it with
    ``group``, so steady-state allocations find cached, registered memory and never call
    ``ncclMemAlloc`` or register. With ``graph_pool``, grows the capture pool of that graph
    pool instead, so that captures into it reuse registered memory from their first
    allocation.

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
        pool = (
            shared_pool(resolved.device)
            if graph_pool is None
            else capture_pool(resolved.device, pool_id(graph_pool)).pool
        )
        grow(resolved.device, pool, nbytes, small_bytes)
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
