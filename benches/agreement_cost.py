"""Host-side cost of one agreement round, on CPU: what the default agreement adds to a context
exit that registers (the never-hang issue's budget is 1 ms on 2 to 4 ranks).

Each rank is a process; the ranks share a ``TCPStore`` served by rank 0 over loopback, as a
``torch.distributed`` group's store is. A round carries a registration-shaped record (the
frees count, the segment count, bytes, fingerprint, topology and sizes: 24 ints). Beside it,
in the same processes, the baseline: one bare store round trip per rank (``set`` then
``wait`` for every rank's key), the least any cross-rank agreement over a store can cost.
Rounds alternate between the two in turns, and each figure is rank 0's median.

    python benches/agreement_cost.py [--ranks 2 4] [--rounds 400] [--out benches/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from datetime import timedelta
from typing import Any

RECORD = [0, 2, 12 << 20, 123456789, 1, *([-1] * 6), 8 << 20, 4 << 20] + [0] * 11


def _rank(rank: int, world: int, port: int, rounds: int, results: Any) -> None:
    import torch.distributed as dist

    from symm_rs import agreement
    from symm_rs.groups import Channel, Group

    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timedelta(seconds=60))
    group = Group(0x1000, world, rank, 0, "bench", Channel(store, f"bench-{world}"))
    agreed: list[float] = []
    bare: list[float] = []
    for turn in range(rounds):
        for kind in ("agree", "bare") if turn % 2 == 0 else ("bare", "agree"):
            if kind == "agree":
                t0 = time.perf_counter()
                rows = agreement.exchange(group, "registration", RECORD, timeout=30)
                agreed.append((time.perf_counter() - t0) * 1e6)
                assert len(rows) == world
            else:
                keys = [f"bare/{turn}/{r}" for r in range(world)]
                t0 = time.perf_counter()
                store.set(keys[rank], "x")
                store.wait(keys, timedelta(seconds=30))
                bare.append((time.perf_counter() - t0) * 1e6)
    warm = rounds // 10  # the first rounds open connections and warm caches
    results.put(
        {
            "rank": rank,
            "agreement_round_us": statistics.median(agreed[warm:]),
            "bare_store_round_us": statistics.median(bare[warm:]),
            "agreement_p90_us": sorted(agreed[warm:])[int(0.9 * len(agreed[warm:]))],
        }
    )


def measure(world: int, rounds: int) -> dict[str, Any]:
    from symm_rs_bench.launch import free_port

    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, rounds, results)) for r in range(world)
    ]
    for p in procs:
        p.start()
    per_rank = sorted((results.get(timeout=600) for _ in range(world)), key=lambda d: d["rank"])
    for p in procs:
        p.join(timeout=30)
    rank0 = per_rank[0]
    return {
        "ranks": world,
        "rounds": rounds,
        **{k: round(v, 1) for k, v in rank0.items() if k != "rank"},
        "agreement_over_bare_us": round(
            rank0["agreement_round_us"] - rank0["bare_store_round_us"], 1
        ),
        "target_us": 1000.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    rows = [measure(world, args.rounds) for world in args.ranks]
    report = {
        "what": "host-side cost of one symm_rs agreement round over a TCPStore (loopback)",
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or '?'}",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "agreement_cpu.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    for row in rows:
        print(
            f"{row['ranks']} ranks: agreement round {row['agreement_round_us']:.0f} us "
            f"(p90 {row['agreement_p90_us']:.0f}), bare store round trip "
            f"{row['bare_store_round_us']:.0f} us, target < 1000 us"
        )
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
