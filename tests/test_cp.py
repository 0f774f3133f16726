"""CPU tests of symm_rs.cp: the zig-zag layout, and the CP KV all-gather over real gloo groups.

Symmetric memory needs a GPU, so the gathers run with ``disabled=True`` (the context is then a
no-op). Each world size spawns its processes once and runs every case inside them; a worker keeps
going after a failed check so all ranks issue the same collectives, and reports its failures.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import random
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import pytest
import torch

import symm_rs
from symm_rs_bench.launch import run_ranks_to_exit


def _import_cp() -> ModuleType:
    try:
        return importlib.import_module("symm_rs.cp")
    except ModuleNotFoundError:
        # The installed wheel may predate cp.py; the module is pure Python, so the source
        # tree's copy runs on top of the installed native core.
        source = Path(__file__).resolve().parents[1] / "python" / "symm_rs"
        symm_rs.__path__.append(str(source))
        return importlib.import_module("symm_rs.cp")


cp = _import_cp()

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
# [], [heads, head_dim] and a deeper shape: the gather must not care how many trailing dims.
TRAILING = ((), (2, 4), (2, 3, 2))
JOIN_TIMEOUT_S = 120.0


def _make_kv(tokens: int, trailing: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (tokens, *trailing)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**40), 2**40, shape, generator=gen, dtype=dtype)


def _seq_len_batches(cp_size: int, seed: int, count: int) -> list[list[int]]:
    """Edge batches, then random ones; zero-length sequences are allowed and included."""
    blocks = 2 * cp_size
    batches = [
        [],
        [0],
        [0, 0],
        [1],
        [1, 1, 1],
        [0, 3, 0, 1],
        [blocks - 1],
        [blocks],
        [blocks + 1],
        [1, blocks - 1, blocks, blocks + 1, 0],
    ]
    rng = random.Random(seed)
    for _ in range(count):
        size = rng.randint(1, 6)
        batches.append(
            [
                rng.randint(0, 2 * blocks) if rng.random() < 0.5 else rng.randint(0, 150)
                for _ in range(size)
            ]
        )
    return batches


class FakeCommunicator:
    """Stands in for ``symm_rs.Communicator`` on rank ``rank`` of a group, in one process.

    The other ranks' slices are given up front; ``all_gather_into_tensor`` checks that this
    rank's input is the padded, contiguous slice expected and fills the output as a real
    all-gather would.
    """

    def __init__(self, rank: int, slices: list[torch.Tensor]) -> None:
        self.rank = rank
        self.size = len(slices)
        self._slices = slices
        self.calls: list[Any] = []

    def all_gather_into_tensor(
        self, output: torch.Tensor, input: torch.Tensor, stream: Optional[Any] = None
    ) -> None:
        self.calls.append(stream)
        assert input.is_contiguous() and output.is_contiguous()
        assert output.shape[0] == input.shape[0] * self.size
        assert output.shape[1:] == input.shape[1:] and output.dtype == input.dtype
        width = input.shape[0]
        mine = self._slices[self.rank]
        assert torch.equal(input[: mine.shape[0]], mine)
        assert not input[mine.shape[0] :].any(), "padding must be zero"
        snapshot = input.clone()  # the input may alias the output (in-place gather)
        for r, piece in enumerate(self._slices):
            dst = output[r * width : (r + 1) * width]
            dst.zero_()
            dst[: piece.shape[0]].copy_(snapshot[: piece.shape[0]] if r == self.rank else piece)


# --- layout, no communication -------------------------------------------------------------------


def test_layout_golden_example():
    layout = cp.zigzag_layout([5, 0, 1, 9, 3], cp_size=2)
    assert layout.block_lens == (
        (2, 1, 1, 1),
        (0, 0, 0, 0),
        (1, 0, 0, 0),
        (3, 2, 2, 2),
        (1, 1, 1, 0),
    )
    assert layout.per_rank_tokens == (10, 8)
    kv = torch.arange(18)
    # Rank 0: blocks 0 of every sequence, then blocks 3; rank 1: blocks 1, then blocks 2.
    assert cp.zigzag_split(kv, layout, 0).tolist() == [0, 1, 5, 6, 7, 8, 15, 4, 13, 14]
    assert cp.zigzag_split(kv, layout, 1).tolist() == [2, 9, 10, 16, 3, 11, 12, 17]
    gathered = torch.cat([cp.zigzag_split(kv, layout, r) for r in range(2)])
    assert torch.equal(gathered[layout.restore_index], kv)


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 8])
def test_layout_round_trip(cp_size):
    for seq_lens in _seq_len_batches(cp_size, seed=cp_size, count=25):
        layout = cp.zigzag_layout(seq_lens, cp_size)
        blocks = 2 * cp_size
        total = sum(seq_lens)
        assert layout.cp_size == cp_size and layout.seq_lens == tuple(seq_lens)
        assert len(layout.per_rank_tokens) == cp_size
        assert sum(layout.per_rank_tokens) == total
        assert sum(layout.split_lens) == total
        assert len(layout.split_lens) == blocks * len(seq_lens)
        for length, lens in zip(seq_lens, layout.block_lens):
            assert len(lens) == blocks and sum(lens) == length
            assert list(lens) == sorted(lens, reverse=True)  # remainder goes to the first blocks
            assert lens[0] - lens[-1] <= 1
        index = layout.restore_index
        assert index.dtype == torch.int64 and index.dim() == 1
        assert torch.equal(torch.sort(index).values, torch.arange(total))

        kv = torch.arange(total)
        slices = [cp.zigzag_split(kv, layout, r) for r in range(cp_size)]
        assert [s.shape[0] for s in slices] == list(layout.per_rank_tokens)
        gathered = torch.cat(slices)
        assert torch.equal(gathered[index], kv)
        # split_lens cuts the gathered slices into the blocks, each a run of consecutive tokens.
        for piece in torch.split(gathered, list(layout.split_lens)):
            if piece.numel() > 1:
                assert torch.equal(piece, torch.arange(int(piece[0]), int(piece[0]) + len(piece)))


def test_layout_balances_sequences():
    layout = cp.zigzag_layout([1000, 37, 4], cp_size=4)
    # Every rank holds one early and one late block: at most 2 tokens apart per sequence.
    assert max(layout.per_rank_tokens) - min(layout.per_rank_tokens) <= 2 * 3


def test_layout_trailing_dims_and_device():
    layout = cp.zigzag_layout([7, 2, 0, 11], cp_size=3, device="cpu")
    for trailing in TRAILING:
        kv = _make_kv(20, trailing, torch.float32, seed=1)
        gathered = torch.cat([cp.zigzag_split(kv, layout, r) for r in range(3)])
        assert torch.equal(gathered.index_select(0, layout.restore_index), kv)


def test_layout_is_frozen_and_compares_by_value():
    a = cp.zigzag_layout([3, 4], 2)
    b = cp.zigzag_layout([3, 4], 2)
    assert a == b and hash(a) == hash(b)
    assert a != cp.zigzag_layout([3, 4], 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.cp_size = 3


def test_layout_validation():
    with pytest.raises(ValueError, match="cp_size must be an int >= 1"):
        cp.zigzag_layout([1, 2], 0)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] is -1"):
        cp.zigzag_layout([1, -1], 2)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] must be an int"):
        cp.zigzag_layout([1.5], 2)
    with pytest.raises(ValueError, match=r"seq_lens\[0\] must be an int, got a bool"):
        cp.zigzag_layout([True], 2)
    # Integer scalars that are not Python ints (0-d tensors, numpy ints) are accepted.
    assert cp.zigzag_layout([torch.tensor(3), 4], 2) == cp.zigzag_layout([3, 4], 2)
    layout = cp.zigzag_layout([4, 4], 2)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
        cp.zigzag_split(torch.zeros(8), layout, 2)
    with pytest.raises(ValueError, match="sum\\(seq_lens\\) = 8 tokens; got 7"):
        cp.zigzag_split(torch.zeros(7), layout, 0)


# --- gather through a fake communicator, no spawning --------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rerange_through_fake_communicator(world):
    for i, seq_lens in enumerate(_seq_len_batches(world, seed=100 + world, count=10)):
        layout = cp.zigzag_layout(seq_lens, world)
        dtype, trailing = DTYPES[i % len(DTYPES)], TRAILING[i % len(TRAILING)]
        kv = _make_kv(sum(seq_lens), trailing, dtype, seed=i)
        slices = [cp.zigzag_split(kv, layout, r) for r in range(world)]
        for rank in range(world):
            comm = FakeCommunicator(rank, slices)
            out = cp.cp_all_gather_rerange_kv_cache(slices[rank], comm, layout, disabled=True)
            assert out.dtype == dtype and torch.equal(out, kv), (seq_lens, rank)
            assert len(comm.calls) == (1 if max(layout.per_rank_tokens) > 0 else 0)


def test_gather_uneven_through_fake_communicator():
    counts = [3, 0, 5, 1]
    slices = [_make_kv(n, (2, 4), torch.bfloat16, seed=n) for n in counts]
    for rank in range(4):
        comm = FakeCommunicator(rank, slices)
        # A CPU tensor ignores the stream: the communicator gets stream=None.
        out = cp.cp_all_gather_reorganized_into_tensor_kv_cache(
            slices[rank], comm, counts, stream=object(), disabled=True
        )
        assert comm.calls == [None]
        assert torch.equal(out, torch.cat(slices))


def test_gather_all_empty_skips_the_collective():
    comm = FakeCommunicator(0, [torch.zeros(0, 3), torch.zeros(0, 3)])
    out = cp.cp_all_gather_reorganized_into_tensor_kv_cache(
        torch.zeros(0, 3), comm, [0, 0], disabled=True
    )
    assert out.shape == (0, 3) and comm.calls == []


def test_gather_validation():
    slices = [torch.ones(2, 4), torch.ones(3, 4)]
    comm = FakeCommunicator(1, slices)
    with pytest.raises(ValueError, match=r"input has 2 tokens on rank 1; expected per_rank_tok"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(slices[0], comm, [2, 3], disabled=True)
    with pytest.raises(ValueError, match="per_rank_tokens has 3 entries; expected 2"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(slices[1], comm, [2, 3, 0], disabled=True)
    with pytest.raises(ValueError, match=r"per_rank_tokens\[0\] is -1"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(slices[1], comm, [-1, 3], disabled=True)
    with pytest.raises(ValueError, match="0-d tensor"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(
            torch.tensor(1.0), comm, [2, 3], disabled=True
        )
    with pytest.raises(TypeError, match="all_gather_into_tensor"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(
            slices[1], object(), [2, 3], disabled=True
        )
    layout = cp.zigzag_layout([5], cp_size=3)
    with pytest.raises(ValueError, match="cp_size=3, but the group has 2 ranks"):
        cp.cp_all_gather_rerange_kv_cache(torch.ones(2), comm, layout, disabled=True)
    assert comm.calls == [], "a rejected call must not communicate"


def test_enabled_symmetric_memory_rejects_a_group_without_a_communicator():
    # Not disabled: use_symmetric_memory must find an NCCL communicator, which the fake lacks.
    slices = [torch.ones(2), torch.ones(2)]
    comm = FakeCommunicator(0, slices)
    with pytest.raises(TypeError, match="group must be"):
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(slices[0], comm, [2, 2])
    assert comm.calls == []


# --- real gloo groups ---------------------------------------------------------------------------


def _gloo_cases(rank: int, world: int, group: Any, failures: list[str]) -> int:
    """Runs every case on this rank; returns how many ran. Same collectives on every rank."""
    ran = 0

    def check(ok: bool, what: str) -> None:
        if not ok:
            failures.append(f"rank {rank}: {what}")

    # Function 1 alone, uneven counts, with ranks holding nothing.
    uneven = {
        2: [[3, 0], [0, 5], [0, 0], [4, 4], [1, 7]],
        4: [[2, 0, 5, 1], [0, 0, 0, 1], [0, 0, 0, 0], [4, 4, 4, 4], [9, 0, 0, 3]],
    }[world]
    for c, counts in enumerate(uneven):
        for t, trailing in enumerate(TRAILING):
            dtype = DTYPES[(c + t) % len(DTYPES)]
            slices = [
                _make_kv(n, trailing, dtype, seed=1000 * c + 10 * t + r)
                for r, n in enumerate(counts)
            ]
            out = cp.cp_all_gather_reorganized_into_tensor_kv_cache(
                slices[rank], group, counts, disabled=True
            )
            expected = torch.cat(slices)
            check(
                out.shape == expected.shape and torch.equal(out, expected),
                f"gather counts={counts} trailing={trailing} dtype={dtype}",
            )
            ran += 1

    # The zig-zag round trip over random batches, every dtype and trailing shape.
    for b, seq_lens in enumerate(_seq_len_batches(world, seed=7 * world, count=12)):
        layout = cp.zigzag_layout(seq_lens, world)
        for dtype in DTYPES:
            for trailing in TRAILING:
                kv = _make_kv(sum(seq_lens), trailing, dtype, seed=b)
                local = cp.zigzag_split(kv, layout, rank)
                out = cp.cp_all_gather_rerange_kv_cache(local, group, layout, disabled=True)
                check(
                    out.dtype == dtype and torch.equal(out, kv),
                    f"rerange seq_lens={seq_lens} trailing={trailing} dtype={dtype}",
                )
                ran += 1

    # Without disabled, a gloo group has no NCCL communicator to register with. Every rank
    # raises before communicating, so the ranks stay in step.
    try:
        cp.cp_all_gather_reorganized_into_tensor_kv_cache(
            torch.ones(1), group, [1] * world, disabled=False
        )
        check(False, "disabled=False on a gloo group did not raise")
    except (TypeError, symm_rs.SymmetricMemoryError):
        pass
    ran += 1
    return ran


def _gloo_rank(rank: int, world: int) -> tuple[int, list[str]]:
    """One rank (spawned by ``run_ranks_to_exit``, which set the env:// variables): every case,
    and what failed."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    failures: list[str] = []
    ran = 0
    try:
        # A rank that died mid-case turns the others' wait into an error, not a hang.
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        try:
            ran = _gloo_cases(rank, world, dist.group.WORLD, failures)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        failures.append(f"rank {rank}: {traceback.format_exc()}")
    return ran, failures


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_all_gather(world):
    outcomes = run_ranks_to_exit(_gloo_rank, world, timeout=JOIN_TIMEOUT_S, exit_wait=5.0)
    missing = [r for r, o in enumerate(outcomes) if not o.ok]
    assert not missing, f"ranks {missing} never reported (hung or crashed): {outcomes}"
    reports = {r: o.value for r, o in enumerate(outcomes)}
    problems = [f for _, failures in reports.values() for f in failures]
    assert not problems, "\n".join(problems)
    counts = {ran for ran, _ in reports.values()}
    assert len(counts) == 1 and counts.pop() > 0, f"ranks ran different case counts: {reports}"
    assert all(o.exitcode == 0 for o in outcomes), [o.exitcode for o in outcomes]
