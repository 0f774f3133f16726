"""``symm_rs.ops`` under ``torch.compile(fullgraph=True)`` and inside a replayed CUDA graph.

A small tensor-parallel block (column-parallel matmul, row-parallel matmul + all-reduce, an
all-gather feeding a reduce-scatter) calls the custom ops; compiled (inductor, or aot_eager when
inductor cannot be imported) and eager runs on the same inputs must agree exactly on every rank
(integer-valued data: the order of a sum cannot matter), and so must every replay of a CUDA graph
that captured the compiled block. The ops' outputs must lie in the communicator's windows
(symmetric ones; registered ones when the ranks share one GPU, ``--shared-gpu``).
"""

from __future__ import annotations

import gc
import importlib
import os
from typing import Any

import torch

import symm_rs
from symm_rs import ops

from harness import Ctx

HIDDEN = 256
FFN = 512
TOKENS = 16  # one shape throughout: no recompilation, least of all during a capture
REPLAYS = 4

_state: dict[str, Any] = {}


class Block(torch.nn.Module):
    """Each rank holds its shard of the weights; the input is the same on every rank."""

    def __init__(self, comm: symm_rs.Communicator) -> None:
        super().__init__()
        self.comm, self.rank = comm, comm.rank
        gen = torch.Generator(device=comm.device).manual_seed(1234 + self.rank)
        shard = FFN // comm.size
        w1 = torch.randint(-1, 2, (HIDDEN, shard), generator=gen, device=comm.device).float()
        w2 = torch.randint(-1, 2, (shard, HIDDEN), generator=gen, device=comm.device).float()
        self.register_buffer("w1", w1)
        self.register_buffer("w2", w2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.remainder(x @ self.w1, 5) - 2  # integer-valued, small
        y = ops.all_reduce(h @ self.w2, self.comm)
        y = torch.remainder(y, 5) - 2
        g = ops.all_gather(y + self.rank, self.comm)  # [ws * TOKENS, HIDDEN]
        return y, ops.reduce_scatter(g * (self.rank + 1), self.comm)


def setup_rank(rank: int, world_size: int) -> None:
    # The ranks are daemonic processes, which may not start inductor's compile-worker pool on
    # every torch: compile in-process (the block has a handful of kernels).
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    try:
        importlib.import_module("torch._inductor.config").compile_threads = 1
    except ImportError:
        pass


def _new_input(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(-2, 3, (TOKENS, HIDDEN), generator=gen, device=gen.device).float()


def _backend() -> str:
    try:
        importlib.import_module("torch._inductor.compile_fx")
        importlib.import_module("triton")
    except ImportError:
        return "aot_eager"
    return "inductor"


def _setup(ctx: Ctx) -> dict[str, Any]:
    if not _state:
        comm = symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device)
        block = Block(comm)
        backend = _backend()
        _state.update(
            comm=comm,
            block=block,
            backend=backend,
            compiled=torch.compile(block, fullgraph=True, backend=backend),
            gen=torch.Generator(device=ctx.device).manual_seed(99),  # same inputs on every rank
        )
    return _state


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def case_ops_eager_are_exact_and_symmetric(ctx: Ctx) -> None:
    s = _setup(ctx)
    comm, ws, rank = s["comm"], ctx.world_size, ctx.rank
    with torch.no_grad():
        x = _new_input(s["gen"]) + rank  # differs per rank
        reduced = ops.all_reduce(x, comm)
        gathered = ops.all_gather(x, comm)
        scattered = ops.reduce_scatter(gathered, comm, op="max")
    base = x - rank
    expected_reduced = ws * base + sum(range(ws))
    expected_gathered = torch.cat([base + r for r in range(ws)])
    expected_scattered = base + rank  # the max over ranks of the same gathered rows
    outputs = (reduced, gathered, scattered)
    torch.cuda.synchronize()
    symmetric = {
        name: ctx.in_window(t, comm)
        for name, t in zip(("all_reduce", "all_gather", "reduce_scatter"), outputs)
    }
    ctx.details.update(symmetric=symmetric)
    assert torch.equal(reduced, expected_reduced), "all_reduce"
    assert torch.equal(gathered, expected_gathered), "all_gather"
    assert torch.equal(scattered, expected_scattered), "reduce_scatter"
    assert all(symmetric.values()), symmetric


def case_compiled_fullgraph_matches_eager_exactly(ctx: Ctx) -> None:
    s = _setup(ctx)
    ctx.details["backend"] = s["backend"]
    wrong = []
    with torch.no_grad():
        for step in range(3):
            x = _new_input(s["gen"])
            eager = s["block"](x)
            compiled = s["compiled"](x)
            if not _same(eager, compiled):
                wrong.append(step)
            y, r = eager
            ws = ctx.world_size
            if not torch.equal(r, ws * (ws + 1) // 2 * (y + ctx.rank)):
                wrong.append(f"eager {step} differs from its formula")
    torch.cuda.synchronize()
    ctx.details.update(
        wrong=wrong,
        compiled_outputs_symmetric=[ctx.in_window(t, s["comm"]) for t in compiled],
    )
    assert not wrong, wrong


def case_compiled_block_replays_in_cuda_graph_exactly(ctx: Ctx) -> None:
    s = _setup(ctx)
    comm, compiled = s["comm"], s["compiled"]
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    static_in = _new_input(s["gen"])
    graph = torch.cuda.CUDAGraph()
    wrong = []
    with torch.no_grad():
        # Warm-ups on the capture stream, with the graph pool known: the ops' outputs come from
        # its symmetric pool and are registered, so the capture reuses registered memory.
        stream.wait_stream(torch.cuda.current_stream())
        with symm_rs.graph_capture(pool), torch.cuda.stream(stream):
            for _ in range(2):
                compiled(static_in)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                static_out = compiled(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        symm_rs.register(comm)  # anything the capture grew
        for step in range(REPLAYS):
            static_in.copy_(_new_input(s["gen"]))
            graph.replay()
            if not _same(static_out, s["block"](static_in)):
                wrong.append(step)
    torch.cuda.synchronize()
    ctx.details.update(
        backend=s["backend"],
        replays=REPLAYS,
        wrong=wrong,
        graph_outputs_symmetric=[ctx.in_window(t, comm) for t in static_out],
    )
    # NCCL's communicator destruction waits for every CUDA graph that captured its
    # collectives: drop the graph (and what refers to it) before closing.
    del graph, static_out
    _state.clear()
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.synchronize()
    comm.close()
    assert not wrong, f"replays {wrong} differ from eager"
