"""Small collectives on symmetric buffers whose per-rank size is not a multiple of 16 bytes,
through torch.distributed and symm_rs.Communicator, with the placement of every buffer checked
across ranks. Records a matrix of (count, path) -> correct?, layout symmetric? Runs alike with
ranks sharing one GPU (``--shared-gpu``), where NCCL runs its regular kernels on the windows."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import symm_rs

from harness import Ctx

COUNTS = [4096, 4097, 4098, 4099, 4100, 4104, 1000, 1001, 65537]


def _pattern(n: int, rank: int, salt: int) -> torch.Tensor:
    # On the current device, which the harness sets to the rank's (ctx.device).
    base = torch.arange(n, device="cuda", dtype=torch.int64)
    return ((base * 5 + rank * 3 + salt) % 7).to(torch.bfloat16)


def _run(ctx: Ctx, path: str, comm: Any, count: int) -> dict[str, Any]:
    ws = ctx.world_size
    owner = ctx.group if path == "torch" else comm
    with symm_rs.use_symmetric_memory(owner):
        b = {
            "ag_in": torch.empty(count, dtype=torch.bfloat16, device=ctx.device),
            "ag_out": torch.empty(count * ws, dtype=torch.bfloat16, device=ctx.device),
            "rs_in": torch.empty(count * ws, dtype=torch.bfloat16, device=ctx.device),
            "rs_out": torch.empty(count, dtype=torch.bfloat16, device=ctx.device),
            "ar": torch.empty(count, dtype=torch.bfloat16, device=ctx.device),
        }
    layout = "symmetric"
    try:
        symm_rs.checks.check_layout(list(b.values()), owner)
    except symm_rs.RegistrationError as e:
        layout = str(e)[:200]
    b["ag_in"].copy_(_pattern(count, ctx.rank, 0))
    b["rs_in"].copy_(_pattern(count * ws, ctx.rank, 1))
    b["ar"].copy_(_pattern(count, ctx.rank, 2))
    if path == "torch":
        dist.all_gather_into_tensor(b["ag_out"], b["ag_in"], group=ctx.group)
        dist.reduce_scatter_tensor(b["rs_out"], b["rs_in"], group=ctx.group)
        dist.all_reduce(b["ar"], group=ctx.group)
    else:
        comm.all_gather_into_tensor(b["ag_out"], b["ag_in"])
        comm.reduce_scatter_tensor(b["rs_out"], b["rs_in"])
        comm.all_reduce(b["ar"])
    torch.cuda.synchronize()
    ag = torch.cat([_pattern(count, r, 0) for r in range(ws)])
    rs = sum(_pattern(count * ws, r, 1).double() for r in range(ws))[
        ctx.rank * count : (ctx.rank + 1) * count
    ]
    ar = sum(_pattern(count, r, 2).double() for r in range(ws))
    return {
        "count": count,
        "path": path,
        "layout": layout,
        "in_window": all(ctx.in_window(t, owner) for t in b.values()),
        "all_gather": bool(torch.equal(b["ag_out"], ag)),
        "reduce_scatter": bool(torch.equal(b["rs_out"].double(), rs)),
        "all_reduce": bool(torch.equal(b["ar"].double(), ar)),
    }


def _inplace_all_gather(ctx: Ctx, path: str, comm: Any, count: int) -> bool:
    owner = ctx.group if path == "torch" else comm
    with symm_rs.use_symmetric_memory(owner):
        out = torch.empty(count * ctx.world_size, dtype=torch.bfloat16, device=ctx.device)
    mine = out.narrow(0, ctx.rank * count, count)
    mine.copy_(_pattern(count, ctx.rank, 3))
    if path == "torch":
        dist.all_gather_into_tensor(out, mine, group=ctx.group)
    else:
        comm.all_gather_into_tensor(out, mine)
    torch.cuda.synchronize()
    return bool(torch.equal(out, torch.cat([_pattern(count, r, 3) for r in range(ctx.world_size)])))


def case_unaligned_small_collectives(ctx: Ctx) -> None:
    rows = []
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        for count in COUNTS:
            for path in ("torch", "communicator"):
                row = _run(ctx, path, comm, count)
                row["all_gather_in_place"] = _inplace_all_gather(ctx, path, comm, count)
                rows.append(row)
    ctx.details["rows"] = rows
    # NCCL's own results on the torch path are evidence, not our assertion; symm_rs's
    # Communicator must be right everywhere (it steers around the reduce-scatter bug).
    ctx.details["nccl_reduce_scatter_wrong_counts"] = sorted(
        {r["count"] for r in rows if r["path"] == "torch" and not r["reduce_scatter"]}
    )
    ctx.details["nccl_in_place_all_gather_wrong_counts"] = sorted(
        {r["count"] for r in rows if r["path"] == "torch" and not r["all_gather_in_place"]}
    )
    assert all(r["layout"] == "symmetric" for r in rows), "buffers not placed symmetrically"
    assert all(r["in_window"] for r in rows), "buffers outside their owner's windows"
    ours = [r for r in rows if r["path"] == "communicator"]
    keys = ("all_gather", "reduce_scatter", "all_reduce", "all_gather_in_place")
    bad = [r for r in ours if not all(r[k] for k in keys)]
    assert not bad, bad
    torch_path = [r for r in rows if r["path"] == "torch"]
    assert all(r["all_gather"] and r["all_reduce"] for r in torch_path), torch_path
