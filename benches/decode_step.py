"""Decode-step benchmark: the engine-shaped TP stack of tests/gpu/suite_engine.py, captured as
CUDA graphs for batch sizes 1-64 on symmetric buffers (through symm_rs.compat.sglang) and on
plain buffers, replayed side by side in the same processes. Writes
benches/results/decode_step_<N>gpu.json and decode_step.png.

    python benches/decode_step.py --world-sizes 2 4 [--out benches/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "gpu"))

REPLAYS = 200
REPEATS = 5


def _time_replays(graph: Any) -> float:
    import torch

    for _ in range(20):
        graph.replay()
    samples = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / REPLAYS)
    return statistics.median(samples)


def rank_main(rank: int, world: int) -> dict[str, Any]:
    import types

    import torch
    from suite_engine import BATCH_SIZES, Model, _kv_tokens

    import symm_rs
    from symm_rs.compat import sglang as sg
    from symm_rs_bench.launch import init_nccl

    group = init_nccl(rank, world)
    comm = symm_rs.Communicator.from_process_group(group, device=torch.device("cuda", rank))
    coordinator = types.SimpleNamespace(
        pynccl_comm=comm, world_size=world, unique_name="tp", cpu_group=group
    )
    model = Model(coordinator, comm, rank, world)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    graphs: dict[tuple[str, int], Any] = {}
    for kind in ("symm", "plain"):
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        sg.set_graph_pool_id(pool if kind == "symm" else None)
        with torch.cuda.stream(stream):
            for bs in BATCH_SIZES:
                x = torch.randint(-2, 3, (bs, 512), generator=gen, device="cuda").float()
                for _ in range(2):
                    torch.cuda.synchronize()
                    model.forward(x, kind == "symm", _kv_tokens(bs, world))
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    model.forward(x, kind == "symm", _kv_tokens(bs, world))
                graphs[(kind, bs)] = (graph, x)
        sg.set_graph_pool_id(None)
        symm_rs.register(coordinator)
    torch.cuda.synchronize()
    rows = []
    for bs in sorted(BATCH_SIZES):
        # Alternate the two so that drift in clocks or load hits both alike.
        plain = _time_replays(graphs[("plain", bs)][0])
        symm = _time_replays(graphs[("symm", bs)][0])
        rows.append({"batch_size": bs, "plain_us": plain, "symm_us": symm})
    # NCCL's communicator destruction waits for every graph that captured its collectives.
    del graphs, graph, x
    gc.collect()
    torch.cuda.synchronize()
    comm.close()
    symm_rs.release(group)
    torch.distributed.destroy_process_group()
    return {"rows": rows, "device": torch.cuda.get_device_name(rank)}


def _merge(per_rank: list[dict[str, Any]], world: int) -> dict[str, Any]:
    import torch

    import symm_rs

    rows = []
    for i, row in enumerate(per_rank[0]["rows"]):
        plain = max(r["rows"][i]["plain_us"] for r in per_rank)
        symm = max(r["rows"][i]["symm_us"] for r in per_rank)
        rows.append(
            {
                "batch_size": row["batch_size"],
                "plain_us": round(plain, 2),
                "symm_us": round(symm, 2),
                "symm_vs_plain": round(symm / plain - 1, 4),
            }
        )
    return {
        "benchmark": "decode_step",
        "what": "one decode step (2 TP layers: column/row-parallel matmuls, symmetric "
        "all-reduce, side-stream all-gather, CP KV all-gather) replayed as a CUDA graph; "
        "median of 5 x 200 replays per rank, then the max over ranks",
        "world_size": world,
        "device": per_rank[0]["device"],
        "torch": torch.__version__,
        "nccl": ".".join(map(str, symm_rs.library_info().version)),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }


def _plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        bs = [r["batch_size"] for r in result["rows"]]
        ws = result["world_size"]
        ax.plot(bs, [r["plain_us"] for r in result["rows"]], "o--", label=f"{ws} GPUs plain")
        ax.plot(bs, [r["symm_us"] for r in result["rows"]], "o-", label=f"{ws} GPUs symmetric")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode step (µs, graph replay)")
    ax.set_title(f"decode step, {results[0]['device']}, NCCL {results[0]['nccl']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    import torch

    from symm_rs_bench.launch import run_ranks

    results = []
    status = 0
    for world in args.world_sizes:
        if torch.cuda.device_count() < world:
            print(f"skipping {world} GPUs: {torch.cuda.device_count()} visible")
            continue
        outcomes = run_ranks(rank_main, world, timeout=300)
        if not all(ok for ok, _ in outcomes):
            print(f"decode_step on {world} GPUs failed: {[v for ok, v in outcomes if not ok]}")
            status = 1
            continue
        result = _merge([v for _, v in outcomes], world)
        results.append(result)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"decode_step_{world}gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
        for row in result["rows"]:
            print(world, row)
    if results:
        _plot(results, os.path.join(args.out, "decode_step.png"))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
