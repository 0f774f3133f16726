"""Never hang, never crash: what a CPU can check of it (the never-hang issue's findings).

The agreement protocol itself runs over real stores in several processes in
``test_agreement_cpu.py``; the native table's bounded waits, plans and lanes in Rust
(``rust/src/segments/tests.rs``); the allocator plugs, NULL windows, aborts and the GIL on the
stand-in NCCL in ``test_stand_in.py``. This file covers the Python rules between them.
"""

from __future__ import annotations

import logging
import threading
import types
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import symm_rs  # noqa: E402
from symm_rs import (  # noqa: E402
    _native,
    agreement,
    context,
    groups,
    lifetime,
    pool,
    process_groups,
    registration,
    watchdog,
)
from symm_rs.groups import Channel, Group  # noqa: E402


def _group(comm: int = 0xC0FFEE, channel: Any = None, peers: int = 5) -> Group:
    return Group(comm, 2, 0, 0, f"fake {comm:#x}", channel, peers)


# -- finding 2: an exit registers its own group only ------------------------------------------


def test_an_exit_registers_only_its_own_group(monkeypatch: pytest.MonkeyPatch) -> None:
    # A capture postponed group B's registration; the next exit, of group A, used to register
    # B first (a pipeline stage then registered the world while the next stage waited for it).
    a, b = _group(0xA000), _group(0xB000)
    calls: list[int] = []
    monkeypatch.setattr(
        registration, "register", lambda g, lane, verify=True, timeout=None: calls.append(g.comm)
    )
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    context._exit_register(b, 1, True, None)  # inside a capture: postponed
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    context._exit_register(a, 1, True, None)
    assert calls == [0xA000], "another group's postponed registration ran at this exit"


def test_registrations_postponed_in_an_nccl_group_run_at_its_end_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(
        registration, "register", lambda g, lane, verify=True, timeout=None: calls.append(g.comm)
    )
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_native, "in_group", lambda: True)
    context._exit_register(_group(0xA000), 1, True, None)
    context._exit_register(_group(0xB000), 1, True, None)
    assert calls == []
    context.register_postponed_in_nccl_group()
    assert calls == [0xA000, 0xB000]
    context.register_postponed_in_nccl_group()
    assert calls == [0xA000, 0xB000], "registered twice"


# -- a failed block takes its part in the round, or leaves a notice --------------------------


def test_a_failed_block_with_something_to_register_takes_its_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_native, "in_group", lambda: False)
    monkeypatch.setattr(
        agreement, "report_failure", lambda g, topic, why, timeout=None: seen.append("round")
    )
    monkeypatch.setattr(agreement, "notice_failure", lambda g, why: seen.append("notice"))
    monkeypatch.setattr(_native, "is_up_to_date", lambda comm, lane: False)
    context._exit_failed(_group(), 1, True, None, KeyError("boom"))
    monkeypatch.setattr(_native, "is_up_to_date", lambda comm, lane: True)
    context._exit_failed(_group(), 1, True, None, KeyError("boom"))
    context._exit_failed(_group(), 1, False, None, KeyError("boom"))  # agreement off: nothing
    assert seen == ["round", "notice"]


# -- finding 12: pools freed on one rank only --------------------------------------------------


def test_ranks_that_freed_their_pools_differently_disagree_by_name() -> None:
    mine = registration.size_record([4096, 8192])
    other = list(mine)
    other[0] += 1  # that rank called destroy_pool once more
    with pytest.raises(agreement.AgreementError, match="destroy_pool, release_graph_pool"):
        registration.require_same_segments(_group(), [mine, other])
    registration.require_same_segments(_group(), [mine, list(mine)])


def test_ranks_that_allocated_differently_are_named_with_their_segments() -> None:
    a = registration.size_record([4096, 8192])
    b = registration.size_record([4096])
    with pytest.raises(agreement.AgreementError) as caught:
        registration.require_same_segments(_group(), [a, b])
    text = str(caught.value)
    assert "rank(s) [0]: 2 segment(s), 12288 bytes" in text
    assert "rank(s) [1]: 1 segment(s), 4096 bytes" in text
    assert "SYMM_RS_SEAL" in text


# -- finding 9: caches die with their communicators --------------------------------------------


def test_shutdown_releases_and_abort_forgets_before_the_communicator_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(_native, "release_comm", lambda comm: calls.append(("release", comm)))
    monkeypatch.setattr(_native, "forget_comm", lambda comm: calls.append(("forget", comm)))
    dropped: list[int] = []
    groups.on_forget(dropped.append)

    class FakeProcessGroup:
        def __init__(self) -> None:
            self.log: list[str] = []

        def shutdown(self) -> None:
            self.log.append("shutdown")

        def abort(self) -> None:
            self.log.append("abort")

    pg = FakeProcessGroup()
    shutdown = lifetime._windows_go_first(FakeProcessGroup.shutdown, deregister=True)
    abort = lifetime._windows_go_first(FakeProcessGroup.abort, deregister=False)
    lifetime.process_groups[pg] = _group(0xD00D)
    shutdown(pg)
    assert calls == [("release", 0xD00D)] and pg.log == ["shutdown"] and 0xD00D in dropped
    assert pg not in lifetime.process_groups, "a shut-down group's resolution survived"
    lifetime.process_groups[pg] = _group(0xD00D)
    abort(pg)
    assert calls[-1] == ("forget", 0xD00D) and pg.log[-1] == "abort"


def test_every_way_to_destroy_a_process_group_goes_through_the_wrappers() -> None:
    import torch.distributed as dist

    process_groups.usable()  # installs them
    assert getattr(dist.ProcessGroup.shutdown, "_symm_rs_wrapped", False)
    assert getattr(dist.ProcessGroup.abort, "_symm_rs_wrapped", False)


def test_a_forgotten_communicator_leaves_no_round_count_behind() -> None:
    no_store = _group(0xE000)
    key = agreement.round_key(no_store)
    agreement._rounds[key] = 7
    agreement._broken[key] = "old"
    groups.drop_cached(0xE000)
    assert key not in agreement._rounds and key not in agreement._broken


# -- measured 2: no pool is destroyed while a route is open ------------------------------------


def test_destroy_pool_refuses_while_any_route_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(id=(1, 2), snapshot=lambda: [])
    monkeypatch.setitem(pool._pools.shared, (0, threading.get_ident(), 9), fake)
    monkeypatch.setattr(pool.gc, "collect", lambda: 0)
    _native.route_opened()
    try:
        with pytest.raises(symm_rs.SymmetricMemoryError, match=r"route.*open.*abort the process"):
            pool.destroy_pool()
        assert (0, threading.get_ident(), 9) in pool._pools.shared, "a pool was dropped"
    finally:
        _native.route_closed()
    assert _native.open_routes() == 0


def test_a_dead_threads_pool_is_taken_over_not_destroyed(monkeypatch: pytest.MonkeyPatch) -> None:
    old = types.SimpleNamespace(id=(3, 4))
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    monkeypatch.setitem(pool._pools.shared, (0, dead.ident, 11), old)
    pool._pools.lanes[(3, 4)] = 42
    made: list[int] = []
    monkeypatch.setattr(pool, "_new_pool", lambda device: made.append(device))
    taken: list[Any] = []
    worker = threading.Thread(target=lambda: taken.append(pool.shared_pool(0, 11)))
    worker.start()
    worker.join()
    assert taken == [old] and made == [], "a new pool was made while a dead thread's waited"
    assert pool.lane_of(old) == 42, "the pool kept its lane (and its registered segments)"
    monkeypatch.delitem(pool._pools.shared, (0, worker.ident, 11))
    monkeypatch.delitem(pool._pools.lanes, (3, 4))


# -- the watchdog --------------------------------------------------------------------------------


@pytest.fixture()
def errors() -> Any:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Collect(logging.ERROR)
    logging.getLogger("symm_rs").addHandler(handler)
    yield records
    logging.getLogger("symm_rs").removeHandler(handler)


def test_a_registration_stuck_past_the_timeout_is_reported_once(
    monkeypatch: pytest.MonkeyPatch, errors: list[str]
) -> None:
    stuck = [(0xF00, 5, [1 << 20, 2 << 20], 31.0, 1, 4242)]
    monkeypatch.setattr(_native, "registrations_in_progress", lambda: stuck)
    monkeypatch.setattr(agreement, "default_timeout", lambda: 30.0)
    watchdog._names[0xF00] = ("ProcessGroup 'tp' (rank 0 of 2)", None)
    try:
        watchdog.look_once()
        watchdog.look_once()
        text = symm_rs.describe_registration_in_progress()
    finally:
        watchdog._names.pop(0xF00, None)
        watchdog._reported_stuck.discard((0xF00, 4242))
    reports = [e for e in errors if "has not returned" in e]
    assert len(reports) == 1, errors
    assert "ProcessGroup 'tp' (rank 0 of 2)" in reports[0] and "31 s" in reports[0]
    assert "registering 2 segment(s)" in text and "3145728 bytes" in text and "31.0 s" in text


def test_a_broken_group_is_reported_on_a_rank_blocked_elsewhere(
    monkeypatch: pytest.MonkeyPatch, errors: list[str], tmp_path: Any
) -> None:
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    group = _group(0xF10, Channel(store, "pg-watched"))
    aborted: list[str] = []
    group = Group(**{**group.__dict__, "abort": lambda: aborted.append("abort")})
    monkeypatch.setattr(_native, "registrations_in_progress", lambda: [])
    monkeypatch.setattr(watchdog, "_start", lambda: None)
    watchdog.watch(group)
    try:
        watchdog.look_once()
        assert errors == []
        store.set("symm_rs/pg-watched/broken", "round 3, seen by rank 1: rank(s) [0] missing")
        monkeypatch.setenv("SYMM_RS_ON_FAILURE", "abort")
        watchdog.look_once()
        watchdog.look_once()
    finally:
        watchdog._forget(0xF10)
    reports = [e for e in errors if "is broken" in e]
    assert len(reports) == 1 and "rank(s) [0] missing" in reports[0], errors
    assert aborted == ["abort"], "SYMM_RS_ON_FAILURE=abort did not abort through the owner"


# -- finding 10: the harness sees teardown ------------------------------------------------------


def _exits_badly(rank: int, world_size: int, how: str) -> str:
    import atexit
    import os
    import time

    if how == "crash":
        atexit.register(lambda: os._exit(7))
    elif how == "hang":
        atexit.register(lambda: time.sleep(60))
    return f"rank {rank} done"


@pytest.mark.parametrize(
    ("how", "ending", "code"), [("crash", "exited", 7), ("hang", "killed", None)]
)
def test_a_rank_that_dies_or_hangs_after_answering_is_seen(
    how: str, ending: str, code: Any
) -> None:
    from symm_rs_bench.launch import run_ranks_to_exit

    outcomes = run_ranks_to_exit(_exits_badly, 2, args=(how,), timeout=120, exit_wait=5)
    for rank, outcome in enumerate(outcomes):
        assert outcome.ok and outcome.value == f"rank {rank} done"
        assert (outcome.ending, outcome.exitcode) == (ending, code), outcome


def test_a_clean_exit_is_seen_as_one() -> None:
    from symm_rs_bench.launch import run_ranks_to_exit

    for outcome in run_ranks_to_exit(_exits_badly, 2, args=("clean",), timeout=120):
        assert (outcome.ending, outcome.exitcode) == ("exited", 0)
