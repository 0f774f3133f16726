"""The buffers a section times and the call it times on them, shared by every section."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist

import symm_rs
from symm_rs_bench.timing import Rank


def allocate(r: Rank, nbytes: int, *owners: Any) -> tuple[Any, Any]:
    """``(small, big)``: bf16 zeros of ``nbytes`` and ``world * nbytes``; with ``owners``,
    allocated in ``use_symmetric_memory(owners[0])`` and registered with every owner."""
    n = nbytes // 2
    if not owners:
        small = torch.zeros(n, dtype=torch.bfloat16, device=r.device)
        return small, torch.zeros(n * r.world, dtype=torch.bfloat16, device=r.device)
    with symm_rs.use_symmetric_memory(owners[0]):
        small = torch.empty(n, dtype=torch.bfloat16, device=r.device)
        big = torch.empty(n * r.world, dtype=torch.bfloat16, device=r.device)
    for owner in owners[1:]:  # registration is per communicator
        with symm_rs.use_symmetric_memory(owner):
            pass
    for t in (small, big):
        t.zero_()
    if not all(symm_rs.is_symmetric(t, o) for t in (small, big) for o in owners):
        raise RuntimeError("buffers allocated inside use_symmetric_memory are not symmetric")
    torch.cuda.synchronize()
    return small, big


def collective(op: str, small: Any, big: Any, group: Any, comm: Any = None) -> Callable[[], Any]:
    """The call to time (zeros stay zeros, so repeated sums cannot overflow): through
    ``torch.distributed`` on ``group``, or through the ``symm_rs.Communicator`` ``comm``."""
    kw = {} if comm is not None else {"group": group}
    call = {
        "all_gather": ("all_gather_into_tensor", big, small),
        "all_reduce": ("all_reduce", small),
        "reduce_scatter": ("reduce_scatter_tensor", small, big),
    }[op]
    return functools.partial(getattr(dist if comm is None else comm, call[0]), *call[1:], **kw)
