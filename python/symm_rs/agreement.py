"""Cross-rank checks that end in bounded time on every rank.

Registration is collective: a rank that registers alone waits inside NCCL for ever. Before it,
ranks can compare what they are about to do (``verify_pending``) or where their buffers sit
(``check_layout``). The comparison runs over the group's store when it has one (torch's
``Store``: every wait has a timeout, and a rank that fails posts why, so its peers fail at once
instead of waiting), else over the communicator itself with a host-side deadline.

Every rank must make the same checks in the same order on a group: each check is one numbered
round per topic, and a rank whose peers never reach its round times out naming them.
"""

from __future__ import annotations

import itertools
import threading
import time
import zlib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Optional

from symm_rs import _native
from symm_rs.env import read_seconds
from symm_rs.groups import Group, resolve

TIMEOUT_ENV = "SYMM_RS_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
_RECORD = 16  # int64s per rank on the communicator path: count, bytes, fingerprint, 13 sizes
_FAILED = -2  # first int of a record that reports a failure instead of data


def default_timeout() -> float:
    """Seconds a cross-rank check waits for its peers: ``SYMM_RS_TIMEOUT``, else 30."""
    value = read_seconds(TIMEOUT_ENV)
    return DEFAULT_TIMEOUT_S if value is None else value


class AgreementError(_native.RegistrationError):
    """Ranks of a group did not agree, or not all of them arrived, within the timeout."""


# Round numbers per channel tag (or, without a store, per communicator) and topic: every rank
# counts the same checks the same way. Keyed by the tag, not the communicator's address: NCCL
# reuses addresses, and a successor group must not continue its predecessor's count. Never
# reset: a store keeps old rounds' keys, and a restarted count would read them.
_rounds: dict[tuple[object, str], itertools.count[int]] = {}
_rounds_lock = threading.Lock()
# Tensors of communicator-path exchanges that timed out: the kernel may still write into them.
_abandoned: list[Any] = []


def round_key(group: Group, topic: str) -> tuple[object, str]:
    """What rounds of ``topic`` on ``group`` are counted under."""
    return (group.channel.tag if group.channel is not None else group.comm, topic)


def _next_round(group: Group, topic: str) -> int:
    with _rounds_lock:
        counter = _rounds.setdefault(round_key(group, topic), itertools.count())
        return next(counter)


def exchange(
    group: Group,
    topic: str,
    record: Sequence[int],
    timeout: Optional[float] = None,
    width: Optional[int] = None,
) -> list[list[int]]:
    """Every rank's ``record`` (ints), in rank order. Collective over ``group``. Records may
    differ in length between ranks only when ``width`` is given: over a communicator (no store)
    they are then cut or padded (with -1) to ``width`` ints.

    Raises:
        AgreementError: a rank reported a failure for this round, or not every rank arrived
            within ``timeout`` seconds (the message names which).
    """
    seconds = default_timeout() if timeout is None else timeout
    if group.channel is not None:
        return _store_exchange(group, topic, [int(x) for x in record], seconds)
    values = [int(x) for x in record]
    return _comm_exchange(group, topic, values, seconds, width or len(values))


def report_failure(group: Group, topic: str, reason: str, timeout: Optional[float] = None) -> None:
    """Tells the peers of ``group`` that this rank will not take part in its next ``topic``
    round (of ``_RECORD``-wide records), so that they raise at once (with the reason) instead
    of waiting for it."""
    seconds = default_timeout() if timeout is None else timeout
    if group.channel is not None:
        round_ = _next_round(group, topic)
        group.channel.store.set(_key(group, topic, round_, group.rank), f"failed:{reason}")
        return
    # Without a store the only way to reach peers waiting in this round is the round itself.
    try:
        _comm_exchange(group, topic, [_FAILED], seconds, _RECORD)
    except AgreementError:
        pass


def _key(group: Group, topic: str, round_: int, rank: int) -> str:
    assert group.channel is not None
    return f"symm_rs/{group.channel.tag}/{topic}/{round_}/{rank}"


def _store_exchange(group: Group, topic: str, record: list[int], seconds: float) -> list[list[int]]:
    assert group.channel is not None
    store = group.channel.store
    round_ = _next_round(group, topic)
    keys = [_key(group, topic, round_, r) for r in range(group.size)]
    store.set(keys[group.rank], "ok:" + ",".join(map(str, record)))
    try:
        store.wait(keys, timedelta(seconds=seconds))
    except Exception as e:  # torch raises DistStoreError (a RuntimeError) on timeout
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        if not missing:
            raise
        reason = f"rank {group.rank} gave up waiting for rank(s) {missing} after {seconds:g} s"
        store.set(keys[group.rank], f"failed:{reason}")
        raise AgreementError(
            f"{group.name}: rank(s) {missing} did not reach symm_rs's {topic} check (round "
            f"{round_}) within {seconds:g} s ({SYMM_RS_TIMEOUT_HINT}); they failed, exited, or "
            "entered a different number of use_symmetric_memory contexts"
        ) from e
    values = [v.decode() if isinstance(v, bytes) else str(v) for v in _get_all(store, keys)]
    failed = {r: v[len("failed:") :] for r, v in enumerate(values) if v.startswith("failed:")}
    if round_ >= 2:
        try:
            store.delete_key(_key(group, topic, round_ - 2, group.rank))
        except Exception:
            pass  # only housekeeping: every rank has read that round already
    if failed:
        detail = "; ".join(f"rank {r}: {why}" for r, why in failed.items())
        raise AgreementError(f"{group.name}: peers failed before symm_rs's {topic} check: {detail}")
    return [[int(x) for x in v[len("ok:") :].split(",") if x] for v in values]


SYMM_RS_TIMEOUT_HINT = f"{TIMEOUT_ENV} sets the limit"


def _get_all(store: Any, keys: list[str]) -> list[Any]:
    multi_get = getattr(store, "multi_get", None)
    if multi_get is not None:
        return list(multi_get(keys))
    return [store.get(k) for k in keys]


_side_streams: dict[int, Any] = {}


def _comm_exchange(
    group: Group, topic: str, record: list[int], seconds: float, width: int
) -> list[list[int]]:
    """The same over the communicator, on a side stream, with a host-side deadline."""
    import torch

    _next_round(group, topic)
    record = (record + [-1] * width)[:width]
    device = torch.device("cuda", group.device)
    side = _side_streams.get(group.device)
    if side is None:
        side = _side_streams.setdefault(group.device, torch.cuda.Stream(device))
    current = torch.cuda.current_stream(device)
    with torch.cuda.device(device):
        send = torch.tensor(record, dtype=torch.int64, device=device)
        recv = torch.empty(group.size * width, dtype=torch.int64, device=device)
        side.wait_stream(current)
        stream = (side.cuda_stream, group.device)
        _native.run_collective(group.comm, "all_gather", recv, send, stream)
        done = torch.cuda.Event()
        done.record(side)
    deadline = time.monotonic() + seconds
    while not done.query():
        if time.monotonic() > deadline:
            _abandoned.append((send, recv))
            raise AgreementError(
                f"{group.name}: not every rank joined symm_rs's {topic} check within "
                f"{seconds:g} s ({SYMM_RS_TIMEOUT_HINT}). This group has no store, so the check "
                "ran on the communicator, which is now blocked in that all-gather: abort it "
                "(ncclCommAbort) or end the process"
            )
        time.sleep(50e-6)
    rows = recv.view(group.size, width).tolist()
    failed = [r for r, row in enumerate(rows) if row[0] == _FAILED]
    if failed and record[0] != _FAILED:
        raise AgreementError(
            f"{group.name}: rank(s) {failed} failed before symm_rs's {topic} check"
        )
    return rows


def verify_pending(group: object, timeout: Optional[float] = None) -> None:
    """Checks that every rank of ``group`` is about to register the same segment sizes, so a
    disagreement is an error on every rank instead of a hang inside NCCL. Collective.

    Raises:
        AgreementError: the ranks disagree (the message names each rank's segments), a rank
            failed, or not all arrived within the timeout.
    """
    resolved = resolve(group)
    if resolved is None:
        return
    sizes = [int(s) for s in _native.pending_sizes(resolved.comm, resolved.peer_set)]
    record = [len(sizes), sum(sizes), zlib.crc32(repr(sizes).encode()), *sizes]
    rows = exchange(resolved, "verify", record, timeout, width=_RECORD)
    if all(row[:3] == rows[0][:3] for row in rows):
        return

    def describe(row: list[int]) -> str:
        shown = [x for x in row[3:] if x >= 0][:13]
        more = "" if row[0] <= len(shown) else f" +{row[0] - len(shown)} more"
        return f"{row[0]} segment(s), {row[1]} bytes, sizes {shown}{more}"

    groups: dict[str, list[int]] = {}
    for rank, row in enumerate(rows):
        groups.setdefault(describe(row), []).append(rank)
    detail = "; ".join(f"rank(s) {ranks}: {what}" for what, ranks in groups.items())
    raise AgreementError(
        f"ranks of {resolved.name} disagree on the segments to register, which would hang "
        f"every rank inside ncclCommWindowRegister: {detail}. Every rank must allocate the same "
        "sizes in the same order inside use_symmetric_memory (reserve() up front avoids growth "
        "at run time)"
    )


def extent(tensor: Any) -> tuple[int, int]:
    """``(first byte, byte length)`` a tensor's elements occupy."""
    if tensor.numel() == 0:
        return (tensor.data_ptr(), 0)
    # torch strides are never negative, so the first element is the lowest address.
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.data_ptr(), span * tensor.element_size())


def check_layout(tensors: Sequence[Any], group: object, timeout: Optional[float] = None) -> None:
    """Checks that each tensor sits at the same segment position and offset on every rank of
    ``group``, which symmetric kernels assume (they address a peer's copy at the local offset).
    Collective: one exchange. A debugging aid, not a per-call check.

    Raises:
        AgreementError: some tensor's placement differs between ranks; the message says which
            tensor and each rank's placement.
    """
    resolved = resolve(group)
    if resolved is None:
        return
    record: list[int] = []
    for tensor in tensors:
        ptr, nbytes = extent(tensor)
        index, offset = _native.segment_position(ptr, nbytes) or (-1, -1)
        record += [index, offset, nbytes]
    rows = exchange(resolved, "layout", record or [0], timeout)
    for i in range(len(tensors)):
        placements = [tuple(row[3 * i : 3 * i + 3]) for row in rows]
        if any(p != placements[0] for p in placements) or placements[0][0] < 0:
            shown = ", ".join(
                f"rank {r}: segment {p[0]} offset {p[1]} ({p[2]} bytes)"
                for r, p in enumerate(placements)
            )
            raise AgreementError(
                f"tensor {i} is not placed symmetrically ({shown}); symmetric kernels would "
                "read the wrong memory on peers. Allocate the same sizes in the same order on "
                "every rank, and do not free symmetric tensors that other streams still use"
            )
