"""Cross-rank agreement that ends in bounded time on every rank.

Registration is collective: a rank that registers alone waits inside NCCL for ever. So before
any registration the ranks of a group hold one *round*: each posts what it is about to register
(or that it failed), and either all of them go on, or all of them raise. Checks that users call
(``check_layout``, ``symmetric_kernels``) are rounds too.

Rounds are numbered per group, one counter for every kind of round, and a rank takes part in a
round exactly when its exit has something to register; ranks that allocated the same sizes
therefore stay in step, whatever failed in between. Over the group's store (torch's ``Store``),
one round is:

* every rank posts its record under ``symm_rs/<tag>/<round>/<rank>`` (``ok:<ints>`` or
  ``failed:<reason>``);
* each waits for every record, in slices, looking between slices for a peer's failure notice
  and for the group's *broken* mark;
* the decision is one key written once (``compare_set``): ``go`` by a rank that saw every
  record, ``abort:<why>`` by one that saw a failure or gave up waiting. Every rank reads the
  same decision, so a late rank can never go on alone after another gave up;
* a round that timed out (ranks missing) leaves the group *broken*: its ranks are out of step
  for good (a rank that allocated nothing new takes no round), and every later round on any rank
  raises at once with the first reason. ``symm_rs.watchdog`` tells a rank blocked elsewhere.

Without a store (a raw ``int`` communicator, an engine communicator without a CPU group) a round
is an all-gather on the communicator itself, with a host-side deadline. It cannot be made as
safe: a rank that skipped the round runs its next collective against the all-gather. Use a
group with a store (``symm_rs.groups``) wherever one exists.

The checks users call (``verify_pending``, ``check_layout``) are in ``symm_rs.checks``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from symm_rs import _moved, _native, env
from symm_rs.errors import AgreementError
from symm_rs.groups import Group, on_forget

TIMEOUT_HINT = f"{env.TIMEOUT} sets the limit"
# Widths of a record over a communicator (no store): they must be the same on every rank.
COMM_RECORD_WIDTH = 48
_FAILED = -2  # first int of a communicator-path record that reports a failure
# Waiting for peers: polls start fast (ranks usually arrive within a millisecond of each
# other) and back off; a peer's failure notice or the broken mark is looked for a few times a
# second.
_FIRST_POLL_S = 0.0002
_LONGEST_POLL_S = 0.05
_FIRST_LOOK_S = 0.05
_LOOK_EVERY_S = 0.25


_pushed_limit: Optional[float] = None


def default_timeout() -> float:
    """Seconds a cross-rank step waits for its peers: ``SYMM_RS_TIMEOUT``, else 30. The native
    side's own waits (another registration of the same communicator, a segment being
    registered) use the same limit."""
    global _pushed_limit
    seconds = env.read_timeout()
    if seconds != _pushed_limit:
        _native.set_wait_limit(seconds)
        _pushed_limit = seconds
    return seconds


def checked_timeout(timeout: Optional[float]) -> float:
    """``timeout`` in seconds, or the default when ``None``.

    Raises:
        ValueError: not a finite number > 0 (torch's store reads 0 as "wait for ever").
    """
    if timeout is None:
        return default_timeout()
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, got {timeout!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    return float(timeout)


# -- round numbering --------------------------------------------------------------------------

# Round numbers per channel tag (or, without a store, per communicator). Keyed by the tag, not
# the communicator's address: NCCL reuses addresses, and a successor group must not continue
# its predecessor's count. Never reset: a store keeps old rounds' keys.
_rounds: dict[object, int] = {}
# Groups this process knows are broken (their reason), by the same key.
_broken: dict[object, str] = {}
_lock = threading.Lock()
# Tensors of communicator-path rounds that were abandoned: the kernel may still write them.
_abandoned: list[Any] = []
# Groups on which this rank posted a failure notice it has not taken back yet.
_noticed: set[object] = set()
# Called with a group this rank has just marked broken (the watchdog then need not report it).
_break_hooks: list[Callable[[Group], None]] = []


def on_break(hook: Callable[[Group], None]) -> None:
    """Runs ``hook(group)`` whenever this rank marks ``group`` broken (and raises)."""
    _break_hooks.append(hook)


def _forget(comm: int) -> None:
    """A communicator without a store counts its rounds by address: a successor NCCL creates
    at the same address starts afresh (with a store, the channel's tag is unique anyway)."""
    with _lock:
        _rounds.pop(("comm", comm), None)
        _broken.pop(("comm", comm), None)


on_forget(_forget)


def round_key(group: Group) -> object:
    """What the rounds of ``group`` are counted under."""
    return group.channel.tag if group.channel is not None else ("comm", group.comm)


def _next_round(group: Group) -> int:
    key = round_key(group)
    with _lock:
        number = _rounds.get(key, 0)
        _rounds[key] = number + 1
        return number


def peek_round(group: Group) -> int:
    """The number of the next round this rank will take on ``group``."""
    return _rounds.get(round_key(group), 0)


def broken_reason(group: Group) -> Optional[str]:
    """Why ``group`` is broken, as far as this process knows, or ``None``."""
    return _broken.get(round_key(group))


def _mark_broken_locally(group: Group, reason: str) -> str:
    with _lock:
        return _broken.setdefault(round_key(group), reason)


# -- keys -------------------------------------------------------------------------------------


def _prefix(group: Group) -> str:
    assert group.channel is not None
    return f"symm_rs/{group.channel.tag}"


def data_key(group: Group, round_: int, rank: int) -> str:
    return f"{_prefix(group)}/{round_}/{rank}"


def decision_key(group: Group, round_: int) -> str:
    return f"{_prefix(group)}/{round_}/decision"


def broken_key(group: Group) -> str:
    return f"{_prefix(group)}/broken"


def status_key(group: Group, rank: int) -> str:
    return f"{_prefix(group)}/status/{rank}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _get_if_set(store: Any, key: str) -> Optional[str]:
    return _text(store.get(key)) if store.check([key]) else None


def _get_all(store: Any, keys: list[str]) -> list[str]:
    multi_get = getattr(store, "multi_get", None)
    values = multi_get(keys) if multi_get is not None else [store.get(k) for k in keys]
    return [_text(v) for v in values]


# -- rounds -----------------------------------------------------------------------------------


def exchange(
    group: Group,
    topic: str,
    record: Sequence[int],
    timeout: Optional[float] = None,
    width: Optional[int] = None,
) -> list[list[int]]:
    """One round on ``group``: every rank's ``record`` (ints), in rank order. Collective.
    Records may differ in length between ranks only when ``width`` is given: over a
    communicator (no store) they are then cut or padded (with -1) to ``width`` ints.

    Raises:
        AgreementError: a rank reported a failure for this round, not every rank arrived within
            ``timeout`` seconds, or the group is broken (the message says which and why).
        ValueError: ``timeout`` is not a finite number > 0.
    """
    seconds = checked_timeout(timeout)
    values = [int(x) for x in record]
    _raise_if_broken(group, topic)
    round_ = _next_round(group)
    if group.channel is not None:
        _take_back_notice(group)
        return _store_round(group, topic, round_, "ok:" + ",".join(map(str, values)), seconds)
    return _comm_round(group, topic, values, seconds, width or len(values))


def report_failure(group: Group, topic: str, reason: str, timeout: Optional[float] = None) -> None:
    """Takes this rank's part in its next round on ``group`` as a failure: its peers in that
    round raise at once, naming this rank and ``reason``. Never waits for them (over a store);
    over a communicator it joins the all-gather and leaves it running."""
    seconds = checked_timeout(timeout)
    if broken_reason(group) is not None:
        return  # peers raise on the broken mark already
    round_ = _next_round(group)
    if group.channel is not None:
        store = group.channel.store
        store.set(data_key(group, round_, group.rank), f"failed:{reason}")
        store.compare_set(decision_key(group, round_), "", f"abort:rank {group.rank}: {reason}")
        _post_status(group, f"failed in round {round_} ({topic}): {reason}")
        return
    try:
        _comm_round(group, topic, [_FAILED], seconds, COMM_RECORD_WIDTH, wait=False)
    except AgreementError:
        pass


def notice_failure(group: Group, reason: str) -> None:
    """Posts, without taking a round, that this rank failed inside a context in which it had
    nothing to register: a peer that waits for it in a round names this failure when it gives
    up. (Not a reason to give up sooner: the peers may have had nothing to register either, and
    then this rank may still come to their next round.) Only over a store."""
    if group.channel is None:
        return
    _post_status(group, f"failed before round {peek_round(group)}: {reason}")
    with _lock:
        _noticed.add(round_key(group))


def _take_back_notice(group: Group) -> None:
    """This rank takes a round after all: a notice that said it would not must go first, or a
    peer polling before this rank's record lands would read it and abort the round."""
    key = round_key(group)
    if key not in _noticed:
        return
    assert group.channel is not None
    try:
        group.channel.store.delete_key(status_key(group, group.rank))
    finally:
        with _lock:
            _noticed.discard(key)


def _post_status(group: Group, what: str) -> None:
    assert group.channel is not None
    stamp = time.strftime("%H:%M:%S")
    group.channel.store.set(status_key(group, group.rank), f"{peek_round(group)}|{stamp} {what}")


def _raise_if_broken(group: Group, topic: str) -> None:
    """Raises at once on a group this process knows is broken. (A rank that has not seen the
    mark yet meets it after its first wait slice: the happy path pays no extra request.)"""
    reason = broken_reason(group)
    if reason is not None:
        raise AgreementError(
            f"{group.name}: symm_rs's cross-rank checks on this group stopped after an "
            f"earlier failure ({reason}); its ranks are out of step for good. Destroy and "
            f"recreate the group (or its communicator) to use symmetric memory again "
            f"(asked for: {topic})"
        )


def _store_round(
    group: Group, topic: str, round_: int, payload: str, seconds: float
) -> list[list[int]]:
    assert group.channel is not None
    store = group.channel.store
    keys = [data_key(group, round_, r) for r in range(group.size)]
    decision = decision_key(group, round_)
    store.set(keys[group.rank], payload)
    # Polled with `check`, not `wait`: a store wait that times out logs from C++ every time,
    # and the slices are what let this rank notice a peer's failure while it waits.
    start = time.monotonic()
    deadline, next_look, delay = start + seconds, start + _FIRST_LOOK_S, _FIRST_POLL_S
    while not store.check(keys):
        now = time.monotonic()
        if now >= deadline:
            _give_up(group, store, keys, decision, round_, topic, seconds)
            break  # someone decided "go" first: every record is there
        if now >= next_look:
            next_look = now + _LOOK_EVERY_S
            early = _early_abort(group, store, keys, decision, round_, topic)
            if early is not None:
                raise AgreementError(early)
        time.sleep(min(delay, max(deadline - now, 0.0)))
        delay = min(delay * 2, _LONGEST_POLL_S)
    values = _get_all(store, keys)
    failed = {r: v[len("failed:") :] for r, v in enumerate(values) if v.startswith("failed:")}
    proposal = (
        "abort:" + "; ".join(f"rank {r}: {why}" for r, why in failed.items()) if failed else "go"
    )
    decided = _text(store.compare_set(decision, "", proposal))
    _housekeeping(group, store, round_)
    if decided != "go":
        raise AgreementError(
            f"{group.name}: peers failed before symm_rs's {topic} check (round {round_}): "
            f"{decided[len('abort:') :]}"
        )
    return [[int(x) for x in v[len("ok:") :].split(",") if x] for v in values]


def _early_abort(
    group: Group, store: Any, keys: list[str], decision: str, round_: int, topic: str
) -> Optional[str]:
    """While waiting: the reason to stop waiting now, if there is one (another rank aborted
    the round, or the group broke)."""
    decided = _get_if_set(store, decision)
    if decided is not None and decided.startswith("abort:"):
        return f"{group.name}: symm_rs's {topic} check (round {round_}) was aborted: {decided[6:]}"
    broken = _get_if_set(store, broken_key(group))
    if broken is not None:
        _mark_broken_locally(group, broken)
        return (
            f"{group.name}: symm_rs's cross-rank checks on this group stopped after an earlier "
            f"failure ({broken}); destroy and recreate the group to use symmetric memory again"
        )
    # A missing rank's failure notice is not a reason to stop: it may come from a block in
    # which no rank had anything to register, and that rank may still be on its way to this
    # round. It is what the timeout's message reports that rank was last doing.
    return None


def _give_up(
    group: Group,
    store: Any,
    keys: list[str],
    decision: str,
    round_: int,
    topic: str,
    seconds: float,
) -> None:
    """The round timed out on this rank: abort it for everyone (unless a rank that saw every
    record decided first) and break the group. Raises, or returns when the round went on."""
    missing = [r for r, k in enumerate(keys) if not store.check([k])]
    if not missing:
        return  # every record arrived just now: decide as usual
    doing = "; ".join(f"rank {r}: {_doing(store, group, r, round_)}" for r in missing)
    reason = (
        f"rank(s) {missing} did not reach symm_rs's {topic} check (round {round_}) within "
        f"{seconds:g} s ({TIMEOUT_HINT}); last seen: {doing}. A rank that allocated nothing new "
        "inside its use_symmetric_memory context takes no registration round: ranks must "
        "allocate the same sizes in the same order (reserve() up front, or SYMM_RS_SEAL=1 to "
        "make growth an error at once)"
    )
    decided = _text(store.compare_set(decision, "", "abort:" + reason))
    if decided == "go":
        return
    _break(group, store, decision, round_, decided[len("abort:") :])
    raise AgreementError(f"{group.name}: {decided[len('abort:') :]}")


def _break(group: Group, store: Any, decision: str, round_: int, reason: str) -> None:
    store.compare_set(decision, "", "abort:" + reason)
    mark = f"round {round_}, seen by rank {group.rank}: {reason}"
    first = _text(store.compare_set(broken_key(group), "", mark))
    _mark_broken_locally(group, first)
    for hook in _break_hooks:
        hook(group)


def _doing(store: Any, group: Group, rank: int, round_: int) -> str:
    """What a missing rank was last seen doing: a failure it posted, or the last round of this
    group it took part in."""
    status = _get_if_set(store, status_key(group, rank))
    if status is not None:
        return status.partition("|")[2]
    if round_ == 0:
        return "it took no symm_rs round on this group yet"
    if store.check([data_key(group, round_ - 1, rank)]):
        return f"it took part in round {round_ - 1}, the previous one"
    return f"it did not take part in round {round_ - 1} either"


def _housekeeping(group: Group, store: Any, round_: int) -> None:
    """Deletes this rank's record of two rounds ago (every rank has read it); rank 0 deletes
    old decisions in batches. One request per round: the round's cost is mostly requests."""
    if round_ < 2:
        return
    try:
        store.delete_key(data_key(group, round_ - 2, group.rank))
        if group.rank == 0 and round_ % 16 == 0:
            for old in range(max(round_ - 17, 0), round_ - 1):
                store.delete_key(decision_key(group, old))
    except Exception:
        pass  # only housekeeping: every rank has read those rounds already


_side_streams: dict[int, Any] = {}


def _comm_round(
    group: Group,
    topic: str,
    record: list[int],
    seconds: float,
    width: int,
    wait: bool = True,
) -> list[list[int]]:
    """A round as an all-gather over the communicator, on a side stream, with a host-side
    deadline. Each rank sends its wall-clock deadline too; a round that completes within a
    margin of the earliest one counts as timed out on every rank, so that a rank that gave up
    and a late rank that saw the all-gather complete decide alike (up to clock skew and the
    polling interval)."""
    deadline_ms = int((time.time() + seconds) * 1000)
    row = ([deadline_ms, *record] + [-1] * width)[: width + 1]
    device = torch.device("cuda", group.device)
    side = _side_streams.get(group.device)
    if side is None:
        side = _side_streams.setdefault(group.device, torch.cuda.Stream(device))
    current = torch.cuda.current_stream(device)
    with torch.cuda.device(device):
        send = torch.tensor(row, dtype=torch.int64, device=device)
        recv = torch.empty(group.size * (width + 1), dtype=torch.int64, device=device)
        side.wait_stream(current)
        _native.run_collective(
            group.comm, "all_gather", recv, send, (side.cuda_stream, group.device)
        )
        done = torch.cuda.Event()
        done.record(side)
    if not wait:
        _abandoned.append((send, recv, done))
        return []
    limit = time.monotonic() + seconds
    while not done.query():
        if time.monotonic() > limit:
            _abandoned.append((send, recv, done))
            reason = (
                f"not every rank joined symm_rs's {topic} check within {seconds:g} s "
                f"({TIMEOUT_HINT}). This group has no store, so the check ran on the "
                "communicator, which is now blocked in that all-gather: abort it (its owner's "
                "abort, or Communicator.abort()) or end the process"
            )
            raise AgreementError(f"{group.name}: {_mark_broken_locally(group, reason)}")
        time.sleep(50e-6)
    rows = recv.view(group.size, width + 1).tolist()
    margin_ms = max(50.0, 0.05 * seconds * 1000)
    if time.time() * 1000 > min(r[0] for r in rows) - margin_ms:
        reason = (
            f"symm_rs's {topic} check completed too close to a rank's deadline ({seconds:g} s, "
            f"{TIMEOUT_HINT}): that rank may have given up, so no rank goes on"
        )
        raise AgreementError(f"{group.name}: {_mark_broken_locally(group, reason)}")
    failed = [r for r, row_ in enumerate(rows) if row_[1] == _FAILED]
    if failed and record[0] != _FAILED:
        raise AgreementError(
            f"{group.name}: rank(s) {failed} failed before symm_rs's {topic} check"
        )
    return [row_[1:] for row_ in rows]


# AgreementError is declared in symm_rs.errors; rounds raise it, and callers catch it from here.
__all__ = [
    "COMM_RECORD_WIDTH",
    "AgreementError",
    "broken_reason",
    "checked_timeout",
    "default_timeout",
    "exchange",
    "notice_failure",
    "on_break",
    "peek_round",
    "report_failure",
    "round_key",
]


# Names that moved out in this release (CHANGELOG.md), reachable here for one more release.
_MOVED = {
    "check_layout": "checks",
    "verify_pending": "checks",
    "extent": "checks",
}


def __getattr__(name: str) -> Any:
    return _moved.moved("symm_rs.agreement", name, _MOVED, public=True)
