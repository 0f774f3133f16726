"""Cold start: ``import torch``, ``import symm_rs``, the first symmetric allocation and the first
registration, in a fresh interpreter per rank, all started together by ``run_coldstart`` after the
main run (warm file cache, cold interpreter). It runs this file as a script (``-m`` would import
symm_rs before the clock starts), which prints ``MARKER`` + its numbers as JSON."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from typing import Any

MARKER = "symm_rs.bench.coldstart "


def _measure(rank: int, world: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist

    t1 = time.perf_counter()
    import symm_rs

    t2 = time.perf_counter()
    torch.cuda.set_device(rank)
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    device, timeout = torch.device("cuda", rank), datetime.timedelta(seconds=60)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device, timeout=timeout)
    t4 = time.perf_counter()
    dist.all_reduce(torch.ones(1, device="cuda"))  # every rank here before the clock starts
    torch.cuda.synchronize()
    t5 = time.perf_counter()
    with symm_rs.use_symmetric_memory(dist.group.WORLD):
        buf = torch.empty(1 << 20, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        t6 = time.perf_counter()
    torch.cuda.synchronize()
    t7 = time.perf_counter()
    if not symm_rs.is_symmetric(buf, dist.group.WORLD):
        raise RuntimeError("the first buffer from use_symmetric_memory is not in a window")
    return {
        "rank": rank,
        "import_torch_ms": (t1 - t0) * 1e3,
        "import_symm_rs_ms": (t2 - t1) * 1e3,
        "cuda_context_ms": (t3 - t2) * 1e3,
        "init_process_group_ms": (t4 - t3) * 1e3,
        "first_alloc_ms": (t6 - t5) * 1e3,
        "first_registration_ms": (t7 - t6) * 1e3,
        "symm_rs_total_ms": (t2 - t1 + t7 - t5) * 1e3,  # import + first allocation + registration
    }


def main() -> None:
    """One rank; ``RANK``, ``WORLD_SIZE`` and the rendezvous address come from the environment.
    Prints its numbers, then tears down; a failure leaves a traceback and a non-zero status."""
    print(MARKER + json.dumps(_measure(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))))
    sys.stdout.flush()
    import torch.distributed as dist  # imported by _measure: nothing is timed any more

    import symm_rs

    symm_rs.release(dist.group.WORLD)
    dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: it can wait on NCCL


def _rank(rank: int, world: int, timeout: float) -> dict[str, Any]:
    import symm_rs  # this very package, also for the script: on its PYTHONPATH

    parent = os.path.dirname(os.path.dirname(os.path.abspath(symm_rs.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__)]
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run(
            command, env=env, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = done.stdout.decode(errors="replace")
    except subprocess.TimeoutExpired as e:  # its numbers may be out, its teardown hung
        output = (e.output or b"").decode(errors="replace")
    found = [line for line in output.splitlines() if line.startswith(MARKER)]
    if not found:
        raise RuntimeError(f"no result from {' '.join(command)}; output:\n{output[-2000:]}")
    return dict(json.loads(found[-1][len(MARKER) :]))


def run_coldstart(world: int, timeout: float) -> dict[int, Any]:
    """Per rank, its numbers or ``{"error": ...}``; a failed rank stops the others."""
    from symm_rs_bench.launch import run_ranks

    outcomes = run_ranks(_rank, world, args=(timeout,), timeout=timeout + 30, grace=10.0)
    return {rank: value if ok else {"error": value} for rank, (ok, value) in enumerate(outcomes)}


if __name__ == "__main__":
    # Run as a script, this folder heads sys.path: drop it, so that config.py or timing.py can
    # never stand in for a top-level module of that name.
    here = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != here]
    main()
