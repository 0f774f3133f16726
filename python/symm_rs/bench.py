"""``python -m symm_rs bench``: symmetric memory measured against its baselines, on 2+ GPUs.

One process per GPU (spawned). Every section compares against its baseline in the same run and
the same processes:

* ``collectives``: all-gather, all-reduce and reduce-scatter through ``torch.distributed``, bf16,
  on caching-allocator buffers (``plain``) and on symmetric windows (``symm``), eager and in
  CUDA-graph replay;
* ``communicator``: ``symm_rs.Communicator`` against ``torch.distributed`` on the same symmetric
  buffers, small sizes, GPU time and host time per call;
* ``context``: one ``use_symmetric_memory`` enter+exit with nothing to register, against torch's
  ``use_mem_pool`` and the raw begin/end/release calls;
* ``coldstart``: fresh processes: ``import torch``, ``import symm_rs``, process-group creation,
  the first symmetric allocation and the first registration;
* ``registration``: cost of registering new segments, of ``symm_rs.reserve`` (if present) and,
  at the very end, of ``symm_rs.destroy_pool`` (deregistration).

The parent process writes ``<out>/bench_<N>gpu<tag>.json`` and ``.png`` and prints a Markdown
table. Usage: ``python -m symm_rs bench [--world-size N] [--quick] [--env NCCL_SYM_CTAS=16]``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

SCHEMA = "symm_rs.bench/1"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
SECTIONS = ("collectives", "communicator", "context", "coldstart", "registration")
OPS = ("all_gather", "all_reduce", "reduce_scatter")
OP_ABBREV = {"all_gather": "AG", "all_reduce": "AR", "reduce_scatter": "RS"}
BUFFERS = ("plain", "symm")
MODES = ("eager", "graph")
COMMUNICATOR_OPS = ("all_gather", "all_reduce")
COMMUNICATOR_PATHS = ("symm_rs", "torch")
BACKENDS = ("torch", "symm_rs")
DTYPE = "bfloat16"
DTYPE_BYTES = 2
SIZE_QUANTUM = 2 * DTYPE_BYTES
DEFAULT_MIN_BYTES = 1 * KiB
DEFAULT_MAX_BYTES = 256 * MiB
DEFAULT_FACTOR = 8
# The rows of DESIGN.md's table; the default sizes (1 KiB * 8^k) contain every one of them.
DESIGN_ROWS = (1 * KiB, 512 * KiB, 4 * MiB, 32 * MiB, 256 * MiB)
COMMUNICATOR_MAX_BYTES = 1 * MiB
PROBE_CALLS = 3
CONTEXT_BATCHES = 20
# Segment sizes of the registration section: every one >= 10 MiB and a multiple of 2 MiB, so the
# caching allocator gives each tensor a segment of exactly its size (smaller requests share 20 MiB
# segments) and every tensor needs a new segment while the earlier ones are alive.
FIRST_SEGMENT_BYTES = 20 * MiB
REGISTRATION_SEGMENT_MIB = (12, 16, 24, 32, 48, 64)
RESERVE_BYTES = 1 * GiB
COLD_MARKER = "SYMM_RS_BENCH_COLD "
OTHER_ENV_PREFIXES = ("TORCH_NCCL_", "SYMM_RS_", "TORCH_SYMM_MEM_", "NVSHMEM_")
OTHER_ENV_NAMES = ("CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_MAX_CONNECTIONS")
RESULT_KEYS = (
    "schema",
    "timestamp",
    "world_size",
    "machine",
    "versions",
    "env",
    "env_set",
    "other_env",
    "config",
    "method",
    "aggregation",
    "sections",
    "errors",
    "elapsed_s",
)
# DESIGN.md's figures, quoted for comparison; not measured by this run.
DESIGN_REFERENCE = {
    "source": "DESIGN.md, 2 and 4 x H100, torch 2.11.0+cu130, NCCL 2.28.9 (not measured here)",
    "runtime_compiled_allocator_cold_build_s": 19.4,
    "runtime_compiled_allocator_note": "32-core host, plus ~4 s torch import",
    "first_window_register_ms": 22.0,
    "window_register_each_after_ms": 3.3,
    "window_deregister_ms": 0.12,
    "torch_use_mem_pool_us": 6.1,
    "raw_begin_end_release_us": 3.0,
}
AGGREGATION = (
    "collectives and communicator: each rank times its own calls; the reported latency is the "
    "maximum over ranks of each rank's median over repetitions (a collective finishes when its "
    "slowest rank does); rank0_us and per_rank_us give the rest. context, registration, "
    "coldstart: rank0 holds rank 0's numbers, max_over_ranks the maximum of each figure, "
    "per_rank every rank's."
)
METHOD = {
    "dtype": DTYPE,
    "bytes": (
        "bytes per rank: all_gather input (output is world*bytes), all_reduce buffer (in place), "
        "reduce_scatter output (input is world*bytes)"
    ),
    "bandwidth": (
        "nccl-tests conventions, GB/s = 1e9 B/s. all_gather, reduce_scatter: algbw = "
        "world*bytes/time, busbw = algbw*(world-1)/world. all_reduce: algbw = bytes/time, "
        "busbw = algbw*2*(world-1)/world"
    ),
    "buffers": (
        "plain: torch caching allocator; symm: both buffers allocated inside "
        "symm_rs.use_symmetric_memory(default group), checked with is_symmetric"
    ),
    "backend": (
        "collectives.backend: torch = torch.distributed on the default NCCL group; symm_rs = a "
        "symm_rs.Communicator over the same ranks (symm buffers then registered with it)"
    ),
    "hang_guard": (
        "ranks wait for their GPU by polling CUDA events; after gpu_timeout_s a rank reports a "
        "hang and the run stops; rows finished before that are kept"
    ),
    "eager": (
        "N back-to-back torch.distributed calls between two CUDA events on the current stream; "
        "per call = elapsed/N. Before each repetition the ranks synchronize their GPU and meet "
        "in a gloo all-reduce. latency = median over repetitions"
    ),
    "graph": (
        "K calls captured in one CUDA graph (warm-up on a side stream, capture on "
        "torch.cuda.graph's own stream, capture_error_mode=thread_local), replayed R times "
        "between CUDA events; per call = elapsed/(K*R). latency = median over repetitions"
    ),
    "iterations": (
        "after warm-up, 3 timed calls estimate the per-call time (maximum over ranks, so every "
        "rank runs the same count); calls per repetition = target/(reps*estimate), clamped to "
        "[min_iters, max_iters]. --iters fixes the count instead"
    ),
    "speedup": "plain latency / symm latency (> 1: symmetric buffers faster)",
    "communicator": (
        "symm_rs.Communicator and torch.distributed on the same buffers, allocated inside "
        "use_symmetric_memory(communicator) and then registered with the torch group too; "
        "event_us: GPU time per call (CUDA events); issue_us: host time to issue the loop; "
        "wall_us: host time of loop + synchronize, per call"
    ),
    "context": (
        "time.perf_counter_ns around batches of enter+exit with nothing new to register; "
        "mean_us over all iterations, median_batch_us the median of the batch means"
    ),
    "coldstart": (
        "fresh python processes (one per rank, started together) after the main run: the file "
        "cache is warm, the interpreter is not. symm_rs_total_ms = import symm_rs + first "
        "symmetric allocation (pool creation, NCCL loading, ncclMemAlloc) + first registration; "
        "process-group creation is reported but not counted"
    ),
    "registration": (
        "first: one new 20 MiB segment on a communicator with no window; batch: M new segments "
        "(12-64 MiB) registered at one context exit; reserve: symm_rs.reserve(1 GiB, group); "
        "destroy_pool: symm_rs.destroy_pool() at the very end (deregisters every window, then "
        "ncclMemFree), ms_per_window = time / windows deregistered"
    ),
}


class BenchAbort(RuntimeError):
    """Some ranks failed where others did not: their collective sequences may differ, so the
    whole run stops instead of risking a hang."""


class BenchHang(BenchAbort):
    """The GPU did not finish queued work in time: the ranks are stuck in a collective."""


# --------------------------------------------------------------------------------------------
# Pure helpers (tested without a GPU)
# --------------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "k": KiB, "m": MiB, "g": GiB}


def parse_size(text: str) -> int:
    """``"4M"``, ``"512KiB"``, ``"1g"``, ``"1024"`` -> bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise ValueError(f"not a size: {text!r} (examples: 1024, 8K, 512KiB, 4M, 1G)")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _UNITS[unit]


def _check_size(nbytes: int) -> None:
    # An even bf16 count: NCCL's symmetric kernels mishandle odd 16-bit counts (comm.py stages
    # around them), which would time a different path.
    if nbytes < SIZE_QUANTUM or nbytes % SIZE_QUANTUM:
        raise ValueError(
            f"sizes must be positive multiples of {SIZE_QUANTUM} bytes (an even bf16 count), "
            f"got {nbytes}"
        )


def size_list(
    min_bytes: int = DEFAULT_MIN_BYTES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    factor: int = DEFAULT_FACTOR,
) -> list[int]:
    """``min, min*factor, ...`` up to ``max`` (``max`` itself is added when the steps miss it).

    Raises:
        ValueError: a size is not a positive multiple of 4, ``max < min`` or ``factor < 2``.
    """
    _check_size(min_bytes)
    _check_size(max_bytes)
    if max_bytes < min_bytes:
        raise ValueError(f"--max-bytes ({max_bytes}) is below --min-bytes ({min_bytes})")
    if factor < 2:
        raise ValueError(f"--factor must be >= 2, got {factor}")
    sizes = []
    size = min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    if sizes[-1] != max_bytes:
        sizes.append(max_bytes)
    return sizes


def parse_size_list(text: str) -> list[int]:
    """``"1K,512K,4M"`` -> sorted distinct byte counts.

    Raises:
        ValueError: an entry is not a size, or not a positive multiple of 4.
    """
    sizes = sorted({parse_size(part) for part in str(text).split(",") if part.strip()})
    if not sizes:
        raise ValueError("--sizes is empty")
    for size in sizes:
        _check_size(size)
    return sizes


def communicator_sizes(sizes: list[int], max_bytes: int = COMMUNICATOR_MAX_BYTES) -> list[int]:
    """The sizes of the communicator section: those up to ``max_bytes``, plus ``max_bytes``
    itself when the list reaches down to it."""
    out = [s for s in sizes if s <= max_bytes]
    if out and max_bytes not in out:
        out.append(max_bytes)
    return sorted(out)


def registration_sizes(count: int) -> list[int]:
    """Byte sizes of the ``count`` tensors of the registration section (one segment each)."""
    return [REGISTRATION_SEGMENT_MIB[i % len(REGISTRATION_SEGMENT_MIB)] * MiB for i in range(count)]


def parse_sections(values: Optional[list[str]]) -> list[str]:
    """``["collectives,context", "registration"]`` or ``["all"]`` -> sections in run order.

    Raises:
        ValueError: an unknown section.
    """
    if not values:
        return list(SECTIONS)
    wanted: set[str] = set()
    for value in values:
        for name in str(value).split(","):
            name = name.strip()
            if not name:
                continue
            if name == "all":
                wanted.update(SECTIONS)
            elif name in SECTIONS:
                wanted.add(name)
            else:
                raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    if not wanted:
        raise ValueError("--sections selects nothing")
    return [s for s in SECTIONS if s in wanted]


def parse_env(values: Optional[list[str]]) -> dict[str, str]:
    """``["NCCL_SYM_CTAS=16"]`` -> ``{"NCCL_SYM_CTAS": "16"}``.

    Raises:
        ValueError: an entry without ``=`` or with an empty name.
    """
    env: dict[str, str] = {}
    for item in values or []:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def output_stem(world_size: int, tag: str = "") -> str:
    """``bench_<N>gpu<tag>``; a tag gets a leading ``_`` unless it starts with ``_``/``-``/``.``.

    Raises:
        ValueError: the tag holds characters other than letters, digits, ``.``, ``_``, ``-``.
    """
    tag = tag or ""
    if tag and not re.match(r"^[A-Za-z0-9._-]+$", tag):
        raise ValueError(f"--tag may hold letters, digits, '.', '_' and '-' only, got {tag!r}")
    if tag and tag[0] not in "_-.":
        tag = "_" + tag
    return f"bench_{world_size}gpu{tag}"


def format_bytes(nbytes: int) -> str:
    """``1024`` -> ``"1 KiB"``, ``4194304`` -> ``"4 MiB"``, ``1536`` -> ``"1536 B"``."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit} {name}"
    return f"{nbytes} B"


def bandwidth_gbs(op: str, nbytes: int, world_size: int, seconds: float) -> tuple[float, float]:
    """``(algbw, busbw)`` in GB/s (1e9 B/s) with nccl-tests' conventions; ``nbytes`` per rank
    (all_gather input, all_reduce buffer, reduce_scatter output).

    Raises:
        ValueError: unknown op, ``world_size < 1`` or ``seconds <= 0``.
    """
    if world_size < 1 or not seconds > 0:
        raise ValueError(f"need world_size >= 1 and seconds > 0, got {world_size}, {seconds}")
    if op == "all_reduce":
        size, factor = nbytes, 2.0 * (world_size - 1) / world_size
    elif op in ("all_gather", "reduce_scatter"):
        size, factor = nbytes * world_size, (world_size - 1) / world_size
    else:
        raise ValueError(f"unknown op {op!r}")
    algbw = size / seconds / 1e9
    return algbw, algbw * factor


def iterations_for(
    seconds_per_call: Optional[float],
    target_s: float,
    reps: int,
    min_iters: int = 5,
    max_iters: int = 200,
) -> int:
    """Calls per repetition so that ``reps`` repetitions take about ``target_s``, clamped to
    ``[min_iters, max_iters]`` (an unknown or zero estimate gives ``max_iters``)."""
    if seconds_per_call is None or not seconds_per_call > 0 or not math.isfinite(seconds_per_call):
        return max_iters
    count = int(target_s / (max(1, reps) * seconds_per_call))
    return max(min_iters, min(max_iters, count))


def graph_plan(
    seconds_per_call: Optional[float],
    target_s: float,
    reps: int,
    max_calls: int = 10,
    max_total: int = 200,
    graph_budget_s: float = 5e-3,
) -> tuple[int, int]:
    """``(calls per graph, replays per repetition)``: up to ``max_calls`` calls in one graph but
    no more than ``graph_budget_s`` of work, and enough replays for about ``target_s`` over
    ``reps`` repetitions, at most ``max_total`` calls per repetition."""
    if seconds_per_call is None or not seconds_per_call > 0 or not math.isfinite(seconds_per_call):
        return max_calls, max(1, max_total // max_calls)
    calls = max(1, min(max_calls, int(graph_budget_s / seconds_per_call)))
    replays = math.ceil(target_s / (max(1, reps) * calls * seconds_per_call))
    return calls, max(1, min(max(1, max_total // calls), replays))


def fixed_graph_plan(iters: int, max_calls: int = 10) -> tuple[int, int]:
    """``(calls per graph, replays)`` for a fixed ``--iters`` count per repetition."""
    calls = max(1, min(max_calls, iters))
    return calls, max(1, math.ceil(iters / calls))


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


# --------------------------------------------------------------------------------------------
# Configuration and command line
# --------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """What every rank needs to know; travels to the spawned processes."""

    sizes: list[int]
    sections: list[str]
    warmup: int = 5
    iters: Optional[int] = None
    reps: int = 5
    target_s: float = 0.05
    min_iters: int = 5
    max_iters: int = 200
    max_graph_calls: int = 10
    host_iters: int = 200
    context_iters: int = 20000
    registration_segments: int = 16
    reserve_bytes: int = RESERVE_BYTES
    quick: bool = False
    nccl_timeout_s: float = 60.0
    control_timeout_s: float = 60.0
    gpu_timeout_s: float = 30.0
    backend: str = "torch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument(
        "--world-size", type=int, default=None, help="GPUs to use (default: all visible; min 2)"
    )
    parser.add_argument(
        "--out",
        default=os.path.join("benches", "results"),
        help="output folder (default benches/results)",
    )
    parser.add_argument("--tag", default="", help="file-name suffix: bench_<N>gpu<tag>.json")
    parser.add_argument(
        "--min-bytes",
        default=format_bytes(DEFAULT_MIN_BYTES),
        help="smallest bytes per rank (default 1 KiB)",
    )
    parser.add_argument(
        "--max-bytes",
        default=format_bytes(DEFAULT_MAX_BYTES),
        help="largest bytes per rank (default 256 MiB)",
    )
    parser.add_argument(
        "--factor", type=int, default=DEFAULT_FACTOR, help="size step (default 8: 1K, 8K, ...)"
    )
    parser.add_argument("--sizes", default=None, help="explicit sizes, e.g. 1K,512K,4M (overrides)")
    parser.add_argument(
        "--iters", type=int, default=None, help="calls per repetition (default: time budget)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument(
        "--target-ms",
        type=float,
        default=None,
        help="measured time per (op, size, mode, buffers) (default 50)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations and repetitions")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=None,
        metavar="SECTION",
        help=f"subset of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the rank processes, set before NCCL starts (repeatable)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="collectives section: torch.distributed on the default group (default), or a "
        "symm_rs.Communicator over the same ranks (a fallback should torch's collectives not "
        "replay in CUDA graphs)",
    )
    parser.add_argument(
        "--gpu-timeout",
        type=float,
        default=30.0,
        help="seconds a rank waits for its GPU before declaring a hang (default 30)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds before hung ranks are killed (default 300)",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the options describe.

    Raises:
        ValueError: an option is out of range.
    """
    if args.sizes:
        sizes = parse_size_list(args.sizes)
    else:
        sizes = size_list(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor)
    cfg = BenchConfig(sizes=sizes, sections=parse_sections(args.sections), quick=bool(args.quick))
    if args.quick:
        cfg.warmup, cfg.reps, cfg.target_s, cfg.max_iters = 2, 3, 0.015, 50
        cfg.host_iters, cfg.context_iters, cfg.registration_segments = 50, 5000, 8
    if args.warmup is not None:
        cfg.warmup = args.warmup
    if args.reps is not None:
        cfg.reps = args.reps
    if args.target_ms is not None:
        cfg.target_s = args.target_ms / 1e3
    if args.iters is not None:
        cfg.iters = args.iters
    cfg.backend = args.backend
    cfg.gpu_timeout_s = float(args.gpu_timeout)
    if (
        cfg.warmup < 0
        or cfg.reps < 1
        or cfg.target_s <= 0
        or (cfg.iters is not None and cfg.iters < 1)
    ):
        raise ValueError("need --warmup >= 0, --reps >= 1, --target-ms > 0 and --iters >= 1")
    if cfg.gpu_timeout_s <= 0:
        raise ValueError("need --gpu-timeout > 0")
    return cfg


def visible_gpu_count() -> int:
    """GPUs torch can see (0 without CUDA)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


# --------------------------------------------------------------------------------------------
# Per-rank machinery
# --------------------------------------------------------------------------------------------


class _Rank:
    """One rank's view: its groups, the configuration, and the agreement protocol.

    Every measurement runs as a *unit*: afterwards all ranks count, over a gloo group, how many
    failed. None: go on. All: record the error and go on (every rank skipped the same work).
    Some: ``BenchAbort`` on every rank, since their NCCL call sequences may now differ.
    """

    def __init__(
        self, rank: int, world: int, cfg: BenchConfig, group: Any, control: Any, emit: Any
    ) -> None:
        import torch

        self.rank = rank
        self.world = world
        self.cfg = cfg
        self.group = group
        self.control = control
        self.emit = emit
        self.device = torch.device("cuda", rank)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _all_reduce_cpu(self, value: float, op: str) -> float:
        import torch
        import torch.distributed as dist

        # A CPU tensor on the gloo group: no CUDA allocation (safe inside a pool context) and no
        # NCCL call (so it never pairs with a collective of the benchmarked communicator).
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=reduce_op, group=self.control)
        return float(tensor.item())

    def wait_gpu(self, what: str, event: Any = None) -> None:
        """Waits until ``event`` (default: all work queued so far on the current stream) has
        completed, like ``synchronize``, but raises ``BenchHang`` after ``gpu_timeout_s``
        instead of blocking forever when the ranks are stuck in a collective."""
        import torch

        if event is None:
            event = torch.cuda.Event()
            event.record()
        deadline = time.monotonic() + self.cfg.gpu_timeout_s
        while not event.query():
            if time.monotonic() > deadline:
                raise BenchHang(
                    f"{what}: rank {self.rank}'s GPU has not finished after "
                    f"{self.cfg.gpu_timeout_s:.0f} s; the ranks are probably stuck in a collective"
                )
            time.sleep(0)

    def barrier(self, what: str = "barrier") -> None:
        """GPU idle here, then all ranks meet (host side)."""
        import torch

        self.wait_gpu(what)
        torch.cuda.synchronize()
        self._all_reduce_cpu(0.0, "sum")

    def agree_max(self, value: float) -> float:
        return self._all_reduce_cpu(value, "max")

    def count_failures(self, failed: bool) -> int:
        return int(self._all_reduce_cpu(1.0 if failed else 0.0, "sum") + 0.5)

    def unit(self, label: str, fn: Callable[..., Any], *args: Any) -> tuple[Any, Optional[str]]:
        error: Optional[str] = None
        value: Any = None
        try:
            value = fn(*args)
        except BenchAbort:
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            print(f"[rank {self.rank}] {label} failed: {traceback.format_exc()}", file=sys.stderr)
        failed = self.count_failures(error is not None)
        if failed == 0:
            return value, None
        if failed >= self.world:
            self.log(f"  {label}: failed on every rank: {error}")
            return None, error
        mine = f"this rank: {error}" if error else "this rank succeeded"
        raise BenchAbort(
            f"{label} failed on {failed} of {self.world} ranks ({mine}); stopping, since the "
            "ranks' collective sequences may no longer match"
        )

    def section(self, name: str, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        self.log(f"[{name}] start")
        started = time.perf_counter()
        data, error = self.unit(f"[{name}]", fn, *args)
        if error is not None:
            data = {"error": error}
        data = dict(data or {})
        data["elapsed_s"] = _round(time.perf_counter() - started)
        self.emit("section", (name, data))
        self.log(f"[{name}] done in {data['elapsed_s']} s")
        return data


def _events() -> tuple[Any, Any]:
    import torch

    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _probe_seconds(r: _Rank, fn: Callable[[], Any]) -> float:
    """Seconds per call of ``fn`` from a few calls, agreed (maximum) over ranks."""
    start, end = _events()
    r.barrier()
    start.record()
    for _ in range(PROBE_CALLS):
        fn()
    end.record()
    r.wait_gpu("probe", end)
    return r.agree_max(start.elapsed_time(end) / 1e3 / PROBE_CALLS)


def _time_loop(r: _Rank, fn: Callable[[], Any], iters: int, reps: int) -> list[float]:
    """Microseconds per call of ``iters`` back-to-back calls, once per repetition."""
    start, end = _events()
    samples = []
    for _ in range(reps):
        r.barrier()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        r.wait_gpu("timed calls", end)
        samples.append(start.elapsed_time(end) * 1e3 / iters)
    return samples


def _measure_eager(r: _Rank, fn: Callable[[], Any]) -> dict[str, Any]:
    cfg = r.cfg
    for _ in range(cfg.warmup):
        fn()
    if cfg.iters is not None:
        iters = cfg.iters
    else:
        iters = iterations_for(
            _probe_seconds(r, fn), cfg.target_s, cfg.reps, cfg.min_iters, cfg.max_iters
        )
    samples = _time_loop(r, fn, iters, cfg.reps)
    median = statistics.median(samples)
    # Agreed, so that the graph plan derived from it is the same on every rank.
    estimate = r.agree_max(median / 1e6)
    return {"samples_us": samples, "median_us": median, "iters": iters, "estimate_s": estimate}


def _measure_graph(r: _Rank, fn: Callable[[], Any], estimate_s: Optional[float]) -> dict[str, Any]:
    import torch

    cfg = r.cfg
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(2, min(cfg.warmup, 3))):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    r.wait_gpu("warm-up on a side stream")
    torch.cuda.synchronize()
    if cfg.iters is not None:
        calls, replays = fixed_graph_plan(cfg.iters, cfg.max_graph_calls)
    else:
        if estimate_s is None:
            estimate_s = _probe_seconds(r, fn)
        calls, replays = graph_plan(
            estimate_s, cfg.target_s, cfg.reps, cfg.max_graph_calls, cfg.max_iters
        )
    graph = torch.cuda.CUDAGraph()
    try:
        # torch.cuda.graph captures on its own side stream, never on the default stream.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for _ in range(calls):
                fn()
        torch.cuda.synchronize()
        graph.replay()  # the first replay uploads the graph
        r.wait_gpu("first graph replay")
        start, end = _events()
        samples = []
        for _ in range(cfg.reps):
            r.barrier()
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            r.wait_gpu("graph replays", end)
            samples.append(start.elapsed_time(end) * 1e3 / (calls * replays))
    except BenchHang:
        raise  # leave the graph alone: the GPU may still be running it
    except BaseException:
        try:
            torch.cuda.synchronize()
            graph.reset()
        except Exception:
            pass
        raise
    graph.reset()
    del graph
    return {
        "samples_us": samples,
        "median_us": statistics.median(samples),
        "calls_per_graph": calls,
        "replays": replays,
    }


# -- collectives ----------------------------------------------------------------------------


def _allocate_pair(r: _Rank, kind: str, elems: int, owner: Any) -> tuple[Any, Any]:
    """``(small, big)``: ``elems`` and ``world * elems`` bf16 zeros; for ``symm``, inside
    ``use_symmetric_memory(owner)`` (the group or communicator the collectives run on)."""
    import torch

    import symm_rs

    if kind == "plain":
        small = torch.zeros(elems, dtype=torch.bfloat16, device=r.device)
        big = torch.zeros(elems * r.world, dtype=torch.bfloat16, device=r.device)
    else:
        with symm_rs.use_symmetric_memory(owner):
            small = torch.empty(elems, dtype=torch.bfloat16, device=r.device)
            big = torch.empty(elems * r.world, dtype=torch.bfloat16, device=r.device)
        small.zero_()
        big.zero_()
        if not (symm_rs.is_symmetric(small, owner) and symm_rs.is_symmetric(big, owner)):
            raise RuntimeError("buffers allocated inside use_symmetric_memory are not symmetric")
    torch.cuda.synchronize()
    return small, big


def _collective(op: str, small: Any, big: Any, group: Any, comm: Any) -> Callable[[], Any]:
    """The call to time (zeros stay zeros, so repeated sums cannot overflow): through
    ``torch.distributed`` on ``group``, or through the ``symm_rs.Communicator`` ``comm``."""
    import torch.distributed as dist

    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if comm is not None:
        if op == "all_gather":
            return functools.partial(comm.all_gather_into_tensor, big, small)
        if op == "all_reduce":
            return functools.partial(comm.all_reduce, small)
        return functools.partial(comm.reduce_scatter_tensor, small, big)
    if op == "all_gather":
        return functools.partial(dist.all_gather_into_tensor, big, small, group=group)
    if op == "all_reduce":
        return functools.partial(dist.all_reduce, small, group=group)
    return functools.partial(dist.reduce_scatter_tensor, small, big, group=group)


def _collectives_row(
    r: _Rank,
    row: dict[str, Any],
    pair: Any,
    comm: Any,
    estimates: dict[tuple[str, str], float],
    graph_errors: dict[str, str],
) -> None:
    """Measures one (op, bytes, mode, buffers) row in place; errors go into the row."""
    op, nbytes, mode, kind = row["op"], row["bytes"], row["mode"], row["buffers"]
    if isinstance(pair, str):
        row["error"] = pair
        return
    if mode == "graph" and kind in graph_errors:
        row["error"] = f"skipped: an earlier graph capture failed ({graph_errors[kind]})"
        return
    fn = _collective(op, pair[0], pair[1], r.group, comm)
    name = f"[collectives] {op} {format_bytes(nbytes)} {kind} {mode}"
    if mode == "eager":
        result, error = r.unit(name, _measure_eager, r, fn)
        if result is not None:
            estimates[(op, kind)] = result.pop("estimate_s")
    else:
        result, error = r.unit(name, _measure_graph, r, fn, estimates.get((op, kind)))
        if error is not None:
            graph_errors[kind] = f"{op} {format_bytes(nbytes)}: {error}"
    if error is not None:
        row["error"] = error
        return
    row.update(result)
    r.log(f"{name}: {row['median_us']:.1f} us (rank 0)")


def _section_collectives(r: _Rank) -> dict[str, Any]:
    import torch

    comm = None
    if r.cfg.backend == "symm_rs":
        comm, error = r.unit("[collectives] create Communicator", _make_communicator, r)
        if error is not None:
            return {"backend": r.cfg.backend, "error": f"Communicator creation failed: {error}"}
    owner = r.group if comm is None else comm
    rows: list[dict[str, Any]] = []
    # After a failed capture (on every rank), no more captures with that kind of buffer.
    graph_errors: dict[str, str] = {}
    for nbytes in r.cfg.sizes:
        buffers: dict[str, Any] = {}
        for kind in BUFFERS:
            pair, error = r.unit(
                f"[collectives] allocate {kind} {format_bytes(nbytes)}",
                _allocate_pair,
                r,
                kind,
                nbytes // DTYPE_BYTES,
                owner,
            )
            buffers[kind] = pair if error is None else f"allocation failed: {error}"
            pair = None
        estimates: dict[tuple[str, str], float] = {}
        for op in OPS:
            for mode in MODES:
                for kind in BUFFERS:
                    row: dict[str, Any] = {"op": op, "bytes": nbytes, "mode": mode, "buffers": kind}
                    _collectives_row(r, row, buffers[kind], comm, estimates, graph_errors)
                    rows.append(row)
                    r.emit("row", ("collectives", row))
        buffers.clear()
    out: dict[str, Any] = {"backend": r.cfg.backend, "rows": rows}
    if comm is not None:
        r.wait_gpu("collectives")
        torch.cuda.synchronize()
        _, out["close_error"] = r.unit("[collectives] close Communicator", comm.close)
    return out


# -- communicator ---------------------------------------------------------------------------


def _make_communicator(r: _Rank) -> Any:
    import symm_rs

    return symm_rs.Communicator.from_process_group(r.group, device=r.rank)


def _allocate_comm_pair(r: _Rank, comm: Any, elems: int) -> tuple[Any, Any]:
    import torch

    import symm_rs

    with symm_rs.use_symmetric_memory(comm):
        small = torch.empty(elems, dtype=torch.bfloat16, device=r.device)
        big = torch.empty(elems * r.world, dtype=torch.bfloat16, device=r.device)
    # Registration is per communicator: give the torch group windows on the same segments.
    with symm_rs.use_symmetric_memory(r.group):
        pass
    small.zero_()
    big.zero_()
    for owner in (comm, r.group):
        if not (symm_rs.is_symmetric(small, owner) and symm_rs.is_symmetric(big, owner)):
            raise RuntimeError(f"buffers are not symmetric on {type(owner).__name__}")
    torch.cuda.synchronize()
    return small, big


def _communicator_call(path: str, op: str, comm: Any, r: _Rank, small: Any, big: Any) -> Any:
    import torch.distributed as dist

    if path == "symm_rs":
        if op == "all_gather":
            return functools.partial(comm.all_gather_into_tensor, big, small)
        return functools.partial(comm.all_reduce, small)
    if op == "all_gather":
        return functools.partial(dist.all_gather_into_tensor, big, small, group=r.group)
    return functools.partial(dist.all_reduce, small, group=r.group)


def _measure_host(r: _Rank, fn: Callable[[], Any]) -> dict[str, Any]:
    cfg = r.cfg
    iters = cfg.iters if cfg.iters is not None else cfg.host_iters
    for _ in range(cfg.warmup):
        fn()
    start, end = _events()
    event_us, issue_us, wall_us = [], [], []
    for _ in range(cfg.reps):
        r.barrier()
        t0 = time.perf_counter()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        t1 = time.perf_counter()
        r.wait_gpu("timed calls", end)
        t2 = time.perf_counter()
        event_us.append(start.elapsed_time(end) * 1e3 / iters)
        issue_us.append((t1 - t0) * 1e6 / iters)
        wall_us.append((t2 - t0) * 1e6 / iters)
    return {
        "event_us": statistics.median(event_us),
        "issue_us": statistics.median(issue_us),
        "wall_us": statistics.median(wall_us),
        "samples_event_us": event_us,
        "samples_wall_us": wall_us,
        "iters": iters,
    }


def _section_communicator(r: _Rank) -> dict[str, Any]:
    import torch

    sizes = communicator_sizes(r.cfg.sizes)
    if not sizes:
        return {"skipped": f"no size <= {format_bytes(COMMUNICATOR_MAX_BYTES)} selected"}
    comm, error = r.unit("[communicator] create", _make_communicator, r)
    if error is not None:
        return {"error": f"Communicator.from_process_group failed: {error}"}
    rows: list[dict[str, Any]] = []
    for nbytes in sizes:
        label = format_bytes(nbytes)
        pair, error = r.unit(
            f"[communicator] allocate {label}", _allocate_comm_pair, r, comm, nbytes // DTYPE_BYTES
        )
        for op in COMMUNICATOR_OPS:
            for path in COMMUNICATOR_PATHS:
                row: dict[str, Any] = {"op": op, "bytes": nbytes, "path": path}
                rows.append(row)
                if error is not None:
                    row["error"] = f"allocation failed: {error}"
                    r.emit("row", ("communicator", row))
                    continue
                fn = _communicator_call(path, op, comm, r, pair[0], pair[1])
                name = f"[communicator] {op} {label} {path}"
                result, failure = r.unit(name, _measure_host, r, fn)
                fn = None
                if failure is not None:
                    row["error"] = failure
                    r.emit("row", ("communicator", row))
                    continue
                row.update(result)
                r.emit("row", ("communicator", row))
                r.log(
                    f"{name}: gpu {row['event_us']:.1f} us, wall {row['wall_us']:.1f} us, "
                    f"issue {row['issue_us']:.1f} us (rank 0)"
                )
        pair = None
    r.wait_gpu("communicator")
    torch.cuda.synchronize()
    _, close_error = r.unit("[communicator] close", comm.close)
    return {"rows": rows, "close_error": close_error}


# -- context --------------------------------------------------------------------------------


def _loop_symm(n: int, group: Any) -> int:
    import symm_rs

    context = symm_rs.use_symmetric_memory
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with context(group):
            pass
    return time.perf_counter_ns() - t0


def _loop_use_mem_pool(n: int, pool: Any) -> int:
    import torch

    use_mem_pool = torch.cuda.use_mem_pool
    t0 = time.perf_counter_ns()
    for _ in range(n):
        with use_mem_pool(pool):
            pass
    return time.perf_counter_ns() - t0


def _loop_raw(
    n: int,
    device: int,
    pool_id: Any,
    begin: Callable[..., Any],
    end: Callable[..., Any],
    release: Callable[..., Any],
) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        begin(device, pool_id)
        end(device, pool_id)
        release(device, pool_id)
    return time.perf_counter_ns() - t0


def _section_context(r: _Rank) -> dict[str, Any]:
    import torch

    import symm_rs

    symm_rs.register(r.group)  # collective; afterwards nothing is pending on any rank
    batch = max(1, r.cfg.context_iters // CONTEXT_BATCHES)
    pool = torch.cuda.MemPool()
    variants: list[tuple[str, Callable[..., int], tuple[Any, ...]]] = [
        ("symm_rs.use_symmetric_memory", _loop_symm, (r.group,)),
        ("torch.cuda.use_mem_pool", _loop_use_mem_pool, (pool,)),
    ]
    c = torch._C
    begin = getattr(c, "_cuda_beginAllocateCurrentThreadToPool", None)
    end = getattr(c, "_cuda_endAllocateToPool", None)
    release = getattr(c, "_cuda_releasePool", None)
    out: dict[str, Any] = {"iterations_per_batch": batch, "batches": CONTEXT_BATCHES}
    if begin is not None and end is not None and release is not None:
        raw_args = (torch.cuda.current_device(), pool.id, begin, end, release)
        variants.append(("raw begin/end/release", _loop_raw, raw_args))
    else:
        out["raw begin/end/release"] = {"skipped": "this torch lacks the raw pool calls"}
    for name, loop, args in variants:
        loop(batch, *args)  # warm-up
        totals = [loop(batch, *args) for _ in range(CONTEXT_BATCHES)]
        per_batch_us = [t / batch / 1e3 for t in totals]
        out[name] = {
            "mean_us": sum(totals) / (batch * len(totals)) / 1e3,
            "median_batch_us": statistics.median(per_batch_us),
            "min_batch_us": min(per_batch_us),
        }
        r.log(f"[context] {name}: {out[name]['median_batch_us']:.2f} us (rank 0)")
    del pool
    return out


# -- registration ---------------------------------------------------------------------------


def _comm_windows(comm: int) -> int:
    import symm_rs

    entry = symm_rs.stats()["communicators"].get(comm)
    return int(entry["windows"]) if entry else 0


def _timed_context(r: _Rank, sizes: list[int]) -> tuple[list[Any], dict[str, Any]]:
    """Allocates ``sizes`` inside the context and times the allocation and the exit."""
    import torch

    import symm_rs

    before = symm_rs.stats()
    r.barrier()
    context = symm_rs.use_symmetric_memory(r.group)
    t0 = time.perf_counter()
    context.__enter__()
    try:
        tensors = [
            torch.empty(n // DTYPE_BYTES, dtype=torch.bfloat16, device=r.device) for n in sizes
        ]
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        r.barrier()  # registration is collective: start the clock with every rank there
    except BaseException:
        context.__exit__(*sys.exc_info())
        raise
    t2 = time.perf_counter()
    context.__exit__(None, None, None)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    after = symm_rs.stats()
    segments = after["segments"] - before["segments"]
    windows = after["windows_registered"] - before["windows_registered"]
    register_ms = (t3 - t2) * 1e3
    return tensors, {
        "tensors": len(sizes),
        "tensor_bytes": sizes if len(sizes) <= 32 else sum(sizes),
        "alloc_ms": (t1 - t0) * 1e3,
        "register_ms": register_ms,
        "segments_created": segments,
        "windows_registered": windows,
        "register_ms_per_window": register_ms / windows if windows else None,
        "bytes_created": after["bytes"] - before["bytes"],
    }


def _registration_first(r: _Rank, keep: list[Any]) -> dict[str, Any]:
    import symm_rs

    comm = symm_rs.resolve_comm(r.group)
    windows_before = _comm_windows(comm)
    tensors, data = _timed_context(r, [FIRST_SEGMENT_BYTES])
    keep.extend(tensors)
    data["communicator_windows_before"] = windows_before
    if windows_before:
        data["note"] = "the communicator already had windows: not its first registration"
    return data


def _registration_batch(r: _Rank, keep: list[Any]) -> dict[str, Any]:
    sizes = registration_sizes(r.cfg.registration_segments)
    tensors, data = _timed_context(r, sizes)
    keep.extend(tensors)
    data["segments_requested"] = len(sizes)
    if data["segments_created"] != len(sizes):
        data["note"] = (
            f"expected {len(sizes)} new segments, the pool grew by {data['segments_created']}; "
            "register_ms_per_window divides by the windows actually registered"
        )
    return data


def _registration_reserve(r: _Rank) -> dict[str, Any]:
    import torch

    import symm_rs

    reserve = getattr(symm_rs, "reserve", None)
    if reserve is None:
        return {"skipped": "symm_rs.reserve is not in this build"}
    before = symm_rs.stats()
    r.barrier()
    t0 = time.perf_counter()
    returned = reserve(r.cfg.reserve_bytes, r.group)
    torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    after = symm_rs.stats()
    return {
        "nbytes": r.cfg.reserve_bytes,
        "ms": elapsed_ms,
        "segments_created": after["segments"] - before["segments"],
        "windows_registered": after["windows_registered"] - before["windows_registered"],
        "bytes_created": after["bytes"] - before["bytes"],
        "returned": returned
        if isinstance(returned, (int, float, str, type(None)))
        else repr(returned),
    }


def _registration_begin(r: _Rank) -> dict[str, Any]:
    keep: list[Any] = []
    out: dict[str, Any] = {}
    for name, fn, args in (
        ("first", _registration_first, (r, keep)),
        ("batch", _registration_batch, (r, keep)),
        ("reserve", _registration_reserve, (r,)),
    ):
        data, error = r.unit(f"[registration] {name}", fn, *args)
        out[name] = data if error is None else {"error": error}
        if error is None and "register_ms" in data:
            r.log(
                f"[registration] {name}: {data['register_ms']:.1f} ms for "
                f"{data['windows_registered']} window(s) (rank 0)"
            )
        elif error is None and "ms" in data:
            r.log(f"[registration] {name}: {data['ms']:.1f} ms (rank 0)")
    keep.clear()
    return out


def _pool_tensors_alive() -> int:
    """Blocks of the shared pool still allocated (``destroy_pool`` refuses to run then)."""
    import symm_rs

    if not symm_rs.stats()["segments"]:
        return 0
    return sum(
        1
        for segment in symm_rs.shared_pool().snapshot()
        for block in segment.get("blocks", [])
        if block.get("state") == "active_allocated"
    )


def _registration_destroy(r: _Rank) -> dict[str, Any]:
    import torch

    import symm_rs

    destroy = getattr(symm_rs, "destroy_pool", None)
    if destroy is None:
        return {"skipped": "symm_rs.destroy_pool is not in this build"}
    torch.cuda.synchronize()
    # torch's NCCL watchdog may hold the last collectives' tensors for a moment.
    deadline = time.monotonic() + 10.0
    while True:
        gc.collect()
        alive = _pool_tensors_alive()
        if alive == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    alive = int(r.agree_max(float(alive)))
    if alive:
        return {"skipped": f"{alive} tensor(s) from the symmetric pool still alive on some rank"}
    before = symm_rs.stats()
    r.barrier()
    t0 = time.perf_counter()
    freed = destroy()
    torch.cuda.synchronize()
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    after = symm_rs.stats()
    windows = after["windows_deregistered"] - before["windows_deregistered"]
    r.log(f"[registration] destroy_pool: {elapsed_ms:.1f} ms, {windows} window(s) (rank 0)")
    return {
        "ms": elapsed_ms,
        "segments_freed": freed,
        "windows_deregistered": windows,
        "ms_per_window": elapsed_ms / windows if windows else None,
        "note": "includes ncclMemFree of every segment",
    }


# -- rank entry points ----------------------------------------------------------------------


def _rank_meta(world: int) -> dict[str, Any]:
    import torch

    import symm_rs

    meta: dict[str, Any] = {}
    try:
        device = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(device)
        meta["machine"] = {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_count": torch.cuda.device_count(),
            "gpus_used": world,
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / GiB, 1),
            "hostname": platform.node(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
        }
        torch_nccl: Any = None
        try:
            version = torch.cuda.nccl.version()
            torch_nccl = ".".join(map(str, version)) if isinstance(version, tuple) else version
        except Exception:
            pass
        info = symm_rs.library_info()
        meta["versions"] = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, info["version"])),
            "nccl_path": info["path"],
            "nccl_origin": info["origin"],
            "nccl_windows_supported": info["windows_supported"],
            "torch_nccl": torch_nccl,
            "symm_rs": symm_rs.__version__,
            "python": platform.python_version(),
        }
    except Exception as e:
        meta["error"] = f"{type(e).__name__}: {e}"
    meta["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")}
    meta["other_env"] = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith(OTHER_ENV_PREFIXES) or k in OTHER_ENV_NAMES
    }
    return meta


def _bench_rank(rank: int, world: int, cfg: BenchConfig, emit: Callable[[str, Any], None]) -> None:
    import torch
    import torch.distributed as dist

    import symm_rs
    from symm_rs.launch import init_nccl

    started = time.perf_counter()
    group = init_nccl(rank, world, timeout_s=cfg.nccl_timeout_s)
    control = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=cfg.control_timeout_s)
    )
    r = _Rank(rank, world, cfg, group, control, emit)
    if rank == 0:
        emit("meta", _rank_meta(world))
    r.log(f"[setup] {world} ranks up in {time.perf_counter() - started:.1f} s")
    registration: Optional[dict[str, Any]] = None
    if "registration" in cfg.sections:
        # First, while the pool is empty: every tensor then needs a new segment.
        registration = r.section("registration", _registration_begin, r)
    if "collectives" in cfg.sections:
        r.section("collectives", _section_collectives, r)
    if "communicator" in cfg.sections:
        r.section("communicator", _section_communicator, r)
    if "context" in cfg.sections:
        r.section("context", _section_context, r)
    if registration is not None:
        data, error = r.unit("[registration] destroy_pool", _registration_destroy, r)
        registration["destroy_pool"] = data if error is None else {"error": error}
        emit("section", ("registration", registration))
    gc.collect()
    torch.cuda.synchronize()
    symm_rs.release(group)
    dist.destroy_process_group()
    r.log(f"[teardown] done; {time.perf_counter() - started:.1f} s in the rank processes")


def _child_main(
    rank: int,
    world: int,
    port: int,
    cfg: BenchConfig,
    results: Any,
    body: Optional[Callable[..., None]] = None,
) -> None:
    """A spawned rank: runs ``body`` (default ``_bench_rank``), reports through ``results``."""
    from symm_rs.launch import set_rank_environment

    set_rank_environment(rank, world, port)

    def emit(kind: str, payload: Any) -> None:
        results.put((rank, kind, payload))

    code = 0
    try:
        (body or _bench_rank)(rank, world, cfg, emit)
        emit("done", None)
    except BaseException as e:
        code = 1
        emit("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    # Skip interpreter teardown: after a failure it could wait on NCCL forever. Flush first.
    results.close()
    results.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------------------------
# Parent side: launching, cold start, merging, output
# --------------------------------------------------------------------------------------------


@dataclass
class LaunchResult:
    meta: Optional[dict[str, Any]]
    sections: dict[str, dict[int, Any]]
    errors: dict[int, str]


def _launch(
    cfg: BenchConfig,
    world: int,
    timeout_s: float,
    grace_s: float = 15.0,
    target: Optional[Callable[..., None]] = None,
    body: Optional[Callable[..., None]] = None,
) -> LaunchResult:
    """Spawns one process per GPU; once a rank fails, the others get ``grace_s`` to report
    before all are killed (a failed rank may leave the rest inside a collective)."""
    import torch.multiprocessing as mp

    from symm_rs.launch import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=target or _child_main, args=(r, world, port, cfg, results, body), daemon=True
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = LaunchResult(meta=None, sections={}, errors={})
    partial: dict[str, dict[int, list[Any]]] = {}
    finished: set[int] = set()
    deadline = time.monotonic() + timeout_s
    first_failure: Optional[float] = None

    def handle(message: tuple[int, str, Any]) -> None:
        nonlocal first_failure
        rank, kind, payload = message
        if kind == "meta":
            out.meta = payload
        elif kind == "section":
            name, data = payload
            out.sections.setdefault(name, {})[rank] = data
        elif kind == "row":
            name, row = payload
            partial.setdefault(name, {}).setdefault(rank, []).append(row)
        elif kind in ("done", "error"):
            finished.add(rank)
            if kind == "error":
                out.errors[rank] = str(payload)
                first_failure = first_failure or time.monotonic()

    while len(finished) < world:
        now = time.monotonic()
        if now >= deadline or (first_failure is not None and now >= first_failure + grace_s):
            break
        try:
            handle(results.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if r not in finished and not p.is_alive()]
        if not dead:
            continue
        while True:  # a rank's last messages may still be in the pipe
            try:
                handle(results.get(timeout=1.0))
            except queue.Empty:
                break
        for r in dead:
            if r not in finished:
                finished.add(r)
                out.errors[r] = f"rank {r} exited with code {procs[r].exitcode} before reporting"
                first_failure = first_failure or time.monotonic()
    for r, p in enumerate(procs):
        if r not in finished:
            reason = (
                "killed after another rank failed"
                if first_failure is not None
                else f"no answer within {timeout_s:.0f} s (killed)"
            )
            out.errors[r] = f"rank {r}: {reason}"
            if p.is_alive():
                p.kill()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    # A rank that stopped inside a section still gave the rows it had finished.
    for name, by_rank in partial.items():
        for rank, rows in by_rank.items():
            section = out.sections.setdefault(name, {})
            if rank not in section:
                section[rank] = {"rows": rows, "error": "incomplete: the rank stopped here"}
    return out


_COLD_SCRIPT = r"""
import json, os, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import symm_rs
t2 = time.perf_counter()
import datetime
import torch.distributed as dist
rank = int(os.environ["RANK"])
world = int(os.environ["WORLD_SIZE"])
out = {"rank": rank, "import_torch_ms": (t1 - t0) * 1e3, "import_symm_rs_ms": (t2 - t1) * 1e3}
try:
    torch.cuda.set_device(rank)
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    out["cuda_context_ms"] = (t3 - t2) * 1e3
    dist.init_process_group(
        "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank),
        timeout=datetime.timedelta(seconds=float(os.environ["SYMM_RS_BENCH_TIMEOUT"])),
    )
    group = dist.group.WORLD
    t4 = time.perf_counter()
    out["init_process_group_ms"] = (t4 - t3) * 1e3
    token = torch.ones(1, device="cuda")
    dist.all_reduce(token, group=group)  # every rank here before the clock starts
    torch.cuda.synchronize()
    context = symm_rs.use_symmetric_memory(group)
    t5 = time.perf_counter()
    context.__enter__()
    buf = torch.empty(1 << 20, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    t6 = time.perf_counter()
    context.__exit__(None, None, None)
    torch.cuda.synchronize()
    t7 = time.perf_counter()
    out["first_alloc_ms"] = (t6 - t5) * 1e3
    out["first_registration_ms"] = (t7 - t6) * 1e3
    out["symmetric"] = bool(symm_rs.is_symmetric(buf, group))
    if not out["symmetric"]:
        out["error"] = "the first buffer from use_symmetric_memory is not in a window"
    out["symm_rs_total_ms"] = (
        out["import_symm_rs_ms"] + out["first_alloc_ms"] + out["first_registration_ms"]
    )
    print("SYMM_RS_BENCH_COLD " + json.dumps(out), flush=True)
    del buf
    symm_rs.release(group)
    dist.destroy_process_group()
except BaseException as e:
    out["error"] = f"{type(e).__name__}: {e}"
    print("SYMM_RS_BENCH_COLD " + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(1)
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def _package_parent() -> str:
    import symm_rs

    return os.path.dirname(os.path.dirname(os.path.abspath(symm_rs.__file__)))


def _has_marker(path: str) -> bool:
    with open(path, errors="replace") as f:
        return any(line.startswith(COLD_MARKER) for line in f)


def _run_coldstart(
    world: int, timeout_s: float, grace_s: float = 10.0, script: str = _COLD_SCRIPT
) -> dict[int, Any]:
    """Runs ``_COLD_SCRIPT`` in ``world`` fresh interpreters at once; per rank, its numbers or
    ``{"error": ...}``."""
    from symm_rs.launch import free_port

    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_package_parent(), env.get("PYTHONPATH", "")) if p
    )
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        SYMM_RS_BENCH_TIMEOUT=str(max(30.0, timeout_s)),
    )
    out: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="symm_rs_bench_cold_") as tmp:
        procs = []
        logs = []
        for rank in range(world):
            log = open(os.path.join(tmp, f"rank{rank}.log"), "w+", errors="replace")
            logs.append(log)
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script],
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + timeout_s
        # A failed rank, or every rank with its numbers printed (teardown may then dawdle):
        # the rest get grace_s, then are killed.
        settled: Optional[float] = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if settled is None and (
                any(p.poll() not in (None, 0) for p in procs)
                or all(_has_marker(log.name) for log in logs)
            ):
                settled = now
            if now >= deadline or (settled is not None and now >= settled + grace_s):
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        for rank, log in enumerate(logs):
            log.seek(0)
            text = log.read()
            log.close()
            found = [line for line in text.splitlines() if line.startswith(COLD_MARKER)]
            if found:
                out[rank] = json.loads(found[-1][len(COLD_MARKER) :])
            else:
                code = procs[rank].returncode
                out[rank] = {"error": f"exit code {code}, no result; output tail:\n{text[-2000:]}"}
    return out


def _tree_max(values: list[Any]) -> Any:
    """Element-wise maximum of equally shaped dicts/numbers (other leaves: the first value)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    first = present[0]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return max(present)
    if isinstance(first, dict):
        return {
            k: _tree_max([v.get(k) if isinstance(v, dict) else None for v in present])
            for k in first
        }
    return first


def _find_errors(value: Any, where: str) -> list[tuple[str, str]]:
    """``(where, message)`` of every non-empty ``error``/``close_error`` entry in ``value``."""
    found: list[tuple[str, str]] = []
    if isinstance(value, dict):
        label = where
        if "op" in value and "bytes" in value:
            parts = [value.get(k) for k in ("op", "bytes", "mode", "buffers", "path")]
            label = f"{where} " + " ".join(
                format_bytes(p) if isinstance(p, int) else str(p) for p in parts if p is not None
            )
        for key, item in value.items():
            if key in ("error", "close_error") and item:
                found.append((label, str(item)))
            elif isinstance(item, (dict, list)):
                found.extend(_find_errors(item, label if key == "rows" else f"{where} {key}"))
    elif isinstance(value, list):
        for item in value:
            found.extend(_find_errors(item, where))
    return found


def _round_tree(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return _round(value, digits)
    if isinstance(value, dict):
        return {k: _round_tree(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round_tree(v, digits) for v in value]
    return value


def _merge_per_rank(per_rank: dict[int, Any], world: int) -> dict[str, Any]:
    ordered = [_round_tree(per_rank.get(r)) for r in range(world)]
    return {
        "rank0": ordered[0],
        "max_over_ranks": _tree_max(ordered),
        "per_rank": ordered,
    }


def _merge_collectives(per_rank: dict[int, Any], world: int) -> dict[str, Any]:
    base = per_rank.get(0) or next(iter(per_rank.values()), None) or {}
    if "rows" not in base:
        return {k: v for k, v in base.items()}
    keyed: list[dict[tuple[Any, ...], dict[str, Any]]] = []
    for r in range(world):
        rows = (per_rank.get(r) or {}).get("rows", [])
        keyed.append({(x["op"], x["bytes"], x["mode"], x["buffers"]): x for x in rows})
    rows_out = []
    for row in base["rows"]:
        key = (row["op"], row["bytes"], row["mode"], row["buffers"])
        medians = [(k.get(key) or {}).get("median_us") for k in keyed]
        errors = [(k.get(key) or {}).get("error") for k in keyed]
        valid = [m for m in medians if m is not None]
        merged: dict[str, Any] = {
            "op": row["op"],
            "bytes": row["bytes"],
            "mode": row["mode"],
            "buffers": row["buffers"],
            "latency_us": _round(max(valid)) if len(valid) == world else None,
            "rank0_us": _round(medians[0]),
            "per_rank_us": [_round(m) for m in medians],
        }
        if merged["latency_us"] is not None:
            algbw, busbw = bandwidth_gbs(row["op"], row["bytes"], world, merged["latency_us"] / 1e6)
            merged["algbw_gbs"], merged["busbw_gbs"] = _round(algbw), _round(busbw)
            samples = row.get("samples_us") or []
            merged["rank0_samples_us"] = [_round(s) for s in samples]
            for field in ("iters", "calls_per_graph", "replays"):
                if field in row:
                    merged[field] = row[field]
        error = next((e for e in errors if e), None)
        if error is not None or merged["latency_us"] is None:
            merged["error"] = error or "missing on some ranks"
        rows_out.append(merged)
    table = []
    seen: set[tuple[Any, ...]] = set()
    by_key = {(x["op"], x["bytes"], x["mode"], x["buffers"]): x for x in rows_out}
    for row in rows_out:
        key = (row["op"], row["bytes"], row["mode"])
        if key in seen:
            continue
        seen.add(key)
        plain = by_key.get((*key, "plain"), {})
        symm = by_key.get((*key, "symm"), {})
        p, s = plain.get("latency_us"), symm.get("latency_us")
        table.append(
            {
                "op": key[0],
                "bytes": key[1],
                "mode": key[2],
                "plain_us": p,
                "symm_us": s,
                "speedup": _round(p / s) if p and s else None,
                "plain_busbw_gbs": plain.get("busbw_gbs"),
                "symm_busbw_gbs": symm.get("busbw_gbs"),
            }
        )
    out = {k: v for k, v in base.items() if k != "rows"}
    out.update({"dtype": DTYPE, "rows": rows_out, "table": table})
    return out


def _merge_communicator(per_rank: dict[int, Any], world: int) -> dict[str, Any]:
    base = per_rank.get(0) or next(iter(per_rank.values()), None) or {}
    if "rows" not in base:
        return {k: v for k, v in base.items()}
    fields = ("event_us", "issue_us", "wall_us")
    keyed = []
    for r in range(world):
        rows = (per_rank.get(r) or {}).get("rows", [])
        keyed.append({(x["op"], x["bytes"], x["path"]): x for x in rows})
    rows_out = []
    for row in base["rows"]:
        key = (row["op"], row["bytes"], row["path"])
        merged: dict[str, Any] = {"op": row["op"], "bytes": row["bytes"], "path": row["path"]}
        for field in fields:
            values = [(k.get(key) or {}).get(field) for k in keyed]
            valid = [v for v in values if v is not None]
            merged[field] = _round(max(valid)) if len(valid) == world else None
            merged[f"rank0_{field}"] = _round(values[0])
        if "iters" in row:
            merged["iters"] = row["iters"]
        error = next(
            (k.get(key, {}).get("error") for k in keyed if k.get(key, {}).get("error")), None
        )
        if error is not None or merged["event_us"] is None:
            merged["error"] = error or "missing on some ranks"
        rows_out.append(merged)
    by_key = {(x["op"], x["bytes"], x["path"]): x for x in rows_out}
    table = []
    for op, nbytes in dict.fromkeys((x["op"], x["bytes"]) for x in rows_out):
        ours = by_key.get((op, nbytes, "symm_rs"), {})
        theirs = by_key.get((op, nbytes, "torch"), {})
        entry: dict[str, Any] = {"op": op, "bytes": nbytes}
        for field in fields:
            entry[f"symm_rs_{field}"] = ours.get(field)
            entry[f"torch_{field}"] = theirs.get(field)
        a, b = theirs.get("wall_us"), ours.get("wall_us")
        entry["wall_speedup"] = _round(a / b) if a and b else None
        table.append(entry)
    out = {k: v for k, v in base.items() if k != "rows"}
    out.update({"rows": rows_out, "table": table})
    return out


def merge_results(
    *,
    world_size: int,
    config: dict[str, Any],
    meta: Optional[dict[str, Any]],
    sections: dict[str, dict[int, Any]],
    rank_errors: dict[int, str],
    env_set: dict[str, str],
    elapsed_s: float,
    timestamp: Optional[str] = None,
) -> dict[str, Any]:
    """The JSON document: per-rank section data merged, plus machine, versions and method."""
    meta = dict(meta or {})
    machine = meta.get("machine") or {"gpu": None, "gpu_count": None, "gpus_used": world_size}
    versions = meta.get("versions") or {}
    if not versions:
        try:
            import torch

            import symm_rs

            versions = {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "symm_rs": symm_rs.__version__,
                "python": platform.python_version(),
            }
        except Exception:
            versions = {"python": platform.python_version()}
    merged: dict[str, Any] = {}
    for name in SECTIONS:
        if name not in sections:
            continue
        per_rank = sections[name]
        if name == "collectives":
            merged[name] = _merge_collectives(per_rank, world_size)
        elif name == "communicator":
            merged[name] = _merge_communicator(per_rank, world_size)
        else:
            merged[name] = _merge_per_rank(per_rank, world_size)
        if name in ("coldstart", "registration", "context"):
            merged[name]["reference"] = DESIGN_REFERENCE
    errors = [f"rank {r}: {text}" for r, text in sorted(rank_errors.items())]
    for name in merged:
        found: dict[str, list[int]] = {}
        for rank, value in sorted(sections[name].items()):
            for where, message in _find_errors(value, ""):
                found.setdefault(f"{name}{where}: {message}", []).append(rank)
        for text, ranks in found.items():
            errors.append(f"{text} (ranks {', '.join(map(str, ranks))})")
    if meta.get("error"):
        errors.append(f"meta: {meta['error']}")
    return {
        "schema": SCHEMA,
        "timestamp": timestamp or datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "world_size": world_size,
        "machine": machine,
        "versions": versions,
        "env": meta.get("env", {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}),
        "env_set": dict(env_set),
        "other_env": meta.get("other_env", {}),
        "config": config,
        "method": METHOD,
        "aggregation": AGGREGATION,
        "sections": merged,
        "errors": errors,
        "elapsed_s": _round(elapsed_s),
    }


def _fmt_us(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _title(result: dict[str, Any]) -> str:
    machine = result.get("machine") or {}
    versions = result.get("versions") or {}
    parts = [f"{result.get('world_size')} x {machine.get('gpu') or 'GPU'}"]
    if versions.get("torch"):
        parts.append(f"torch {versions['torch']}")
    if versions.get("nccl"):
        parts.append(f"NCCL {versions['nccl']}")
    if versions.get("symm_rs"):
        parts.append(f"symm_rs {versions['symm_rs']}")
    env_set = result.get("env_set") or {}
    if env_set:
        parts.append(" ".join(f"{k}={v}" for k, v in sorted(env_set.items())))
    return ", ".join(parts)


def render_markdown(result: dict[str, Any], mode: str = "graph") -> str:
    """The README table: rows = bytes per rank, columns = plain and symm latency (µs) of
    all-gather, all-reduce and reduce-scatter in ``mode`` (CUDA-graph replay by default)."""
    table = ((result.get("sections") or {}).get("collectives") or {}).get("table") or []
    cells = {(e["op"], e["bytes"]): e for e in table if e.get("mode") == mode}
    sizes = sorted({nbytes for _, nbytes in cells})
    how = "CUDA-graph replay" if mode == "graph" else "eager"
    lines = [
        f"Latency in µs, bf16, {how}, {_title(result)} (bytes per rank; `plain` = "
        "caching-allocator buffers, `symm` = symmetric window; max over ranks of the median)",
        "",
        "| bytes | " + " | ".join(f"{OP_ABBREV[op]} {k}" for op in OPS for k in BUFFERS) + " |",
        "| --- |" + " --- |" * (len(OPS) * len(BUFFERS)),
    ]
    for nbytes in sizes:
        row = [format_bytes(nbytes)]
        for op in OPS:
            entry = cells.get((op, nbytes), {})
            row.extend(_fmt_us(entry.get(f"{k}_us")) for k in BUFFERS)
        lines.append("| " + " | ".join(row) + " |")
    if not sizes:
        lines.append("| (no collectives measured) |" + " |" * (len(OPS) * len(BUFFERS)))
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str) -> Optional[str]:
    """Writes the latency plot to ``path``; returns why not, or ``None`` once written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = ((result.get("sections") or {}).get("collectives") or {}).get("rows") or []
    rows = [x for x in rows if x.get("latency_us") is not None]
    if not rows:
        return "no collective was measured: no plot"
    fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 4.8))
    styles = {
        ("plain", "eager"): ("tab:gray", "--"),
        ("plain", "graph"): ("tab:gray", "-"),
        ("symm", "eager"): ("tab:blue", "--"),
        ("symm", "graph"): ("tab:blue", "-"),
    }
    for ax, op in zip(axes, OPS):
        sizes: set[int] = set()
        for kind in BUFFERS:
            for mode in MODES:
                points = sorted(
                    (x["bytes"], x["latency_us"])
                    for x in rows
                    if x["op"] == op and x["buffers"] == kind and x["mode"] == mode
                )
                if not points:
                    continue
                sizes.update(p[0] for p in points)
                color, style = styles[(kind, mode)]
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    color=color,
                    linestyle=style,
                    marker="o",
                    label=f"{kind} {mode}",
                )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        if sizes:
            ticks = sorted(sizes)
            ax.set_xticks(ticks)
            ax.set_xticklabels([format_bytes(t) for t in ticks], rotation=45, ha="right")
        ax.set_title(op)
        ax.set_xlabel("bytes per rank")
        ax.set_ylabel("latency (µs)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(_title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    sections = result.get("sections") or {}
    comm = sections.get("communicator") or {}
    for entry in comm.get("table") or []:
        lines.append(
            f"communicator {entry['op']} {format_bytes(entry['bytes'])}: wall per call: symm_rs "
            f"{_fmt_us(entry.get('symm_rs_wall_us'))} us, torch "
            f"{_fmt_us(entry.get('torch_wall_us'))} us"
        )
    context = (sections.get("context") or {}).get("rank0") or {}
    for name, data in context.items():
        if isinstance(data, dict) and "median_batch_us" in data:
            lines.append(f"context {name}: {data['median_batch_us']:.2f} us")
    cold = (sections.get("coldstart") or {}).get("max_over_ranks") or {}
    if cold.get("symm_rs_total_ms") is not None:
        lines.append(
            f"coldstart (max over ranks): symm_rs total {cold['symm_rs_total_ms']:.0f} ms "
            f"(import {cold.get('import_symm_rs_ms', 0):.0f}, first alloc "
            f"{cold.get('first_alloc_ms', 0):.0f}, first registration "
            f"{cold.get('first_registration_ms', 0):.0f}); import torch "
            f"{cold.get('import_torch_ms', 0):.0f} ms; init_process_group "
            f"{cold.get('init_process_group_ms', 0):.0f} ms; DESIGN's runtime-compiled "
            f"allocator: {DESIGN_REFERENCE['runtime_compiled_allocator_cold_build_s']} s"
        )
    reg = (sections.get("registration") or {}).get("rank0") or {}
    for name in ("first", "batch"):
        data = reg.get(name) or {}
        if data.get("register_ms") is not None:
            lines.append(
                f"registration {name}: {data['register_ms']:.1f} ms, "
                f"{data.get('windows_registered')} window(s)"
            )
    destroy = reg.get("destroy_pool") or {}
    if destroy.get("ms_per_window") is not None:
        lines.append(f"destroy_pool: {destroy['ms_per_window']:.3f} ms per window")
    return lines


def _print_text(text: str) -> None:
    try:
        print(text, flush=True)
    except UnicodeEncodeError:  # a terminal without UTF-8
        print(text.replace("µ", "u").encode("ascii", "replace").decode(), flush=True)


def run(args: argparse.Namespace) -> int:
    """``python -m symm_rs bench``: returns 0, 1 (errors recorded in the JSON) or 2 (usage)."""
    try:
        cfg = config_from_args(args)
        env_set = parse_env(args.env)
        output_stem(2, args.tag)  # checks the tag
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    # Set before anything starts CUDA or NCCL, so that the rank processes inherit them.
    os.environ.update(env_set)
    visible = visible_gpu_count()
    if visible < 2:
        print(f"bench needs at least 2 GPUs; this machine has {visible}", file=sys.stderr)
        return 2
    world = visible if args.world_size is None else int(args.world_size)
    if world < 2:
        print(f"bench needs --world-size >= 2, got {world}", file=sys.stderr)
        return 2
    if world > visible:
        print(
            f"bench --world-size {world} needs {world} GPUs; this machine has {visible}",
            file=sys.stderr,
        )
        return 2
    stem = output_stem(world, args.tag)
    os.makedirs(args.out, exist_ok=True)
    # Set here so that the rank processes inherit them from their very start (before NCCL).
    started = time.perf_counter()
    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
    print(
        f"symm_rs bench: {world} GPUs, sizes {', '.join(format_bytes(s) for s in cfg.sizes)}, "
        f"sections {', '.join(cfg.sections)}" + (f", env {env_set}" if env_set else ""),
        flush=True,
    )
    main_sections = [s for s in cfg.sections if s != "coldstart"]
    launched = LaunchResult(meta=None, sections={}, errors={})
    if main_sections:
        launched = _launch(cfg, world, args.timeout)
    if "coldstart" in cfg.sections:
        print("[coldstart] fresh processes ...", flush=True)
        cold_started = time.perf_counter()
        cold = _run_coldstart(world, min(args.timeout, 180.0))
        for data in cold.values():
            data["elapsed_s"] = _round(time.perf_counter() - cold_started)
        launched.sections["coldstart"] = cold
        print(f"[coldstart] done in {time.perf_counter() - cold_started:.1f} s", flush=True)
    if launched.meta is None:
        try:  # the ranks never reported it (coldstart only, or an early failure)
            launched.meta = _rank_meta(world)
        except Exception as e:
            launched.meta = {"error": f"{type(e).__name__}: {e}"}
    config = asdict(cfg)
    config["timeout_s"] = args.timeout
    result = merge_results(
        world_size=world,
        config=config,
        meta=launched.meta,
        sections=launched.sections,
        rank_errors=launched.errors,
        env_set=env_set,
        elapsed_s=time.perf_counter() - started,
        timestamp=timestamp,
    )
    json_path = os.path.join(args.out, stem + ".json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {json_path}", flush=True)
    if not args.no_plot:
        png_path = os.path.join(args.out, stem + ".png")
        why = plot_results(result, png_path)
        print(why if why else f"wrote {png_path}", flush=True)
    print()
    _print_text(render_markdown(result))
    for line in _summary_lines(result):
        _print_text(line)
    if result["errors"]:
        print(f"\n{len(result['errors'])} error(s):", file=sys.stderr)
        for error in result["errors"]:
            print(f"  {error.strip()[:2000]}", file=sys.stderr)
        return 1
    return 0
