"""Context-parallel KV-cache all-gather into symmetric memory.

With context parallelism every rank of the CP group holds a slice of each sequence's KV cache;
attention needs the whole of it, so the ranks all-gather their slices. Ranks hold different
numbers of tokens, and an all-gather moves equal counts, so each rank pads its slice to the
longest one, the ranks gather, and the padding is dropped again. The gathered buffer is allocated
inside ``use_symmetric_memory(group)`` so NCCL can run its symmetric all-gather kernels (the
pattern of SGLang's ``cp_all_gather_reorganized_into_tensor_kv_cache``).

For load balance under causal attention the sequences are split zig-zag: ``2 * cp_size`` blocks
per sequence, rank ``r`` holding blocks ``r`` and ``2 * cp_size - 1 - r``. ``zigzag_layout``
describes that split, ``zigzag_split`` makes a rank's slice from the full KV, and
``cp_all_gather_rerange_kv_cache`` gathers the slices back into every sequence's token order.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from symm_rs import _native
from symm_rs.context import use_symmetric_memory
from symm_rs.groups import Group, peers, resolve

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


def _describe(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _as_int(name: str, value: object) -> int:
    # operator.index takes numpy and 0-d integer tensors too, but not floats or bools.
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, got {_describe(value)}") from None


def _check_counts(name: str, counts: Sequence[int], expected_len: int, what: str) -> list[int]:
    values = [_as_int(f"{name}[{i}]", n) for i, n in enumerate(counts)]
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
    return _gather(input, group, per_rank_tokens, stream, disabled, native=True)


def _gather_in_python(
    input: torch.Tensor,
    group: object,
    per_rank_tokens: Sequence[int],
    stream: Optional[torch.cuda.Stream] = None,
    disabled: bool = False,
) -> torch.Tensor:
    """``cp_all_gather_reorganized_into_tensor_kv_cache`` with every step in torch (the path
    before the Rust core did it): the reference of the GPU tests and benchmarks."""
    return _gather(input, group, per_rank_tokens, stream, disabled, native=False)


def _gather_with_driver_copies(
    input: torch.Tensor,
    group: object,
    per_rank_tokens: Sequence[int],
    stream: Optional[torch.cuda.Stream] = None,
    disabled: bool = False,
) -> torch.Tensor:
    """``cp_all_gather_reorganized_into_tensor_kv_cache`` with the Rust core's copies issued as
    driver copies and memsets instead of its copy kernel (as ``SYMM_RS_CP_COPY=driver`` makes
    every call): for benchmarks and tests that compare the two in one process."""
    return _gather(input, group, per_rank_tokens, stream, disabled, native=True, copy="driver")


def _slot_rows(max_len: int, row_bytes: int) -> int:
    """Rows per rank in the gathered buffer: ``max_len`` padded so that a slot is a multiple of
    16 bytes. NCCL 2.28's symmetric kernels give wrong results for 16-bit data whose per-rank
    size is not (measured on H100; see tests/gpu/results/suite_alignment_*); the padding never
    reaches the result. The Rust core applies the same rule (``_native.cp_plan``)."""
    align = 16 // math.gcd(row_bytes, 16) if row_bytes else 1
    return -(-max_len // align) * align


def _gather(
    input: torch.Tensor,
    group: object,
    per_rank_tokens: Sequence[int],
    stream: Optional[torch.cuda.Stream],
    disabled: bool,
    native: bool,
    copy: Optional[str] = None,
) -> torch.Tensor:
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

    slot = _slot_rows(max_len, math.prod(trailing) * input.element_size())
    with use_symmetric_memory(peer if peer.comm else group, disabled=disabled):
        gathered = torch.empty((slot * world, *trailing), dtype=input.dtype, device=input.device)
    compact = slot != max_len or any(c != max_len for c in counts)
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
    ``"kernel"`` or ``"driver"``, ``None`` for ``SYMM_RS_CP_COPY``'s choice."""
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
        copy=copy,
    )
    if stream is not None:
        current.wait_stream(stream)
    return gathered if output is None else output


@dataclass(frozen=True)
class ZigzagLayout:
    """Where each token of a batch lives under the zig-zag context-parallel split.

    Every sequence is cut into ``2 * cp_size`` blocks; rank ``r`` holds blocks ``r`` and
    ``2 * cp_size - 1 - r`` of every sequence, as all sequences' block ``r`` (in sequence order)
    followed by all sequences' block ``2 * cp_size - 1 - r``.

    Attributes:
        cp_size: ranks in the context-parallel group.
        seq_lens: tokens of each sequence, in batch order.
        block_lens: per sequence, the lengths of its ``2 * cp_size`` blocks.
        per_rank_tokens: tokens each rank holds.
        split_lens: lengths that cut the ranks' slices, concatenated in rank order, back into
            blocks: per rank, its first blocks (one per sequence) then its second blocks.
        restore_index: 1-D int64 index; ``gathered[restore_index]`` puts the ranks' slices
            concatenated in rank order back into token order, sequence after sequence.
    """

    cp_size: int
    seq_lens: tuple[int, ...]
    block_lens: tuple[tuple[int, ...], ...]
    per_rank_tokens: tuple[int, ...]
    split_lens: tuple[int, ...]
    # Derived from the fields above, and a tensor has no usable == or hash.
    restore_index: torch.Tensor = field(compare=False, repr=False)

    @property
    def num_blocks(self) -> int:
        """Blocks per sequence: ``2 * cp_size``."""
        return 2 * self.cp_size

    @property
    def total_tokens(self) -> int:
        """Tokens in the whole batch."""
        return sum(self.seq_lens)

    def rank_blocks(self, rank: int) -> tuple[int, int]:
        """The two block indices ``rank`` holds of every sequence."""
        return rank, self.num_blocks - 1 - rank


def _exclusive_cumsum(values: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(values, 0) - values


def zigzag_layout(
    seq_lens: Sequence[int],
    cp_size: int,
    device: Optional[Union[torch.device, str]] = None,
) -> ZigzagLayout:
    """Builds the zig-zag layout of a batch.

    Block ``i`` of a sequence of length ``L`` has ``L // (2 * cp_size)`` tokens, plus one when
    ``i < L % (2 * cp_size)``. Sequences shorter than ``2 * cp_size`` (some blocks empty) and
    empty sequences are allowed.

    Arguments:
        seq_lens: tokens of each sequence, in batch order (may be empty).
        cp_size: ranks in the context-parallel group.
        device: where to build ``restore_index`` (the KV's device saves a copy per gather).

    Returns:
        The layout.

    Raises:
        ValueError: ``cp_size < 1`` or a sequence length is negative or not an int.
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an int >= 1; got {cp_size!r}")
    lens = tuple(_as_int(f"seq_lens[{i}]", n) for i, n in enumerate(seq_lens))
    for i, length in enumerate(lens):
        if length < 0:
            raise ValueError(f"seq_lens[{i}] is {length}; sequence lengths must be >= 0")

    num_blocks = 2 * cp_size
    block_lens = tuple(
        tuple(
            length // num_blocks + (1 if i < length % num_blocks else 0) for i in range(num_blocks)
        )
        for length in lens
    )

    # Pieces in the order the gather delivers them: rank by rank, first blocks then second.
    piece_seq: list[int] = []
    piece_block: list[int] = []
    per_rank_tokens: list[int] = []
    for rank in range(cp_size):
        tokens = 0
        for block in (rank, num_blocks - 1 - rank):
            for seq in range(len(lens)):
                piece_seq.append(seq)
                piece_block.append(block)
                tokens += block_lens[seq][block]
        per_rank_tokens.append(tokens)
    split_lens = tuple(block_lens[s][b] for s, b in zip(piece_seq, piece_block))

    # Each (sequence, block) piece's offset in the gathered tokens, then per output token the
    # gathered position: piece start plus the token's offset inside its piece.
    table = torch.tensor(block_lens, dtype=torch.int64).reshape(len(lens), num_blocks)
    starts = torch.zeros_like(table)
    if split_lens:
        starts[torch.tensor(piece_seq), torch.tensor(piece_block)] = _exclusive_cumsum(
            torch.tensor(split_lens, dtype=torch.int64)
        )
    piece_lens = table.flatten()
    shift = starts.flatten() - _exclusive_cumsum(piece_lens)
    total = sum(lens)
    restore_index = torch.repeat_interleave(shift, piece_lens, output_size=total) + torch.arange(
        total, dtype=torch.int64
    )
    if device is not None:
        restore_index = restore_index.to(device)

    return ZigzagLayout(
        cp_size=cp_size,
        seq_lens=lens,
        block_lens=block_lens,
        per_rank_tokens=tuple(per_rank_tokens),
        split_lens=split_lens,
        restore_index=restore_index,
    )


def _check_rank(rank: int, layout: ZigzagLayout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < layout.cp_size:
        raise ValueError(f"rank must be an int in [0, {layout.cp_size}); got {rank!r}")


def zigzag_split(kv: torch.Tensor, layout: ZigzagLayout, rank: int) -> torch.Tensor:
    """One rank's slice of the full KV under ``layout``.

    Arguments:
        kv: the whole batch, shape ``[sum(seq_lens), *trailing]``, sequences concatenated.
        layout: the zig-zag layout of the batch.
        rank: the rank whose slice to return.

    Returns:
        Shape ``[layout.per_rank_tokens[rank], *trailing]``: every sequence's block ``rank``,
        then every sequence's block ``2 * cp_size - 1 - rank``. A fresh tensor.

    Raises:
        ValueError: ``rank`` is out of range, or ``kv`` does not hold ``sum(seq_lens)`` tokens.
    """
    _check_rank(rank, layout)
    if kv.dim() == 0 or kv.shape[0] != layout.total_tokens:
        got = "a 0-d tensor" if kv.dim() == 0 else f"{kv.shape[0]} tokens"
        raise ValueError(f"kv must hold sum(seq_lens) = {layout.total_tokens} tokens; got {got}")
    trailing = tuple(kv.shape[1:])
    if layout.per_rank_tokens[rank] == 0:
        return kv.new_empty((0, *trailing))
    flat = [n for blocks in layout.block_lens for n in blocks]
    pieces = torch.split(kv, flat, dim=0)
    num_blocks = layout.num_blocks
    nseq = len(layout.seq_lens)
    picked = [
        pieces[seq * num_blocks + block]
        for block in layout.rank_blocks(rank)
        for seq in range(nseq)
    ]
    return torch.cat(picked, dim=0)


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
