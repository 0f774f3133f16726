"""vLLM's ``pynccl_allocator`` API, backed by symm_rs (vLLM 0.33's public names).

Switch by changing one import::

    from symm_rs.compat.vllm import nccl_symm_mem_context, set_graph_pool_id  # was vLLM's

Differences from vLLM's module, all deliberate:

* ``compile_nccl_allocator`` compiles nothing (the allocator ships prebuilt) and cannot fail;
* registration is per communicator in symm_rs's segment table, not keyed by the unique id,
  and ``is_symmetric_memory_tensor`` asks that table (any tensor inside a pool segment), not a
  snapshot taken at the last exit;
* inside a CUDA-graph capture the buffers come from a symmetric pool private to the capture's
  graph pool (``set_graph_pool_id``), so no block a graph writes is handed to eager code;
* ``is_symmetric_memory_enabled`` reads ``VLLM_USE_NCCL_SYMM_MEM`` (through ``vllm.envs``
  when vLLM is importable), as vLLM does.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from symm_rs import context, pool

__all__ = [
    "compile_nccl_allocator",
    "get_nccl_mem_pool",
    "is_symmetric_memory_enabled",
    "is_symmetric_memory_tensor",
    "nccl_symm_mem_context",
    "set_graph_pool_id",
]


def is_symmetric_memory_enabled() -> bool:
    """``VLLM_USE_NCCL_SYMM_MEM`` (default off)."""
    try:
        import vllm.envs as envs  # type: ignore[import-not-found]
    except ImportError:
        return os.environ.get("VLLM_USE_NCCL_SYMM_MEM", "0").strip().lower() in ("1", "true")
    return bool(envs.VLLM_USE_NCCL_SYMM_MEM)


def is_symmetric_memory_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage comes from one of symm_rs's pools (``False`` when off)."""
    if not is_symmetric_memory_enabled():
        return False
    from symm_rs import _native

    return _native.segment_of(tensor.untyped_storage().data_ptr(), 1) is not None


def set_graph_pool_id(graph_pool_id: Any) -> None:
    """The graph pool of the captures that follow (``symm_rs.set_graph_pool``)."""
    context.set_graph_pool(graph_pool_id)


def compile_nccl_allocator() -> None:
    """Nothing to compile: symm_rs's allocator ships prebuilt."""


def get_nccl_mem_pool() -> torch.cuda.MemPool:
    """The shared symmetric ``MemPool`` of the current device."""
    return pool.shared_pool()


class nccl_symm_mem_context:
    """vLLM's context: allocate under ``pynccl_comm``'s symmetric memory, register on exit.
    A no-op (that still returns itself) when disabled, off, or for one rank, as vLLM's."""

    def __init__(self, pynccl_comm: Any, disabled: bool = False) -> None:
        self.pynccl_comm = pynccl_comm
        self.disabled = (
            disabled
            or not is_symmetric_memory_enabled()
            or getattr(pynccl_comm, "world_size", 2) == 1
            or not torch.cuda.is_available()
        )
        self._context = None if self.disabled else context.use_symmetric_memory(pynccl_comm)

    def __enter__(self) -> nccl_symm_mem_context:
        if self._context is not None:
            self._context.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self._context is not None:
            self._context.__exit__(exc_type, exc_val, exc_tb)
