"""Probe: does registering on the world communicator fail after TP and CP sub-communicators
registered windows? (suite_cp at 4 GPUs: ncclCommWindowRegister -> CUDA 801 'operation not
supported' once case_tp2_by_cp2 had run.) Variants: sub-groups split from the world
(``new_group(device_id=...)``) or made separately; the world registering first or last.

    python tests/gpu/explore/probe_subgroup_register.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

VARIANTS = ("split_world_last", "nosplit_world_last", "split_world_first")
# The repository's launcher (benches/symm_rs_bench), beside the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 3, "benches"))


def rank_main(rank: int, world: int, variant: str) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import symm_rs
    from symm_rs_bench.launch import init_nccl

    group = init_nccl(rank, world)
    kw = {"device_id": torch.device("cuda", rank)} if variant.startswith("split") else {}
    tp = [dist.new_group(r, **kw) for r in ([0, 1], [2, 3])][rank // 2]
    cp = [dist.new_group(r, **kw) for r in ([0, 2], [1, 3])][rank % 2]
    keep, steps = [], []
    order = [group, tp, cp] if variant.endswith("world_first") else [tp, cp, group]
    names = {id(group): "world", id(tp): "tp", id(cp): "cp"}
    for g in order + order:  # each group twice: a new segment after the others registered
        try:
            with symm_rs.use_symmetric_memory(g):
                keep.append(torch.empty(3 << 20, device="cuda"))
            symm_rs.register(g)
            steps.append((names[id(g)], "ok"))
        except Exception as e:
            steps.append((names[id(g)], f"{type(e).__name__}: {e}"[:200]))
            break
    return {"steps": steps, "stats": symm_rs.stats().as_dict()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--variant", choices=VARIANTS, action="append")
    args = parser.parse_args()
    from symm_rs_bench.launch import run_ranks

    results = {}
    for variant in args.variant or VARIANTS:
        outcomes = run_ranks(rank_main, 4, (variant,), timeout=35, grace=5)
        results[variant] = [v for _, v in outcomes]
        print(
            variant,
            json.dumps([v["steps"] if isinstance(v, dict) else v for v in results[variant]])[:1500],
        )
        sys.stdout.flush()
    with open(os.path.join(args.out, "probe_subgroup_register.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
