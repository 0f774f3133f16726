"""Safety on real GPUs: CUDA-graph capture and 1,000 replays on symmetric buffers, registration
deferred out of a capture, out-of-memory inside the context, reservation, the silent-fallback
check, and the cross-rank verification that turns a would-be hang into an error on every rank."""

from __future__ import annotations

import time
import warnings

import torch
import torch.distributed as dist

import symm_rs

from harness import Ctx

N = 1 << 16  # bf16 elements per rank


def case_graph_capture_and_1000_replays_are_exact(ctx: Ctx) -> None:
    ws = ctx.world_size
    src = torch.zeros(N, dtype=torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Warm-up outside the capture, on the stream the capture will use (cached blocks belong to
    # a stream; torch.cuda.graph captures on its own stream unless told): the segments exist
    # and are registered before capturing.
    with torch.cuda.stream(side), symm_rs.use_symmetric_memory(ctx.group):
        warm = [torch.empty(N, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        warm.append(torch.empty(N * ws, dtype=torch.bfloat16, device="cuda"))
    del warm
    segments_before = symm_rs.stats()["segments_tracked"]
    g = torch.cuda.CUDAGraph()
    # Older torch cannot tell symm_rs which pool a capture uses: name it and pass it.
    pool = torch.cuda.graph_pool_handle()
    with torch.cuda.stream(side), torch.cuda.graph(g, pool=pool, stream=side):
        with symm_rs.use_symmetric_memory(ctx.group, graph_pool=pool):
            ag_in = torch.empty(N, dtype=torch.bfloat16, device="cuda")
            ar = torch.empty(N, dtype=torch.bfloat16, device="cuda")
            ag_out = torch.empty(N * ws, dtype=torch.bfloat16, device="cuda")
        ag_in.copy_(src)
        ar.copy_(src)
        dist.all_gather_into_tensor(ag_out, ag_in, group=ctx.group)
        dist.all_reduce(ar, group=ctx.group)
    torch.cuda.current_stream().wait_stream(side)
    assert symm_rs.stats()["segments_tracked"] == segments_before, "capture grew the pool"
    assert symm_rs.is_symmetric(ag_in, ctx.group) and symm_rs.is_symmetric(ag_out, ctx.group)
    assert symm_rs.is_symmetric(ar, ctx.group)
    base = torch.arange(N, device="cuda", dtype=torch.float32) % 13
    wrong = 0
    for step in range(1000):
        src.copy_(base + (step % 17) + ctx.rank)
        g.replay()
        if step % 10 == 0 or step >= 990:
            torch.cuda.synchronize()
            expected_ag = torch.cat([base + (step % 17) + r for r in range(ws)]).bfloat16()
            expected_ar = sum(base + (step % 17) + r for r in range(ws)).bfloat16()
            wrong += int(not torch.equal(ag_out, expected_ag))
            wrong += int(not torch.equal(ar, expected_ar))
    torch.cuda.synchronize()
    ctx.details.update(replays=1000, checked=2 * (100 + 9), wrong=wrong)
    assert wrong == 0, f"{wrong} replays gave wrong results"
    del g


def case_capture_that_needs_a_new_segment_defers_registration(ctx: Ctx) -> None:
    g = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(g, pool=pool, stream=side):
        with symm_rs.use_symmetric_memory(ctx.group, graph_pool=pool):
            fresh = torch.empty(96 << 20, dtype=torch.uint8, device="cuda")  # a new segment
        fresh.fill_(ctx.rank + 1)
        dist.all_reduce(fresh, group=ctx.group)
    torch.cuda.current_stream().wait_stream(side)
    deferred = symm_rs.stats()["deferred_registrations"]
    registered_during_capture = symm_rs.is_symmetric(fresh, ctx.group)
    with symm_rs.use_symmetric_memory(ctx.group):
        pass  # the first exit outside a capture registers what the capture postponed
    ctx.details.update(
        deferred_after_capture=deferred,
        symmetric_during=registered_during_capture,
        symmetric_after=symm_rs.is_symmetric(fresh, ctx.group),
    )
    assert deferred == 1 and not registered_during_capture
    assert symm_rs.is_symmetric(fresh, ctx.group)
    g.replay()
    torch.cuda.synchronize()
    total = sum(range(1, ctx.world_size + 1)) % 256
    assert bool((fresh == total).all()), "replay of the deferred-registration graph is wrong"
    del g, fresh


def case_out_of_memory_raises_torch_error_and_recovers(ctx: Ctx) -> None:
    free, _ = torch.cuda.mem_get_info()
    message = ""
    try:
        with symm_rs.use_symmetric_memory(ctx.group):
            torch.empty(free + (64 << 30), dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as e:
        message = str(e)
    ctx.details["message_tail"] = message[-400:]
    assert message, "no torch.OutOfMemoryError"
    assert "symm_rs" in message and "ncclMemAlloc" in message, message[-400:]
    with symm_rs.use_symmetric_memory(ctx.group):
        after = torch.ones(1 << 20, dtype=torch.float32, device="cuda")
    assert symm_rs.is_symmetric(after, ctx.group)
    dist.all_reduce(after, group=ctx.group)
    torch.cuda.synchronize()
    assert bool((after == ctx.world_size).all())
    assert symm_rs.stats()["alloc_failures"] >= 1


def case_reservation_makes_steady_state_allocation_free(ctx: Ctx) -> None:
    made = symm_rs.reserve(512 << 20, ctx.group)
    stats = symm_rs.stats()
    tracked = stats["segments_tracked"]
    registered = stats["windows_registered"]
    live = []
    for step in range(50):
        with symm_rs.use_symmetric_memory(ctx.group):
            live.append(torch.empty((step % 7 + 1) << 20, dtype=torch.uint8, device="cuda"))
            live.append(torch.empty(4096 + step, dtype=torch.uint8, device="cuda"))
        if len(live) > 12:
            live = live[4:]
    after = symm_rs.stats()
    ctx.details.update(
        new_segments=made,
        reserved_bytes=after["reserved_bytes"],
        pool_bytes=after["pool_bytes"],
        in_use_bytes=after["in_use_bytes"],
    )
    assert made >= 1
    assert after["segments_tracked"] == tracked, "steady state called ncclMemAlloc"
    assert after["windows_registered"] == registered, "steady state registered again"
    assert 0 < after["in_use_bytes"] <= after["pool_bytes"]
    assert all(symm_rs.is_symmetric(t, ctx.group) for t in live)


def case_silent_fallback_is_reported(ctx: Ctx) -> None:
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        plain = torch.ones(1024, device="cuda")
        previous = symm_rs.set_window_check("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):
                    comm.all_reduce(plain)  # one call site: one warning
            symm_rs.set_window_check("raise")
            try:
                comm.all_reduce(plain)
                raised = False
            except symm_rs.RegistrationError:
                raised = True
            with symm_rs.use_symmetric_memory(comm):
                inside = torch.ones(1024, device="cuda")
            comm.all_reduce(inside)  # registered: no error even in raise mode
        finally:
            symm_rs.set_window_check(previous)
        torch.cuda.synchronize()
    kinds = [w.category for w in caught]
    ctx.details.update(warnings=len(kinds), raised=raised)
    assert kinds == [symm_rs.NotSymmetricWarning], kinds
    assert raised


def case_verification_cost_per_exit(ctx: Ctx) -> None:
    timings = {}
    for verify in (False, True, False, True):
        for _ in range(20):
            with symm_rs.use_symmetric_memory(ctx.group, verify=verify):
                pass
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            with symm_rs.use_symmetric_memory(ctx.group, verify=verify):
                pass
        timings[f"verify={verify}"] = (time.perf_counter() - start) / 200 * 1e6
    ctx.details["exit_us"] = {k: round(v, 2) for k, v in timings.items()}


def case_rank_mismatch_fails_fast_on_every_rank(ctx: Ctx) -> None:
    odd = None
    error = ""
    start = time.perf_counter()
    try:
        with symm_rs.use_symmetric_memory(ctx.group, verify=True):
            common = torch.empty(3 << 20, dtype=torch.uint8, device="cuda")
            if ctx.rank == 0:
                # Larger than anything cached (the reservation is 512 MiB): a new segment.
                odd = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # rank 0 only
    except symm_rs.RegistrationError as e:
        error = str(e)
    seconds = time.perf_counter() - start
    ctx.details.update(error=error[:600], seconds=round(seconds, 3))
    assert error, "the mismatch was not detected"
    assert "rank(s) [0]" in error and "1073741824" in error, error
    # Leave the process consistent: drop everything and free the pool on every rank.
    del odd, common
    symm_rs.destroy_pool()
    with symm_rs.use_symmetric_memory(ctx.group, verify=True):
        ok = torch.full((256,), 1.0, device="cuda")
    dist.all_reduce(ok, group=ctx.group)
    torch.cuda.synchronize()
    assert bool((ok == ctx.world_size).all())
