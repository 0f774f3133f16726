"""The ``policy`` section: the size policy against both of its choices, in CUDA-graph replay, at
the bench's sizes, all three on one Communicator so that the policy is the only thing that
changes: ``plain`` (caching-allocator buffers, the policy's table empty: NCCL's regular
algorithms), ``symm`` (the same calls on symmetric windows, table empty) and ``policy`` (the
symmetric buffers with the table on, which sends each call to the window-less twin or not). Each
path is captured with its table set (the route is chosen when a call is made, so a graph keeps
the one it captured), and the three are timed in turns (``ROUNDS``). Each ``checks`` entry says
whether policy <= min(plain, symm) * (1 + TOLERANCE); ``twin_memory`` is the GPU memory the twin
communicator costs."""

from __future__ import annotations

from typing import Any

import torch

import symm_rs
from symm_rs.policy import table_from_timings
from symm_rs_bench.buffers import allocate, collective
from symm_rs_bench.config import OPS, format_bytes
from symm_rs_bench.timing import Rank, time_eager, time_graphs_in_turns

TOLERANCE = 0.03
PATHS = ("plain", "symm", "policy")
# The three paths take turns this many times: at a few microseconds a call, one pass each in a
# row showed differences of 5-15% between two communicators running the very same kernel.
ROUNDS = 5
NO_TABLE = "none"  # nothing to the twin: the communicator alone, as without the policy


def _free_bytes(r: Rank) -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info(r.device)[0])


def _twin(r: Rank) -> tuple[Any, dict[str, Any]]:
    """A Communicator with the policy on, and the memory its twin took: when created, and
    after its first calls (NCCL allocates some buffers lazily), each the maximum over ranks."""
    pcomm = symm_rs.Communicator.from_process_group(r.group, device=r.rank)
    small, big = allocate(r, 1 << 20)  # allocated before the measurements
    calls = [collective(op, small, big, r.group, pcomm) for op in OPS]
    for call in calls:  # the main communicator's lazy buffers, out of the way first
        call()
    before = _free_bytes(r)
    policy = pcomm.enable_policy(symm_rs.policy.PolicyTable.everything())
    created = _free_bytes(r)
    for call in calls:  # now on the twin
        call()
    used = _free_bytes(r)
    measured = _measured_table(r)
    # The crossover this machine showed in the collectives section of this run, as a user
    # would calibrate it; without that section, the table users get by default.
    pcomm.set_policy_table(measured if measured is not None else True)
    memory = {
        "at_creation_bytes": r.all_reduce(before - created),
        "after_first_calls_bytes": r.all_reduce(before - used),
        "how": "torch.cuda.mem_get_info before and after, maximum over ranks",
    }
    r.log(f"[policy] twin memory: {memory['after_first_calls_bytes'] / 2**20:.1f} MiB (max)")
    info = {
        "table_source": "measured: this run's collectives section (CUDA-graph rows, torch's "
        "communicator on plain buffers against symmetric ones, maximum over ranks)"
        if measured is not None
        else "default (SYMM_RS_POLICY_TABLE or symm_rs.policy.DEFAULT_TABLES)",
        "table": pcomm.policy.table.to_text(),
        "mechanism": policy.mechanism,
        "per_call_selection": policy.per_call_selection,
        "note": policy.note,
    }
    return pcomm, {"twin_memory": memory, **info}


def _measured_table(r: Rank) -> Any:
    """``table_from_timings`` of this run's collectives section, the times agreed across
    ranks (every rank then holds the same table); ``None`` when that section did not run."""
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for row in r.done.get("collectives", {}).get("rows", []):
        us = row.get("median_us")  # a rank's own rows (merged documents call it latency_us)
        # Only plain against symm: the torch baselines beside them do not count here.
        if row.get("mode") == "graph" and us is not None and row["buffers"] in ("plain", "symm"):
            cells.setdefault((row["op"], row["bytes"]), {})[row["buffers"]] = us
    timings = {
        key: (r.all_reduce(value["plain"]), r.all_reduce(value["symm"]))
        for key, value in sorted(cells.items())
        if len(value) == 2
    }
    return table_from_timings(timings) if timings else None


def policy(r: Rank) -> dict[str, Any]:
    """Every size and collective: the three paths in CUDA-graph replay (the eager ``plain``
    time plans the graphs), and the verdict on the agreed medians."""
    pcomm, out = _twin(r)
    table = pcomm.policy.table
    tables = {"plain": NO_TABLE, "symm": NO_TABLE, "policy": table}
    rows, checks = [], []
    r.expect(len(r.cfg.sizes) * len(OPS))
    for nbytes in r.cfg.sizes:
        plain = allocate(r, nbytes)
        symm = allocate(r, nbytes, pcomm)
        for op in OPS:
            calls = {
                "plain": collective(op, *plain, r.group, pcomm),
                "symm": collective(op, *symm, r.group, pcomm),
                "policy": collective(op, *symm, r.group, pcomm),
            }
            pcomm.set_policy_table(NO_TABLE)
            estimate_s = time_eager(r, calls["plain"])["estimate_s"]
            agreed = {}
            timed = time_graphs_in_turns(
                r, calls, estimate_s, ROUNDS, lambda path: pcomm.set_policy_table(tables[path])
            )
            for path in PATHS:
                row = timed[path]
                rows.append({"op": op, "bytes": nbytes, "path": path, **row})
                agreed[path] = r.all_reduce(row["median_us"])
            best = min(agreed["plain"], agreed["symm"])
            checks.append(
                {
                    "op": op,
                    "bytes": nbytes,
                    "route": "twin" if table.use_twin(op, nbytes) else "main",
                    **{f"{p}_us": agreed[p] for p in PATHS},
                    "ok": agreed["policy"] <= best * (1 + TOLERANCE),
                }
            )
            verdict = "ok" if checks[-1]["ok"] else "SLOWER"
            r.step(
                f"{op} {format_bytes(nbytes)}: plain {agreed['plain']:.1f} symm "
                f"{agreed['symm']:.1f} policy {agreed['policy']:.1f} us "
                f"({checks[-1]['route']}, {verdict})"
            )
        del plain, symm, calls
    torch.cuda.synchronize()
    pcomm.close()
    out.update(rows=rows, checks=checks, all_ok=all(c["ok"] for c in checks))
    out["tolerance"] = TOLERANCE
    return out
