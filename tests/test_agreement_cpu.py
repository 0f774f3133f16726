"""Cross-rank agreement in bounded time, over a real torch store, with one process per rank (no
GPU): every rank gets every record; a rank that reports a failure makes its peers raise at once
with its reason; a rank that never arrives makes its peers raise after the timeout, naming it,
and leaves the group broken, so every later round raises at once; a rank that arrives after
its peers gave up cannot go on alone; rounds stay in step across failures."""

from __future__ import annotations

import math
import multiprocessing
import time
from typing import Any

import pytest

pytest.importorskip("torch")

WORLD = 3


def _group(rank: int, path: str, tag: str) -> Any:
    import torch.distributed as dist

    from symm_rs.groups import Channel, Group

    store = dist.FileStore(path, WORLD)
    return Group(0x1000, WORLD, rank, 0, "test group", Channel(store, tag))


def _rank(rank: int, path: str, scenario: str, results: Any) -> None:
    from symm_rs import agreement

    group = _group(rank, path, f"t-{scenario}")
    outcome: dict[str, Any] = {"rank": rank, "error": None, "errors": []}
    start = time.monotonic()
    try:
        if scenario == "happy":
            rows = [agreement.exchange(group, "x", [rank, i, rank * i]) for i in range(20)]
            outcome["all_rounds_match"] = all(
                row == [[r, i, r * i] for r in range(WORLD)] for i, row in enumerate(rows)
            )
        elif scenario == "failure":
            if rank == 1:
                agreement.report_failure(group, "registration", "ValueError: rank 1 broke")
            else:
                agreement.exchange(group, "registration", [rank], timeout=30)
        elif scenario == "missing":
            if rank != 2:
                try:
                    agreement.exchange(group, "registration", [rank], timeout=1.0)
                except agreement.AgreementError as e:
                    outcome["errors"].append(str(e))
                outcome["seconds"] = time.monotonic() - start
                # The group is broken now: the next round raises at once, on every rank.
                again = time.monotonic()
                try:
                    agreement.exchange(group, "registration", [rank], timeout=30)
                finally:
                    outcome["again_seconds"] = time.monotonic() - again
            else:
                time.sleep(3)  # arrives after the others gave up, and meets the mark
                agreement.exchange(group, "registration", [rank], timeout=30)
        elif scenario == "late":
            # Rank 2 arrives after ranks 0 and 1 gave up: the one decision key makes it raise
            # too, instead of seeing every record and registering alone.
            if rank == 2:
                time.sleep(2.0)
                agreement.exchange(group, "registration", [rank], timeout=30)
            else:
                agreement.exchange(group, "registration", [rank], timeout=0.5)
        elif scenario == "notice":
            # Rank 2 failed inside a context in which it had nothing to register (so it takes no
            # round), while its peers did: when they give up, they say what rank 2 did.
            if rank == 2:
                agreement.notice_failure(group, "OutOfMemoryError: rank 2 ran out")
            else:
                agreement.exchange(group, "registration", [rank], timeout=2)
        elif scenario == "stale_notice":
            # Rank 2 failed in a block in which no rank had anything new (no round then, only
            # a notice); later every rank registers, rank 2 a little late. Its old notice must
            # not abort that round.
            if rank == 2:
                agreement.notice_failure(group, "KeyError: long ago")
                time.sleep(1.0)
            rows = agreement.exchange(group, "registration", [rank], timeout=30)
            outcome["rows"] = rows
        elif scenario == "in_step":
            # Finding 1: a rank that fails takes its part in the very round its peers hold, so
            # rounds stay in step: the next round pairs every rank's next record.
            for step in range(3):
                try:
                    if rank == 1 and step == 0:
                        agreement.report_failure(group, "registration", "KeyError: step 0")
                        continue
                    rows = agreement.exchange(group, "registration", [step, rank], timeout=30)
                    outcome.setdefault("rows", []).append(rows)
                except agreement.AgreementError as e:
                    outcome["errors"].append(str(e))
    except agreement.AgreementError as e:
        outcome["error"] = str(e)
    outcome.setdefault("seconds", time.monotonic() - start)
    results.put(outcome)


def _run(scenario: str, tmp_path: Any) -> dict[int, dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    path = str(tmp_path / f"store_{scenario}")
    procs = [ctx.Process(target=_rank, args=(r, path, scenario, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out = {}
    for _ in range(WORLD):
        item = results.get(timeout=120)
        out[item["rank"]] = item
    for p in procs:
        p.join(timeout=30)
    return out


def test_every_rank_gets_every_record_round_after_round(tmp_path: Any) -> None:
    out = _run("happy", tmp_path)
    for rank in range(WORLD):
        assert out[rank]["error"] is None, out[rank]
        assert out[rank]["all_rounds_match"], out[rank]


def test_a_rank_that_fails_makes_its_peers_raise_at_once_with_its_reason(tmp_path: Any) -> None:
    out = _run("failure", tmp_path)
    for rank in (0, 2):
        error = out[rank]["error"]
        assert error and "rank 1: ValueError: rank 1 broke" in error, out[rank]
        assert out[rank]["seconds"] < 30, "found only by the timeout"


def test_a_missing_rank_is_named_after_the_timeout_and_breaks_the_group(tmp_path: Any) -> None:
    out = _run("missing", tmp_path)
    for rank in (0, 1):
        (first,) = out[rank]["errors"]
        assert "rank(s) [2] did not reach" in first and "SYMM_RS_TIMEOUT" in first, first
        assert "allocated nothing new" in first, "the message should say the likely cause"
        later = out[rank]["error"]
        assert later and "stopped after an earlier failure" in later, out[rank]
        assert out[rank]["again_seconds"] < 10, "a broken group must fail at once"
    # The first rank to give up aborts the round for both: only one waits the whole timeout.
    assert max(out[rank]["seconds"] for rank in (0, 1)) >= 1.0
    late = out[2]["error"]
    assert late and "did not reach" in late, out[2]


def test_a_rank_that_arrives_after_its_peers_gave_up_does_not_go_on_alone(tmp_path: Any) -> None:
    out = _run("late", tmp_path)
    for rank in range(WORLD):
        assert out[rank]["error"] is not None, f"rank {rank} went on: {out[rank]}"
    assert "rank(s) [2] did not reach" in out[2]["error"], out[2]
    assert out[2]["seconds"] < 15, "the late rank should raise at once, not time out itself"


def test_a_failure_notice_is_what_the_timeout_reports(tmp_path: Any) -> None:
    out = _run("notice", tmp_path)
    for rank in (0, 1):
        error = out[rank]["error"]
        assert error and "rank(s) [2] did not reach" in error, out[rank]
        assert "failed before round 0: OutOfMemoryError: rank 2 ran out" in error, error


def test_a_notice_is_taken_back_when_the_rank_takes_a_round_after_all(tmp_path: Any) -> None:
    out = _run("stale_notice", tmp_path)
    for rank in range(WORLD):
        assert out[rank]["error"] is None, out[rank]
        assert out[rank]["rows"] == [[r] for r in range(WORLD)]


def test_rounds_stay_in_step_after_a_rank_fails(tmp_path: Any) -> None:
    out = _run("in_step", tmp_path)
    for rank in range(WORLD):
        rows = out[rank].get("rows", [])
        expected_steps = [1, 2]
        assert [r[0][0] for r in rows] == expected_steps, out[rank]
        for row in rows:
            step = row[0][0]
            assert row == [[step, r] for r in range(WORLD)], f"rounds drifted: {row}"
    for rank in (0, 2):
        (error,) = out[rank]["errors"]
        assert "KeyError: step 0" in error


def test_rounds_are_keyed_by_channel_not_address() -> None:
    from symm_rs import agreement
    from symm_rs.groups import Channel, Group

    a = Group(0x1000, 2, 0, 0, "a", Channel(object(), "pg-1"))
    successor = Group(0x1000, 2, 0, 0, "b", Channel(object(), "pg-2"))  # same address reused
    assert agreement.round_key(a) != agreement.round_key(successor)
    no_store = Group(0x1000, 2, 0, 0, "c")
    assert agreement.round_key(no_store) == ("comm", 0x1000)


@pytest.mark.parametrize("bad", [0, -1, math.inf, math.nan, 0.0])
def test_a_timeout_that_is_not_a_positive_finite_number_is_refused(bad: float) -> None:
    # Finding 6: torch's store reads a zero timeout as "wait for ever".
    from symm_rs import agreement
    from symm_rs.groups import Channel, Group

    group = Group(0x1000, 2, 0, 0, "a", Channel(object(), "pg-timeouts"))
    with pytest.raises(ValueError, match="finite number of seconds > 0"):
        agreement.exchange(group, "x", [1], timeout=bad)
    with pytest.raises(TypeError, match="number of seconds"):
        agreement.exchange(group, "x", [1], timeout="30")  # type: ignore[arg-type]
