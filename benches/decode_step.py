"""Decode-step benchmark: the engine-shaped TP stack of tests/gpu/suite_engine.py, captured as
CUDA graphs for batch sizes 1-64 on symmetric buffers (through symm_rs.compat.sglang) and on
plain buffers, replayed side by side in the same processes. A third option, what a user would
pick instead: the same step on plain buffers with its all-reduce through PyTorch's own symmetric
memory (torch.distributed._symmetric_memory; a copy into its buffer, the one-shot or two-shot
kernel, a copy out, as SGLang's and vLLM's torch symm-mem communicators do), checked exact
against the plain step first; recorded as {"unavailable": reason} where this torch lacks it.
Writes benches/results/decode_step_<N>gpu.json and decode_step.png.

    python benches/decode_step.py --world-sizes 2 4 [--out benches/results]
"""

from __future__ import annotations

import argparse
import functools
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
TORCH_PATHS = ("torch_one_shot", "torch_two_shot")


class TorchSymmAllReduce:
    """The communicator the model sees on the torch path: all-reduce through a buffer of
    PyTorch's symmetric memory (``path``: one-shot or two-shot kernel), everything else (the
    all-gathers) through ``comm``. It has no ``comm`` attribute, so symm_rs's CP gather treats
    it as a group that only gathers."""

    def __init__(self, comm: Any, buf: Any, group_name: str, path: str) -> None:
        from symm_rs_bench.torch_symm import symm_op

        self.inner, self.buf, self.group_name, self.path = comm, buf, group_name, path
        self.device, self.rank, self.size = comm.device, comm.rank, comm.size
        symm_op("one_shot_all_reduce" if path == "torch_one_shot" else "two_shot_all_reduce_")

    def all_reduce(self, tensor: Any) -> Any:
        from symm_rs_bench.torch_symm import one_shot_call, two_shot_call

        flat, buf = tensor.view(-1), self.buf[: tensor.numel()]
        buf.copy_(flat)
        if self.path == "torch_one_shot":
            one_shot_call(buf, flat, self.group_name)()
        else:
            two_shot_call(buf, self.group_name)()
            flat.copy_(buf)
        return tensor

    def all_gather_into_tensor(self, out: Any, inp: Any, stream: Any = None) -> None:
        self.inner.all_gather_into_tensor(out, inp, stream=stream)


def _agree(group: Any, fn: Any) -> tuple[Any, Any]:
    """``(fn(), None)``, or ``(None, reason)`` when it raised on any rank (agreed over the
    group, so every rank takes the same branch)."""
    import torch

    try:
        value, error = fn(), None
    except Exception as e:  # a baseline this torch lacks becomes "unavailable"
        value, error = None, f"{type(e).__name__}: {e}".strip()[:400]
    flag = torch.tensor([float(error is not None)], device="cuda")
    torch.distributed.all_reduce(flag, group=group)
    if flag.item():
        return None, error or "raised on another rank"
    return value, None


def _check_torch_step(model: Any, comm: Any, proxy: Any, x: Any, kv: list[int]) -> None:
    """One eager step through ``proxy`` against the plain step: exact, or AssertionError."""
    import torch

    want = model.forward(x, False, kv)
    model.comm = proxy
    try:
        got = model.forward(x, False, kv)
    finally:
        model.comm = comm
    torch.cuda.synchronize()
    if not torch.equal(got, want):
        raise AssertionError(f"batch {x.shape[0]}: not exact against the plain step")


def _capture_torch_step(
    model: Any, comm: Any, proxy: Any, x: Any, kv: list[int], pool: Any, stream: Any
) -> Any:
    """The step through ``proxy`` captured as the plain and symm steps are (warm-ups first)."""
    import torch

    model.comm = proxy
    try:
        with torch.cuda.stream(stream):
            for _ in range(2):
                torch.cuda.synchronize()
                model.forward(x, False, kv)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                model.forward(x, False, kv)
    finally:
        model.comm = comm
    return graph


def _torch_graphs(
    model: Any, comm: Any, group: Any, gen: Any, world: int
) -> tuple[dict[tuple[str, int], Any], dict[str, Any]]:
    """The torch paths' graphs, captured like the plain ones, each batch size checked exact
    against the plain step first; ``({(path, bs): (graph, x)}, {path: status})``."""
    import torch
    from suite_engine import BATCH_SIZES, HIDDEN, _kv_tokens

    from symm_rs.compat import sglang as sg
    from symm_rs_bench.torch_symm import rendezvous, symm_mem_module

    def allocate() -> Any:
        buf = symm_mem_module().empty(max(BATCH_SIZES) * HIDDEN, dtype=torch.float32, device="cuda")
        rendezvous(buf, group.group_name)
        return buf

    buf, why = _agree(group, allocate)
    graphs: dict[tuple[str, int], Any] = {}
    status: dict[str, Any] = {}
    sg.set_graph_pool_id(None)
    for path in TORCH_PATHS:
        if why is not None:
            status[path] = {"unavailable": why}
            continue
        make = functools.partial(TorchSymmAllReduce, comm, buf, group.group_name, path)
        proxy, error = _agree(group, make)
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        for bs in BATCH_SIZES if error is None else ():
            x = torch.randint(-2, 3, (bs, 512), generator=gen, device="cuda").float()
            step = (model, comm, proxy, x, _kv_tokens(bs, world))
            _, error = _agree(group, functools.partial(_check_torch_step, *step))
            if error is None:
                capture = functools.partial(_capture_torch_step, *step, pool, stream)
                graph, error = _agree(group, capture)
            if error is not None:
                break
            graphs[(path, bs)] = (graph, x)
        if error is not None:
            graphs = {k: v for k, v in graphs.items() if k[0] != path}
        status[path] = {"unavailable": error} if error is not None else {"checked": True}
    torch.cuda.synchronize()
    return graphs, status


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
    torch_graphs, torch_status = _torch_graphs(model, comm, group, gen, world)
    rows = []
    for bs in sorted(BATCH_SIZES):
        # Alternate the two so that drift in clocks or load hits both alike.
        plain = _time_replays(graphs[("plain", bs)][0])
        symm = _time_replays(graphs[("symm", bs)][0])
        rows.append({"batch_size": bs, "plain_us": plain, "symm_us": symm})
        for path in TORCH_PATHS:
            if (path, bs) in torch_graphs:
                rows[-1][f"{path}_us"] = _time_replays(torch_graphs[(path, bs)][0])
    # NCCL's communicator destruction waits for every graph that captured its collectives.
    del graphs, graph, x, torch_graphs
    gc.collect()
    torch.cuda.synchronize()
    comm.close()
    symm_rs.release(group)
    torch.distributed.destroy_process_group()
    return {"rows": rows, "device": torch.cuda.get_device_name(rank), "torch_symm": torch_status}


def merge_rows(per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each batch size's latencies, the maximum over ranks; a torch path's only where every
    rank timed it."""
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
        for path in TORCH_PATHS:
            key = f"{path}_us"
            if all(key in r["rows"][i] for r in per_rank):
                rows[-1][key] = round(max(r["rows"][i][key] for r in per_rank), 2)
    return rows


def _merge(per_rank: list[dict[str, Any]], world: int) -> dict[str, Any]:
    import torch

    import symm_rs

    rows = merge_rows(per_rank)
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
        # Rank 0's word on each torch path: {"checked": true} or {"unavailable": reason}.
        "torch_symm": per_rank[0].get("torch_symm", {}),
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
        for path in TORCH_PATHS:
            key = f"{path}_us"
            points = [(r["batch_size"], r[key]) for r in result["rows"] if key in r]
            if points:
                ax.plot(*zip(*points), "s:", label=f"{ws} GPUs {path.replace('_', ' ')}")
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

    from symm_rs_bench.launch import multicast_off, run_ranks

    multicast_off()  # before any rank starts: no multicast object in NCCL, torch or NVSHMEM

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
