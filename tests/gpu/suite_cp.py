"""Context-parallel KV all-gather on real GPUs: cp = world size over NCCL (torch group and
symm_rs.Communicator), and a TP 2 x CP 2 layout on 4 GPUs where each rank uses two groups and
the gathered buffers are symmetric for the CP group."""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist

import symm_rs
from symm_rs.cp import (
    cp_all_gather_reorganized_into_tensor_kv_cache,
    cp_all_gather_rerange_kv_cache,
    zigzag_layout,
    zigzag_split,
)

from harness import Ctx, needs

SHAPES = [(), (8, 128), (2, 3, 64)]
DTYPES = [torch.bfloat16, torch.float32]


def _batch(seed: int, cp: int) -> list[int]:
    rng = random.Random(seed)
    short = [rng.randint(0, 2 * cp - 1) for _ in range(3)]  # empty blocks
    return [*short, 1, *(rng.randint(1, 3000) for _ in range(rng.randint(1, 5)))]


def _kv(total: int, trailing: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn((total, *trailing), generator=gen, device="cuda").to(dtype)


def _round_trips(ctx: Ctx, group: Any, cp: int, cp_rank: int, seed0: int) -> list[str]:
    """Zig-zag split of a known KV, gathered back over ``group``; mismatches collected so every
    rank issues the same collectives."""
    problems = []
    stream = torch.cuda.Stream()
    for case in range(6):
        lens = _batch(seed0 + case, cp)
        layout = zigzag_layout(lens, cp, device="cuda")
        trailing = SHAPES[case % len(SHAPES)]
        dtype = DTYPES[case % len(DTYPES)]
        full = _kv(sum(lens), trailing, dtype, seed=seed0 + case)  # same on every rank
        local = zigzag_split(full, layout, cp_rank)
        got = cp_all_gather_rerange_kv_cache(
            local, group, layout, stream=stream if case % 2 else None
        )
        torch.cuda.synchronize()
        if not torch.equal(got, full):
            problems.append(f"lens={lens} shape={trailing} {dtype}: gathered KV differs")
    return problems


def _gathered_is_symmetric(group: Any, cp: int, cp_rank: int) -> bool:
    # Equal counts: the function returns the symmetric gather buffer itself.
    tokens = [16] * cp
    local = torch.full((16, 4, 32), float(cp_rank), device="cuda", dtype=torch.bfloat16)
    out = cp_all_gather_reorganized_into_tensor_kv_cache(local, group, tokens)
    expected = torch.arange(cp, device="cuda", dtype=torch.bfloat16).repeat_interleave(16)
    assert torch.equal(out[:, 0, 0], expected), "equal-count gather wrong"
    return symm_rs.is_symmetric(out, group)


def case_cp_over_the_whole_world_torch_group(ctx: Ctx) -> None:
    problems = _round_trips(ctx, ctx.group, ctx.world_size, ctx.rank, seed0=100)
    symmetric = _gathered_is_symmetric(ctx.group, ctx.world_size, ctx.rank)
    ctx.details.update(cp=ctx.world_size, problems=problems, gathered_symmetric=symmetric)
    assert not problems, problems
    assert symmetric, "the gathered buffer is not symmetric for the CP group"


def case_cp_over_a_symm_rs_communicator(ctx: Ctx) -> None:
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        problems = _round_trips(ctx, comm, comm.size, comm.rank, seed0=200)
        symmetric = _gathered_is_symmetric(comm, comm.size, comm.rank)
    ctx.details.update(problems=problems, gathered_symmetric=symmetric)
    assert not problems, problems
    assert symmetric


@needs(4)
def case_tp2_by_cp2_two_groups_per_rank(ctx: Ctx) -> None:
    # Ranks 0,1 | 2,3 form TP groups; 0,2 | 1,3 form CP groups. Every rank creates every group.
    tp_groups = [dist.new_group(r, device_id=ctx.device) for r in ([0, 1], [2, 3])]
    cp_groups = [dist.new_group(r, device_id=ctx.device) for r in ([0, 2], [1, 3])]
    ctx._made.extend([tp_groups[ctx.rank // 2], cp_groups[ctx.rank % 2]])
    tp = tp_groups[ctx.rank // 2]
    cp = cp_groups[ctx.rank % 2]
    tp_rank, cp_rank = ctx.rank % 2, ctx.rank // 2

    with symm_rs.use_symmetric_memory(tp):
        hidden = torch.full((4096,), float(ctx.rank + 1), device="cuda", dtype=torch.bfloat16)
    dist.all_reduce(hidden, group=tp)

    problems = _round_trips(ctx, cp, 2, cp_rank, seed0=300 + ctx.rank % 2)
    cp_symmetric = _gathered_is_symmetric(cp, 2, cp_rank)
    torch.cuda.synchronize()
    tp_sum = float(sum(r + 1 for r in range(4) if r // 2 == ctx.rank // 2))
    ctx.details.update(
        problems=problems,
        cp_gathered_symmetric=cp_symmetric,
        tp_buffer_symmetric_for_tp=symm_rs.is_symmetric(hidden, tp),
        tp_rank=tp_rank,
        cp_rank=cp_rank,
    )
    assert torch.equal(hidden, torch.full_like(hidden, tp_sum)), "TP all-reduce wrong"
    assert symm_rs.is_symmetric(hidden, tp), "TP buffer not symmetric for the TP group"
    assert not problems, problems
    assert cp_symmetric, "CP gathered buffer not symmetric for the CP group"
