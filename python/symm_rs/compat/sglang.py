"""SGLang's ``pynccl_allocator`` API, backed by symm_rs (SGLang 0.5.23's public names).

Switch by changing one import::

    from symm_rs.compat.sglang import use_symmetric_memory, set_graph_pool_id  # was sglang's

Differences from SGLang's module, all deliberate:

* nothing is compiled at run time, and registration is per communicator in symm_rs's segment
  table (a block reused under another group is registered with that group too);
* inside a CUDA-graph capture the buffers come from a symmetric pool private to the capture's
  graph pool (``set_graph_pool_id``), not from the shared pool: no block a graph writes is ever
  handed to eager code, and side streams forked in the capture stay in the graph's memory;
* ``is_symmetric_memory_enabled`` asks SGLang's server arguments when SGLang is importable;
  outside SGLang it answers ``set_symmetric_memory_enabled``'s setting (default: enabled);
* ``is_allocation_symmetric`` is SGLang's (``sglang.srt.layers.dp_attention``) when SGLang is
  importable, else ``True`` (every rank allocates the same sizes);
* ``SymmetricMemoryContext.tag(tensor)`` (older SGLang) is kept as a no-op marker.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Optional

import torch

from symm_rs import context, pool

__all__ = [
    "SymmetricMemoryContext",
    "disable_symmetric_memory_context",
    "get_nccl_mem_pool",
    "is_allocation_symmetric",
    "is_symmetric_memory_enabled",
    "is_tensor_in_symmetric_mempool",
    "restore_symmetric_memory_context",
    "set_graph_pool_id",
    "set_symmetric_memory_enabled",
    "use_symmetric_memory",
]

_enabled: Optional[bool] = None


def set_symmetric_memory_enabled(enabled: Optional[bool]) -> None:
    """Overrides ``is_symmetric_memory_enabled`` (``None``: ask SGLang again)."""
    global _enabled
    _enabled = enabled


def is_symmetric_memory_enabled() -> bool:
    """SGLang's ``--enable-symm-mem`` when SGLang is importable, else the setting of
    ``set_symmetric_memory_enabled`` (enabled by default)."""
    if _enabled is not None:
        return _enabled
    try:
        from sglang.srt.server_args import get_global_server_args  # type: ignore[import-not-found]
    except ImportError:
        return True
    try:
        return bool(get_global_server_args().enable_symm_mem)
    except (ValueError, AttributeError):
        return False


def is_allocation_symmetric() -> bool:
    """Whether every rank allocates identical sizes (SGLang's DP-attention rule)."""
    try:
        from sglang.srt.layers.dp_attention import (  # type: ignore[import-not-found]
            is_allocation_symmetric as sglang_rule,
        )
    except ImportError:
        return True
    return bool(sglang_rule())


def set_graph_pool_id(graph_pool_id: Any) -> None:
    """The graph pool of the captures that follow (``symm_rs.set_graph_pool``)."""
    context.set_graph_pool(graph_pool_id)


def get_nccl_mem_pool() -> torch.cuda.MemPool:
    """The shared symmetric ``MemPool`` of the current device."""
    return pool.shared_pool()


def is_tensor_in_symmetric_mempool(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage comes from one of symm_rs's pools."""
    from symm_rs import _native

    return _native.segment_of(tensor.untyped_storage().data_ptr(), 1) is not None


class _Active(threading.local):
    def __init__(self) -> None:
        self.stack: list[SymmetricMemoryContext] = []


_active = _Active()


class SymmetricMemoryContext:
    """SGLang's context class: ``symm_rs.use_symmetric_memory(group_coordinator)``, re-entrant
    after exit (``disable_``/``restore_symmetric_memory_context`` exit and re-enter it)."""

    def __init__(self, group_coordinator: Any) -> None:
        self.group_coordinator = group_coordinator
        self._context = context.use_symmetric_memory(group_coordinator)

    def __enter__(self) -> SymmetricMemoryContext:
        self._context.__enter__()
        _active.stack.append(self)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if _active.stack and _active.stack[-1] is self:
            _active.stack.pop()
        self._context.__exit__(exc_type, exc_val, exc_tb)

    def tag(self, tensor: torch.Tensor) -> None:
        """Older SGLang's marker: ``tensor.symmetric_memory = True``."""
        tensor.symmetric_memory = True  # type: ignore[attr-defined]


def use_symmetric_memory(
    group_coordinator: Any, disabled: bool = False
) -> AbstractContextManager[Any]:
    """A ``SymmetricMemoryContext`` for ``group_coordinator``, or ``nullcontext()`` when
    symmetric memory is off, ``disabled`` is set, or the group has one rank (as SGLang)."""
    world_size = getattr(group_coordinator, "world_size", None)
    if disabled or not is_symmetric_memory_enabled() or world_size == 1:
        return nullcontext()
    return SymmetricMemoryContext(group_coordinator)


def disable_symmetric_memory_context() -> Optional[SymmetricMemoryContext]:
    """Exits this thread's innermost active context and returns it (``None`` if none), so
    that code in between allocates from the ordinary allocator."""
    if not _active.stack:
        return None
    saved = _active.stack[-1]
    saved.__exit__(None, None, None)
    return saved


def restore_symmetric_memory_context(saved_context: Optional[SymmetricMemoryContext]) -> None:
    """Re-enters a context ``disable_symmetric_memory_context`` returned."""
    if saved_context is not None:
        saved_context.__enter__()
