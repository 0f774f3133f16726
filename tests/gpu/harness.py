"""Runs a GPU suite, one process per GPU, and writes a JSON summary.

A suite is a module in this folder whose ``case_*`` functions run, in definition order, on every
rank with a ``Ctx``; a case passes when it passes on every rank. Usage:

    python tests/gpu/harness.py SUITE --world-size N [--out DIR]

where SUITE is e.g. ``suite_core``. The summary (device, torch, NCCL, world size, passed, failed,
per-case outcome and details) is written to ``DIR/SUITE_<N>gpu.json``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)


@dataclass
class Ctx:
    """What a case gets: its rank, the world, and a place to put evidence."""

    rank: int
    world_size: int
    group: Any
    device: Any
    details: dict[str, Any] = field(default_factory=dict)

    def new_group(self) -> Any:
        """A second NCCL group over the same ranks (its own communicator), made eagerly."""
        import torch.distributed as dist

        group = dist.new_group(list(range(self.world_size)), device_id=self.device)
        self._made.append(group)
        return group

    def __post_init__(self) -> None:
        self._made: list[Any] = []


def needs(world_size: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Marks a case that needs at least ``world_size`` ranks."""

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.min_world_size = world_size  # type: ignore[attr-defined]
        return fn

    return mark


def _cases(module: Any) -> list[tuple[str, Callable[..., Any]]]:
    return [(n, f) for n, f in vars(module).items() if n.startswith("case_") and callable(f)]


def _worker(
    rank: int, world_size: int, suite: str, only: list[str], progress: str
) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist

    import symm_rs
    from symm_rs.launch import init_nccl

    module = importlib.import_module(suite)
    setup = getattr(module, "setup_rank", None)
    if setup is not None:
        setup(rank, world_size)
    # A short watchdog: a case that leaves ranks out of step should fail the run, not stall it.
    group = init_nccl(rank, world_size, timeout_s=60)
    device = torch.device("cuda", rank)
    results: list[dict[str, Any]] = []
    made: list[Any] = []

    def record(result: dict[str, Any]) -> None:
        results.append(result)
        # Kept on disk as we go, so a rank that later dies still leaves its evidence.
        with open(os.path.join(progress, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(result, default=str) + "\n")

    for name, fn in _cases(module):
        if only and name not in only:
            continue
        need = getattr(fn, "min_world_size", 2)
        if world_size < need:
            record({"name": name, "outcome": "skipped", "reason": f"needs {need} GPUs"})
            continue
        ctx = Ctx(rank, world_size, group, device)
        start = time.perf_counter()
        try:
            fn(ctx)
            torch.cuda.synchronize()
            outcome, error = "passed", None
        except Exception as e:
            outcome, error = "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        made.extend(ctx._made)
        result = {
            "name": name,
            "outcome": outcome,
            "error": error,
            "seconds": round(time.perf_counter() - start, 3),
            "details": ctx.details,
        }
        record(result)
        if error:
            print(f"[rank {rank}] {name} FAILED: {error}", file=sys.stderr, flush=True)
        dist.barrier(group=group, device_ids=[rank])
    # Windows must go before their communicators do.
    for g in [*made, group]:
        symm_rs.release(g)
    dist.destroy_process_group()
    return results


def _environment() -> dict[str, Any]:
    import torch

    import symm_rs

    info = symm_rs.library_info()
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus_visible": torch.cuda.device_count(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl_version": ".".join(map(str, info["version"])),
        "nccl_library": info["path"],
        "python": platform.python_version(),
        "symm_rs": symm_rs.__version__,
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
    }


def _recover(rank: int, ok: bool, value: Any, progress: str) -> tuple[bool, Any]:
    """A rank that died or hung: its finished cases from disk, then the case it was in."""
    if ok:
        return ok, value
    done = []
    path = os.path.join(progress, f"rank{rank}.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    done.append({"name": "<in progress>", "outcome": "failed", "error": value})
    return True, done


def run(suite: str, world_size: int, only: list[str], timeout: float) -> dict[str, Any]:
    import tempfile

    from symm_rs.launch import run_ranks

    module = importlib.import_module(suite)
    started = time.time()
    progress = tempfile.mkdtemp(prefix="symm_rs_gpu_")
    per_rank = run_ranks(_worker, world_size, args=(suite, only, progress), timeout=timeout)
    per_rank = [_recover(rank, ok, value, progress) for rank, (ok, value) in enumerate(per_rank)]
    names = [n for n, _ in _cases(module) if not only or n in only]
    tests = []
    for index, name in enumerate(names):
        ranks = []
        for rank, (ok, value) in enumerate(per_rank):
            if not ok:
                ranks.append({"rank": rank, "outcome": "failed", "error": value})
            elif index < len(value):
                ranks.append({"rank": rank, **value[index]})
            else:
                ranks.append({"rank": rank, "outcome": "failed", "error": "not run: the rank died"})
        outcomes = {r["outcome"] for r in ranks}
        outcome = (
            "skipped"
            if outcomes == {"skipped"}
            else ("passed" if outcomes == {"passed"} else "failed")
        )
        entry: dict[str, Any] = {"name": name, "outcome": outcome}
        if outcome == "failed":
            entry["errors"] = {r["rank"]: r.get("error") for r in ranks if r["outcome"] == "failed"}
        if ranks and ranks[0].get("details"):
            entry["details"] = ranks[0]["details"]
        if ranks and "seconds" in ranks[0]:
            entry["seconds"] = ranks[0]["seconds"]
        if outcome == "skipped":
            entry["reason"] = ranks[0].get("reason")
        tests.append(entry)
    return {
        "suite": suite,
        "world_size": world_size,
        "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "wall_seconds": round(time.time() - started, 1),
        **_environment(),
        "passed": sum(t["outcome"] == "passed" for t in tests),
        "failed": sum(t["outcome"] == "failed" for t in tests),
        "skipped": sum(t["outcome"] == "skipped" for t in tests),
        "tests": tests,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("suite")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--timeout", type=float, default=420)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    summary = run(args.suite, args.world_size, args.only, args.timeout)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.suite}_{args.world_size}gpu{args.tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    for t in summary["tests"]:
        print(f"{t['outcome']:>7}  {t['name']}")
        for rank, err in t.get("errors", {}).items():
            print(f"         rank {rank}: {str(err).splitlines()[0] if err else err}")
    print(
        f"{summary['suite']} on {summary['world_size']} x {summary['device']}: "
        f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
        f"-> {path}"
    )
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
