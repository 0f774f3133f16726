"""The zig-zag context-parallel split: for load balance under causal attention every sequence is
cut into ``2 * cp_size`` blocks, rank ``r`` holding blocks ``r`` and ``2 * cp_size - 1 - r``.
``zigzag_layout`` describes that split, ``zigzag_split`` makes a rank's slice from the full KV,
and the layout's ``restore_index`` puts gathered slices back in token order
(``symm_rs.cp.cp_all_gather_rerange_kv_cache``). Layout arithmetic only: no communication.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

__all__ = ["ZigzagLayout", "zigzag_layout", "zigzag_split"]


def describe(obj: object) -> str:
    """A type's full name, for messages."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def as_int(name: str, value: object) -> int:
    """``value`` as an int (numpy and 0-d integer tensors too, not floats or bools)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, got {describe(value)}") from None


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
    lens = tuple(as_int(f"seq_lens[{i}]", n) for i, n in enumerate(seq_lens))
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
