"""What no exception can report: a registration stuck inside NCCL, and a peer that failed
while this rank waits elsewhere.

Once inside ``ncclCommWindowRegister`` symm_rs cannot return (SGLang #36943: every TP rank
deadlocked there, nothing logged, health checks green). And a rank whose peer gave up on a
symm_rs round may meanwhile be blocked in the engine's own collective, waiting for that peer.
One daemon thread, started with the first registration, looks once a second at:

* the registrations NCCL is running (``_native.registrations_in_progress()``): one that has not
  returned within ``SYMM_RS_TIMEOUT`` is logged at ERROR level, once, with its communicator,
  ranks, segment sizes and time waited; ``describe_registration_in_progress()`` gives the same
  text to engines' watchdogs and health checks at any time;
* the *broken* mark of every group with a store that registered here (one ``check`` request
  to the group's store per group per second: the cost of this watcher): a peer that gave up on
  a round marks the group, and this rank logs the peer's reason at ERROR level, once, however
  busy its main thread is.

``SYMM_RS_ON_FAILURE=abort`` also aborts the communicator through its owner in both cases
(``ProcessGroup.abort()``, or ``Communicator.abort()`` for symm_rs's own, which calls
``ncclCommAbort``); a thread blocked in a collective of that group then gets an error. The
default, ``log``, aborts nothing: the engine decides (torch's own watchdog aborts a
ProcessGroup after its timeout). Groups without a store have no mark to watch: their rounds
end in an error on the ranks that take part, and only the stuck-registration report applies.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from symm_rs import _native, agreement, env
from symm_rs.groups import Group, on_forget

log = logging.getLogger("symm_rs")
INTERVAL_S = 1.0


@dataclass
class _Watched:
    name: str
    rank: int
    store: Any
    broken_key: str
    abort: Optional[Callable[[], None]]
    reported: bool = False


_lock = threading.Lock()
_watched: dict[int, _Watched] = {}  # by communicator
_reported_stuck: set[tuple[int, int]] = set()  # (comm, OS thread) already logged
_thread: Optional[threading.Thread] = None
_names: dict[int, tuple[str, Optional[Callable[[], None]]]] = {}


def watch(group: Group) -> None:
    """Watches ``group`` from its first registration on (cheap when already watched)."""
    if group.comm in _names:
        return
    with _lock:
        _names[group.comm] = (f"{group.name} (rank {group.rank} of {group.size})", group.abort)
        if group.channel is not None:
            _watched[group.comm] = _Watched(
                group.name,
                group.rank,
                group.channel.store,
                f"symm_rs/{group.channel.tag}/broken",
                group.abort,
            )
    _start()


def broken_by_this_rank(group: Group) -> None:
    """This rank marked ``group`` broken and raised: it needs no log line about it."""
    with _lock:
        watched = _watched.get(group.comm)
        if watched is not None:
            watched.reported = True


agreement.on_break(broken_by_this_rank)


def _forget(comm: int) -> None:
    with _lock:
        _watched.pop(comm, None)
        _names.pop(comm, None)


on_forget(_forget)


def _start() -> None:
    global _thread
    with _lock:
        if _thread is not None and _thread.is_alive():
            return
        _thread = threading.Thread(target=_run, name="symm_rs-watchdog", daemon=True)
        _thread.start()


def _run() -> None:
    while True:
        time.sleep(INTERVAL_S)
        try:
            look_once()
        except Exception:  # the watchdog must outlive anything it looks at
            log.debug("symm_rs watchdog: a check failed", exc_info=True)


def look_once() -> None:
    """One look at stuck registrations and broken groups (the thread calls it every second)."""
    _check_stuck()
    _check_broken()


def _abort_on_failure() -> bool:
    try:
        return env.read_choice(env.ON_FAILURE, env.ON_FAILURE_CHOICES) == "abort"
    except ValueError:
        return False


def _abort(name: str, abort: Optional[Callable[[], None]]) -> None:
    if not _abort_on_failure():
        return
    if abort is None:
        log.error(
            "symm_rs: SYMM_RS_ON_FAILURE=abort, but %s has no owner symm_rs can abort it "
            "through; abort it yourself",
            name,
        )
        return
    log.error("symm_rs: aborting %s (SYMM_RS_ON_FAILURE=abort)", name)
    try:
        abort()
    except Exception:
        log.exception("symm_rs: aborting %s failed", name)


def _check_stuck() -> None:
    limit = agreement.default_timeout()
    for comm, _peers, sizes, seconds, entered, thread in _native.registrations_in_progress():
        if seconds < limit or (comm, thread) in _reported_stuck:
            continue
        _reported_stuck.add((comm, thread))
        name, abort = _names.get(comm, (f"comm {comm:#x}", None))
        log.error(
            "symm_rs: a symmetric-window registration on %s has not returned after %.0f s "
            "(segment %d of %d, sizes %s, thread %d): it waits inside ncclCommWindowRegister "
            "for a peer, and cannot be interrupted from here",
            name,
            seconds,
            entered,
            len(sizes),
            sizes[:8],
            thread,
        )
        _abort(name, abort)


def _check_broken() -> None:
    with _lock:
        pending = [w for w in _watched.values() if not w.reported]
    for watched in pending:
        if not watched.store.check([watched.broken_key]):
            continue
        value = watched.store.get(watched.broken_key)
        reason = value.decode() if isinstance(value, bytes) else str(value)
        watched.reported = True
        log.error(
            "symm_rs: %s (this is rank %d) is broken: %s. If this rank is waiting in a "
            "collective of that group, the peer it waits for may never come",
            watched.name,
            watched.rank,
            reason,
        )
        _abort(watched.name, watched.abort)


def describe_registration_in_progress() -> str:
    """One line per symmetric-window registration running in this process (communicator,
    ranks' group, segment sizes, seconds waited, the thread); empty when none is. For
    engines' watchdogs and health checks: a registration that stays here past the timeout is
    stuck inside NCCL."""
    lines = []
    for comm, _peers, sizes, seconds, entered, thread in _native.registrations_in_progress():
        name = _names.get(comm, (f"comm {comm:#x}", None))[0]
        lines.append(
            f"symm_rs: registering {len(sizes)} segment(s) {sizes[:8]} "
            f"({sum(sizes)} bytes) on {name} (comm {comm:#x}) for {seconds:.1f} s, at segment "
            f"{entered} of {len(sizes)}, thread {thread}"
        )
    return "\n".join(lines)
