"""Context-parallel KV-cache all-gather into symmetric memory.

With context parallelism every rank of the CP group holds a slice of each sequence's KV cache;
attention needs the whole of it, so the ranks all-gather their slices. Ranks hold different
numbers of tokens, and an all-gather moves equal counts, so each rank pads its slice to the
longest one, the ranks gather, and the padding is dropped again. The gathered buffer is allocated
inside ``use_symmetric_memory(group)`` so NCCL can run its symmetric all-gather kernels (the
pattern of SGLang's ``cp_all_gather_reorganized_into_tensor_kv_cache``).

For load balance under causal attention the sequences are split zig-zag (``symm_rs.zigzag``:
the layout, a rank's slice, the index that restores token order);
``cp_all_gather_rerange_kv_cache`` gathers the slices back into every sequence's token order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from symm_rs import _native, env
from symm_rs.context import use_symmetric_memory
from symm_rs.groups import Group, peers, resolve
from symm_rs.zigzag import ZigzagLayout, as_int, zigzag_layout, zigzag_split

__all__ = [
    "ZigzagLayout",
    "cp_all_gather_reorganized_into_tensor_kv_cache",
    "cp_all_gather_rerange_kv_cache",
    "zigzag_layout",
    "zigzag_split",
]


# The dtypes NCCL has a type for (the Rust core's table); others take the torch path.
_NCCL_DTYPES = frozenset(
    getattr(torch, name) for name in _native.NCCL_DTYPE_NAMES if hasattr(torch, name)
)


def _check_counts(name: str, counts: Sequence[int], expected_len: int, what: str) -> list[int]:
    values = [as_int(f"{name}[{i}]", n) for i, n in enumerate(counts)]
    if len(values) != expected_len:
        raise ValueError(f"{name} has {len(values)} entries; expected {expected_len} ({what})")
    for i, n in enumerate(values):
        if n < 0:
            raise ValueError(f"{name}[{i}] is {n}; token counts must be >= 0")
    return values


def cp_all_gather_reorganized_into_tensor_kv_cache(
    input: torch.Tensor,
    group: object,
    per_rank_tokens: Sequence[int],
    stream: Optional[torch.cuda.Stream] = None,
    disabled: bool = False,
) -> torch.Tensor:
    """All-gathers every rank's KV tokens, in rank order, through a symmetric buffer.

    Collective: every rank of ``group`` must call it with the same ``per_rank_tokens``.

    On an NCCL group with CUDA tensors Python only allocates the gathered buffer (inside
    ``use_symmetric_memory``) and the compact result; the Rust core then enqueues the copy into
    this rank's slot, the zeroed padding, the in-place all-gather and the compaction on one
    stream (a copy kernel launch before and after one ``ncclAllGather``, or driver copies with
    ``SYMM_RS_CP_COPY=driver``: capturable in a CUDA graph). Otherwise (``disabled=True``, CPU
    tensors, groups without a communicator) torch does the same steps.

    Arguments:
        input: this rank's tokens, shape ``[per_rank_tokens[rank], *trailing]``.
        group: any group ``use_symmetric_memory`` accepts (``symm_rs.groups.ACCEPTED``);
            with ``disabled=True`` also a ProcessGroup of any backend (gloo) or an object with
            ``all_gather_into_tensor(output, input, stream=None)``, ``.rank`` and ``.size``.
        per_rank_tokens: how many real tokens each rank holds, one entry per rank.
        stream: CUDA stream to run the all-gather on; it first waits for the current stream,
            and the current stream waits for it before the result is assembled. Ignored for
            CPU tensors.
        disabled: allocate the gathered buffer from the ordinary allocator (no GPU needed).

    Returns:
        Shape ``[sum(per_rank_tokens), *trailing]``: rank 0's tokens, then rank 1's, and so on.
        When no rank needed padding this is the gathered buffer itself (symmetric memory);
        otherwise a fresh tensor.

    Raises:
        TypeError: ``group`` is not a kind accepted (or, unless ``disabled``, not one
            ``use_symmetric_memory`` accepts).
        ValueError: ``per_rank_tokens`` does not have one int >= 0 per rank, ``input`` does
            not hold ``per_rank_tokens[rank]`` tokens, or this process is not in ``group``.
    """
    return _gather(input, group, per_rank_tokens, stream=stream, disabled=disabled)


def _gather(
    input: torch.Tensor,
    group: object,
    per_rank_tokens: Sequence[int],
    stream: Optional[torch.cuda.Stream] = None,
    disabled: bool = False,
    native: bool = True,
    copy: Optional[str] = None,
) -> torch.Tensor:
    """The gather behind ``cp_all_gather_reorganized_into_tensor_kv_cache``. ``native=False``
    does every step in torch (the path before the Rust core did it: the GPU tests' and the
    benchmarks' reference); ``copy`` overrides ``SYMM_RS_CP_COPY`` for the Rust path."""
    peer = peers(group)  # once per call; the context below reuses it
    rank, world = peer.rank, peer.size
    counts = _check_counts(
        "per_rank_tokens", per_rank_tokens, world, "one token count per rank of the group"
    )
    if input.dim() == 0:
        raise ValueError("input must have a token dimension (dim 0); got a 0-d tensor")
    if input.shape[0] != counts[rank]:
        raise ValueError(
            f"input has {input.shape[0]} tokens on rank {rank}; expected "
            f"per_rank_tokens[{rank}] = {counts[rank]}"
        )
    trailing = tuple(input.shape[1:])
    max_len = max(counts)
    if max_len == 0:
        # Every rank sees the same counts, so every rank skips the collective together.
        return input.new_empty((0, *trailing))

    # The Rust core's plan (one slot rule for both paths): slots padded to 16 bytes, where NCCL
    # 2.28's symmetric kernels are right for 16-bit data (tests/gpu/results/suite_alignment_*).
    slot, compaction = _native.cp_plan(rank, counts, math.prod(trailing) * input.element_size())
    with use_symmetric_memory(peer if peer.comm else group, disabled=disabled):
        gathered = torch.empty((slot * world, *trailing), dtype=input.dtype, device=input.device)
    compact = bool(compaction)
    if native and not disabled and input.is_cuda and input.dtype in _NCCL_DTYPES:
        # A ProcessGroup's communicator is known once the context above has resolved it.
        nccl = peer if peer.comm else resolve(group)
        if nccl is not None and nccl.comm:
            return _gather_native(input, gathered, nccl, counts, trailing, compact, stream, copy)

    # Gather in place: this rank's padded slice lives inside the gathered buffer, so both NCCL
    # buffers lie in the symmetric window (symmetric kernels need both) and no second
    # allocation is made. torch and NCCL accept an input that is the rank's slice of the output.
    local = gathered.narrow(0, rank * slot, slot)
    n = counts[rank]
    local[:n].copy_(input)
    # Padding never reaches the result; zeroing it keeps the buffer deterministic.
    local[n:].zero_()

    side = stream if stream is not None and input.is_cuda else None
    if side is not None:
        current = torch.cuda.current_stream(input.device)
        side.wait_stream(current)
        # The buffers are used on the side stream: keep the allocator from reusing them early.
        gathered.record_stream(side)
        peer.all_gather_into_tensor(gathered, local, side)
        current.wait_stream(side)
    else:
        peer.all_gather_into_tensor(gathered, local, None)

    if not compact:
        return gathered
    by_rank = gathered.view(world, slot, *trailing)
    return torch.cat([by_rank[r, :c] for r, c in enumerate(counts)], dim=0)


def _gather_native(
    input: torch.Tensor,
    gathered: torch.Tensor,
    group: Group,
    counts: list[int],
    trailing: tuple[int, ...],
    compact: bool,
    stream: Optional[torch.cuda.Stream],
    copy: Optional[str],
) -> torch.Tensor:
    """The gather enqueued by the Rust core on one stream, into ``gathered`` and (when some rank
    is padded) a compact result from the ordinary allocator: it leaves the symmetric window,
    which only the collective needs, and is as long-lived as the caller makes it. ``copy``:
    ``"kernel"`` or ``"driver"``, ``None`` for ``SYMM_RS_CP_COPY``'s choice (read at each
    call)."""
    total = sum(counts)
    output = input.new_empty((total, *trailing)) if compact else None
    source = input if input.is_contiguous() else input.contiguous()
    current = torch.cuda.current_stream(input.device)
    run_on = current if stream is None else stream
    if stream is not None:
        stream.wait_stream(current)
        # The buffers are used on the side stream: keep the allocator from reusing them early.
        for t in (gathered, source, output):
            if t is not None:
                t.record_stream(stream)
    _native.cp_all_gather(
        group.comm,
        group.rank,
        gathered,
        source,
        output,
        counts,
        (run_on.cuda_stream, run_on.device.index),
        copy=env.read_cp_copy() if copy is None else copy,
    )
    if stream is not None:
        current.wait_stream(stream)
    return gathered if output is None else output


def cp_all_gather_rerange_kv_cache(
    input: torch.Tensor,
    group: object,
    layout: ZigzagLayout,
    stream: Optional[torch.cuda.Stream] = None,
    disabled: bool = False,
) -> torch.Tensor:
    """All-gathers zig-zag split KV and returns it in every sequence's token order.

    Collective: every rank of ``group`` must call it with the same layout.

    Arguments:
        input: this rank's slice (``zigzag_split(kv, layout, rank)``), shape
            ``[layout.per_rank_tokens[rank], *trailing]``.
        group: as for ``cp_all_gather_reorganized_into_tensor_kv_cache``.
        layout: the batch's zig-zag layout; ``layout.cp_size`` must be the group's size.
        stream: CUDA stream for the all-gather (ignored for CPU tensors).
        disabled: allocate the gathered buffer from the ordinary allocator.

    Returns:
        Shape ``[sum(layout.seq_lens), *trailing]``: the sequences' tokens in order, sequence
        after sequence, as the unsplit KV.

    Raises:
        TypeError: ``group`` is not a kind accepted.
        ValueError: the layout was built for another group size, or ``input`` does not hold
            ``layout.per_rank_tokens[rank]`` tokens.
    """
    world = peers(group).size
    if layout.cp_size != world:
        raise ValueError(
            f"layout was built for cp_size={layout.cp_size}, but the group has {world} ranks"
        )
    gathered = cp_all_gather_reorganized_into_tensor_kv_cache(
        input, group, layout.per_rank_tokens, stream=stream, disabled=disabled
    )
    index = layout.restore_index.to(gathered.device)
    return gathered.index_select(0, index)
