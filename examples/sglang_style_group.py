"""An SGLang-style group object wired into symm_rs, launched by torchrun:

    torchrun --nproc-per-node 2 examples/sglang_style_group.py

SGLang's ``GroupCoordinator`` carries its NCCL communicator as ``.pynccl_comm.comm`` (a
``ctypes.c_void_p``) and runs its collectives on it. Registering on that very communicator is
what makes NCCL choose symmetric kernels; registering on another group's is the classic bug.
Here a ``symm_rs.Communicator`` plays the part of SGLang's PyNcclCommunicator.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.distributed as dist

import symm_rs

from _requirements import require_gpu, torchrun_ranks


@dataclass
class PyNcclLike:
    comm: ctypes.c_void_p
    inner: symm_rs.Communicator

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.inner.all_reduce(tensor)


@dataclass
class GroupCoordinatorLike:
    pynccl_comm: PyNcclLike
    world_size: int


def main() -> None:
    rank, local_rank = torchrun_ranks("examples/sglang_style_group.py")
    require_gpu("examples/sglang_style_group.py", rank, local_rank)
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    inner = symm_rs.Communicator.from_process_group(dist.group.WORLD)
    tp = GroupCoordinatorLike(PyNcclLike(ctypes.c_void_p(inner.comm), inner), inner.size)

    with symm_rs.use_symmetric_memory(tp):
        hidden = torch.full((4096,), float(rank + 1), dtype=torch.bfloat16, device="cuda")
    tp.pynccl_comm.all_reduce(hidden)
    torch.cuda.synchronize()
    expected = float(sum(range(1, tp.world_size + 1)))
    ok = bool((hidden == expected).all()) and symm_rs.is_symmetric(hidden, tp)
    print(f"rank {rank}: all-reduce exact and symmetric: {ok}", flush=True)
    inner.close()  # deregisters its windows, then destroys it
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
