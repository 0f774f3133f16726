"""The examples on a machine they cannot run on: each says what it needs (torchrun, a GPU per
process) and exits with a non-zero status, without a traceback of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("[!_]*.py"))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")


def _run(args: list[str], **environ: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**clean, **environ},
    )


def test_the_examples_are_found() -> None:
    assert EXAMPLES == ["examples/sglang_style_group.py", "examples/torchrun_all_gather.py"]


@pytest.mark.parametrize("example", EXAMPLES)
def test_without_torchrun_an_example_says_how_to_launch_it(example: str) -> None:
    done = _run([example])
    assert done.returncode != 0
    assert f"torchrun --nproc-per-node 2 {example}" in done.stderr
    assert "GPUs" in done.stderr and "Traceback" not in done.stderr


@no_gpu
@pytest.mark.parametrize("example", EXAMPLES)
def test_without_a_gpu_rank_0_says_so_and_the_others_exit_quietly(example: str) -> None:
    done = _run([example], RANK="0", LOCAL_RANK="0", WORLD_SIZE="2")
    assert done.returncode != 0
    assert "needs one CUDA GPU per process: local rank 0 has none" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run([example], RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")
    assert done.returncode != 0 and done.stderr.strip() == ""


@no_gpu
def test_under_torchrun_without_gpus_no_rank_prints_a_traceback() -> None:
    example = "examples/torchrun_all_gather.py"
    done = _run(["-m", "torch.distributed.run", "--nproc-per-node", "2", example])
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count("needs one CUDA GPU per process") == 1
    # torchrun reports the failed ranks with a traceback of its own; none comes from a rank.
    assert f'{example}", line' not in output
    assert "KeyError" not in output and "no NVIDIA driver" not in output
