"""Symmetric all-gather with torch.distributed, launched by torchrun:

    torchrun --nproc-per-node 2 examples/torchrun_all_gather.py

Buffers allocated inside ``use_symmetric_memory(group)`` are registered as symmetric windows
of that group's communicator when the block exits, so NCCL runs its symmetric kernels on them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import symm_rs

from _requirements import require_gpu, torchrun_ranks


def main() -> None:
    rank, local_rank = torchrun_ranks("examples/torchrun_all_gather.py")
    require_gpu("examples/torchrun_all_gather.py", rank, local_rank)
    torch.cuda.set_device(local_rank)
    # device_id creates the NCCL communicator now rather than at the first collective.
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    group = dist.group.WORLD
    world = dist.get_world_size()
    n = 1 << 20

    with symm_rs.use_symmetric_memory(group):
        send = torch.empty(n, dtype=torch.bfloat16, device="cuda")
        recv = torch.empty(n * world, dtype=torch.bfloat16, device="cuda")
    send.fill_(rank)
    dist.all_gather_into_tensor(recv, send, group=group)
    expected = torch.arange(world, device="cuda", dtype=torch.bfloat16).repeat_interleave(n)
    ok = torch.equal(recv, expected)
    print(
        f"rank {rank}: exact={ok} symmetric={symm_rs.is_symmetric(recv, group)} "
        f"windows={symm_rs.stats().windows_registered}",
        flush=True,
    )
    symm_rs.release(group)  # windows go before the communicator does
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
