"""The core on real GPUs: buffers from use_symmetric_memory are symmetric windows of their group
(and only of groups that registered them), torch.distributed collectives on them give the same
results as on plain buffers, groups over the same ranks share one pool while sub-groups that
grow differently never reach the world's registrations, and the pool tears down cleanly.

With ranks sharing one GPU (``--shared-gpu``) the same buffers must be registered windows
(``is_registered``) instead of symmetric ones, and NCCL must log no symmetric kernel."""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
import torch.distributed as dist

import symm_rs

from harness import Ctx, needs

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8]
# Element counts: tiny, odd, just over a 2 MiB segment, and 3 MiB + a few bytes of bf16.
SIZES = [1, 1000, (1 << 20) + 3, (3 << 19) + 7]
TOLERANCE = {
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
    torch.float32: 1e-5,
}
LOG_DIR = "/tmp/symm_rs_nccl_logs"


def setup_rank(rank: int, world_size: int) -> None:
    # NCCL prints one TUNING line per collective; the [Symmetric] ones prove the kernel choice.
    os.makedirs(LOG_DIR, exist_ok=True)
    os.environ.setdefault("NCCL_DEBUG", "INFO")
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "TUNING")
    os.environ["NCCL_DEBUG_FILE"] = f"{LOG_DIR}/rank{rank}.%p.log"


def _symmetric_lines() -> int:
    count = 0
    for path in glob.glob(f"{LOG_DIR}/rank{dist.get_rank()}.{os.getpid()}.log"):
        with open(path, errors="replace") as f:
            count += sum("Symmetric" in line or "SYMK" in line for line in f)
    return count


def _integer_pattern(n: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    # Small integers: every sum over <= 8 ranks stays exact in bf16/fp16/uint8. On the current
    # device, which the harness sets to the rank's (ctx.device).
    base = torch.arange(n, device="cuda", dtype=torch.int64)
    return ((base * 7 + rank * 3) % 8).to(dtype)


def _random(n: int, rank: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed * 1000 + rank)
    return torch.randn(n, device="cuda", generator=gen, dtype=torch.float32).to(dtype)


def _alloc(ctx: Ctx, n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    ws = ctx.world_size
    shapes = {"ag_in": n, "ag_out": n * ws, "ar": n, "rs_in": n * ws, "rs_out": n}
    return {k: torch.empty(v, dtype=dtype, device=ctx.device) for k, v in shapes.items()}


def _run_collectives(bufs: dict[str, torch.Tensor], group: Any) -> None:
    dist.all_gather_into_tensor(bufs["ag_out"], bufs["ag_in"], group=group)
    dist.all_reduce(bufs["ar"], group=group)
    dist.reduce_scatter_tensor(bufs["rs_out"], bufs["rs_in"], group=group)


def _fill(bufs: dict[str, torch.Tensor], make: Any) -> None:
    bufs["ag_in"].copy_(make(bufs["ag_in"].numel(), 0))
    bufs["ar"].copy_(make(bufs["ar"].numel(), 1))
    bufs["rs_in"].copy_(make(bufs["rs_in"].numel(), 2))


def case_buffers_are_symmetric_for_their_group_only(ctx: Ctx) -> None:
    other = ctx.new_group()
    with symm_rs.use_symmetric_memory(ctx.group):
        inside = torch.empty(4096, dtype=torch.bfloat16, device=ctx.device)
    plain = torch.empty(4096, dtype=torch.bfloat16, device=ctx.device)
    ctx.expect_window(inside, ctx.group, "allocated in the context, but it")
    assert not symm_rs.is_registered(inside, other), "a window of a group that never registered"
    assert not symm_rs.is_registered(plain, ctx.group), "a caching-allocator buffer is a window"
    with symm_rs.use_symmetric_memory(ctx.group, disabled=True):
        skipped = torch.empty(4096, dtype=torch.bfloat16, device=ctx.device)
    assert not symm_rs.is_registered(skipped, ctx.group), "disabled=True still used the pool"
    ctx.details["stats"] = symm_rs.stats().as_dict()


def case_collectives_match_plain_buffers(ctx: Ctx) -> None:
    checked = 0
    sym_lines_before = _symmetric_lines()
    for dtype in DTYPES:
        for n in SIZES:
            with symm_rs.use_symmetric_memory(ctx.group):
                sym = _alloc(ctx, n, dtype)
            plain = _alloc(ctx, n, dtype)
            for name, t in sym.items():
                ctx.expect_window(t, ctx.group, f"{name} {dtype} n={n}")

            def integers(count: int, salt: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                return _integer_pattern(count + salt, ctx.rank, dtype)[salt:]

            for bufs in (sym, plain):
                _fill(bufs, integers)
                _run_collectives(bufs, ctx.group)
            ws = ctx.world_size
            expected_ag = torch.cat([_integer_pattern(n, r, dtype) for r in range(ws)])
            expected_ar = sum(_integer_pattern(n + 1, r, torch.int64)[1:] for r in range(ws))
            expected_rs = sum(_integer_pattern(n * ws + 2, r, torch.int64)[2:] for r in range(ws))[
                ctx.rank * n : (ctx.rank + 1) * n
            ]
            if dtype == torch.uint8:
                expected_ar, expected_rs = expected_ar % 256, expected_rs % 256
            for bufs, label in ((sym, "symmetric"), (plain, "plain")):
                assert torch.equal(bufs["ag_out"], expected_ag), f"all-gather {label} {dtype} {n}"
                assert torch.equal(bufs["ar"], expected_ar.to(dtype)), (
                    f"all-reduce {label} {dtype} {n}"
                )
                assert torch.equal(bufs["rs_out"], expected_rs.to(dtype)), (
                    f"reduce-scatter {label} {dtype} {n}"
                )
            if dtype in TOLERANCE:

                def noise(count: int, salt: int, dtype: torch.dtype = dtype) -> torch.Tensor:
                    return _random(count, ctx.rank, dtype, seed=salt)

                for bufs in (sym, plain):
                    _fill(bufs, noise)
                    _run_collectives(bufs, ctx.group)
                assert torch.equal(sym["ag_out"], plain["ag_out"]), f"random all-gather {dtype} {n}"
                tol = TOLERANCE[dtype] * ws
                for key in ("ar", "rs_out"):
                    torch.testing.assert_close(
                        sym[key].float(),
                        plain[key].float(),
                        atol=tol,
                        rtol=tol,
                        msg=lambda m, label=f"random {key} {dtype} n={n}": f"{label}: {m}",
                    )
            checked += 1
    torch.cuda.synchronize()
    ctx.details["combinations"] = checked
    ctx.details["nccl_symmetric_log_lines"] = _symmetric_lines() - sym_lines_before
    if ctx.shared_gpu:
        assert ctx.details["nccl_symmetric_log_lines"] == 0, "symmetric kernels on a shared GPU"


def case_symmetric_kernels_only_on_registered_buffers(ctx: Ctx) -> None:
    """NVLink: NCCL logs symmetric kernels for registered buffers only. Shared GPU: the
    buffers are registered, and NCCL logs no symmetric kernel for any of them."""
    n = 1 << 16
    with symm_rs.use_symmetric_memory(ctx.group):
        s_in = torch.ones(n, dtype=torch.bfloat16, device=ctx.device)
        s_out = torch.empty(n * ctx.world_size, dtype=torch.bfloat16, device=ctx.device)
    p_in = torch.ones(n, dtype=torch.bfloat16, device=ctx.device)
    p_out = torch.empty(n * ctx.world_size, dtype=torch.bfloat16, device=ctx.device)
    ctx.expect_window(s_in, ctx.group, "s_in")
    ctx.expect_window(s_out, ctx.group, "s_out")
    torch.cuda.synchronize()
    before = _symmetric_lines()
    for _ in range(4):
        dist.all_gather_into_tensor(p_out, p_in, group=ctx.group)
    torch.cuda.synchronize()
    after_plain = _symmetric_lines()
    for _ in range(4):
        dist.all_gather_into_tensor(s_out, s_in, group=ctx.group)
    torch.cuda.synchronize()
    after_symmetric = _symmetric_lines()
    ctx.details["symmetric_lines_plain"] = after_plain - before
    ctx.details["symmetric_lines_symmetric"] = after_symmetric - after_plain
    assert after_plain == before, "NCCL logged symmetric kernels for caching-allocator buffers"
    assert bool((s_out == 1).all()) and bool((p_out == 1).all()), "all-gather of ones wrong"
    if ctx.shared_gpu:
        assert after_symmetric == after_plain, "NCCL logged symmetric kernels on a shared GPU"
    # NCCL prints its TUNING lines on rank 0 only.
    elif ctx.rank == 0:
        assert after_symmetric > after_plain, (
            "NCCL logged no symmetric kernel for registered buffers (NCCL_DEBUG_SUBSYS=TUNING?)"
        )


def case_two_groups_share_one_pool(ctx: Ctx) -> None:
    second = ctx.new_group()
    n = 24 << 20
    with symm_rs.use_symmetric_memory(ctx.group):
        a = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    with symm_rs.use_symmetric_memory(second):
        # Larger than any block earlier cases freed, so it needs a new segment.
        b = torch.empty(40 << 20, dtype=torch.uint8, device=ctx.device)
    # The second group's exit registered every segment, the first group's included.
    ctx.expect_window(a, second, "a (second group)")
    ctx.expect_window(b, second, "b (second group)")
    ctx.expect_window(a, ctx.group, "a")
    assert not symm_rs.is_registered(b, ctx.group), "registered before the first group's exit"
    with symm_rs.use_symmetric_memory(ctx.group):
        pass
    ctx.expect_window(b, ctx.group, "b")
    stats = symm_rs.stats()
    comms = {c.comm: c for c in stats.communicators}
    first_comm = symm_rs.groups.resolve_comm(ctx.group)
    second_comm = symm_rs.groups.resolve_comm(second)
    for comm in (first_comm, second_comm):
        assert comm in comms, f"communicator {comm:#x} missing from stats"
        assert comms[comm].pending_segments == 0
        # A communicator NCCL answered with NULL windows is plain: no window to count.
        windows = 0 if comms[comm].plain else stats.segments
        assert comms[comm].windows == windows, (comms[comm], stats.segments)
    a.fill_(ctx.rank + 1)
    with symm_rs.use_symmetric_memory(second):
        out = torch.empty(n * ctx.world_size, dtype=torch.uint8, device=ctx.device)
    dist.all_gather_into_tensor(out, a, group=second)
    expected = torch.arange(1, ctx.world_size + 1, device=ctx.device, dtype=torch.uint8)
    assert torch.equal(out.view(ctx.world_size, n), expected[:, None].expand(-1, n))
    ctx.details["segments"] = stats.segments
    ctx.details["windows_per_comm"] = {hex(c): comms[c].windows for c in (first_comm, second_comm)}


def case_block_freed_by_one_group_is_registered_by_the_next(ctx: Ctx) -> None:
    third = ctx.new_group()
    n = 5 << 20
    with symm_rs.use_symmetric_memory(ctx.group):
        x = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    address = x.data_ptr()
    del x
    with symm_rs.use_symmetric_memory(third):
        y = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    assert y.data_ptr() == address, "the pool did not reuse the freed block; scenario not reached"
    ctx.expect_window(y, third, "the reused block")
    y.fill_(1)
    dist.all_reduce(y, group=third)
    assert bool((y == ctx.world_size).all())


@needs(4)
def case_subgroups_that_grow_differently_never_split_the_worlds_registration(ctx: Ctx) -> None:
    # TP {0,1} and {2,3}, CP {0,2} and {1,3}: each pair grows its pool its own way (TP group 0
    # three 3 MiB buffers, TP group 1 one 5 MiB buffer; CP groups 1 vs 2 buffers). A world
    # communicator that registered every segment of the device would then ask the ranks for
    # different registrations and hang or fail inside NCCL (seen as CUDA 801 in suite_cp). Only
    # the world's own segments may reach the world's registration.
    pairs = [dist.new_group(r, device_id=ctx.device) for r in ([0, 1], [2, 3], [0, 2], [1, 3])]
    tp, cp = pairs[ctx.rank // 2], pairs[2 + ctx.rank % 2]
    ctx._made.extend([tp, cp])
    counts = {"tp": (3, 3 << 20) if ctx.rank < 2 else (1, 5 << 20)}
    counts["cp"] = (1 + ctx.rank % 2, 1 << 20)
    kept = []
    for name, group in (("tp", tp), ("cp", cp)):
        number, nbytes = counts[name]
        with symm_rs.use_symmetric_memory(group):
            bufs = [
                torch.full((nbytes,), 1, dtype=torch.uint8, device=ctx.device)
                for _ in range(number)
            ]
        for b in bufs:
            ctx.expect_window(b, group, f"{name} buffer (for {name})")
            dist.all_reduce(b, group=group)
        kept += bufs
    world_comm = symm_rs.groups.resolve_comm(ctx.group)
    with symm_rs.use_symmetric_memory(ctx.group):
        world_buf = torch.full((3 << 20,), ctx.rank + 1, dtype=torch.int32, device=ctx.device)
        # A TP context nested inside the world's allocates from the TP pool, not the world's.
        with symm_rs.use_symmetric_memory(tp):
            nested = torch.full((1 << 20,), 1, dtype=torch.uint8, device=ctx.device)
    dist.all_reduce(world_buf, group=ctx.group)
    dist.all_reduce(nested, group=tp)
    torch.cuda.synchronize()
    stats = symm_rs.stats().as_dict()["communicators"]
    ctx.details.update(
        world_windows=stats[world_comm]["windows"],
        world_pending=stats[world_comm]["pending_segments"],
        subgroup_buffers_in_world_windows=sum(symm_rs.is_registered(b, ctx.group) for b in kept),
    )
    expected = sum(range(1, ctx.world_size + 1))
    assert bool((world_buf == expected).all()), "world all-reduce wrong"
    assert bool((nested == 2).all()), "nested TP all-reduce wrong"
    assert all(bool((b == 2).all()) for b in kept), "sub-group all-reduce wrong"
    ctx.expect_window(world_buf, ctx.group, "the world's buffer")
    ctx.expect_window(nested, tp, "the nested TP buffer")
    assert not symm_rs.is_registered(nested, ctx.group)
    assert ctx.details["subgroup_buffers_in_world_windows"] == 0
    assert stats[world_comm]["pending_segments"] == 0
    # A symm_rs.Communicator over the world's ranks shares the world's pool: its registration
    # makes the world's buffer a window of it too, and never the sub-groups' buffers.
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        made = symm_rs.register(comm)
        assert isinstance(made, int) and made > 0, made
        ctx.expect_window(world_buf, comm, "the world's buffer (Communicator)")
        assert not any(symm_rs.is_registered(b, comm) for b in kept)
        out = comm.all_reduce(world_buf, out=torch.empty_like(world_buf))
        torch.cuda.synchronize()
        assert bool((out == expected * ctx.world_size).all()), "Communicator all-reduce wrong"
    del kept, nested, world_buf


def case_destroying_the_pool_deregisters_every_window(ctx: Ctx) -> None:
    torch.cuda.synchronize()
    before = symm_rs.stats()
    refused = ctx.shared_gpu and ctx.nccl_refused(ctx.group)
    assert before.windows_registered > 0 or refused
    freed = symm_rs.destroy_pool()
    after = symm_rs.stats()
    ctx.details["freed_segments"] = freed
    ctx.details["before"] = before.as_dict()
    ctx.details["after"] = after.as_dict()
    assert freed == before.segments > 0
    assert after.segments == 0 and after.bytes == 0
    assert after.windows_deregistered == after.windows_registered
    assert after.deregistration_failures == 0 and after.free_failures == 0
    # A new pool starts on the next use, and works.
    with symm_rs.use_symmetric_memory(ctx.group):
        z = torch.full((1024,), ctx.rank, dtype=torch.float32, device=ctx.device)
        out = torch.empty(1024 * ctx.world_size, dtype=torch.float32, device=ctx.device)
    ctx.expect_window(z, ctx.group, "a buffer of the new pool")
    dist.all_gather_into_tensor(out, z, group=ctx.group)
    expected = torch.arange(
        ctx.world_size, device=ctx.device, dtype=torch.float32
    ).repeat_interleave(1024)
    assert torch.equal(out, expected)
