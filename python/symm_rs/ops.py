"""The Communicator's collectives as torch custom ops, for ``torch.compile`` and CUDA graphs.

    y = symm_rs.ops.all_reduce(x, comm)          # torch.ops.symm_rs.all_reduce(x, comm.comm, "sum")
    g = symm_rs.ops.all_gather(x, comm)          # [comm.size * x.shape[0], *x.shape[1:]]
    r = symm_rs.ops.reduce_scatter(g, comm)      # [g.shape[0] // comm.size, *g.shape[1:]]

Each op is out-of-place (it returns a new tensor and mutates nothing) and has a fake
implementation that only computes the output's shape, so dynamo and AOTAutograd trace a model
that calls them without a graph break (``fullgraph=True``), and inductor calls them as extern
kernels. A Communicator is not a value an op can take, so the schema carries its ``ncclComm_t``
address (an int, a constant of the compiled graph) and the world size (for the fake shapes); the
real implementation finds the live Communicator by its address.

Outputs are allocated, by default, inside ``use_symmetric_memory(communicator)``: they lie in the
communicator's windows, so a collective that consumes another's output (an all-gather feeding a
reduce-scatter) runs NCCL's symmetric kernels without a copy. Inside a CUDA-graph capture that
needs the capture's graph pool (``symm_rs.graph_capture(pool)`` around ``torch.cuda.graph(g,
pool=pool)``, or a torch that reports the capturing graph); without it the op raises
``SymmetricMemoryError`` naming the fix, as the context does, rather than silently leaving the
windows. ``set_output_memory("plain")`` allocates outputs with plain ``torch.empty`` instead
(e.g. for ``torch.compile(mode="reduce-overhead")``, whose captures use a pool of inductor's own).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Protocol

import torch

from symm_rs import _native
from symm_rs.context import use_symmetric_memory

# The reductions, as the Rust core names them (one table: ``collective.rs``).
OPS: tuple[str, ...] = _native.REDUCE_OPS
_OUTPUT_MEMORY = ("symmetric", "plain")

_output_memory = "symmetric"


class CommunicatorLike(Protocol):
    """What the ops need of a communicator: ``symm_rs.Communicator`` is one."""

    @property
    def comm(self) -> int: ...

    @property
    def size(self) -> int: ...

    def all_reduce(
        self, tensor: torch.Tensor, op: str = ..., out: Optional[torch.Tensor] = ...
    ) -> torch.Tensor: ...

    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor) -> None: ...

    def reduce_scatter_tensor(
        self, out: torch.Tensor, inp: torch.Tensor, op: str = ...
    ) -> None: ...


# -- the live communicators, by address -----------------------------------------------------

# Weak: the registry never keeps a communicator (and its windows) alive. A new communicator
# that NCCL gives a dead one's address replaces it.
_live: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def remember(communicator: CommunicatorLike) -> int:
    """Makes ``communicator`` reachable from the ops by its address; returns the address.
    Every ``symm_rs.Communicator`` is remembered when it is created."""
    address = int(communicator.comm)
    _live[address] = communicator
    return address


def lookup(comm: int, where: str, world_size: Optional[int] = None) -> CommunicatorLike:
    """The live communicator at address ``comm``, checked against the op's ``world_size``
    when it has one (``where`` names the op in errors).

    Raises:
        ValueError: no live communicator there, it is closed, or its size differs.
    """
    found = _live.get(comm)
    if found is None:
        raise ValueError(
            f"{where}: no live symm_rs.Communicator has address {comm:#x}; create it with "
            "symm_rs.Communicator (or pass one to symm_rs.ops.*) and keep it alive while the "
            "compiled model runs (torch.distributed ProcessGroups are not supported here)"
        )
    if getattr(found, "closed", False):
        raise ValueError(f"{where}: the communicator at address {comm:#x} is closed")
    if world_size is not None and found.size != world_size:
        raise ValueError(
            f"{where}: world_size={world_size}, but the communicator at {comm:#x} has "
            f"{found.size} ranks; pass its .size"
        )
    return found


# -- output memory --------------------------------------------------------------------------


def set_output_memory(kind: str) -> str:
    """Where the ops allocate their outputs: ``"symmetric"`` (default; in the communicator's
    windows) or ``"plain"`` (``torch.empty``). Read when an op runs, so it applies to models
    compiled before the call too. Returns the previous setting.

    Raises:
        ValueError: unknown kind.
    """
    global _output_memory
    if kind not in _OUTPUT_MEMORY:
        raise ValueError(f"kind must be one of {_OUTPUT_MEMORY}; got {kind!r}")
    previous, _output_memory = _output_memory, kind
    return previous


def _empty(communicator: CommunicatorLike, like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if _output_memory == "plain":
        return like.new_empty(shape)
    # A one-rank communicator has no windows: nothing to register, and nothing NCCL calls.
    with use_symmetric_memory(communicator, disabled=communicator.size == 1):
        return like.new_empty(shape)


# -- argument checks shared by the fake and real implementations ----------------------------


def _check_op(op: str, where: str) -> None:
    if op not in OPS:
        raise ValueError(f"{where}: op must be one of {OPS}; got {op!r}")


def _check_world(x: torch.Tensor, world_size: int, where: str) -> None:
    if world_size < 1:
        raise ValueError(f"{where}: world_size must be >= 1; got {world_size}")
    if x.dim() == 0:
        raise ValueError(f"{where}: x must have at least one dimension (ranks split dim 0)")


def _gathered_shape(x: torch.Tensor, world_size: int) -> list[int]:
    _check_world(x, world_size, "symm_rs::all_gather")
    return [world_size * x.shape[0], *x.shape[1:]]


def _scattered_shape(x: torch.Tensor, world_size: int, op: str) -> list[int]:
    where = "symm_rs::reduce_scatter"
    _check_op(op, where)
    _check_world(x, world_size, where)
    if x.shape[0] % world_size:
        raise ValueError(
            f"{where}: x.shape[0]={x.shape[0]} is not divisible by world_size={world_size}; "
            "pad dim 0 to a multiple of the world size"
        )
    return [x.shape[0] // world_size, *x.shape[1:]]


# -- the ops --------------------------------------------------------------------------------
# Explicit schemas: ``int`` rather than the ``SymInt`` an annotation would give, so an address
# is never made symbolic.


@torch.library.custom_op(
    "symm_rs::all_reduce", mutates_args=(), schema="(Tensor x, int comm, str op) -> Tensor"
)
def _all_reduce(x: torch.Tensor, comm: int, op: str) -> torch.Tensor:
    _check_op(op, "symm_rs::all_reduce")
    communicator = lookup(comm, "symm_rs::all_reduce")
    x = x.contiguous()
    out = _empty(communicator, x, list(x.shape))
    communicator.all_reduce(x, op=op, out=out)  # out of place: NCCL reads x, writes out
    return out


@_all_reduce.register_fake
def _all_reduce_fake(x: torch.Tensor, comm: int, op: str) -> torch.Tensor:
    _check_op(op, "symm_rs::all_reduce")
    return x.new_empty(x.shape)


@torch.library.custom_op(
    "symm_rs::all_gather", mutates_args=(), schema="(Tensor x, int comm, int world_size) -> Tensor"
)
def _all_gather(x: torch.Tensor, comm: int, world_size: int) -> torch.Tensor:
    shape = _gathered_shape(x, world_size)
    communicator = lookup(comm, "symm_rs::all_gather", world_size)
    x = x.contiguous()
    out = _empty(communicator, x, shape)
    communicator.all_gather_into_tensor(out, x)
    return out


@_all_gather.register_fake
def _all_gather_fake(x: torch.Tensor, comm: int, world_size: int) -> torch.Tensor:
    return x.new_empty(_gathered_shape(x, world_size))


@torch.library.custom_op(
    "symm_rs::reduce_scatter",
    mutates_args=(),
    schema="(Tensor x, int comm, int world_size, str op) -> Tensor",
)
def _reduce_scatter(x: torch.Tensor, comm: int, world_size: int, op: str) -> torch.Tensor:
    shape = _scattered_shape(x, world_size, op)
    communicator = lookup(comm, "symm_rs::reduce_scatter", world_size)
    x = x.contiguous()
    out = _empty(communicator, x, shape)
    communicator.reduce_scatter_tensor(out, x, op=op)
    return out


@_reduce_scatter.register_fake
def _reduce_scatter_fake(x: torch.Tensor, comm: int, world_size: int, op: str) -> torch.Tensor:
    return x.new_empty(_scattered_shape(x, world_size, op))


# -- what models call -----------------------------------------------------------------------


def all_reduce(x: torch.Tensor, comm: CommunicatorLike, op: str = "sum") -> torch.Tensor:
    """``x`` reduced across ``comm``'s ranks, in a new tensor (``torch.ops.symm_rs.all_reduce``).
    Traceable by ``torch.compile(fullgraph=True)``; capturable in CUDA graphs."""
    return torch.ops.symm_rs.all_reduce(x, comm.comm, op)


def all_gather(x: torch.Tensor, comm: CommunicatorLike) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order, in a new tensor."""
    return torch.ops.symm_rs.all_gather(x, comm.comm, comm.size)


def reduce_scatter(x: torch.Tensor, comm: CommunicatorLike, op: str = "sum") -> torch.Tensor:
    """``x`` reduced across ranks; this rank keeps its block of dim 0 (``x.shape[0]`` must be
    a multiple of ``comm.size``), in a new tensor."""
    return torch.ops.symm_rs.reduce_scatter(x, comm.comm, comm.size, op)


__all__ = [
    "OPS",
    "CommunicatorLike",
    "all_gather",
    "all_reduce",
    "lookup",
    "reduce_scatter",
    "remember",
    "set_output_memory",
]
