"""The native ``use_symmetric_memory``: its bookkeeping without a GPU.

The rules it calls (``symm_rs.context._enter`` and ``_exit``, and what they call:
``_enter_slow`` and friends) are replaced by recorders, so these tests see exactly when the
native side resolves a group, routes, and registers.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import pytest

import symm_rs
from symm_rs import _native
from symm_rs import context as ctx
from symm_rs.groups import Group

COMM = 0x5EED000
LANE = 3  # the pool lane the recorded slow path "routes" into
REGISTER = f"register True lane {LANE}"  # agreement on by default


class Coordinator:
    """SGLang's GroupCoordinator, reduced to what symm_rs reads."""

    def __init__(self, comm: int) -> None:
        self.pynccl_comm = types.SimpleNamespace(comm=comm)


def _group(comm: int = COMM, device: int = 0, peers: int = 0) -> Group:
    """A two-rank group; its peer set defaults to one of its own (as a bare communicator's)."""
    name = f"fake {comm:#x}"
    return Group(comm=comm, size=2, rank=0, device=device, name=name, peer_set=peers or comm)


class _Handle:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def end(self) -> None:
        self.log.append("end")


class Rules:
    """Records what the native context asks of ``symm_rs.context``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, groups: dict[int, Group]) -> None:
        self.log: list[str] = []
        self.tags: list[int] = []  # the allocation tag while each route was made
        self.resolved: list[object] = []
        self.groups = groups

        def resolve(group: object) -> Optional[Group]:
            self.resolved.append(group)
            comm = group.pynccl_comm.comm if hasattr(group, "pynccl_comm") else group
            return self.groups.get(comm)  # type: ignore[arg-type]

        def enter_slow(group: Group, graph_pool: Any, nested: bool = False) -> tuple[Any, Any, int]:
            self.log.append(f"enter {group.comm:#x}" + (" nested" if nested else ""))
            self.tags.append(_tag())
            return _Handle(self.log), None, LANE

        monkeypatch.setattr(ctx, "resolve", resolve)
        monkeypatch.setattr(ctx, "_enter_slow", enter_slow)
        monkeypatch.setattr(
            ctx,
            "_exit_register",
            lambda g, lane, verify, timeout: self.log.append(f"register {verify} lane {lane}"),
        )
        monkeypatch.setattr(
            ctx,
            "_exit_failed",
            lambda g, lane, verify, timeout, error: self.log.append(
                f"failed {type(error).__name__}"
            ),
        )
        monkeypatch.setattr(
            ctx, "_enter_failed", lambda g, error, timeout: self.log.append("enter_failed")
        )


@pytest.fixture(autouse=True)
def _clean_cache() -> Any:
    _native.forget_group(COMM)
    _native.forget_group(COMM + 1)
    yield
    _native.forget_group(COMM)
    _native.forget_group(COMM + 1)


def test_the_context_is_the_native_class() -> None:
    assert symm_rs.use_symmetric_memory is _native.use_symmetric_memory
    c = symm_rs.use_symmetric_memory(COMM, disabled=True, timeout=2.5)
    assert (c.disabled, c.graph_pool, c.timeout) == (True, None, 2.5)
    with c as entered:
        assert entered is c and c._resolved is None


def test_a_group_object_is_resolved_once_then_from_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = Rules(monkeypatch, {COMM: _group()})
    coordinator = Coordinator(COMM)
    for _ in range(5):
        with symm_rs.use_symmetric_memory(coordinator) as c:
            assert c._resolved == _group()
    assert rules.resolved == [coordinator]
    # Every exit registers here: the stand-in table has never seen COMM, so it is not up to date.
    assert rules.log == [f"enter {COMM:#x}", "end", REGISTER] * 5


def test_a_swapped_communicator_is_resolved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group(), COMM + 1: _group(COMM + 1)})
    coordinator = Coordinator(COMM)
    with symm_rs.use_symmetric_memory(coordinator):
        pass
    coordinator.pynccl_comm.comm = COMM + 1  # an engine recreated its communicator
    with symm_rs.use_symmetric_memory(coordinator) as c:
        assert c._resolved.comm == COMM + 1
    assert len(rules.resolved) == 2


def test_a_forgotten_communicator_is_resolved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group()})
    for _ in range(2):
        with symm_rs.use_symmetric_memory(COMM):
            pass
    _native.forget_group(COMM)
    with symm_rs.use_symmetric_memory(COMM):
        pass
    assert rules.resolved == [COMM, COMM]


def test_objects_without_weak_references_are_never_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Slotted:
        __slots__ = ("comm",)

        def __init__(self) -> None:
            self.comm = COMM

    rules = Rules(monkeypatch, {COMM: _group()})
    monkeypatch.setattr(ctx, "resolve", lambda g: rules.resolved.append(g) or _group())
    group = Slotted()
    for _ in range(3):
        with symm_rs.use_symmetric_memory(group):
            pass
    assert rules.resolved == [group] * 3


def test_a_one_rank_group_routes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {})
    with symm_rs.use_symmetric_memory(COMM) as c:
        assert c._resolved is None
    assert rules.log == []


def _tag() -> tuple[int, int]:
    """The (peer set, lane) this thread's allocations are tagged with now."""
    tag = _native.allocate_for(0, 0)
    _native.allocate_for(*tag)
    return tuple(tag)


def test_nested_contexts_over_the_same_ranks_route_once_and_each_registers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A ProcessGroup and a Communicator over the same ranks share a peer set, hence a pool.
    rules = Rules(monkeypatch, {COMM: _group(peers=7), COMM + 1: _group(COMM + 1, peers=7)})
    with symm_rs.use_symmetric_memory(COMM):
        with symm_rs.use_symmetric_memory(COMM + 1):
            assert _tag() == (7, LANE)
        assert _tag() == (7, LANE)
    assert _tag() == (0, 0)
    assert rules.log == [f"enter {COMM:#x}", REGISTER, "end", REGISTER]
    # Tagged before routing (the slow path may grow the pool at once), with the peers.
    assert rules.tags == [(7, 0)]


def test_a_nested_context_for_other_ranks_routes_to_their_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # World {0..3} around TP {0,1}: the TP buffers must not grow the world's pool, which the
    # other TP group's ranks grow differently.
    rules = Rules(monkeypatch, {COMM: _group(peers=7), COMM + 1: _group(COMM + 1, peers=8)})
    with symm_rs.use_symmetric_memory(COMM):
        with symm_rs.use_symmetric_memory(COMM + 1):
            assert _tag() == (8, LANE)
        assert _tag() == (7, LANE)
    assert _tag() == (0, 0)
    assert rules.log == [
        f"enter {COMM:#x}",
        f"enter {COMM + 1:#x} nested",
        "end",
        REGISTER,
        "end",
        REGISTER,
    ]


def test_a_nested_context_that_cannot_route_keeps_the_outer_pool_and_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Older torch puts the oldest route first: the inner context then allocates into the outer
    # pool, and its segments carry the outer tag, so the outer group registers them.
    rules = Rules(monkeypatch, {COMM: _group(peers=7), COMM + 1: _group(COMM + 1, peers=8)})
    real = ctx._enter_slow

    def enter_slow(group: Group, graph_pool: Any, nested: bool = False) -> tuple[Any, Any, int]:
        if nested:
            rules.log.append("kept")
            return None, None, 0
        return real(group, graph_pool, nested)

    monkeypatch.setattr(ctx, "_enter_slow", enter_slow)
    with symm_rs.use_symmetric_memory(COMM):
        with symm_rs.use_symmetric_memory(COMM + 1):
            assert _tag() == (7, LANE)
    assert _tag() == (0, 0)
    assert rules.log == [f"enter {COMM:#x}", "kept", REGISTER, "end", REGISTER]


def test_nesting_across_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group(), COMM + 1: _group(COMM + 1, device=1)})
    with symm_rs.use_symmetric_memory(COMM):
        with pytest.raises(symm_rs.SymmetricMemoryError, match=r"cuda:1 cannot nest.*cuda:0"):
            with symm_rs.use_symmetric_memory(COMM + 1):
                pass
    # The refused context tells peers that may wait for this rank (agreement is on).
    assert rules.log == [f"enter {COMM:#x}", "enter_failed", "end", REGISTER]


def test_an_active_object_cannot_be_entered_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    Rules(monkeypatch, {COMM: _group()})
    c = symm_rs.use_symmetric_memory(COMM)
    with c:
        with pytest.raises(symm_rs.SymmetricMemoryError, match="already active"):
            c.__enter__()
    with c:  # and again once it has exited
        pass


def test_an_error_in_the_block_is_reported_not_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rules = Rules(monkeypatch, {COMM: _group()})
    with pytest.raises(KeyError):
        with symm_rs.use_symmetric_memory(COMM, verify=True):
            raise KeyError("boom")
    assert rules.log == [f"enter {COMM:#x}", "end", "failed KeyError"]


def test_a_failed_enter_tells_verifying_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group()})

    def refuse(group: Group, graph_pool: Any, nested: bool = False) -> Any:
        raise symm_rs.SymmetricMemoryError("no route")

    monkeypatch.setattr(ctx, "_enter_slow", refuse)
    with pytest.raises(symm_rs.SymmetricMemoryError, match="no route"):
        with symm_rs.use_symmetric_memory(COMM, verify=True):
            pass
    with pytest.raises(symm_rs.SymmetricMemoryError, match="no route"):
        with symm_rs.use_symmetric_memory(COMM, verify=False):
            pass
    assert rules.log == ["enter_failed"]


def test_verify_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYMM_RS_VERIFY", raising=False)
    assert symm_rs.use_symmetric_memory(COMM).verify is True, "agreement is on by default"
    monkeypatch.setenv("SYMM_RS_VERIFY", "yes")
    assert symm_rs.use_symmetric_memory(COMM).verify is True
    monkeypatch.setenv("SYMM_RS_VERIFY", "off")
    assert symm_rs.use_symmetric_memory(COMM).verify is False
    # Read when asked for (and at each exit that registers), not when the object is made.
    context = symm_rs.use_symmetric_memory(COMM)
    monkeypatch.setenv("SYMM_RS_VERIFY", "maybe")
    with pytest.raises(ValueError, match="SYMM_RS_VERIFY"):
        context.verify  # noqa: B018
    context.verify = False
    assert context.verify is False


def test_the_graph_pool_setting_lives_in_the_native_module() -> None:
    assert symm_rs.context.graph_pool() is None
    with symm_rs.graph_capture((7, 9)) as pool:
        assert pool == (7, 9) and _native.graph_pool_id() == (7, 9)
        symm_rs.set_graph_pool((1, 2))
        assert symm_rs.context.graph_pool() == (1, 2)
    assert symm_rs.context.graph_pool() is None


def test_only_this_threads_shared_pool_is_routed_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from symm_rs import pool

    mine, other = object(), object()
    monkeypatch.setitem(pool._pools.shared, (0, threading.get_ident(), 5), mine)
    assert pool.is_shared_pool(0, mine, 5)
    assert not pool.is_shared_pool(0, other, 5)  # e.g. a capture pool
    assert not pool.is_shared_pool(0, mine, 6)  # another peer set's pool
    assert not pool.is_shared_pool(1, mine, 5)  # another device: never created by the question
    assert (1, threading.get_ident(), 5) not in pool._pools.shared


def test_a_comm_property_that_switches_threads_cannot_deadlock_two_contexts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Finding 3: the cache lookup held its lock while reading `.comm`, a Python property on a
    # Communicator. When the property let another thread run, and that thread entered a
    # context, it blocked on the lock holding the GIL, and neither could ever go on.
    import threading
    import time

    class Slow:
        @property
        def comm(self) -> int:
            time.sleep(0.0005)  # gives up the GIL, as a property calling into C may
            return COMM

    Rules(monkeypatch, {COMM: _group()})
    groups = [Slow(), Slow()]
    errors: list[BaseException] = []

    def worker(group: Slow) -> None:
        try:
            for _ in range(200):
                with symm_rs.use_symmetric_memory(group):
                    pass
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "two contexts deadlocked on the group cache"
    assert not errors, errors
