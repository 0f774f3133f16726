"""Cross-rank agreement in bounded time, over a real torch store, with one process per rank (no
GPU): every rank gets every record; a rank that reports a failure makes its peers raise at once
with its reason; a rank that never arrives makes its peers raise after the timeout, naming it;
rounds stay in step across many exchanges."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import pytest

pytest.importorskip("torch")

WORLD = 3


def _rank(rank: int, path: str, scenario: str, results: Any) -> None:
    import torch.distributed as dist

    from symm_rs import agreement
    from symm_rs.groups import Channel, Group

    store = dist.FileStore(path, WORLD)
    group = Group(0x1000, WORLD, rank, 0, "test group", Channel(store, f"t-{scenario}"))
    outcome: dict[str, Any] = {"rank": rank}
    start = time.monotonic()
    try:
        if scenario == "happy":
            rows = [agreement.exchange(group, "x", [rank, i, rank * i]) for i in range(20)]
            outcome["rows"] = rows[-1]
            outcome["all_rounds_match"] = all(
                row == [[r, i, r * i] for r in range(WORLD)] for i, row in enumerate(rows)
            )
        elif scenario == "failure":
            if rank == 1:
                agreement.report_failure(group, "x", "ValueError: rank 1 broke")
                outcome["error"] = None
            else:
                agreement.exchange(group, "x", [rank], timeout=30)
        elif scenario == "missing":
            if rank != 2:
                agreement.exchange(group, "x", [rank], timeout=1.0)
    except agreement.AgreementError as e:
        outcome["error"] = str(e)
    outcome["seconds"] = time.monotonic() - start
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
        assert out[rank].get("error") is None, out[rank]
        assert out[rank]["all_rounds_match"], out[rank]


def test_a_rank_that_fails_makes_its_peers_raise_at_once_with_its_reason(tmp_path: Any) -> None:
    out = _run("failure", tmp_path)
    for rank in (0, 2):
        error = out[rank]["error"]
        assert error and "rank 1: ValueError: rank 1 broke" in error, out[rank]
        assert out[rank]["seconds"] < 30, "found only by the timeout"


def test_a_rank_that_never_arrives_is_named_after_the_timeout(tmp_path: Any) -> None:
    out = _run("missing", tmp_path)
    for rank in (0, 1):
        error = out[rank]["error"]
        assert error and "rank(s) [2] did not reach" in error and "SYMM_RS_TIMEOUT" in error
        assert out[rank]["seconds"] >= 1.0


def test_rounds_are_keyed_by_channel_not_address() -> None:
    from symm_rs import agreement
    from symm_rs.groups import Channel, Group

    a = Group(0x1000, 2, 0, 0, "a", Channel(object(), "pg-1"))
    successor = Group(0x1000, 2, 0, 0, "b", Channel(object(), "pg-2"))  # same address reused
    assert agreement.round_key(a, "verify") != agreement.round_key(successor, "verify")
    no_store = Group(0x1000, 2, 0, 0, "c")
    assert agreement.round_key(no_store, "verify") == (0x1000, "verify")
