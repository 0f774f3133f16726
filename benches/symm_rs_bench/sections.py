"""The sections one rank runs, in a process per GPU (``bench_rank``); coldstart.py runs apart."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

import symm_rs
from symm_rs_bench import torch_symm
from symm_rs_bench.buffers import allocate, collective
from symm_rs_bench.comm_calls import communicator
from symm_rs_bench.config import BUFFERS, MODES, OPS, BenchConfig, MiB, format_bytes
from symm_rs_bench.cp_gather import cp_gather
from symm_rs_bench.launch import init_nccl
from symm_rs_bench.policy import policy
from symm_rs_bench.timing import BenchAbort, Rank, time_eager, time_graph

# Each >= 10 MiB and a multiple of 2 MiB, so the caching allocator gives every tensor a segment
# of its own (smaller requests share 20 MiB segments) while the earlier ones are alive.
REGISTRATION_SEGMENT_MIB = (12, 16, 24, 32, 48, 64)


def collectives(r: Rank) -> dict[str, Any]:
    """torch.distributed on caching-allocator (``plain``) and symmetric (``symm``) buffers, and
    beside them, size by size, PyTorch's own symmetric memory (``torch_symm.CUDA_SERIES``)."""
    rows = []
    ts, torch_error = (
        torch_symm.setup(r, r.cfg.sizes)
        if r.cfg.torch_baselines
        else (None, "skipped (--no-torch)")
    )
    torch_points = sum(len(s) for s in torch_symm.CUDA_SERIES.values()) * len(MODES)
    r.expect(len(r.cfg.sizes) * (len(OPS) * len(MODES) * len(BUFFERS) + torch_points))
    for nbytes in r.cfg.sizes:
        pairs = {"plain": allocate(r, nbytes), "symm": allocate(r, nbytes, r.group)}
        estimate_s: dict[str, float] = {}  # the eager median plans the graph measurement
        for op in OPS:
            for mode in MODES:
                for kind in BUFFERS:
                    fn = collective(op, *pairs[kind], r.group)
                    if mode == "eager":
                        row = time_eager(r, fn)
                        estimate_s[kind] = row.pop("estimate_s")
                    else:
                        row = time_graph(r, fn, estimate_s[kind])
                    rows.append({"op": op, "bytes": nbytes, "mode": mode, "buffers": kind, **row})
                    label = f"{op} {format_bytes(nbytes)} {kind} {mode}"
                    r.step(f"{label}: {row['median_us']:.1f} us (rank 0)")
        del pairs, fn
        for op, series in torch_symm.CUDA_SERIES.items():
            for name in series:
                for row in torch_symm.measure(r, ts, name, op, nbytes, torch_error):
                    rows.append(row)
                    shown = row.get("median_us")
                    result = f"{shown:.1f} us" if shown is not None else "unavailable"
                    r.step(f"{op} {format_bytes(nbytes)} {name} {row['mode']}: {result}")
    out: dict[str, Any] = {"rows": rows}
    out["torch_symm"] = {
        "backend": ts.backend if ts is not None else None,
        "max_bytes": torch_symm.TORCH_SYMM_MAX_BYTES,
        "series": torch_symm.series_summary(rows, torch_symm.CUDA_SERIES, torch_error),
    }
    if ts is not None:
        ts.close()
    return out


def _loop(n: int, context: Callable[[Any], Any], arg: Any) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with context(arg):
            pass
    return time.perf_counter_ns() - t0


def _loop_alloc(n: int, context: Callable[[Any], Any], arg: Any, device: Any) -> int:
    """Each context allocates one block the pool has cached (freed by the previous one)."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with context(arg):
            torch.empty(1024, dtype=torch.uint8, device=device)
    return time.perf_counter_ns() - t0


def _loop_disabled(n: int, context: Callable[..., Any], arg: Any) -> int:
    """The object alone: construct, enter and exit a disabled context (part of the profile)."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with context(arg, disabled=True):
            pass
    return time.perf_counter_ns() - t0


def _loop_raw(n: int, pool: Any) -> int:
    c, device, pool_id = torch._C, torch.cuda.current_device(), pool.id
    begin, end = c._cuda_beginAllocateCurrentThreadToPool, c._cuda_endAllocateToPool
    release = c._cuda_releasePool
    t0 = time.perf_counter_ns()
    for _ in range(n):
        begin(device, pool_id)
        end(device, pool_id)
        release(device, pool_id)
    return time.perf_counter_ns() - t0


def _loop_checks(n: int, _: Any) -> int:
    """The two torch queries the native path makes per enter (device, capture status)."""
    c = torch._C
    get_device, capturing = c._cuda_getDevice, c._cuda_isCurrentStreamCapturing
    t0 = time.perf_counter_ns()
    for _ in range(n):
        get_device()
        capturing()
    return time.perf_counter_ns() - t0


def context(r: Rank) -> dict[str, Any]:
    """One ``use_symmetric_memory`` enter+exit with nothing to register, and one that allocates
    a cached block, each against torch's ``use_mem_pool`` doing the same; then the parts of the
    native path (the raw routing calls, the torch queries, the object alone) as its profile.
    20 batches on the host clock, the variants interleaved per batch so drift hits all alike."""
    symm_rs.register(r.group)  # collective; afterwards nothing is pending on any rank
    batch, pool = max(1, r.cfg.context_iters // 20), torch.cuda.MemPool()
    with symm_rs.use_symmetric_memory(r.group):  # the block the allocating variant reuses
        torch.empty(1024, dtype=torch.uint8, device=r.device)
    symm_rs.register(r.group)
    out: dict[str, Any] = {"iterations_per_batch": batch, "batches": 20}
    variants: list[tuple[str, Callable[..., int], tuple[Any, ...]]] = [
        ("symm_rs.use_symmetric_memory", _loop, (symm_rs.use_symmetric_memory, r.group)),
        ("torch.cuda.use_mem_pool", _loop, (torch.cuda.use_mem_pool, pool)),
        (
            "symm_rs.use_symmetric_memory + 1 cached block",
            _loop_alloc,
            (symm_rs.use_symmetric_memory, r.group, r.device),
        ),
        (
            "torch.cuda.use_mem_pool + 1 cached block",
            _loop_alloc,
            (torch.cuda.use_mem_pool, pool, r.device),
        ),
        ("raw begin/end/release", _loop_raw, (pool,)),
        (
            "symm_rs.use_symmetric_memory(disabled=True)",
            _loop_disabled,
            (symm_rs.use_symmetric_memory, r.group),
        ),
    ]
    if r.device.type == "cuda":  # torch's CUDA queries (the CPU dry run has none)
        variants.append(("torch device + capture queries", _loop_checks, (None,)))
    samples: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for _name, loop, args in variants:
        loop(batch, *args)  # warm-up
    for _ in range(20):
        for name, loop, args in variants:
            samples[name].append(loop(batch, *args) / batch / 1e3)
    for name, us in samples.items():
        out[name] = {"mean_us": statistics.mean(us), "median_batch_us": statistics.median(us)}
        out[name]["min_batch_us"] = min(us)
        r.log(f"[context] {name}: {out[name]['median_batch_us']:.2f} us (rank 0)")
    for what, ours, theirs in (
        ("nothing new", "symm_rs.use_symmetric_memory", "torch.cuda.use_mem_pool"),
        (
            "one cached block",
            "symm_rs.use_symmetric_memory + 1 cached block",
            "torch.cuda.use_mem_pool + 1 cached block",
        ),
    ):
        ratio = out[ours]["median_batch_us"] / out[theirs]["median_batch_us"]
        out[f"ratio, {what}"] = {"symm_over_use_mem_pool": ratio, "target": 1.2}
    return out


def _timed_exit(r: Rank, sizes: list[int], keep: list[Any]) -> dict[str, Any]:
    """Allocates ``sizes`` (kept alive in ``keep``) in one ``use_symmetric_memory``; times the
    allocation and the exit, where the new segments are registered (collective)."""
    windows = symm_rs.stats().windows_registered
    r.barrier()
    t0 = time.perf_counter()
    with symm_rs.use_symmetric_memory(r.group):
        keep += [torch.empty(n // 2, dtype=torch.bfloat16, device=r.device) for n in sizes]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        r.barrier()  # start the clock with every rank there
        t2 = time.perf_counter()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t2) * 1e3
    windows = symm_rs.stats().windows_registered - windows
    return {
        "alloc_ms": (t1 - t0) * 1e3,
        "register_ms": ms,
        "windows_registered": windows,
        "register_ms_per_window": ms / windows if windows else None,
    }


def _agreement_cost(r: Rank, keep: list[Any], turns: int = 10) -> dict[str, Any]:
    """An exit that registers one new segment, with the default agreement before it and
    without (``verify=False``), in alternating turns of the same run: the difference is what
    the agreement adds to an exit that registers."""
    times: dict[str, list[float]] = {"agreed": [], "unagreed": []}
    for turn in range(turns):
        for verify in (turn % 2 == 0, turn % 2 == 1):
            r.barrier()
            with symm_rs.use_symmetric_memory(r.group, verify=verify):
                keep.append(torch.empty(12 * MiB, dtype=torch.uint8, device=r.device))
                torch.cuda.synchronize()
                r.barrier()
                t0 = time.perf_counter()
            times["agreed" if verify else "unagreed"].append((time.perf_counter() - t0) * 1e3)
    agreed, unagreed = (statistics.median(times[k]) for k in ("agreed", "unagreed"))
    return {
        "turns": turns,
        "agreed_exit_ms": agreed,
        "unagreed_exit_ms": unagreed,
        "agreement_ms": agreed - unagreed,
        "target_ms": 1.0,
    }


def registration(r: Rank) -> dict[str, Any]:
    """Run first, on an empty pool: the first window on the communicator (20 MiB), a batch of
    new segments registered at one exit, the agreement's cost at an exit that registers, then
    ``symm_rs.reserve(1 GiB)``."""
    keep: list[Any] = []
    batch = [REGISTRATION_SEGMENT_MIB[i % 6] * MiB for i in range(r.cfg.registration_segments)]
    out = {"first": _timed_exit(r, [20 * MiB], keep), "batch": _timed_exit(r, batch, keep)}
    out["agreement"] = _agreement_cost(r, keep)
    r.barrier()
    t0 = time.perf_counter()
    segments = symm_rs.reserve(1 << 30, r.group)
    torch.cuda.synchronize()
    out["reserve"] = {
        "nbytes": 1 << 30,
        "ms": (time.perf_counter() - t0) * 1e3,
        "segments_created": segments,
    }
    for name, data in out.items():
        ms = data.get("register_ms", data.get("ms", data.get("agreement_ms")))
        r.log(f"[registration] {name}: {ms:.1f} ms (rank 0)")
    return out


def destroy_pool(r: Rank) -> dict[str, Any]:
    """``symm_rs.destroy_pool()`` at the very end: deregisters every window, then frees."""
    for _ in range(100):  # torch's NCCL watchdog may hold the last tensors for a moment
        gc.collect()
        if not symm_rs.pool.pool_usage()["in_use_bytes"]:
            break
        time.sleep(0.1)
    windows = symm_rs.stats().windows_deregistered
    r.barrier()
    t0 = time.perf_counter()
    freed = symm_rs.destroy_pool()  # raises while pool tensors are alive
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    windows = symm_rs.stats().windows_deregistered - windows
    r.log(f"[registration] destroy_pool: {ms:.1f} ms, {windows} window(s) (rank 0)")
    return {
        "ms": ms,
        "segments_freed": freed,
        "windows_deregistered": windows,
        "ms_per_window": ms / windows if windows else None,
    }


def bench_rank(rank: int, world: int, cfg: BenchConfig) -> dict[str, Any]:
    """One GPU's run, for ``symm_rs_bench.launch.run_ranks``: ``{"sections": {name: data}}``, with
    ``"error"`` when the run stopped early (the sections finished before are kept)."""
    started = time.perf_counter()
    r = Rank(rank, world, init_nccl(rank, world, timeout_s=60.0), cfg)
    r.log(f"[setup] {world} ranks up in {time.perf_counter() - started:.1f} s")
    done: dict[str, Any] = {}
    try:
        for name, fn in (
            ("registration", registration),  # first, while the pool is empty
            ("collectives", collectives),
            ("communicator", communicator),
            ("policy", policy),
            ("context", context),
            ("cp", cp_gather),
        ):
            if name in cfg.sections:
                done[name] = r.section(name, fn)
                r.done[name] = done[name]
        if "registration" in done:
            done["registration"]["destroy_pool"] = r.section("destroy_pool", destroy_pool)
    except BenchAbort as e:  # no teardown: the ranks may be stuck in a collective
        return {"sections": done, "error": f"BenchAbort: {e}"}
    gc.collect()
    torch.cuda.synchronize()
    symm_rs.release(r.group)
    dist.destroy_process_group()
    r.log(f"[teardown] done; {time.perf_counter() - started:.1f} s in the rank processes")
    return {"sections": done}
