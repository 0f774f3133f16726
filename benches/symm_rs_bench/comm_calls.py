"""The ``communicator`` section: one eager collective call's cost through ``symm_rs.Communicator``,
through a plain ctypes call of the same NCCL function on the same communicator and buffers (as
SGLang's ``PyNcclCommunicator`` makes it: ``data_ptr()``, ``numel()`` and the current stream read
per call), and through ``torch.distributed``, side by side."""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

import torch

import symm_rs
from symm_rs_bench.buffers import allocate, collective
from symm_rs_bench.config import OPS, MiB, format_bytes
from symm_rs_bench.timing import Rank, time_host

NCCL_BFLOAT16, NCCL_SUM = 9, 0
PATHS = ("symm_rs", "ctypes", "torch")


@functools.cache
def _nccl(path: str) -> Any:
    """The libnccl symm_rs uses, opened with ctypes (the same handle: it is already loaded),
    with the three collectives declared as ``nccl.h`` declares them."""
    lib = ctypes.CDLL(path)
    p, size, i = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.ncclAllGather.argtypes = [p, p, size, i, p, p]
    for name in ("ncclAllGather", "ncclAllReduce", "ncclReduceScatter"):
        getattr(lib, name).restype = i
    lib.ncclAllReduce.argtypes = [p, p, size, i, i, p, p]
    lib.ncclReduceScatter.argtypes = [p, p, size, i, i, p, p]
    return lib


def ctypes_collective(op: str, small: Any, big: Any, comm: Any) -> Callable[[], None]:
    """``op`` as a plain ctypes call on ``comm.comm``: pointers, count and stream read per
    call, the result checked, nothing else."""
    lib = _nccl(symm_rs.library_info().path)
    handle = ctypes.c_void_p(comm.comm)
    dtypes = {torch.bfloat16: NCCL_BFLOAT16}

    def check(code: int) -> None:
        if code != 0:
            raise RuntimeError(f"NCCL error {code}")

    def all_gather() -> None:
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        check(
            lib.ncclAllGather(
                small.data_ptr(), big.data_ptr(), small.numel(), dtypes[small.dtype], handle, stream
            )
        )

    def reduction(fn: Any, send: Any, recv: Any) -> Callable[[], None]:
        def call() -> None:
            stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
            count, dtype = recv.numel(), dtypes[recv.dtype]
            check(fn(send.data_ptr(), recv.data_ptr(), count, dtype, NCCL_SUM, handle, stream))

        return call

    if op == "all_gather":
        return all_gather
    if op == "all_reduce":
        return reduction(lib.ncclAllReduce, small, small)
    return reduction(lib.ncclReduceScatter, big, small)


def communicator(r: Rank) -> dict[str, Any]:
    """The three paths, eager, on the same buffers (the sizes up to 1 MiB, and 1 MiB),
    registered with both communicators; ``checks`` compares the agreed wall times."""
    sizes = sorted({s for s in r.cfg.sizes if s <= MiB} | {MiB})
    comm = symm_rs.Communicator.from_process_group(r.group, device=r.rank)
    rows, checks = [], []
    r.expect(len(sizes) * len(OPS) * len(PATHS))
    for nbytes in sizes:
        small, big = allocate(r, nbytes, comm, r.group)
        for op in OPS:
            calls = {
                "symm_rs": collective(op, small, big, r.group, comm),
                "ctypes": ctypes_collective(op, small, big, comm),
                "torch": collective(op, small, big, r.group),
            }
            agreed = {}
            for path in PATHS:
                row = time_host(r, calls[path])
                rows.append({"op": op, "bytes": nbytes, "path": path, **row})
                agreed[path] = r.all_reduce(row["wall_us"])
                label = f"{op} {format_bytes(nbytes)} {path}"
                r.step(f"{label}: wall {row['wall_us']:.1f} us (rank 0)")
            checks.append(
                {
                    "op": op,
                    "bytes": nbytes,
                    **{f"{p}_wall_us": agreed[p] for p in PATHS},
                    "not_slower_than_ctypes": agreed["symm_rs"] <= agreed["ctypes"],
                    "faster_than_torch": agreed["symm_rs"] < agreed["torch"],
                }
            )
        del small, big
    torch.cuda.synchronize()
    comm.close()
    return {"rows": rows, "checks": checks}
