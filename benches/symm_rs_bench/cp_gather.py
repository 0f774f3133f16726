"""Section ``cp``: the context-parallel KV all-gather, four ways, side by side in one process.

* ``symm_rs``: ``cp_all_gather_reorganized_into_tensor_kv_cache``; Python allocates the
  symmetric gathered buffer and the compact result, the Rust core enqueues the copy into this
  rank's slot, the padding, the in-place ``ncclAllGather`` and the compaction on one stream
  (the copies as one launch of its batched copy kernel before the gather and one after).
* ``symm_rs_driver_copies``: the same Rust path with driver copies and memsets instead of the
  kernel (``SYMM_RS_CP_COPY=driver``; one CUDA-graph node per copy).
* ``symm_rs_python``: the same helper with every step in torch (its path before the Rust core).
* ``sglang``: the pattern engines use (SGLang's ``cp_all_gather_reorganized_into_tensor_kv_cache``
  on ordinary buffers): ``F.pad`` to the longest rank, ``torch.distributed.all_gather_into_tensor``
  into a fresh buffer, ``torch.cat`` of every rank's real rows.

Tokens per rank from ``cfg.cp_tokens``, uneven (rank ``r`` holds ``tokens - 3 r``, so every rank
after the first is padded), bf16 rows of 8 x 128 (heads x head_dim) and 1 x 576 (MLA). Each call
allocates its buffers, as the helpers do in an engine's forward. Eager: N back-to-back calls
between CUDA events (host-bound paths show their issue time); graph: replays of K captured
calls, each path in a graph pool of its own, captured on the warm-up's stream. Before timing,
the four outputs are checked equal on every rank.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import symm_rs
from symm_rs import cp
from symm_rs_bench.timing import Rank, time_eager, time_graph

SHAPES = ((8, 128), (1, 576))
PATHS = ("symm_rs", "symm_rs_driver_copies", "symm_rs_python", "sglang")
DTYPE = torch.bfloat16


def counts_for(tokens: int, world: int) -> list[int]:
    """Uneven counts, as a zig-zag split of odd lengths gives: rank ``r`` has ``tokens - 3 r``."""
    return [max(0, tokens - 3 * r) for r in range(world)]


def shape_name(trailing: tuple[int, ...]) -> str:
    """``(8, 128)`` -> ``"8x128"`` (a JSON-friendly row key)."""
    return "x".join(map(str, trailing))


def kv_slice(
    rank: int, tokens: int, trailing: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Rank ``rank``'s rows: small integers (exact in bf16) that differ between ranks, so any
    rank's result can be checked against every rank's slices."""
    numel = tokens * int(torch.Size(trailing).numel())
    values = torch.arange(numel, device=device) % 61 + 61 * (rank % 4)
    return values.to(DTYPE).view(tokens, *trailing)


def sglang_gather(x: torch.Tensor, group: Any, counts: list[int]) -> torch.Tensor:
    """SGLang's pad + all-gather + cat, on ordinary buffers."""
    max_len, world = max(counts), len(counts)
    pad = (0, 0) * (x.dim() - 1) + (0, max_len - x.shape[0])
    padded = F.pad(x, pad, mode="constant", value=0)
    gathered = x.new_empty((max_len * world, *x.shape[1:]))
    dist.all_gather_into_tensor(gathered, padded, group=group)
    by_rank = gathered.view(world, max_len, *x.shape[1:])
    return torch.cat([by_rank[r, :c] for r, c in enumerate(counts)], dim=0)


def paths(x: torch.Tensor, group: Any, counts: list[int]) -> dict[str, Callable[[], Any]]:
    """The calls to time, by path name: the public helper, its Rust path with driver copies and
    its torch path (``cp._gather``'s ``copy`` and ``native``), and SGLang's. Looked up when
    called, so a dry run can swap the helpers for stand-ins."""

    def helper(**how: Any) -> Any:
        if not how:
            return cp.cp_all_gather_reorganized_into_tensor_kv_cache(x, group, counts)
        return cp._gather(x, group, counts, **how)

    return {
        "symm_rs": helper,
        "symm_rs_driver_copies": functools.partial(helper, copy="driver"),
        "symm_rs_python": functools.partial(helper, native=False),
        "sglang": functools.partial(sglang_gather, x, group, counts),
    }


def _mismatches(calls: dict[str, Callable[[], Any]], expected: torch.Tensor) -> list[str]:
    """The paths whose result differs from ``expected`` (every path runs once on every rank)."""
    wrong = [name for name, fn in calls.items() if not torch.equal(fn(), expected)]
    torch.cuda.synchronize()
    return wrong


def _time_graph(r: Rank, fn: Callable[[], Any], estimate_s: float) -> dict[str, Any]:
    """``time_graph`` in a fresh graph pool, set for symm_rs's contexts; its capture pool is
    freed afterwards (the graph is gone by then)."""
    pool = torch.cuda.graph_pool_handle()
    with symm_rs.graph_capture(pool):
        row = time_graph(r, fn, estimate_s, pool=pool)
    torch.cuda.synchronize()
    try:
        symm_rs.release_graph_pool(pool)
    except symm_rs.SymmetricMemoryError as e:  # the pool stays; the timing is still good
        print(f"[rank {r.rank}] [cp] capture pool kept: {e}", flush=True)
    return row


def cp_gather(r: Rank) -> dict[str, Any]:
    """Rows of ``(tokens, shape, mode, path)`` with each rank's median µs per call."""
    rows, mismatches = [], []
    r.expect(len(r.cfg.cp_tokens) * len(SHAPES) * len(PATHS) * 2)  # eager and graph
    for tokens in r.cfg.cp_tokens:
        counts = counts_for(tokens, r.world)
        for trailing in SHAPES:
            slices = [kv_slice(q, n, trailing, r.device) for q, n in enumerate(counts)]
            calls = paths(slices[r.rank], r.group, counts)
            expected = torch.cat(slices)
            wrong = _mismatches(calls, expected)
            key = {"tokens": tokens, "shape": shape_name(trailing)}
            mismatches += [{**key, "path": name} for name in wrong]
            del slices, expected
            for path in PATHS:
                eager = time_eager(r, calls[path])
                estimate_s = eager.pop("estimate_s")
                graph = _time_graph(r, calls[path], estimate_s)
                for mode, row in (("eager", eager), ("graph", graph)):
                    rows.append({**key, "mode": mode, "path": path, **row})
                    label = f"{tokens} x {key['shape']} {path} {mode}"
                    r.step(f"{label}: {row['median_us']:.1f} us (rank 0)")
            del calls
    return {
        "rows": rows,
        "counts": "rank r holds tokens - 3 r",
        "dtype": "bfloat16",
        "mismatches": mismatches,  # this rank's (rank 0's in the JSON)
        "most_mismatches_on_a_rank": round(r.all_reduce(len(mismatches))),
    }
