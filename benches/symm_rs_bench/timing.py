"""How one rank times a call (eagerly, in CUDA-graph replay, or on the host clock) and keeps in
step with the others, on a gloo group beside the NCCL one."""

from __future__ import annotations

import math
import statistics
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from symm_rs_bench.config import BenchConfig
from symm_rs_bench.progress import Progress

MAX_GRAPH_CALLS = 10
GRAPH_BUDGET_S = 5e-3  # GPU work per graph at most


class BenchAbort(RuntimeError):
    """A section failed on some ranks only: their collective sequences may differ, so the run
    stops instead of risking a hang."""


def iterations_for(seconds_per_call: float, cfg: BenchConfig) -> int:
    """Calls per repetition so that the repetitions take about ``cfg.target_s``, within
    ``[5, cfg.max_iters]``."""
    if not 0 < seconds_per_call < math.inf:
        return cfg.max_iters
    return max(5, min(cfg.max_iters, int(cfg.target_s / (cfg.reps * seconds_per_call))))


def graph_plan(seconds_per_call: float, cfg: BenchConfig) -> tuple[int, int]:
    """``(calls per graph, replays per repetition)``: up to 10 calls and 5 ms of work in one
    graph, replays for about ``cfg.target_s`` in all, at most ``cfg.max_iters`` calls each."""
    if not 0 < seconds_per_call < math.inf:
        return MAX_GRAPH_CALLS, max(1, cfg.max_iters // MAX_GRAPH_CALLS)
    calls = max(1, min(MAX_GRAPH_CALLS, int(GRAPH_BUDGET_S / seconds_per_call)))
    replays = math.ceil(cfg.target_s / (cfg.reps * calls * seconds_per_call))
    return calls, max(1, min(cfg.max_iters // calls, replays))


class Rank:
    """One rank of the run: its NCCL group, the configuration, and a gloo group on which the
    ranks meet and agree without touching the GPU or the benchmarked communicators."""

    def __init__(self, rank: int, world: int, group: Any, cfg: BenchConfig) -> None:
        self.rank, self.world, self.group, self.cfg = rank, world, group, cfg
        self.device = torch.device("cuda", rank)
        self.control: Any = dist.new_group(backend="gloo")
        # This rank's finished sections, for sections that build on an earlier one.
        self.done: dict[str, Any] = {}
        self.progress = Progress() if rank == 0 else None

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.note(message)

    def expect(self, points: int) -> None:
        """The number of points (``step`` calls) the running section will measure."""
        if self.progress is not None:
            self.progress.start(self.progress.section, points)

    def step(self, message: str) -> None:
        """One point of the running section measured (rank 0 shows it)."""
        if self.progress is not None:
            self.progress.step(message)

    def all_reduce(self, value: float, op: Any = dist.ReduceOp.MAX) -> float:
        """``value`` reduced over the ranks (maximum by default), on the gloo group."""
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.control)
        return float(tensor.item())

    def barrier(self) -> None:
        """This GPU idle, then all ranks meet (host side)."""
        torch.cuda.synchronize()
        self.all_reduce(0.0)

    def section(self, name: str, fn: Callable[[Rank], dict[str, Any]]) -> dict[str, Any]:
        """Runs ``fn(self)`` on every rank, then counts failures: with none, or on every rank
        (recorded as ``error``), the run goes on; on some ranks only, ``BenchAbort``."""
        self.log(f"[{name}] start")
        if self.progress is not None:
            self.progress.start(name)
        started = time.perf_counter()
        try:
            data, error = fn(self), None
        except Exception as e:
            data, error = {}, f"{type(e).__name__}: {e}"
            print(f"[rank {self.rank}] [{name}] failed: {traceback.format_exc()}", flush=True)
        failed = round(self.all_reduce(error is not None, dist.ReduceOp.SUM))
        if 0 < failed < self.world:
            mine = f"this rank: {error}" if error else "this rank succeeded"
            raise BenchAbort(f"[{name}] failed on {failed} of {self.world} ranks ({mine})")
        if error is not None:
            data["error"] = error
        data["elapsed_s"] = round(time.perf_counter() - started, 3)
        if self.progress is not None:
            self.progress.close()
        self.log(f"[{name}] done in {data['elapsed_s']} s")
        return data


def time_calls(r: Rank, fn: Callable[[], Any], calls: int) -> tuple[float, float, float]:
    """``calls`` back-to-back calls once the ranks have met with idle GPUs; µs per call of GPU
    time (CUDA events), host time to issue them, and host time until the GPU is done."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    r.barrier()
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    t1 = time.perf_counter()
    end.synchronize()
    t2 = time.perf_counter()
    return start.elapsed_time(end) * 1e3 / calls, (t1 - t0) * 1e6 / calls, (t2 - t0) * 1e6 / calls


def _median_us(r: Rank, fn: Callable[[], Any], calls: int) -> float:
    """The median over repetitions of ``time_calls``'s GPU time."""
    return statistics.median(time_calls(r, fn, calls)[0] for _ in range(r.cfg.reps))


def time_eager(r: Rank, fn: Callable[[], Any]) -> dict[str, Any]:
    """Median over repetitions of N back-to-back calls, N from a probe of 3 calls (maximum over
    ranks, so that every rank runs the same N); ``estimate_s`` (agreed) plans the graph."""
    cfg = r.cfg
    for _ in range(cfg.warmup):
        fn()
    probe_s = r.all_reduce(time_calls(r, fn, 3)[0] / 1e6)
    iters = iterations_for(probe_s, cfg)
    median = _median_us(r, fn, iters)
    return {"median_us": median, "iters": iters, "estimate_s": r.all_reduce(median / 1e6)}


def _captured(r: Rank, fn: Callable[[], Any], calls: int, pool: Any = None) -> Any:
    """``calls`` calls of ``fn`` captured in one CUDA graph after a warm-up, uploaded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture needs
        for _ in range(max(2, min(r.cfg.warmup, 3))):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    capture = {} if pool is None else {"pool": pool, "stream": side}
    # Without a pool, torch captures on a stream of its own.
    with torch.cuda.graph(graph, capture_error_mode="thread_local", **capture):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    graph.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    return graph


def time_graph(
    r: Rank, fn: Callable[[], Any], estimate_s: float, pool: Any = None
) -> dict[str, Any]:
    """Median over repetitions of R replays of one CUDA graph of K calls, per call; K and R
    from ``estimate_s``, the eager time per call agreed over ranks. With ``pool`` (a graph
    pool) the capture allocates from it on the warm-up's stream, as engines capture: what
    ``fn`` allocates inside ``use_symmetric_memory`` then reuses the warm-up's registered
    blocks (the caller sets the pool with ``symm_rs.graph_capture``)."""
    calls, replays = graph_plan(estimate_s, r.cfg)
    graph = _captured(r, fn, calls, pool)
    median = _median_us(r, graph.replay, replays) / calls
    graph.reset()
    return {"median_us": median, "calls_per_graph": calls, "replays": replays}


def time_graphs_in_turns(
    r: Rank,
    fns: dict[str, Callable[[], Any]],
    estimate_s: float,
    rounds: int,
    before_capture: Optional[Callable[[str], Any]] = None,
) -> dict[str, dict[str, Any]]:
    """``time_graph`` for several paths compared with each other: each is captured once
    (``before_capture(name)`` runs first, outside the capture, on every rank), then the paths
    take turns, ``rounds`` times, starting from a different path each round, so that clock
    drift and a neighbour's noise fall on every path alike. Per path: the median over every
    repetition of every round, per call."""
    calls, replays = graph_plan(estimate_s, r.cfg)
    graphs = {}
    for name, fn in fns.items():
        if before_capture is not None:
            before_capture(name)
        graphs[name] = _captured(r, fn, calls)
    names = list(graphs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            replay = graphs[name].replay
            samples[name] += [time_calls(r, replay, replays)[0] / calls for _ in range(r.cfg.reps)]
    for graph in graphs.values():
        graph.reset()
    return {
        name: {
            "median_us": statistics.median(values),
            "calls_per_graph": calls,
            "replays": replays,
            "rounds": rounds,
        }
        for name, values in samples.items()
    }


def time_host(r: Rank, fn: Callable[[], Any]) -> dict[str, Any]:
    """Medians over repetitions of ``event_us`` (GPU time per call), ``issue_us`` (host time to
    issue a call) and ``wall_us`` (host time per call until the GPU is done)."""
    for _ in range(r.cfg.warmup):
        fn()
    samples = [time_calls(r, fn, r.cfg.max_iters) for _ in range(r.cfg.reps)]
    names = ("event_us", "issue_us", "wall_us")
    medians = {name: statistics.median(s[i] for s in samples) for i, name in enumerate(names)}
    return {"iters": r.cfg.max_iters, **medians}
