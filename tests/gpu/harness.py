"""Runs a GPU suite, one process per rank, and writes a JSON summary.

A suite is a module in this folder whose ``case_*`` functions run, in definition order, on every
rank with a ``Ctx``; a case passes when it passes on every rank. Usage:

    python tests/gpu/harness.py SUITE --world-size N [--shared-gpu] [--out DIR]

where SUITE is e.g. ``suite_core``. The summary (device, torch, NCCL, world size, passed, failed,
per-case outcome and details) is written to ``DIR/SUITE_<N>gpu.json``
(``DIR/SUITE_<N>rank_1gpu.json`` with ``--shared-gpu``).

``--shared-gpu`` runs the N ranks on the GPUs there are (one GPU is enough): each rank gets its
own ``NCCL_HOSTID``, so NCCL accepts several ranks on one GPU and connects them through its
network transport. Everything but NVLink runs: real communicators, registration (NCCL 2.28.9
hands back windows there; ``SYMM_RS_REGISTER=always`` makes symm_rs register although no
symmetric kernel can run), agreement, failures and hangs, threads and graphs. Cases marked
``needs_nvlink`` (symmetric kernels, timings) are skipped with the reason.

Teardown is part of the run: after the cases each rank releases its groups, destroys them and
exits; a rank that fails or hangs there, or crashes at interpreter exit, fails the
``<teardown>`` entry.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib
import json
import os
import platform
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
# The suites and, beside the package, the repository's rank launcher (benches/symm_rs_bench).
for _folder in (HERE, os.path.join(os.path.dirname(os.path.dirname(HERE)), "benches")):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)


@dataclass
class Ctx:
    """What a case gets: its rank, the world, and a place to put evidence."""

    rank: int
    world_size: int
    group: Any
    device: Any
    details: dict[str, Any] = field(default_factory=dict)
    # Several ranks share one GPU (no NVLink between ranks, no symmetric kernels).
    shared_gpu: bool = False

    def new_group(self) -> Any:
        """A second NCCL group over the same ranks (its own communicator), made eagerly."""
        import torch.distributed as dist

        group = dist.new_group(list(range(self.world_size)), device_id=self.device)
        self._made.append(group)
        return group

    def __post_init__(self) -> None:
        self._made: list[Any] = []

    def in_window(self, tensor: Any, group: Any) -> bool:
        """Whether ``tensor`` lies in a window of ``group`` as far as this mode can tell: a
        window NCCL runs its symmetric kernels on (``is_symmetric``) with one GPU per rank, a
        registered window (``is_registered``) when ranks share a GPU, where NCCL runs none."""
        import symm_rs

        if self.shared_gpu:
            return bool(symm_rs.is_registered(tensor, group)) or self.nccl_refused(group)
        return bool(symm_rs.is_symmetric(tensor, group))

    def skip(self, reason: str) -> None:
        """Ends the case as skipped with ``reason`` (every rank must skip alike, or the case
        fails): for what this run cannot show, found only once the case runs."""
        raise CaseSkipped(reason)

    def skip_where_nccl_refuses_windows(self, shows: str) -> None:
        """Skips a case about registration itself where NCCL answered this run's world group
        with NULL windows (a shared GPU under NCCL >= 2.29): symm_rs then uses plain memory on
        every rank and registers nothing, so there is no ``shows`` to show."""
        if self.shared_gpu and self.nccl_refused(self.group):
            self.skip(
                f"NCCL answered NULL windows on this run's communicators (NCCL >= 2.29 between "
                f"the NCCL hosts of a shared GPU): symm_rs uses plain memory, so there is no "
                f"{shows} to show"
            )

    def nccl_refused(self, group: Any) -> bool:
        """Whether NCCL answered registration on ``group`` with NULL windows (NCCL >= 2.29
        across what it sees as hosts): symm_rs then uses the pool as plain memory on every rank,
        and a shared-GPU run has no window to look for. Recorded in the case's details."""
        import symm_rs

        resolved = symm_rs.groups.resolve(group)
        refused = resolved is not None and bool(symm_rs._native.is_plain(resolved.comm))
        if refused:
            self.details["nccl_refused_windows"] = True
        return refused

    def expect_window(self, tensor: Any, group: Any, what: str = "buffer") -> None:
        """Asserts ``in_window``; when ranks share a GPU, also that symm_rs does not call the
        window symmetric (the ranks are on different NCCL hosts: no symmetric kernel)."""
        import symm_rs

        if self.shared_gpu:
            registered = symm_rs.is_registered(tensor, group) or self.nccl_refused(group)
            assert registered, f"{what} is not registered"
            assert not symm_rs.is_symmetric(tensor, group), (
                f"{what} counts as symmetric although the ranks share a GPU"
            )
        else:
            assert symm_rs.is_symmetric(tensor, group), f"{what} is not symmetric"


def log_nccl_to(log_dir: str, subsys: str = "TUNING") -> None:
    """Sends NCCL's debug log (``subsys``) of this rank's process to ``log_dir/nccl.<host>.<pid>``.
    NCCL reads its debug settings once, at its first call: a suite's ``setup_rank`` calls this,
    before the harness makes the first communicator."""
    os.makedirs(log_dir, exist_ok=True)
    os.environ.update(
        NCCL_DEBUG="INFO",
        NCCL_DEBUG_SUBSYS=subsys,
        NCCL_DEBUG_FILE=os.path.join(log_dir, "nccl.%h.%p"),
    )


def nccl_log_of_this_process(log_dir: str) -> Optional[str]:
    """The file ``log_nccl_to`` made NCCL write for this process, or ``None`` (nothing logged
    yet). NCCL may name the host otherwise than ``socket.gethostname()``: then by the pid."""
    path = os.path.join(log_dir, f"nccl.{socket.gethostname()}.{os.getpid()}")
    if os.path.exists(path):
        return path
    found = glob.glob(os.path.join(log_dir, f"nccl.*.{os.getpid()}"))
    return found[0] if found else None


class CaseSkipped(Exception):
    """Raised by ``Ctx.skip``."""


def needs_nvlink(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a case that needs one GPU per rank linked by NVLink: it checks symmetric kernels
    or timings, which a shared-GPU run cannot show."""
    fn.needs_nvlink = True  # type: ignore[attr-defined]
    return fn


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
    from symm_rs_bench.launch import device_of, init_nccl, shared_gpu

    module = importlib.import_module(suite)
    setup = getattr(module, "setup_rank", None)
    if setup is not None:
        setup(rank, world_size)
    # A short watchdog: a case that leaves ranks out of step should fail the run, not stall it.
    group = init_nccl(rank, world_size, timeout_s=60)
    device = torch.device("cuda", device_of(rank))
    shared = shared_gpu()
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
            record({"name": name, "outcome": "skipped", "reason": f"needs {need} ranks"})
            continue
        if shared and getattr(fn, "needs_nvlink", False):
            reason = "needs NVLink GPUs (symmetric kernels or timings); this run shares a GPU"
            record({"name": name, "outcome": "skipped", "reason": reason})
            continue
        ctx = Ctx(rank, world_size, group, device, shared_gpu=shared)
        print(f"[rank {rank}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        skip_reason: Optional[str] = None
        try:
            fn(ctx)
            torch.cuda.synchronize()
            outcome, error = "passed", None
        except CaseSkipped as e:
            outcome, error, skip_reason = "skipped", None, str(e)
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
        if skip_reason is not None:
            result["reason"] = skip_reason
        record(result)
        if error:
            print(f"[rank {rank}] {name} FAILED: {error}", file=sys.stderr, flush=True)
        dist.barrier(group=group, device_ids=[device.index])
    start = time.perf_counter()
    try:
        # Windows must go before their communicators do.
        for g in [*made, group]:
            symm_rs.release(g)
        dist.destroy_process_group()
        outcome, error = "passed", None
    except Exception as e:
        outcome, error = "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    record(
        {
            "name": TEARDOWN,
            "outcome": outcome,
            "error": error,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return results


TEARDOWN = "<teardown>"


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
        "nccl_version": ".".join(map(str, info.version)),
        "nccl_library": str(info.path),
        "python": platform.python_version(),
        "symm_rs": symm_rs.__version__,
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "symm_rs_env": {k: v for k, v in os.environ.items() if k.startswith("SYMM_RS_")},
        "torch_env": {
            k: v for k, v in os.environ.items() if k.startswith(("PYTORCH_", "TORCH_SYMM_MEM"))
        },
    }


def _recover(rank: int, ok: bool, value: Any, progress: str, names: list[str]) -> tuple[bool, Any]:
    """A rank that died or hung: its finished cases from disk, then the case it was in (the
    first it did not finish) failed with what killed it."""
    if ok:
        return ok, value
    done = []
    path = os.path.join(progress, f"rank{rank}.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            done = [json.loads(line) for line in f if line.strip()]
    finished = {d["name"] for d in done}
    current = next((n for n in names if n not in finished), TEARDOWN)
    done.append({"name": current, "outcome": "failed", "error": f"in progress: {value}"})
    return True, done


def _exit_problem(outcome: Any) -> Optional[str]:
    """How a rank's process ended badly after its cases (crash or hang at exit), if it did."""
    if outcome.ending == "killed":
        return "the process did not exit within the wait after its cases (hang at exit); killed"
    if outcome.exitcode not in (0, None):
        return f"the process exited with code {outcome.exitcode} after its cases"
    return None


def run(suite: str, world_size: int, only: list[str], timeout: float) -> dict[str, Any]:
    import tempfile

    from symm_rs_bench.launch import run_ranks_to_exit, shared_gpu

    module = importlib.import_module(suite)
    started = time.time()
    progress = tempfile.mkdtemp(prefix="symm_rs_gpu_")
    processes = run_ranks_to_exit(
        _worker, world_size, args=(suite, only, progress), timeout=timeout, exit_wait=60.0
    )
    names = [n for n, _ in _cases(module) if not only or n in only] + [TEARDOWN]
    per_rank = [_recover(rank, o.ok, o.value, progress, names) for rank, o in enumerate(processes)]
    tests = []
    for name in names:
        ranks = []
        for rank, (ok, value) in enumerate(per_rank):
            found = [v for v in value if v.get("name") == name] if ok else []
            if not ok:
                ranks.append({"rank": rank, "outcome": "failed", "error": value})
            elif found:
                ranks.append({"rank": rank, **found[0]})
            else:
                ranks.append({"rank": rank, "outcome": "failed", "error": "not run: the rank died"})
            answered = processes[rank].ok
            problem = _exit_problem(processes[rank]) if name == TEARDOWN and answered else None
            if problem is not None:
                ranks[-1] = {"rank": rank, "outcome": "failed", "error": problem}
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
        "mode": "shared_gpu" if shared_gpu() else "one_gpu_per_rank",
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
    parser.add_argument(
        "--shared-gpu",
        action="store_true",
        help="run the ranks on the GPUs there are (one is enough), each with its own NCCL_HOSTID",
    )
    args = parser.parse_args()
    if args.shared_gpu:
        from symm_rs_bench.launch import SHARED_GPU_ENV

        os.environ[SHARED_GPU_ENV] = "1"  # inherited by the rank processes
        # NCCL 2.28 hands back windows between "hosts" though it runs no symmetric kernel
        # there: register anyway, so that registration and agreement run for real.
        os.environ.setdefault("SYMM_RS_REGISTER", "always")
    summary = run(args.suite, args.world_size, args.only, args.timeout)
    os.makedirs(args.out, exist_ok=True)
    size = f"{args.world_size}rank_1gpu" if args.shared_gpu else f"{args.world_size}gpu"
    path = os.path.join(args.out, f"{args.suite}_{size}{args.tag}.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    for t in summary["tests"]:
        print(f"{t['outcome']:>7}  {t['name']}")
        for rank, err in t.get("errors", {}).items():
            print(f"         rank {rank}: {str(err).splitlines()[0] if err else err}")
    print(
        f"{summary['suite']} on {summary['world_size']} ranks ({summary['mode']}), "
        f"{summary['gpus_visible']} x {summary['device']}: "
        f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
        f"-> {path}"
    )
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
