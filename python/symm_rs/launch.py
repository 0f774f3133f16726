"""Running a function once per GPU, one process each, for ``doctor``, ``bench`` and the GPU
tests. Every rank's return value (or the exception text) comes back to the caller, and a rank
that hangs is killed after ``timeout`` seconds instead of hanging the caller."""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_rank_environment(rank: int, world_size: int, port: int) -> None:
    """The variables torch.distributed's env:// rendezvous reads, for one local rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    set_rank_environment(rank, world_size, port)
    try:
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException as e:  # report everything, the parent decides
        results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def init_nccl(rank: int, world_size: int, timeout_s: float = 120.0) -> Any:
    """``init_process_group("nccl")`` bound to GPU ``rank``, with the communicator made eagerly."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        rank=rank,
        world_size=world_size,
        device_id=torch.device("cuda", rank),
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


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
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
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
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    out: list[tuple[bool, Any]] = []
    for r, p in enumerate(procs):
        if r in answers:
            out.append(answers[r])
        elif cut_short and (p.exitcode is None or p.exitcode == -9):
            out.append((False, f"rank {r} killed {grace:.0f} s after another rank failed"))
        elif p.exitcode is None or p.exitcode == -9:
            out.append((False, f"rank {r} did not finish within {timeout:.0f} s (killed)"))
        else:
            out.append((False, f"rank {r} exited with code {p.exitcode} before answering"))
    return out
