"""Running a function once per GPU, one process each, for the benchmarks and the GPU tests (on
``symm_rs.gpu_check.spawn_ranks``). Every rank's return value (or the exception text) comes back
to the caller, and a rank that hangs is killed after ``timeout`` seconds instead of hanging the
caller."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = [
    "MULTICAST_OFF",
    "SHARED_GPU_ENV",
    "RankOutcome",
    "device_of",
    "free_port",
    "init_nccl",
    "multicast_off",
    "run_ranks",
    "run_ranks_to_exit",
    "share_one_gpu",
    "shared_gpu",
]

# Several ranks on one GPU: NCCL refuses two ranks on one GPU of one host ("Duplicate GPU
# detected"), but compares host hashes, which NCCL_HOSTID sets; with a host id of its own per
# rank NCCL accepts them and connects them through its network transport (loopback).
SHARED_GPU_ENV = "SYMM_RS_SHARED_GPU"

# NVLink multicast stays off in every benchmark process: NCCL's NVLS algorithms, torch's
# symmetric memory (which would otherwise create multicast objects at rendezvous) and NVSHMEM.
# A value already in the environment is kept (the machines that lend GPUs set these).
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def multicast_off(environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Sets every ``MULTICAST_OFF`` variable that ``environ`` (default ``os.environ``, which
    the rank processes inherit) lacks; returns those it set."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in MULTICAST_OFF.items() if k not in env}
    env.update(added)
    return added


# The ranks are spawned by the package's one way to spawn them, ``symm_rs.gpu_check`` (``doctor``
# uses it too); this launcher adds shared-GPU runs, a grace after a failure, and how each process
# ended. That module imports torch, so it is imported when ranks run, not with the harness
# (``symm-rs bench --help`` loads no torch).


def free_port() -> int:
    """A free loopback port (``symm_rs.gpu_check.free_port``)."""
    from symm_rs import gpu_check

    return gpu_check.free_port()


def shared_gpu() -> bool:
    """Whether this run puts several ranks on one GPU (``SYMM_RS_SHARED_GPU=1``)."""
    return os.environ.get(SHARED_GPU_ENV, "").strip() not in ("", "0")


def share_one_gpu(rank: int) -> None:
    """The environment one rank of a several-ranks-on-one-GPU run needs, set before NCCL
    starts: its own NCCL host id and the loopback interface."""
    os.environ["NCCL_HOSTID"] = f"symm_rs-shared-gpu-rank{rank}"
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


def device_of(rank: int) -> int:
    """The GPU of a local rank: its own, or, in a shared-GPU run, one of the few there are."""
    import torch

    count = max(torch.cuda.device_count(), 1)
    return rank % count if shared_gpu() else rank


def _shared_gpu_setup(rank: int) -> None:
    """Each rank's set-up, in its process: ``share_one_gpu`` in a shared-GPU run."""
    if shared_gpu():
        share_one_gpu(rank)


def init_nccl(rank: int, world_size: int, timeout_s: float = 120.0) -> Any:
    """``init_process_group("nccl")`` bound to the rank's GPU (``device_of``), with the
    communicator made eagerly."""
    from symm_rs import gpu_check

    return gpu_check.init_nccl(rank, world_size, device_of(rank), timeout_s)


@dataclass(frozen=True)
class RankOutcome:
    """What one rank process did: its answer, and how the process ended afterwards."""

    ok: bool
    value: Any
    # The process's exit code (negative: killed by that signal); None if it never exited and
    # had to be killed after the exit wait.
    exitcode: Optional[int]
    # How the process ended: "exited" (on its own), "killed" (did not exit within the wait).
    ending: str


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    timeout: float = 300.0,
    grace: Optional[float] = None,
) -> list[tuple[bool, Any]]:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes.

    Returns, per rank, ``(ok, value)`` where ``value`` is the return value or the error text.
    A rank that has not answered within ``timeout`` seconds is reported as hung and killed.
    With ``grace``, once a rank has failed the others get ``grace`` more seconds (a failed rank
    can leave the rest waiting inside a collective).
    """
    return [(o.ok, o.value) for o in run_ranks_to_exit(fn, world_size, args, timeout, grace, 5.0)]


def run_ranks_to_exit(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple[Any, ...] = (),
    timeout: float = 300.0,
    grace: Optional[float] = None,
    exit_wait: float = 60.0,
) -> list[RankOutcome]:
    """``run_ranks``, and how each process ended after it answered: a rank that crashes or
    hangs at interpreter exit (after its answer was sent) shows in ``exitcode``/``ending``.
    Each process gets ``exit_wait`` seconds to exit on its own after the answers are in."""
    from symm_rs import gpu_check

    procs, results = gpu_check.spawn_ranks(fn, world_size, args, _shared_gpu_setup)
    answers: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    cut_short = False
    while len(answers) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
            answers[rank] = (ok, value)
            failed = not ok
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            failed = any(
                p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in answers
            )
        if failed and grace is not None and not cut_short:
            cut_short = True
            deadline = min(deadline, time.monotonic() + grace)
    endings = []
    exit_deadline = time.monotonic() + exit_wait
    for p in procs:
        p.join(timeout=max(exit_deadline - time.monotonic(), 0.1))
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
            endings.append("killed")
        else:
            endings.append("exited")
    out: list[RankOutcome] = []
    for r, p in enumerate(procs):
        code = p.exitcode if endings[r] == "exited" else None
        if r in answers:
            ok, value = answers[r]
        elif cut_short and (p.exitcode is None or p.exitcode == -9):
            ok, value = False, f"rank {r} killed {grace:.0f} s after another rank failed"
        elif p.exitcode is None or p.exitcode == -9:
            ok, value = False, f"rank {r} did not finish within {timeout:.0f} s (killed)"
        else:
            ok, value = False, f"rank {r} exited with code {p.exitcode} before answering"
        out.append(RankOutcome(ok, value, code, endings[r]))
    return out
