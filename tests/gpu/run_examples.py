"""Runs the examples under torchrun on N GPUs and writes ``examples_<N>gpu.json``.

python tests/gpu/run_examples.py --nproc 2 --out tests/gpu/results

The examples put each rank on its own GPU (``cuda:LOCAL_RANK``), as torchrun users do, so they
do not run with ranks sharing one GPU: with ``SYMM_RS_SHARED_GPU=1`` this says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benches"))  # the repository's launcher (symm_rs_bench)
EXAMPLES = ["examples/torchrun_all_gather.py", "examples/sglang_style_group.py"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "gpu", "results"))
    args = parser.parse_args()
    from symm_rs_bench.launch import SHARED_GPU_ENV, shared_gpu

    if shared_gpu():
        print(f"skipped: the examples need one GPU per rank ({SHARED_GPU_ENV} is set)")
        return 0
    runs = []
    for example in EXAMPLES:
        start = time.time()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={args.nproc}",
                os.path.join(ROOT, example),
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("rank ")]
        runs.append(
            {
                "example": example,
                "outcome": "passed" if done.returncode == 0 else "failed",
                "returncode": done.returncode,
                "seconds": round(time.time() - start, 1),
                "output": lines,
                "stderr_tail": done.stderr[-1500:] if done.returncode else "",
            }
        )
        print(f"{runs[-1]['outcome']:>7}  {example}")
    summary = {
        "nproc": args.nproc,
        "passed": sum(r["outcome"] == "passed" for r in runs),
        "failed": sum(r["outcome"] == "failed" for r in runs),
        "runs": runs,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"examples_{args.nproc}gpu.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
