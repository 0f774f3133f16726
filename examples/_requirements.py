"""What the examples need before they start: torchrun's variables and a GPU per process. Each
check prints what is missing and how to launch, and exits with status 1 (no traceback)."""

from __future__ import annotations

import os
import sys
import warnings


def torchrun_ranks(script: str, nproc: int = 2) -> tuple[int, int]:
    """``(rank, local_rank)`` as torchrun sets them."""
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:
        sys.exit(
            f"{script} runs one process per GPU, started by torchrun:\n"
            f"    torchrun --nproc-per-node {nproc} {script}\n"
            f"It needs {nproc} or more CUDA GPUs (one per process)."
        )
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])


def require_gpu(script: str, rank: int, local_rank: int) -> None:
    """Exits unless this process has a CUDA GPU of its own; only rank 0 says why, so that the
    message is printed once, not once per process."""
    import torch

    with warnings.catch_warnings():  # torch warns when no driver is found: said below instead
        warnings.simplefilter("ignore")
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank < visible:
        return
    message = (
        f"{script} needs one CUDA GPU per process: local rank {local_rank} has none "
        f"(torch sees {visible}; check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    )
    sys.exit(message if rank == 0 else 1)
