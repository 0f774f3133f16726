"""An engine-shaped end-to-end run through the SGLang shim (``symm_rs.compat.sglang``).

A tensor-parallel layer stack (column-parallel matmul, row-parallel matmul whose output is
all-reduced in a symmetric buffer, an all-gather on a side stream overlapped with compute, and
the CP KV all-gather) is captured as decode graphs for batch sizes 64 down to 1 into one shared
graph pool, as SGLang captures them (the graph pool is set once, warm-ups run on the capture
stream before each capture). Then 1,000+ steps mix eager prefill of varying size, graph replays
and long-lived eager allocations made between them. Every step's output is compared exactly with
the same model run on plain buffers (integer-valued data: reduction order cannot matter), every
long-lived tensor is checked for being overwritten by replays, and NCCL's own tuning log must
show the captured all-reduces ran symmetric kernels. With ranks sharing one GPU
(``--shared-gpu``) all of it runs but that last check: there the communicator must hold
registered windows and NCCL must log no symmetric kernel.
"""

from __future__ import annotations

import gc
import os
import random
import types
from typing import Any

import torch

import symm_rs
from symm_rs.compat import sglang as sg

from harness import Ctx, log_nccl_to, nccl_log_of_this_process

HIDDEN = 512
INTERMEDIATE = 1024
LAYERS = 2
KV_WIDTH = 64
BATCH_SIZES = [64, 32, 16, 8, 4, 2, 1]  # captured largest first, as engines do
STEPS = 1000
LOG_DIR = os.environ.get("SYMM_RS_ENGINE_LOG_DIR", "/tmp/symm_rs_engine_nccl_log")


def setup_rank(rank: int, world_size: int) -> None:
    trace_after = os.environ.get("SYMM_RS_TRACE_AFTER")
    if trace_after:  # where a hang is: every thread's stack after that many seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(trace_after), exit=True)
    log_nccl_to(LOG_DIR)


def _symmetric_lines(since: int) -> tuple[int, list[str]]:
    path = nccl_log_of_this_process(LOG_DIR)
    if path is None:
        return since, []
    with open(path, errors="replace") as f:
        lines = f.read().splitlines()
    return len(lines), [line for line in lines[since:] if "Bytes ->" in line]


class Model:
    """TP over the communicator: column-parallel, integer activation, row-parallel + all-reduce,
    a side-stream all-gather overlapped with the second matmul, and the CP KV all-gather."""

    def __init__(self, coordinator: Any, comm: symm_rs.Communicator, rank: int, ws: int) -> None:
        self.coordinator, self.comm, self.rank, self.ws = coordinator, comm, rank, ws
        on = self.device = comm.device
        gen = torch.Generator(device=on)
        gen.manual_seed(1234 + rank)  # each rank holds its own shard
        shard = INTERMEDIATE // ws
        self.w1 = [
            torch.randint(-1, 2, (HIDDEN, shard), generator=gen, device=on).float()
            for _ in range(LAYERS)
        ]
        self.w2 = [
            torch.randint(-1, 2, (shard, HIDDEN), generator=gen, device=on).float()
            for _ in range(LAYERS)
        ]
        self.side = torch.cuda.Stream()

    def forward(self, x: torch.Tensor, symmetric: bool, kv_tokens: list[int]) -> torch.Tensor:
        disabled = not symmetric
        outputs = []
        for layer in range(LAYERS):
            h = torch.remainder(x @ self.w1[layer], 5) - 2  # integer-valued, small
            # The side stream gathers this rank's slice of h while the main stream multiplies.
            cur = torch.cuda.current_stream()
            self.side.wait_stream(cur)
            with torch.cuda.stream(self.side):
                with sg.use_symmetric_memory(self.coordinator, disabled=disabled):
                    piece = torch.empty(h.shape[0], 8, device=self.device)
                    gathered = torch.empty(h.shape[0] * self.ws, 8, device=self.device)
                piece.copy_(h[:, :8])
                self.comm.all_gather_into_tensor(gathered, piece, stream=self.side)
                summary = gathered.view(self.ws, h.shape[0], 8).sum(0)
                del piece  # a temporary freed inside the capture, on the side stream
            with sg.use_symmetric_memory(self.coordinator, disabled=disabled):
                y = torch.empty(h.shape[0], HIDDEN, device=self.device)
            torch.matmul(h, self.w2[layer], out=y)
            self.comm.all_reduce(y)
            cur.wait_stream(self.side)
            x = torch.remainder(y, 5) - 2
            outputs.append(summary)
        # CP: every rank's KV rows for this step (uneven counts), gathered in rank order.
        kv = torch.remainder(x[: kv_tokens[self.rank], :KV_WIDTH] + self.rank, 7)
        full = symm_rs.cp_all_gather_reorganized_into_tensor_kv_cache(
            kv.contiguous(), self.comm, kv_tokens, disabled=disabled
        )
        return torch.cat([x.flatten(), torch.cat(outputs).flatten(), full.flatten()])


def _kv_tokens(bs: int, ws: int) -> list[int]:
    return [max(0, bs - r) for r in range(ws)]


def case_engine_decode_graphs_and_mixed_steps_are_exact(ctx: Ctx) -> None:
    ws = ctx.world_size
    comm = symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device)
    coordinator = types.SimpleNamespace(
        pynccl_comm=comm, world_size=ws, unique_name="tp", cpu_group=ctx.group
    )
    assert sg.is_symmetric_memory_enabled()
    model = Model(coordinator, comm, ctx.rank, ws)
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(99)  # the same inputs on every rank

    def new_input(bs: int) -> torch.Tensor:
        return torch.randint(-2, 3, (bs, HIDDEN), generator=gen, device=ctx.device).float()

    # -- capture, as SGLang does: one pool, set once, warm-ups on the capture stream ----------
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
    symmetric_lines_per_bs: dict[int, int] = {}
    log_at, _ = _symmetric_lines(0)
    sg.set_graph_pool_id(pool)
    with torch.cuda.stream(stream):
        for bs in BATCH_SIZES:
            static_in = new_input(bs)
            for _ in range(2):
                torch.cuda.synchronize()
                model.forward(static_in, True, _kv_tokens(bs, ws))
            torch.cuda.synchronize()
            log_at, _ = _symmetric_lines(log_at)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                static_out = model.forward(static_in, True, _kv_tokens(bs, ws))
            torch.cuda.synchronize()
            log_at, captured = _symmetric_lines(log_at)
            symmetric_lines_per_bs[bs] = sum("AllReduce [Symmetric]" in line for line in captured)
            graphs[bs] = (graph, static_in, static_out)
    sg.set_graph_pool_id(None)
    symm_rs.register(coordinator)  # anything a capture grew is registered now

    # -- 1,000+ steps: replays, eager prefill, long-lived eager tensors in between -------------
    rng = random.Random(7)
    side = torch.cuda.Stream()
    long_lived: list[tuple[torch.Tensor, float]] = []
    symmetric_long_lived: list[torch.Tensor] = []
    wrong = torch.zeros((), dtype=torch.int64, device=ctx.device)
    kinds = {"replay": 0, "prefill": 0, "allocation": 0}
    for step in range(STEPS):
        roll = rng.random()
        if roll < 0.6:
            bs = rng.choice(BATCH_SIZES)
            graph, static_in, static_out = graphs[bs]
            static_in.copy_(new_input(bs))
            graph.replay()
            expected = model.forward(static_in, False, _kv_tokens(bs, ws))
            wrong += (static_out != expected).any()
            kinds["replay"] += 1
        elif roll < 0.85:
            tokens = rng.randint(1, 96)
            x = new_input(tokens)
            wrong += (
                model.forward(x, True, _kv_tokens(tokens, ws))
                != model.forward(x, False, _kv_tokens(tokens, ws))
            ).any()
            kinds["prefill"] += 1
        else:
            # Long-lived tensors of many sizes, symmetric and plain, on three streams: any block
            # a graph writes that were handed out here would be overwritten by later replays.
            where = rng.choice([torch.cuda.current_stream(), stream, side])
            with torch.cuda.stream(where):
                size = rng.choice([256, 4096, 65536, 1 << 20])
                value = float(step % 97)
                if rng.random() < 0.5:
                    with sg.use_symmetric_memory(coordinator):
                        t = torch.full((size,), value, device=ctx.device)
                    symmetric_long_lived.append(t)
                else:
                    t = torch.full((size,), value, device=ctx.device)
            long_lived.append((t, value))
            kinds["allocation"] += 1
    torch.cuda.synchronize()
    overwritten = sum(int(not bool((t == value).all())) for t, value in long_lived)
    outside = sum(int(not ctx.in_window(t, comm)) for t in symmetric_long_lived)
    windows = {c.comm: c.windows for c in symm_rs.stats().communicators}.get(comm.comm, 0)

    _, tail = _symmetric_lines(0)
    ctx.details.update(
        steps=STEPS,
        kinds=kinds,
        wrong_steps=int(wrong.item()),
        long_lived=len(long_lived),
        overwritten=overwritten,
        symmetric_all_reduce_lines_per_captured_bs=symmetric_lines_per_bs,
        tuning_log_lines=len(tail),
        symmetric_long_lived=len(symmetric_long_lived),
        symmetric_long_lived_outside_windows=outside,
        communicator_windows=windows,
        capture_pools=len([k for k in symm_rs.pool._pools.capture]),
    )
    assert int(wrong.item()) == 0, f"{int(wrong.item())} steps differ from the plain-buffer model"
    assert overwritten == 0, f"{overwritten} long-lived tensors were overwritten by replays"
    # NCCL >= 2.29 answers NULL windows between the NCCL hosts of a shared GPU: plain memory.
    assert (windows > 0 or ctx.nccl_refused(comm)) and outside == 0, (windows, outside)
    if ctx.shared_gpu:  # different NCCL hosts: no symmetric kernel can run
        assert not any(symmetric_lines_per_bs.values()), symmetric_lines_per_bs
    elif ctx.rank == 0:  # NCCL >= 2.28 logs symmetric kernels on rank 0 only
        assert tail, "NCCL wrote no tuning log"
        missing = [bs for bs, n in symmetric_lines_per_bs.items() if n < LAYERS]
        assert not missing, f"captured all-reduces without a symmetric kernel at bs {missing}"
    # NCCL's communicator destruction waits for every CUDA graph that captured its collectives:
    # drop them all (the loop variables hold the last one) before closing it.
    del graphs, graph, static_in, static_out
    gc.collect()
    torch.cuda.synchronize()
    comm.close()


def case_capture_without_a_known_pool_raises_naming_the_fix(ctx: Ctx) -> None:
    if hasattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph"):
        ctx.details["skipped"] = "this torch reports the capturing graph itself"
        return
    sg.set_graph_pool_id(None)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    message = ""
    with torch.cuda.stream(stream):
        try:
            with torch.cuda.graph(graph, stream=stream):
                with symm_rs.use_symmetric_memory(ctx.group):
                    pass
        except symm_rs.SymmetricMemoryError as e:
            message = str(e)
        except RuntimeError as e:  # the capture itself is invalidated by the exception
            message = message or str(e)
    ctx.details["message"] = message[:300]
    assert "set_graph_pool" in message, message
