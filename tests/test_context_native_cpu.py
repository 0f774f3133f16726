"""The native ``use_symmetric_memory``: its bookkeeping without a GPU.

The rules it calls (``symm_rs.context._enter_slow`` and friends) are replaced by recorders, so
these tests see exactly when the native side resolves a group, routes, and registers.
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


class Coordinator:
    """SGLang's GroupCoordinator, reduced to what symm_rs reads."""

    def __init__(self, comm: int) -> None:
        self.pynccl_comm = types.SimpleNamespace(comm=comm)


def _group(comm: int = COMM, device: int = 0) -> Group:
    return Group(comm=comm, size=2, rank=0, device=device, name=f"fake {comm:#x}")


class _Handle:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def end(self) -> None:
        self.log.append("end")


class Rules:
    """Records what the native context asks of ``symm_rs.context``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, groups: dict[int, Group]) -> None:
        self.log: list[str] = []
        self.resolved: list[object] = []
        self.groups = groups

        def resolve(group: object) -> Optional[Group]:
            self.resolved.append(group)
            comm = group.pynccl_comm.comm if hasattr(group, "pynccl_comm") else group
            return self.groups.get(comm)  # type: ignore[arg-type]

        def enter_slow(group: Group, graph_pool: Any) -> tuple[_Handle, Any]:
            self.log.append(f"enter {group.comm:#x}")
            return _Handle(self.log), None

        monkeypatch.setattr(ctx, "resolve", resolve)
        monkeypatch.setattr(ctx, "_enter_slow", enter_slow)
        monkeypatch.setattr(
            ctx, "_exit_register", lambda g, verify, timeout: self.log.append(f"register {verify}")
        )
        monkeypatch.setattr(
            ctx,
            "_exit_failed",
            lambda g, verify, timeout, error: self.log.append(f"failed {type(error).__name__}"),
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
    assert rules.log == [f"enter {COMM:#x}", "end", "register False"] * 5


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


def test_nested_contexts_route_once_and_each_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group(), COMM + 1: _group(COMM + 1)})
    with symm_rs.use_symmetric_memory(COMM):
        with symm_rs.use_symmetric_memory(COMM + 1):
            pass
    assert rules.log == [f"enter {COMM:#x}", "register False", "end", "register False"]


def test_nesting_across_devices_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = Rules(monkeypatch, {COMM: _group(), COMM + 1: _group(COMM + 1, device=1)})
    with symm_rs.use_symmetric_memory(COMM):
        with pytest.raises(symm_rs.SymmetricMemoryError, match=r"cuda:1 cannot nest.*cuda:0"):
            with symm_rs.use_symmetric_memory(COMM + 1):
                pass
    assert rules.log == [f"enter {COMM:#x}", "end", "register False"]


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

    def refuse(group: Group, graph_pool: Any) -> Any:
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
    monkeypatch.setenv("SYMM_RS_VERIFY", "yes")
    assert symm_rs.use_symmetric_memory(COMM).verify is True
    monkeypatch.setenv("SYMM_RS_VERIFY", "off")
    assert symm_rs.use_symmetric_memory(COMM).verify is False
    monkeypatch.setenv("SYMM_RS_VERIFY", "maybe")
    with pytest.raises(ValueError, match="SYMM_RS_VERIFY"):
        symm_rs.use_symmetric_memory(COMM)


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
    monkeypatch.setitem(pool._pools.shared, (0, threading.get_ident()), mine)
    assert pool.is_shared_pool(0, mine)
    assert not pool.is_shared_pool(0, other)  # e.g. a capture pool
    assert not pool.is_shared_pool(1, mine)  # another device: never created by the question
    assert (1, threading.get_ident()) not in pool._pools.shared
