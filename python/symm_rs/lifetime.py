"""What symm_rs remembers about each communicator it resolved, and how it forgets it.

Communicators die with their groups. ``symm_rs.groups.release(group)`` deregisters first.
torch's ``ProcessGroup.shutdown`` and ``ProcessGroup.abort`` (which ``destroy_process_group`` and
``_abort_process_group`` call, however they were imported) are wrapped so that a shutdown
deregisters the windows of the groups symm_rs has seen first and an abort forgets them without
NCCL calls; a group that disappears otherwise (its object collected, a ``symm_rs.Communicator``
closed or collected) is forgotten too. A destroyed communicator is never passed to NCCL again,
and an address NCCL reuses starts clean: no cached size, rank, peer set or verdict survives.

The caches live here (``symm_rs.groups`` fills them) so that forgetting needs nothing of
resolution; other modules that cache per communicator register with ``on_forget``.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from typing import Any, Callable

from symm_rs import _native

lock = threading.RLock()  # re-entrant: a finalizer may run while it is held
# ProcessGroup -> its resolved Group.
process_groups: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
# Non-ProcessGroup resolutions by communicator address: asking NCCL costs microseconds, and an
# address stays the same communicator until it is released or forgotten (which drops it here).
by_comm: dict[int, Any] = {}
# Peer-set ids, by global ranks or (ranks unknown) by communicator.
peer_sets: dict[tuple[str, object], int] = {}
peer_set_ids = itertools.count(1)  # 0 is symm_rs._native's "any communicator" tag


# Called with a communicator address when it is released or forgotten, so that state kept
# elsewhere about it (capabilities, verification rounds) goes with it.
_forget_hooks: list[Callable[[int], None]] = []


def on_forget(hook: Callable[[int], None]) -> None:
    """Runs ``hook(comm)`` whenever symm_rs releases or forgets a communicator."""
    _forget_hooks.append(hook)


def drop_cached(comm: int) -> None:
    """Forgets what symm_rs's Python side cached about ``comm`` (its windows stay)."""
    with lock:
        by_comm.pop(comm, None)
        peer_sets.pop(("comm", comm), None)  # a successor at this address is another group
        watcher = _watchers.pop(comm, None)
        if watcher is not None:
            watcher.detach()
        for pg, group in list(process_groups.items()):
            if group.comm == comm:
                process_groups.pop(pg, None)
    for hook in _forget_hooks:
        hook(comm)
    # The native context's cache of resolved groups.
    _native.forget_group(comm)


def forget(comm: int) -> int:
    """Forgets a communicator that was destroyed without ``release``: its windows are dropped
    without NCCL calls. Returns how many windows were dropped."""
    drop_cached(comm)
    return int(_native.forget_comm(comm))


# One finalizer per watched communicator. It is detached once the communicator is released or
# forgotten, so that a later communicator NCCL creates at the same address is never forgotten
# by the old group's finalizer.
_watchers: dict[int, weakref.finalize] = {}


def watch(pg: Any, comm: int) -> None:
    # If the group object goes away without destroy_process_group (or before symm_rs's hook was
    # installed), its communicator is gone with it: forget, never deregister on it.
    with lock:
        if comm not in _watchers:
            _watchers[comm] = weakref.finalize(pg, _forget_if_unreleased, comm)


def _forget_if_unreleased(comm: int) -> None:
    try:
        forget(comm)
    except Exception:  # a finalizer must not raise, least of all at interpreter exit
        pass


def _windows_go_first(original: Callable[..., Any], deregister: bool) -> Callable[..., Any]:
    """``ProcessGroup.shutdown``/``abort`` that first release (``deregister``: shutdown,
    while the communicator still exists; deregistration is local, so no rank can hang on it)
    or forget (abort: no NCCL call on a communicator that may be broken) what symm_rs holds
    for the group."""

    @functools.wraps(original)
    def wrapper(pg: Any, *args: Any, **kwargs: Any) -> Any:
        resolved = process_groups.get(pg)
        if resolved is not None:
            drop_cached(resolved.comm)
            _release_or_forget(resolved.comm, deregister)
        return original(pg, *args, **kwargs)

    wrapper._symm_rs_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _release_or_forget(comm: int, deregister: bool) -> None:
    if deregister:
        try:
            _native.release_comm(comm)
            return
        except Exception:
            pass  # the communicator goes regardless: its windows must never be used again
    _native.forget_comm(comm)


def wrap_shutdown_and_abort(process_group: Any) -> None:
    for name, deregister in (("shutdown", True), ("abort", False)):
        original = getattr(process_group, name, None)
        if original is None or getattr(original, "_symm_rs_wrapped", False):
            continue
        setattr(process_group, name, _windows_go_first(original, deregister))
