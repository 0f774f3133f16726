"""vLLM's ``pynccl_allocator`` API, backed by symm_rs: every public name of vLLM 0.34's
``vllm.distributed.device_communicators.pynccl_allocator``, with the same signatures.

Switch by changing one import::

    from symm_rs.compat.vllm import nccl_symm_mem_context, set_graph_pool_id  # was vLLM's

The contract tests (tests/engines) check every import of and call into that module in vLLM's own
source against this one. Differences from vLLM's module, all deliberate (docs/engines.md):

* ``compile_nccl_allocator`` compiles nothing (the allocator ships prebuilt);
* registration is per communicator in symm_rs's segment table, not keyed by the unique id, and
  waits until a CUDA-graph capture is over; ``is_symmetric_memory_tensor`` answers ``True`` only
  for a tensor inside a registered window (of the innermost active context's communicator, when
  one is active), not for any block of the last pool snapshot;
* inside a capture the buffers come from a symmetric pool private to the capture's graph pool,
  so no block a graph writes is handed to eager code. vLLM sets that pool only at capture time
  (``compilation/cudagraph_pool.py``): the buffers the *first* capture into a graph pool
  allocates inside ``nccl_symm_mem_context`` are new segments of that private pool, registered
  only once the capture is over, so that graph's collectives on them run NCCL's ordinary kernels
  (results are the same). ``set_graph_pool_id`` registers what earlier captures could not, so
  every later capture reuses registered blocks; ``symm_rs.reserve(n, pynccl_comm,
  graph_pool=pool)`` before the first capture makes its buffers symmetric too;
* ``is_symmetric_memory_enabled`` is ``VLLM_USE_NCCL_SYMM_MEM`` (through ``vllm.envs`` when vLLM
  is importable, parsed as vLLM does otherwise) on CUDA platforms only, from the first call
  (vLLM's turns off on other platforms once its allocator failed to compile).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Optional

import torch

from symm_rs import context
from symm_rs.compat import _common

__all__ = [
    "compile_nccl_allocator",
    "get_nccl_mem_pool",
    "is_symmetric_memory_enabled",
    "is_symmetric_memory_tensor",
    "nccl_symm_mem_context",
    "set_graph_pool_id",
]

_failed_to_compile = False


def _env_enabled() -> bool:
    try:
        import vllm.envs as envs  # type: ignore[import-not-found]
    except ImportError:
        # vLLM's own parse: "1"/"0", and a ValueError for anything else.
        return bool(int(os.getenv("VLLM_USE_NCCL_SYMM_MEM", "0")))
    return bool(envs.VLLM_USE_NCCL_SYMM_MEM)


def _platform_is_cuda() -> bool:
    """vLLM's ``current_platform.is_cuda()``; without vLLM, a CUDA build of torch with a GPU."""
    try:
        from vllm.platforms import current_platform  # type: ignore[import-not-found]
    except ImportError:
        return torch.version.hip is None and torch.cuda.is_available()
    return bool(current_platform.is_cuda())


def is_symmetric_memory_enabled() -> bool:
    """``VLLM_USE_NCCL_SYMM_MEM`` (default off), on a CUDA platform."""
    return _env_enabled() and not _failed_to_compile and _platform_is_cuda()


def is_symmetric_memory_tensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage lies inside a registered symmetric window (of the innermost
    active context's communicator on this thread when one is active, else of any); ``False``
    when symmetric memory is off."""
    if not is_symmetric_memory_enabled():
        return False
    return _common.storage_in_window(tensor)


# The communicators this process's contexts used, in first-use order (weakly held).
_comms: weakref.WeakKeyDictionary[Any, None] = weakref.WeakKeyDictionary()


def set_graph_pool_id(graph_pool_id: Any) -> None:
    """The graph pool of the captures that follow (``symm_rs.set_graph_pool``). vLLM calls this
    just before each capture, on every rank in the same order: what earlier captures could not
    register is registered here (``symm_rs.register`` on each communicator the contexts used;
    nothing to do costs no exchange), so that this capture reuses registered blocks."""
    context.set_graph_pool(graph_pool_id)
    if not _common.capturing():
        for comm in list(_comms):
            context.register(comm)


def compile_nccl_allocator() -> None:
    """Nothing to compile: symm_rs's allocator ships prebuilt. On a platform that is not CUDA,
    symmetric memory turns off, as vLLM's does when this fails there."""
    global _failed_to_compile
    if not _platform_is_cuda():
        _failed_to_compile = True


def get_nccl_mem_pool() -> Optional[torch.cuda.MemPool]:
    """The ``MemPool`` this thread's contexts allocate from outside CUDA-graph captures (that
    of the innermost active context's communicator, else of the last one a context of this
    thread used, else the device's any-group pool); ``None`` off CUDA platforms, as vLLM's."""
    if _failed_to_compile or not _platform_is_cuda():
        return None
    active = _active.stack[-1].pynccl_comm if _active.stack else None
    return _common.context_pool(active)


class _Active(threading.local):
    def __init__(self) -> None:
        self.stack: list[nccl_symm_mem_context] = []


_active = _Active()


class nccl_symm_mem_context:
    """vLLM's context: allocate under ``pynccl_comm``'s symmetric memory, register on exit.
    A no-op (that still returns itself) when disabled, off, or for one rank, as vLLM's."""

    def __init__(self, pynccl_comm: Any, disabled: bool = False) -> None:
        self.disabled = (
            disabled
            or not is_symmetric_memory_enabled()
            or getattr(pynccl_comm, "world_size", None) == 1
            or not torch.cuda.is_available()
        )
        self.pynccl_comm: Any = None if self.disabled else pynccl_comm
        self.is_graph_capture: Optional[bool] = None
        self.device: Optional[int] = None
        self._context: Any = None
        if not self.disabled:
            self._context = context.use_symmetric_memory(pynccl_comm)
            self.is_graph_capture = _common.capturing()
            self.device = torch.cuda.current_device()

    def __enter__(self) -> nccl_symm_mem_context:
        if self._context is not None:
            self._context.__enter__()
            _active.stack.append(self)
            _common.note_group(self.pynccl_comm)
            _comms.setdefault(self.pynccl_comm)
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self._context is None:
            return
        if _active.stack and _active.stack[-1] is self:
            _active.stack.pop()
        self._context.__exit__(exc_type, exc_val, exc_tb)
