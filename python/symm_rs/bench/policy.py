"""The ``policy`` section: the size policy against both of its choices, in CUDA-graph replay,
at the bench's sizes: ``plain`` (caching-allocator buffers: NCCL's regular algorithms),
``symm`` (the same calls on symmetric windows) and ``policy`` (the symmetric buffers through a
Communicator with the policy on, which sends each call to its window-less twin or not). Each
``checks`` entry says whether policy <= min(plain, symm) * (1 + TOLERANCE); ``twin_memory``
is the GPU memory the twin communicator costs."""

from __future__ import annotations

from typing import Any

import torch

import symm_rs
from symm_rs.bench.config import OPS, format_bytes
from symm_rs.bench.timing import Rank, time_eager, time_graph

TOLERANCE = 0.03
PATHS = ("plain", "symm", "policy")


def _free_bytes(r: Rank) -> int:
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info(r.device)[0])


def _twin(r: Rank) -> tuple[Any, dict[str, Any]]:
    """A Communicator with the policy on, and the memory its twin took: when created, and
    after its first calls (NCCL allocates some buffers lazily), each the maximum over ranks."""
    from symm_rs.bench.sections import allocate, collective

    pcomm = symm_rs.Communicator.from_process_group(r.group, device=r.rank)
    small, big = allocate(r, 1 << 20)  # allocated before the measurements
    calls = [collective(op, small, big, r.group, pcomm) for op in OPS]
    for call in calls:  # the main communicator's lazy buffers, out of the way first
        call()
    before = _free_bytes(r)
    policy = pcomm.enable_policy(symm_rs.PolicyTable.everything())
    created = _free_bytes(r)
    for call in calls:  # now on the twin
        call()
    used = _free_bytes(r)
    pcomm.set_policy_table(True)  # the table users get: SYMM_RS_POLICY_TABLE or the default
    memory = {
        "at_creation_bytes": r.all_reduce(before - created),
        "after_first_calls_bytes": r.all_reduce(before - used),
        "how": "torch.cuda.mem_get_info before and after, maximum over ranks",
    }
    r.log(f"[policy] twin memory: {memory['after_first_calls_bytes'] / 2**20:.1f} MiB (max)")
    info = {
        "table": pcomm.policy.table.to_text(),
        "mechanism": policy.mechanism,
        "per_call_selection": policy.per_call_selection,
        "note": policy.note,
    }
    return pcomm, {"twin_memory": memory, **info}


def policy(r: Rank) -> dict[str, Any]:
    """Every size and collective: the three paths in CUDA-graph replay (the eager ``plain``
    time plans the graphs), and the verdict on the agreed medians."""
    from symm_rs.bench.sections import allocate, collective

    comm = symm_rs.Communicator.from_process_group(r.group, device=r.rank)
    pcomm, out = _twin(r)
    rows, checks = [], []
    for nbytes in r.cfg.sizes:
        plain = allocate(r, nbytes)
        symm = allocate(r, nbytes, comm, pcomm)
        for op in OPS:
            calls = {
                "plain": collective(op, *plain, r.group, comm),
                "symm": collective(op, *symm, r.group, comm),
                "policy": collective(op, *symm, r.group, pcomm),
            }
            estimate_s = time_eager(r, calls["plain"])["estimate_s"]
            agreed = {}
            for path in PATHS:
                row = time_graph(r, calls[path], estimate_s)
                rows.append({"op": op, "bytes": nbytes, "path": path, **row})
                agreed[path] = r.all_reduce(row["median_us"])
            best = min(agreed["plain"], agreed["symm"])
            checks.append(
                {
                    "op": op,
                    "bytes": nbytes,
                    "route": pcomm.route(op, nbytes),
                    **{f"{p}_us": agreed[p] for p in PATHS},
                    "ok": agreed["policy"] <= best * (1 + TOLERANCE),
                }
            )
            verdict = "ok" if checks[-1]["ok"] else "SLOWER"
            r.log(
                f"[policy] {op} {format_bytes(nbytes)}: plain {agreed['plain']:.1f} symm "
                f"{agreed['symm']:.1f} policy {agreed['policy']:.1f} us "
                f"({checks[-1]['route']}, {verdict})"
            )
        del plain, symm, calls
    torch.cuda.synchronize()
    pcomm.close()
    comm.close()
    out.update(rows=rows, checks=checks, all_ok=all(c["ok"] for c in checks))
    out["tolerance"] = TOLERANCE
    return out
