"""Where NCCL cannot run symmetric kernels, symm_rs says so and does not register.

Run three ways by tests/gpu/run_all.sh: normally (NVLink), with the network transport forced
(``NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1``: how ranks on different nodes talk), and with
peer-to-peer off but shared memory on (``NCCL_P2P_DISABLE=1``). Each run checks symm_rs's
verdict (``symm_rs.symmetric_kernels``) against NCCL's own tuning log, the one warning and the
skipped registration where the verdict is no, and exact results either way.

With ranks sharing one GPU (``--shared-gpu``: each rank its own ``NCCL_HOSTID``) the verdict
must be no (the ranks are on different NCCL hosts, as across nodes) and NCCL must log no
symmetric kernel. The harness sets ``SYMM_RS_REGISTER=always`` there, so symm_rs registers
anyway, with no warning (``registered`` windows that are not ``symmetric``); run with
``SYMM_RS_REGISTER=auto`` to see the multi-node behaviour (the warning, no registration).
"""

from __future__ import annotations

import glob
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

import symm_rs

from harness import Ctx, log_nccl_to

# One folder per run (the ranks are children of one harness process) unless run_all.sh names
# one: an older run's [Symmetric] lines must not count for this one.
LOG_DIR = os.environ.get(
    "SYMM_RS_TRANSPORT_LOG_DIR", f"/tmp/symm_rs_transport_nccl_log.{os.getppid()}"
)
_seen: dict[str, Any] = {}


def setup_rank(rank: int, world_size: int) -> None:
    log_nccl_to(LOG_DIR, "INIT,TUNING")


def case_verdict_registration_and_exact_results(ctx: Ctx) -> None:
    ws = ctx.world_size
    verdict = symm_rs.symmetric_kernels(ctx.group)
    _seen["supported"] = verdict.supported
    before = symm_rs.stats().windows_registered
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the second context must not warn again
            with symm_rs.use_symmetric_memory(ctx.group):
                ag_in = torch.full((1 << 16,), float(ctx.rank + 1), device=ctx.device)
                ag_out = torch.empty((1 << 16) * ws, device=ctx.device)
                ar = torch.full((1 << 20,), float(ctx.rank + 1), device=ctx.device)
                rs_in = torch.full(((1 << 14) * ws,), float(ctx.rank + 1), device=ctx.device)
                rs_out = torch.empty(1 << 14, device=ctx.device)
            dist.all_gather_into_tensor(ag_out, ag_in, group=ctx.group)
            dist.all_reduce(ar, group=ctx.group)
            dist.reduce_scatter_tensor(rs_out, rs_in, group=ctx.group)
    torch.cuda.synchronize()
    warned = [w for w in caught if issubclass(w.category, symm_rs.errors.NoSymmetricKernelsWarning)]
    registered = symm_rs.stats().windows_registered - before
    total = sum(range(1, ws + 1))
    expected_ag = torch.arange(1, ws + 1, device=ctx.device).float().repeat_interleave(1 << 16)
    exact = (
        torch.equal(ag_out, expected_ag)
        and bool((ar == total).all())
        and bool((rs_out == total).all())
    )
    register_mode = symm_rs.env.read_choice(symm_rs.env.REGISTER, symm_rs.env.REGISTER_CHOICES)
    ctx.details.update(
        env={
            k: v
            for k, v in os.environ.items()
            if k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_HOSTID", "SYMM_RS_REGISTER")
        },
        register=register_mode,
        symmetric_kernels=verdict.supported,
        reason=verdict.reason,
        warnings=len(warned),
        windows_registered=registered,
        is_symmetric=symm_rs.is_symmetric(ar, ctx.group),
        is_registered=symm_rs.is_registered(ar, ctx.group),
        exact=exact,
    )
    assert exact, "results differ from the expected sums"
    if ctx.shared_gpu:
        assert not verdict.supported, "symmetric kernels between ranks on different NCCL hosts"
    if verdict.supported:
        assert not warned and registered > 0 and symm_rs.is_symmetric(ar, ctx.group)
    elif register_mode == "always":  # SYMM_RS_REGISTER=always: registered anyway, silently
        assert not warned, f"{len(warned)} warnings"
        assert registered > 0 and symm_rs.is_registered(ar, ctx.group)
        assert not symm_rs.is_symmetric(ar, ctx.group)
    else:
        assert len(warned) == 1, f"{len(warned)} warnings"
        assert registered == 0 and not symm_rs.is_registered(ar, ctx.group)
        assert not symm_rs.is_symmetric(ar, ctx.group)


def case_nccl_tuning_log_agrees_with_the_verdict(ctx: Ctx) -> None:
    torch.cuda.synchronize()
    dist.barrier(group=ctx.group, device_ids=[ctx.device.index])
    lines: list[str] = []
    for path in glob.glob(os.path.join(LOG_DIR, "nccl.*")):
        with open(path, errors="replace") as f:
            lines += [line for line in f.read().splitlines() if "Bytes ->" in line]
    symmetric = [line for line in lines if "[Symmetric]" in line]
    ctx.details.update(
        tuning_lines=len(lines), symmetric_lines=len(symmetric), sample=(symmetric or lines)[:3]
    )
    if ctx.rank == 0:  # NCCL >= 2.28 logs kernel choices on rank 0 only
        assert lines, "NCCL wrote no tuning log"
        assert bool(symmetric) == _seen["supported"], (
            f"symm_rs said symmetric kernels: {_seen['supported']}, NCCL logged "
            f"{len(symmetric)} symmetric collectives"
        )
