"""The group abstraction, the symmetric-kernel rules, graph-pool settings and the engine shims,
on a machine without a GPU."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import types
from typing import Any

import pytest
import torch
import torch.distributed as dist

import symm_rs
from symm_rs import capability, context
from symm_rs.compat import sglang as sg
from symm_rs.compat import vllm
from symm_rs.groups import Group, peers, resolve

# -- peers / resolve ------------------------------------------------------------------------


class Gatherer:
    """An object that only knows how to gather (no NCCL communicator)."""

    rank = 1
    size = 3

    def all_gather_into_tensor(self, out: Any, inp: Any, stream: Any = None) -> None:
        out.copy_(inp.repeat(self.size))


def test_a_gatherer_is_a_group_for_collectives_that_do_not_register() -> None:
    group = peers(Gatherer())
    assert (group.rank, group.size, group.comm) == (1, 3, 0)
    out = torch.zeros(6)
    group.all_gather_into_tensor(out, torch.tensor([1.0, 2.0]))
    assert out.tolist() == [1.0, 2.0] * 3
    # ... but not for symmetric memory, which needs a communicator to register with.
    with pytest.raises(TypeError, match="group must be"):
        resolve(Gatherer())


def test_anything_else_names_both_accepted_sets() -> None:
    with pytest.raises(TypeError, match=r"disabled=True also .*all_gather_into_tensor"):
        peers(object())


def test_a_group_resolves_to_itself_and_a_comm_less_group_to_none() -> None:
    group = Group(0x1234, 2, 0, 0, "g")
    assert resolve(group) is group
    assert resolve(Group(0, 2, 0, -1, "gloo")) is None
    assert resolve(Group(0x1234, 1, 0, 0, "one rank")) is None


def test_a_gloo_process_group_gathers_through_torch(tmp_path: Any) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = peers(dist.group.WORLD)
        assert (group.rank, group.size, group.comm) == (0, 1, 0)
        out = torch.zeros(2)
        group.all_gather_into_tensor(out, torch.tensor([3.0, 4.0]))
        assert out.tolist() == [3.0, 4.0]
        channel_owner = types.SimpleNamespace(
            pynccl_comm=types.SimpleNamespace(comm=0x5000), cpu_group=dist.group.WORLD
        )
        # An engine's GroupCoordinator carries its store through its CPU group.
        assert symm_rs.groups._channel_of(channel_owner, "tp") is not None
    finally:
        dist.destroy_process_group()


# -- peer sets: one pool per set of ranks ------------------------------------------------------


def test_groups_over_the_same_ranks_share_a_peer_set_and_others_do_not() -> None:
    from symm_rs.groups import peer_set

    world = peer_set((0, 1, 2, 3), 0xA)
    assert peer_set((3, 2, 1, 0), 0xB) == world  # another communicator, the same ranks
    tp0, tp1 = peer_set((0, 1), 0xC), peer_set((2, 3), 0xD)
    assert len({world, tp0, tp1}) == 3
    assert 0 not in {world, tp0, tp1}  # 0 is the native "every communicator" tag


def test_a_communicator_without_known_ranks_has_a_peer_set_of_its_own_until_forgotten() -> None:
    from symm_rs import groups

    first = groups.peer_set(None, 0xE0)
    assert groups.peer_set(None, 0xE0) == first
    assert groups.peer_set(None, 0xE1) != first
    groups.drop_cached(0xE0)  # released or forgotten: NCCL may reuse the address
    assert groups.peer_set(None, 0xE0) != first


def test_the_ranks_of_an_engine_group_come_from_its_cpu_group(tmp_path: Any) -> None:
    from symm_rs.groups import _ranks_of

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        cpu = dist.group.WORLD
        coordinator = types.SimpleNamespace(
            pynccl_comm=types.SimpleNamespace(comm=1), cpu_group=cpu
        )
        pynccl = types.SimpleNamespace(comm=1, group=cpu)
        assert _ranks_of(coordinator, 1) == (0,)
        assert _ranks_of(types.SimpleNamespace(pynccl_comm=pynccl), 1) == (0,)
        assert _ranks_of(types.SimpleNamespace(_symm_rs_ranks=(4, 6)), 2) == (4, 6)
        # Ranks that do not match the communicator's size are not trusted.
        assert _ranks_of(coordinator, 2) is None
        assert _ranks_of(types.SimpleNamespace(comm=1), 2) is None
    finally:
        dist.destroy_process_group()


# -- symmetric kernels: the rules per NCCL version -----------------------------------------

V27, V28, V29 = (2, 27, 5), (2, 28, 9), (2, 29, 7)
HOST, OTHER_HOST = 11, 22
P2P_OFF, SHM_OFF, WIN_OFF, CUMEM_OFF = 1, 2, 4, 8


UNKNOWN = -1  # NCCL without its own answer (2.27.x), NVML without an answer


def _verdict(version: tuple[int, int, int], *rows: tuple[int, ...]) -> int:
    """The verdict code for rows of (host, bus, flags[, NCCL's answer, NVML index, mask])."""
    full = [list(r) + [UNKNOWN] * (capability.TOPOLOGY_INTS - len(r)) for r in rows]
    return capability._code(version, full)[0]


@pytest.mark.parametrize("version", [V27, V28, V29])
def test_one_node_with_nothing_switched_off_is_supported(version: tuple[int, int, int]) -> None:
    assert _verdict(version, (HOST, 0x100, 0), (HOST, 0x200, 0)) == 0


@pytest.mark.parametrize("version", [V27, V28, V29])
def test_ranks_on_two_nodes_get_no_symmetric_kernels(version: tuple[int, int, int]) -> None:
    assert _verdict(version, (HOST, 0x100, 0), (OTHER_HOST, 0x100, 0)) == 1


def test_p2p_off_alone_stops_2_27_and_2_29_but_not_2_28() -> None:
    rows = ((HOST, 0x100, P2P_OFF), (HOST, 0x200, P2P_OFF))
    assert _verdict(V27, *rows) == 4
    assert _verdict(V28, *rows) == 0  # measured: NCCL 2.28.9 still logs [Symmetric]
    assert _verdict(V29, *rows) == 4


def test_the_forced_network_transport_stops_2_28() -> None:
    rows = ((HOST, 0x100, P2P_OFF | SHM_OFF), (HOST, 0x200, P2P_OFF | SHM_OFF))
    assert _verdict(V28, *rows) == 5


@pytest.mark.parametrize(("flag", "code"), [(WIN_OFF, 6), (CUMEM_OFF, 7)])
def test_windows_or_cumem_off_on_any_rank(flag: int, code: int) -> None:
    assert _verdict(V28, (HOST, 0x100, 0), (HOST, 0x200, flag)) == code


def test_nccl_without_windows() -> None:
    assert _verdict((2, 26, 2), (HOST, 0x100, 0), (HOST, 0x200, 0)) == 8


def test_nccls_own_answer_decides_where_every_rank_has_it() -> None:
    # ncclCommQueryProperties: NCCL's symmetricSupport, whatever symm_rs would judge.
    yes, no = 1, 0
    assert _verdict(V29, (HOST, 0x100, P2P_OFF, yes), (HOST, 0x200, P2P_OFF, yes)) == 0
    assert _verdict(V28, (HOST, 0x100, 0, yes), (HOST, 0x200, 0, no)) == 9
    assert "rank 1" in capability._describe(9, [1], V28)
    # One rank without an answer: symm_rs's own rules apply.
    assert _verdict(V29, (HOST, 0x100, P2P_OFF, yes), (HOST, 0x200, P2P_OFF)) == 4
    # Nodes are NCCL's nodes even where NCCL itself says yes (it never does across nodes).
    assert _verdict(V28, (HOST, 0x100, 0, yes), (OTHER_HOST, 0x100, 0, yes)) == 1


def test_links_judged_from_nvml_masks_the_same_way_on_every_rank() -> None:
    # Rank 0 (NVML index 0) links to index 1 only; rank 2 sits at index 2.
    rows = [(HOST, 0x100, 0, UNKNOWN, 0, 0b010), (HOST, 0x200, 0, UNKNOWN, 1, 0b101)]
    assert _verdict(V27, *rows) == 0
    rows.append((HOST, 0x300, 0, UNKNOWN, 2, 0b011))
    assert _verdict(V27, *rows) == 2  # rank 0 has no peer access to rank 2
    assert _verdict(V29, *rows) == 3
    _, details = capability._code(V27, [list(r) for r in rows])
    assert details == [0, 2]


def test_the_host_is_nccls_host_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    # Several ranks on one machine with different NCCL_HOSTID are different nodes to NCCL
    # (that is how one GPU runs several ranks): symm_rs must not call them one node.
    monkeypatch.delenv("NCCL_HOSTID", raising=False)
    plain = capability._host_key()
    assert capability._host_key() == plain
    monkeypatch.setenv("NCCL_HOSTID", "rank-0")
    first = capability._host_key()
    monkeypatch.setenv("NCCL_HOSTID", "rank-1")
    assert len({plain, first, capability._host_key()}) == 3


def test_reasons_name_the_version_and_the_rank() -> None:
    text = capability._describe(5, [1], V28)
    assert "NCCL_P2P_DISABLE=1 and NCCL_SHM_DISABLE=1 (on rank 1)" in text and "2.28.9" in text
    assert "2 nodes" in capability._describe(1, [2], V27)
    assert not capability.SymmetricKernels(False, "x")


def test_a_one_rank_group_has_no_symmetric_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability, "resolve", lambda group: None)
    verdict = symm_rs.symmetric_kernels(object())
    assert not verdict and "one-rank" in verdict.reason


# -- graph pools ----------------------------------------------------------------------------


def test_graph_pool_setting_and_scope() -> None:
    assert context.graph_pool() is None
    symm_rs.set_graph_pool((0, 7))
    try:
        assert context.graph_pool() == (0, 7)
        with symm_rs.graph_capture((1, 0)) as pool:
            assert pool == (1, 0) and context.graph_pool() == (1, 0)
        assert context.graph_pool() == (0, 7)
    finally:
        symm_rs.set_graph_pool(None)
    assert context.graph_pool() is None


@pytest.mark.parametrize("bad", ["pool", (1,), (1, 2, 3), (1.0, 2), (True, 0), 5])
def test_a_graph_pool_must_look_like_one(bad: object) -> None:
    with pytest.raises(TypeError, match="graph_pool_handle"):
        symm_rs.set_graph_pool(bad)


# -- engine shims ---------------------------------------------------------------------------

SGLANG_SIGNATURES = {
    "use_symmetric_memory": "(group_coordinator: 'Any', disabled: 'bool' = False)",
    "set_graph_pool_id": "(graph_pool_id: 'Any') -> 'None'",
    "disable_symmetric_memory_context": "()",
    "restore_symmetric_memory_context": "(saved_context: 'Optional[SymmetricMemoryContext]')",
    "is_symmetric_memory_enabled": "() -> 'bool'",
    "is_allocation_symmetric": "() -> 'bool'",
    "get_nccl_mem_pool": "()",
}
VLLM_SIGNATURES = {
    "nccl_symm_mem_context": "(pynccl_comm: 'Any', disabled: 'bool' = False)",
    "set_graph_pool_id": "(graph_pool_id: 'Any') -> 'None'",
    "is_symmetric_memory_enabled": "() -> 'bool'",
    "is_symmetric_memory_tensor": "(tensor: 'torch.Tensor') -> 'bool'",
    "compile_nccl_allocator": "() -> 'None'",
    "get_nccl_mem_pool": "()",
}


@pytest.mark.parametrize(("module", "table"), [(sg, SGLANG_SIGNATURES), (vllm, VLLM_SIGNATURES)])
def test_shims_have_the_engines_names_and_parameters(module: Any, table: dict[str, str]) -> None:
    for name, expected in table.items():
        signature = str(inspect.signature(getattr(module, name)))
        # Parameter names and defaults are what engines call with; return notes may differ.
        assert signature.startswith(expected.split(" ->")[0]), (name, signature)
    assert set(table) <= set(module.__all__)


def test_sglang_shim_is_a_null_context_when_off_or_one_rank() -> None:
    coordinator = types.SimpleNamespace(world_size=1)
    assert isinstance(sg.use_symmetric_memory(coordinator), contextlib.nullcontext)
    assert isinstance(
        sg.use_symmetric_memory(types.SimpleNamespace(world_size=2), disabled=True),
        contextlib.nullcontext,
    )
    sg.set_symmetric_memory_enabled(False)
    try:
        assert not sg.is_symmetric_memory_enabled()
        assert isinstance(
            sg.use_symmetric_memory(types.SimpleNamespace(world_size=2)), contextlib.nullcontext
        )
    finally:
        sg.set_symmetric_memory_enabled(None)
    if importlib.util.find_spec("sglang") is None:
        assert sg.is_symmetric_memory_enabled()  # no SGLang: the shim on its own, on
    assert sg.is_allocation_symmetric()
    assert sg.disable_symmetric_memory_context() is None  # nothing active
    sg.restore_symmetric_memory_context(None)


def test_sglang_shim_sets_symm_rs_graph_pool() -> None:
    sg.set_graph_pool_id((0, 3))
    try:
        assert context.graph_pool() == (0, 3)
    finally:
        sg.set_graph_pool_id(None)


def test_vllm_shim_follows_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_NCCL_SYMM_MEM", raising=False)
    assert not vllm.is_symmetric_memory_enabled()
    with vllm.nccl_symm_mem_context(types.SimpleNamespace(world_size=2)) as ctx:
        assert ctx.disabled  # off: a no-op that still returns itself, as vLLM's
    monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", "1")
    monkeypatch.setattr(vllm, "_platform_is_cuda", lambda: True)  # vLLM's: CUDA only
    assert vllm.is_symmetric_memory_enabled()
    assert vllm.nccl_symm_mem_context(types.SimpleNamespace(world_size=1)).disabled
    assert vllm.compile_nccl_allocator() is None
    assert not vllm.is_symmetric_memory_tensor(torch.zeros(2))
