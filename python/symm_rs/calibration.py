"""Measuring the size policy's table on this machine: ``calibrate(comm)`` times every collective
on a Communicator's windows (symmetric kernels) and on its window-less twin (regular algorithms),
and turns the times into a ``PolicyTable`` (``symm_rs.policy.table_from_timings``)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, Callable, Optional

import torch

from symm_rs.context import use_symmetric_memory
from symm_rs.policy import MARGIN, OPS, PolicyTable, table_from_timings


def _call(comm: Any, op: str, small: Any, big: Any) -> Callable[[], Any]:
    """``op`` on ``comm`` with bf16 buffers of ``small`` elements per rank."""
    if op == "all_gather":
        return lambda: comm.all_gather_into_tensor(big, small)
    if op == "all_reduce":
        return lambda: comm.all_reduce(small)
    return lambda: comm.reduce_scatter_tensor(small, big)


def _time_us(calls: list[Any], reps: int, iters: int) -> list[float]:
    out = []
    for call in calls:
        for _ in range(3):
            call()
        samples = []
        for _ in range(reps):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                call()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / iters)
        out.append(statistics.median(samples))
    return out


def calibrate(
    comm: Any,
    sizes: Optional[Iterable[int]] = None,
    margin: float = MARGIN,
    reps: int = 5,
    iters: int = 20,
) -> PolicyTable:
    """Measures this machine's table on ``comm`` (a Communicator with the policy on) and returns
    it; every rank returns the same table. Collective. For each size (bytes per rank, default
    1 KiB .. 256 MiB in steps of 8x) and collective, bf16 buffers inside
    ``use_symmetric_memory(comm)`` are timed on the communicator (symmetric kernels) and on its
    twin (regular algorithms); the times are agreed (maximum over ranks) through ``comm``. The
    table in use is restored afterwards; pass the result to ``comm.set_policy_table`` or keep
    its ``to_text()`` in ``SYMM_RS_POLICY_TABLE``.

    Raises:
        ValueError: ``comm`` has no policy (no twin to measure).
    """
    policy = comm.policy
    if policy is None:
        raise ValueError("calibrate needs a Communicator created with policy=True")
    sizes = sorted(set(sizes or [1024 * 8**k for k in range(7)]))
    ws, device = comm.size, comm.device
    keys, measured = [], []
    try:
        for nbytes in sizes:
            n = max(1, nbytes // 2) + (nbytes // 2) % 2  # even: no staging
            with use_symmetric_memory(comm):
                small = torch.zeros(n, dtype=torch.bfloat16, device=device)
                big = torch.zeros(n * ws, dtype=torch.bfloat16, device=device)
            for op in OPS:
                call = _call(comm, op, small, big)
                times = []
                for table in (PolicyTable.everything(), PolicyTable()):
                    comm._native.set_route(table.route_table)
                    times += _time_us([call], reps, iters)
                keys.append((op, nbytes))
                measured.append(times)
    finally:
        comm._native.set_route(policy.table.route_table)
    agreed = torch.tensor(measured, dtype=torch.float64, device=device)
    comm.all_reduce(agreed, op="max")
    torch.cuda.synchronize()
    rows = agreed.tolist()
    return table_from_timings({k: (r[0], r[1]) for k, r in zip(keys, rows)}, margin)
