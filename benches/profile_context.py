"""Profile of ``use_symmetric_memory`` enter+exit with nothing new, as issue 14 asks ("profile
first"): rank 0 of a 2-GPU group runs the context in a loop while py-spy samples it, native
frames included, and the collapsed stacks are summed per frame.

    python benches/profile_context.py --out benches/results [--seconds 4]

Needs py-spy (``pip install py-spy``) and permission to ptrace the rank process (root, or
``kernel.yama.ptrace_scope=0``). Writes ``profile_context.txt`` (collapsed stacks) and
``profile_context.json`` (share of samples per frame, the top 25).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import time
from typing import Any


def rank_main(rank: int, world: int, out: str, seconds: float) -> dict[str, Any]:
    import torch

    import symm_rs
    from symm_rs_bench.launch import init_nccl

    group = init_nccl(rank, world)
    with symm_rs.use_symmetric_memory(group):
        keep = torch.empty(1 << 20, device="cuda")
    result: dict[str, Any] = {}
    if rank == 0:
        stacks = os.path.join(out, "profile_context.txt")
        spy = subprocess.Popen(
            [
                shutil.which("py-spy") or "py-spy",
                "record",
                "--pid",
                str(os.getpid()),
                "--native",
                "--rate",
                "1000",
                "--duration",
                str(int(seconds)),
                "--format",
                "raw",
                "-o",
                stacks,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.0)  # py-spy attaches
        loops, deadline = 0, time.perf_counter() + seconds + 1.0
        while time.perf_counter() < deadline:
            for _ in range(1000):
                with symm_rs.use_symmetric_memory(group):
                    pass
            loops += 1000
        log = spy.communicate(timeout=60)[0]
        result = {"contexts": loops, "py_spy_rc": spy.returncode, "py_spy_log": log[-2000:]}
    torch.distributed.barrier()
    del keep
    symm_rs.release(group)
    torch.distributed.destroy_process_group()
    return result


def summarize(stacks_path: str) -> dict[str, Any]:
    """Share of samples in which each frame appears (inclusive), the top 25."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    with open(stacks_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            for frame in set(stack.split(";")):
                inclusive[frame] += n
    return {
        "samples": total,
        "inclusive_share": {k: round(v / total, 4) for k, v in inclusive.most_common(25)},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    from symm_rs_bench.launch import run_ranks

    os.makedirs(args.out, exist_ok=True)
    outcomes = run_ranks(rank_main, 2, (args.out, args.seconds), timeout=120)
    if not all(ok for ok, _ in outcomes):
        print(f"profile failed: {[v for ok, v in outcomes if not ok]}")
        return 1
    result = outcomes[0][1]
    stacks = os.path.join(args.out, "profile_context.txt")
    if os.path.exists(stacks):
        result.update(summarize(stacks))
    with open(os.path.join(args.out, "profile_context.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1)[:3000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
