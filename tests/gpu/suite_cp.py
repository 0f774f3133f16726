"""Context-parallel KV all-gather on real GPUs: cp = world size over NCCL (torch group and
symm_rs.Communicator), the Rust path against the torch path (eager, on a side stream and in
CUDA graphs), the Rust path's copy kernel against its driver copies on odd rows and unaligned
inputs, and a TP 2 x CP 2 layout on 4 GPUs where each rank uses two groups and the gathered
buffers are symmetric for the CP group (registered windows of it when the ranks share one GPU,
``--shared-gpu``, where NCCL runs no symmetric kernel)."""

from __future__ import annotations

import gc
import random
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import symm_rs
from symm_rs import cp as cp_module
from symm_rs import env
from symm_rs.cp import (
    cp_all_gather_reorganized_into_tensor_kv_cache,
    cp_all_gather_rerange_kv_cache,
    zigzag_layout,
    zigzag_split,
)

from harness import Ctx, needs

SHAPES = [(), (8, 128), (2, 3, 64)]


def _gather_in_python(*args: Any, **kwargs: Any) -> torch.Tensor:
    """The CP gather with every step in torch: the reference the Rust path is checked against."""
    return cp_module._gather(*args, native=False, **kwargs)


DTYPES = [torch.bfloat16, torch.float32]


def _batch(seed: int, cp: int) -> list[int]:
    rng = random.Random(seed)
    short = [rng.randint(0, 2 * cp - 1) for _ in range(3)]  # empty blocks
    return [*short, 1, *(rng.randint(1, 3000) for _ in range(rng.randint(1, 5)))]


def _kv(total: int, trailing: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    # On the current device, which the harness sets to the rank's (ctx.device).
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if not dtype.is_floating_point:
        return torch.randint(0, 100, (total, *trailing), generator=gen, device="cuda").to(dtype)
    return torch.randn((total, *trailing), generator=gen, device="cuda").to(dtype)


def _round_trips(ctx: Ctx, group: Any, cp: int, cp_rank: int, seed0: int) -> list[str]:
    """Zig-zag split of a known KV, gathered back over ``group``; mismatches collected so every
    rank issues the same collectives."""
    problems = []
    stream = torch.cuda.Stream()
    for case in range(6):
        lens = _batch(seed0 + case, cp)
        layout = zigzag_layout(lens, cp, device=ctx.device)
        trailing = SHAPES[case % len(SHAPES)]
        dtype = DTYPES[case % len(DTYPES)]
        full = _kv(sum(lens), trailing, dtype, seed=seed0 + case)  # same on every rank
        local = zigzag_split(full, layout, cp_rank)
        got = cp_all_gather_rerange_kv_cache(
            local, group, layout, stream=stream if case % 2 else None
        )
        torch.cuda.synchronize()
        if not torch.equal(got, full):
            problems.append(f"lens={lens} shape={trailing} {dtype}: gathered KV differs")
    return problems


def _gathered_in_window(ctx: Ctx, group: Any, cp: int, cp_rank: int) -> bool:
    """Whether the gather buffer is a window of ``group`` (``Ctx.in_window``: symmetric over
    NVLink, registered on a shared GPU)."""
    # Equal counts: the function returns the symmetric gather buffer itself.
    tokens = [16] * cp
    local = torch.full((16, 4, 32), float(cp_rank), device=ctx.device, dtype=torch.bfloat16)
    out = cp_all_gather_reorganized_into_tensor_kv_cache(local, group, tokens)
    expected = torch.arange(cp, device=ctx.device, dtype=torch.bfloat16).repeat_interleave(16)
    assert torch.equal(out[:, 0, 0], expected), "equal-count gather wrong"
    return ctx.in_window(out, group)


def case_cp_over_the_whole_world_torch_group(ctx: Ctx) -> None:
    problems = _round_trips(ctx, ctx.group, ctx.world_size, ctx.rank, seed0=100)
    symmetric = _gathered_in_window(ctx, ctx.group, ctx.world_size, ctx.rank)
    ctx.details.update(cp=ctx.world_size, problems=problems, gathered_symmetric=symmetric)
    assert not problems, problems
    assert symmetric, "the gathered buffer is not symmetric for the CP group"


def case_cp_over_a_symm_rs_communicator(ctx: Ctx) -> None:
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        problems = _round_trips(ctx, comm, comm.size, comm.rank, seed0=200)
        symmetric = _gathered_in_window(ctx, comm, comm.size, comm.rank)
    ctx.details.update(problems=problems, gathered_symmetric=symmetric)
    assert not problems, problems
    assert symmetric


@needs(4)
def case_tp2_by_cp2_two_groups_per_rank(ctx: Ctx) -> None:
    # Ranks 0,1 | 2,3 form TP groups; 0,2 | 1,3 form CP groups. Every rank creates every group.
    tp_groups = [dist.new_group(r, device_id=ctx.device) for r in ([0, 1], [2, 3])]
    cp_groups = [dist.new_group(r, device_id=ctx.device) for r in ([0, 2], [1, 3])]
    ctx._made.extend([tp_groups[ctx.rank // 2], cp_groups[ctx.rank % 2]])
    tp = tp_groups[ctx.rank // 2]
    cp = cp_groups[ctx.rank % 2]
    tp_rank, cp_rank = ctx.rank % 2, ctx.rank // 2

    with symm_rs.use_symmetric_memory(tp):
        hidden = torch.full((4096,), float(ctx.rank + 1), device=ctx.device, dtype=torch.bfloat16)
    dist.all_reduce(hidden, group=tp)

    problems = _round_trips(ctx, cp, 2, cp_rank, seed0=300 + ctx.rank % 2)
    cp_symmetric = _gathered_in_window(ctx, cp, 2, cp_rank)
    torch.cuda.synchronize()
    tp_sum = float(sum(r + 1 for r in range(4) if r // 2 == ctx.rank // 2))
    ctx.details.update(
        problems=problems,
        cp_gathered_symmetric=cp_symmetric,
        tp_buffer_symmetric_for_tp=ctx.in_window(hidden, tp),
        tp_rank=tp_rank,
        cp_rank=cp_rank,
    )
    assert torch.equal(hidden, torch.full_like(hidden, tp_sum)), "TP all-reduce wrong"
    ctx.expect_window(hidden, tp, "TP buffer (for the TP group)")
    assert not problems, problems
    assert cp_symmetric, "CP gathered buffer not symmetric for the CP group"


# (trailing shape, dtype): engine shapes (8 x 128 heads, 1 x 576 MLA), and odd 16-bit rows (2
# or 6 bytes) whose slots need alignment padding even when every rank holds as many tokens.
NATIVE_SHAPES = [
    ((8, 128), torch.bfloat16),
    ((1, 576), torch.bfloat16),
    ((), torch.bfloat16),
    ((3,), torch.float16),
    ((2, 3, 64), torch.float32),
]


def _native_counts(world: int) -> list[list[int]]:
    """Uneven (a middle rank short too), a rank with nothing, equal odd, equal aligned."""
    return [
        [1000 - 3 * r for r in range(world)],
        [5 if r % 2 else 0 for r in range(world)],
        [7] * world,
        [16] * world,
        [r + 1 for r in range(world)],
    ]


def _slices(counts: list[int], trailing: tuple[int, ...], dtype: torch.dtype, seed: int) -> list:
    return [_kv(n, trailing, dtype, seed=seed + r) for r, n in enumerate(counts)]


class _CountingNative:
    """Stands in for ``symm_rs.cp._native`` and counts the Rust gathers (the proof that the
    Rust path ran, not the torch fallback), with the copy mode each asked for and the one the
    core reports it used."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0
        self.modes: list[tuple[Any, str]] = []

    def __getattr__(self, name: str) -> Any:
        # Everything else cp.py asks of the core (its slot plan, ...) is the real one's.
        return getattr(self.real, name)

    def cp_all_gather(self, *args: Any, **kwargs: Any) -> str:
        self.calls += 1
        used = self.real.cp_all_gather(*args, **kwargs)
        self.modes.append((kwargs.get("copy"), used))
        return used


def _default_copy_mode() -> str:
    """What the Rust path uses when not told: ``SYMM_RS_CP_COPY``, else the kernel."""
    return env.read_choice(env.CP_COPY, env.CP_COPY_CHOICES)


def _input_at(rows: torch.Tensor, misalign: bool) -> torch.Tensor:
    """``rows`` copied into a fresh buffer, one row in when ``misalign`` (a contiguous view whose
    address is off by one row: the Rust path reads it in place, unaligned)."""
    skip = 1 if misalign else 0
    buffer = rows.new_empty((rows.shape[0] + skip, *rows.shape[1:]))
    view = buffer[skip:]
    view.copy_(rows)
    return view


def _graph_problems(
    group: Any,
    rank: int,
    counts: list[int],
    trailing: tuple,
    dtype: torch.dtype,
    seed: int,
    paths: Optional[dict[str, Callable[..., torch.Tensor]]] = None,
    misalign: bool = False,
) -> list[str]:
    """The paths (default: Rust and Python) captured in one CUDA graph (SGLang's way: warm-ups
    on the capture stream into a fresh graph pool set with ``graph_capture``), replayed on new
    inputs; exact on every rank."""
    problems = []
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    if paths is None:
        paths = {
            "rust": cp_all_gather_reorganized_into_tensor_kv_cache,
            "python": _gather_in_python,
        }
    static_in = _input_at(_slices(counts, trailing, dtype, seed)[rank], misalign)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(torch.cuda.current_stream())
    with symm_rs.graph_capture(pool), torch.cuda.stream(stream):
        for _ in range(2):
            for fn in paths.values():
                fn(static_in, group, counts)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outs = {name: fn(static_in, group, counts) for name, fn in paths.items()}
    torch.cuda.synchronize()
    symm_rs.register(group)  # anything the capture grew is registered now (collective)
    for replay in range(3):
        slices = _slices(counts, trailing, dtype, seed + 1000 * (replay + 1))
        static_in.copy_(slices[rank])
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.cat(slices)
        for name, out in outs.items():
            if not torch.equal(out, expected):
                problems.append(
                    f"graph {name} replay {replay} counts={counts} {trailing} {dtype}"
                    f"{' misaligned' if misalign else ''}"
                )
    # NCCL waits for graphs that captured its collectives before destroying a communicator,
    # and the capture pool cannot be freed while the outputs live.
    del graph, outs, out, static_in  # `out` still names the last output
    gc.collect()
    torch.cuda.synchronize()
    symm_rs.release_graph_pool(pool)
    return problems


def _native_matches_python(ctx: Ctx, group: Any, rank: int, world: int) -> None:
    problems: list[str] = []
    counting = _CountingNative(cp_module._native)
    cp_module._native = counting  # type: ignore[assignment]
    eager = graphs = 0
    try:
        side = torch.cuda.Stream()
        for c, counts in enumerate(_native_counts(world)):
            for s, (trailing, dtype) in enumerate(NATIVE_SHAPES):
                seed = 100 * c + 10 * s
                slices = _slices(counts, trailing, dtype, seed)
                expected = torch.cat(slices)
                for stream in (None, side):
                    rust = cp_all_gather_reorganized_into_tensor_kv_cache(
                        slices[rank], group, counts, stream=stream
                    )
                    python = _gather_in_python(slices[rank], group, counts, stream=stream)
                    torch.cuda.synchronize()
                    for name, out in (("rust", rust), ("python", python)):
                        if not torch.equal(out, expected):
                            problems.append(f"eager {name} counts={counts} {trailing} {dtype}")
                    eager += 1
                if c < 3 and s < 4:  # uneven, empty rank, equal odd; the 16-bit shapes
                    problems += _graph_problems(group, rank, counts, trailing, dtype, seed)
                    graphs += 1
    finally:
        cp_module._native = counting.real  # type: ignore[assignment]
    used = sorted({mode for _, mode in counting.modes})
    ctx.details.update(
        eager_cases=eager,
        graph_cases=graphs,
        rust_calls=counting.calls,
        copy_modes_used=used,
        problems=problems,
    )
    assert not problems, problems
    # Every eager case ran the Rust path once, and every graph case three times (two warm-ups
    # and the capture): no case fell back to the torch path.
    assert counting.calls == eager + 3 * graphs, counting.calls
    # ... and its copies went the default way (the kernel, unless SYMM_RS_CP_COPY says
    # otherwise): the kernel loaded on this GPU.
    assert used == [_default_copy_mode()], used


def case_rust_path_matches_python_path_torch_group(ctx: Ctx) -> None:
    _native_matches_python(ctx, ctx.group, ctx.rank, ctx.world_size)


def case_rust_path_matches_python_path_symm_rs_communicator(ctx: Ctx) -> None:
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        _native_matches_python(ctx, comm, comm.rank, comm.size)


# (trailing shape, dtype) for the copy modes: rows of 6, 5, 2 and 12 bytes (padded slots, and
# compaction copies that start at every alignment), and 2048-byte engine rows (16-byte units).
COPY_SHAPES = [
    ((3,), torch.bfloat16),
    ((5,), torch.uint8),
    ((), torch.float16),
    ((3,), torch.float32),
    ((8, 128), torch.bfloat16),
]


def _copy_counts(world: int) -> list[list[int]]:
    """[5, 0, 7, 1] repeated over the ranks (uneven, an empty rank), equal odd counts, and
    thousands of rows so the kernel runs many blocks."""
    pattern = [5, 0, 7, 1]
    return [
        [pattern[r % 4] + 8 * (r // 4) for r in range(world)],
        [3] * world,
        [4099 - 4098 * (r % 2) + 2 * r for r in range(world)],
    ]


def _copy_modes_match_torch(ctx: Ctx, group: Any, rank: int, world: int) -> None:
    """Each copy mode of the Rust path, eager (aligned and misaligned inputs, on a side stream)
    and in one CUDA graph together, against ``torch.cat`` of the slices: exact on every rank."""
    problems: list[str] = []
    counting = _CountingNative(cp_module._native)
    cp_module._native = counting  # type: ignore[assignment]

    def gather_with(copy: str) -> Callable[..., torch.Tensor]:
        def gather(input: torch.Tensor, group: Any, counts: list[int], stream: Any = None) -> Any:
            return cp_module._gather(input, group, counts, stream, False, native=True, copy=copy)

        return gather

    modes = {copy: gather_with(copy) for copy in env.CP_COPY_CHOICES}
    eager = graphs = 0
    try:
        side = torch.cuda.Stream()
        for c, counts in enumerate(_copy_counts(world)):
            for s, (trailing, dtype) in enumerate(COPY_SHAPES):
                seed = 5000 + 100 * c + 10 * s
                slices = _slices(counts, trailing, dtype, seed)
                expected = torch.cat(slices)
                for misalign, stream in ((False, None), (True, None), (True, side)):
                    source = _input_at(slices[rank], misalign)
                    for copy, gather in modes.items():
                        out = gather(source, group, counts, stream)
                        torch.cuda.synchronize()
                        if not torch.equal(out, expected):
                            problems.append(
                                f"eager {copy} counts={counts} {trailing} {dtype} "
                                f"misaligned={misalign} side_stream={stream is not None}"
                            )
                        eager += 1
                if c != 2:  # the graphs at the small counts
                    problems += _graph_problems(
                        group, rank, counts, trailing, dtype, seed, paths=modes, misalign=True
                    )
                    graphs += 1
    finally:
        cp_module._native = counting.real  # type: ignore[assignment]
    asked = {copy: sorted({used for a, used in counting.modes if a == copy}) for copy in modes}
    ctx.details.update(eager_calls=eager, graph_cases=graphs, modes_used=asked, problems=problems)
    assert not problems, problems
    # Every call took the Rust path (eager once, graphs twice warm and once captured, per mode)
    # and used the copies it asked for: the kernel loaded, and nothing fell back.
    assert counting.calls == eager + 3 * len(modes) * graphs, counting.calls
    assert asked == {"kernel": ["kernel"], "driver": ["driver"]}, asked


def case_copy_kernel_and_driver_copies_match_torch_torch_group(ctx: Ctx) -> None:
    _copy_modes_match_torch(ctx, ctx.group, ctx.rank, ctx.world_size)


def case_copy_kernel_and_driver_copies_match_torch_symm_rs_communicator(ctx: Ctx) -> None:
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as comm:
        _copy_modes_match_torch(ctx, comm, comm.rank, comm.size)
