"""SGLang's ``pynccl_allocator`` API, backed by symm_rs: every public name of SGLang 0.5.23's
``sglang.srt.distributed.device_communicators.pynccl_allocator``, with the same signatures.

Switch by changing one import::

    from symm_rs.compat.sglang import use_symmetric_memory, set_graph_pool_id  # was sglang's

The contract tests (tests/engines) check every import of and call into that module in SGLang's
own source against this one. Differences from SGLang's module, all deliberate (docs/engines.md):

* nothing is compiled at run time; registration is per communicator in symm_rs's segment table
  (a block reused under another group is registered with that group too), and is postponed
  until a CUDA-graph capture is over;
* inside a capture the buffers come from a symmetric pool private to the capture's graph pool
  (``set_graph_pool_id``), so no block a graph writes is handed to eager code;
* each set of ranks has its own pool (SGLang shares one between all groups): ``get_nccl_mem_pool``
  answers the pool of this thread's innermost (else last) context's group;
* ``is_tensor_in_symmetric_mempool`` answers ``True`` only for a tensor inside a registered
  window (of the innermost active context's group, when one is active), not for any pool block;
* ``disable_``/``restore_symmetric_memory_context`` act on this thread's innermost context (SGLang
  keeps one context per process);
* ``allocate_symmetric_buffer`` takes its buffer from the pool of ``comm``'s ranks: when the last
  view dies the block returns to that pool (still registered), not to the device;
* ``prealloc_symmetric_memory_pool`` is ``symm_rs.reserve`` on SGLang's TP group, sealed in
  symm_rs's sealed mode (``SYMM_RS_SEAL=1``);
* ``debug_check_symmetric_mempool`` warns as SGLang does, and raises with ``SYMM_RS_STRICT=1``;
* ``SymmetricMemoryContext.tag(tensor)`` (older SGLang) is kept as a no-op marker.

The enable flag is SGLang's own (``get_exec().comm.enable_symm_mem``, off while the server
arguments are not published); when SGLang's ``runtime_context`` cannot be imported the answer is
SGLang's default, off, unless ``set_symmetric_memory_enabled`` says otherwise.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
import threading
import traceback
import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional

import torch

import symm_rs
from symm_rs import context, env, watchdog
from symm_rs.compat import _common
from symm_rs.errors import SymmetricMemoryError

__all__ = [
    "SymmetricMemoryContext",
    "allocate_symmetric_buffer",
    "debug_check_symmetric_mempool",
    "describe_registration_in_progress",
    "disable_symmetric_memory_context",
    "get_nccl_mem_pool",
    "is_allocation_symmetric",
    "is_symmetric_memory_enabled",
    "is_tensor_in_symmetric_mempool",
    "prealloc_symmetric_memory_pool",
    "restore_symmetric_memory_context",
    "set_graph_pool_id",
    "set_symmetric_memory_enabled",
    "use_symmetric_memory",
]

log = logging.getLogger(__name__)

_enabled: Optional[bool] = None
_get_exec: Optional[Callable[[], Any]] = None
_import_failure_logged = False


def set_symmetric_memory_enabled(enabled: Optional[bool]) -> None:
    """Overrides ``is_symmetric_memory_enabled`` (``None``: ask SGLang again)."""
    global _enabled
    _enabled = enabled


def _engine_get_exec() -> Optional[Callable[[], Any]]:
    """SGLang's ``runtime_context.get_exec``, or ``None`` when it cannot be imported (then SGLang's
    default applies). Kept once found; a failure is retried, and logged once."""
    global _get_exec, _import_failure_logged
    if _get_exec is not None:
        return _get_exec
    try:
        from sglang.srt.runtime_context import get_exec  # type: ignore[import-not-found]
    except ImportError as e:
        if not _import_failure_logged:
            _import_failure_logged = True
            log.info("symmetric memory off (SGLang's default): sglang.srt.runtime_context: %s", e)
        return None
    _get_exec = get_exec
    return get_exec


def _sglang_installed() -> bool:
    if "sglang" in sys.modules:  # loaded (or, as None, marked unimportable)
        return sys.modules["sglang"] is not None
    try:
        return importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        return False


def is_symmetric_memory_enabled() -> bool:
    """SGLang's ``--enable-symm-mem`` as its runtime context holds it (``get_exec().comm``):
    off while the configuration is not published (SGLang's ``ValueError``), off when SGLang is
    installed but its ``runtime_context`` cannot be imported (SGLang's default), and whatever
    ``set_symmetric_memory_enabled`` set. Without SGLang at all (the shim used on its own, as
    symm_rs's engine suite and decode-step bench do) it is on. Any other error reading the flag
    propagates, as it does from SGLang's own function."""
    if _enabled is not None:
        return _enabled
    if not _sglang_installed():
        return True
    get_exec = _engine_get_exec()
    if get_exec is None:
        return False
    try:
        return bool(get_exec().comm.enable_symm_mem)
    except ValueError:
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


def _env_value(name: str, default: Any, parse: Callable[[str], Any]) -> Any:
    """SGLang's environment variable ``name``: read through SGLang's ``envs`` when it is
    importable, else parsed as SGLang's ``EnvField`` does (an invalid value warns and gives the
    default)."""
    try:
        from sglang.srt.environ import envs  # type: ignore[import-not-found]
    except ImportError:
        envs = None
    field = getattr(envs, name, None)
    if field is not None:
        return field.get()
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as e:
        warnings.warn(f'Invalid value for {name}: {e}, using default "{default}"', stacklevel=3)
        return default


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise ValueError(f'"{lowered}" is not a valid boolean value')


def _parse_int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f'"{value}" is not a valid integer value') from None


def set_graph_pool_id(graph_pool_id: Any) -> None:
    """The graph pool of the captures that follow (``symm_rs.set_graph_pool``)."""
    context.set_graph_pool(graph_pool_id)


def get_nccl_mem_pool() -> torch.cuda.MemPool:
    """The ``MemPool`` this thread's contexts allocate from outside CUDA-graph captures: the
    pool of the innermost active context's group, else of the last group a context of this
    thread used, else the device's any-group pool (its segments are registered by the next
    context exit of every group)."""
    active = _active.stack[-1].group_coordinator if _active.stack else None
    return _common.context_pool(active)


def is_tensor_in_symmetric_mempool(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage lies inside a registered symmetric window: of the innermost
    active context's group on this thread when one is active, else of any communicator."""
    return _common.storage_in_window(tensor)


def describe_registration_in_progress() -> Optional[str]:
    """The registrations running in this process (``symm_rs.watchdog``), or ``None`` when none
    is: SGLang's scheduler watchdog adds a line only for a value that is not ``None``."""
    return watchdog.describe_registration_in_progress() or None


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
        _common.note_group(self.group_coordinator)
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
    symmetric memory is off, ``disabled`` is set, or the group has one rank (as SGLang, which
    asks the enable flag first)."""
    off = (
        not is_symmetric_memory_enabled()
        or disabled
        or getattr(group_coordinator, "world_size", None) == 1
    )
    return nullcontext() if off else SymmetricMemoryContext(group_coordinator)


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


def allocate_symmetric_buffer(comm: Any, nbytes: int) -> tuple[torch.Tensor, bool]:
    """A zeroed ``uint8`` tensor of ``nbytes`` in symmetric memory registered on ``comm`` (a
    ``PyNcclCommunicator``; collective: every rank asks for the same size), and whether it lies
    in a symmetric window of ``comm``. Independent of the enable flag, as SGLang's.

    Raises:
        SymmetricMemoryError: called during a CUDA-graph capture, where registration cannot run.
    """
    if _common.capturing():
        raise SymmetricMemoryError(
            "allocate_symmetric_buffer registers its buffer, which cannot happen during a "
            "CUDA-graph capture; allocate it before capturing"
        )
    with context.use_symmetric_memory(comm):
        # The context runs this thread on the communicator's device.
        buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    buf.zero_()
    return buf, bool(context.is_registered(buf, comm))


_debug_seen: set[str] = set()


def debug_check_symmetric_mempool(
    group_coordinator: Any, tensors: dict[str, torch.Tensor], op_name: str
) -> None:
    """With ``SGLANG_DEBUG_SYMM_MEM=1`` and symmetric memory on: on the group's first rank, warns
    once per call stack about each tensor of ``tensors`` (argument name -> tensor) that lies
    outside the symmetric windows of ``group_coordinator``'s communicator, as SGLang does.
    ``SYMM_RS_STRICT=1`` raises instead.

    Raises:
        SymmetricMemoryError: a tensor is outside, and ``SYMM_RS_STRICT=1``.
    """
    if not _env_value("SGLANG_DEBUG_SYMM_MEM", False, _parse_bool):
        return
    if not is_symmetric_memory_enabled() or not group_coordinator.is_first_rank:
        return
    comm = _common.comm_of(group_coordinator)
    bad = [
        f"  - '{name}' (data_ptr=0x{tensor.untyped_storage().data_ptr():x}, "
        f"shape={list(tensor.shape)}, dtype={tensor.dtype})"
        for name, tensor in tensors.items()
        if not _common.storage_in_window(tensor, comm)
    ]
    if not bad:
        return
    frames = traceback.format_stack()
    if any("_flashinfer_autotune" in frame for frame in frames):
        return  # SGLang's autotuner runs collectives on scratch tensors on purpose
    stack = "".join(frames[:-1])
    message = (
        f"[SymmMem Debug] {op_name}: {len(bad)} tensor(s) are NOT in a symmetric window of "
        f"the group's communicator:\n" + "\n".join(bad)
    )
    if env.read_flag(env.STRICT):
        raise SymmetricMemoryError(f"{message}\n(SYMM_RS_STRICT=1 makes this an error)")
    key = f"{op_name}:{','.join(bad)}:{stack}"
    if key not in _debug_seen:
        _debug_seen.add(key)
        log.warning("%s\nStack trace:\n%s", message, stack)


def _seal() -> dict[str, bool]:
    """``seal=True`` for ``symm_rs.reserve`` in sealed mode (``SYMM_RS_SEAL=1``) where this
    symm_rs can seal a pool; else nothing: the pool grows at run time, as SGLang's does."""
    if "seal" not in inspect.signature(symm_rs.reserve).parameters:
        return {}
    return {"seal": True} if env.read_flag(getattr(env, "SEAL", "SYMM_RS_SEAL")) else {}


def prealloc_symmetric_memory_pool(
    *,
    is_draft_worker: bool,
    enable_symm_mem: bool,
    device: Any,
    forward_stream: Any,
    group: Any = None,
) -> None:
    """Grows the symmetric pool of SGLang's TP group (``get_tp_group()``, or ``group``) by
    ``SGLANG_SYMM_MEM_PREALLOC_GB_SIZE`` GiB on ``forward_stream``, registered at once, so that
    serving need not grow it (SGLang calls this after its CUDA-graph captures). Nothing for a
    draft worker, with symmetric memory off, or a size <= 0 (SGLang's default, -1). In sealed
    mode (``SYMM_RS_SEAL=1``) the pool is sealed (``symm_rs.reserve(..., seal=True)``): growing
    it later fails at once instead of registering at run time; otherwise it grows as SGLang's
    does. Collective over the group."""
    gib = _env_value("SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", -1, _parse_int)
    if is_draft_worker or not enable_symm_mem or gib <= 0:
        return
    if group is None:
        from sglang.srt.distributed.parallel_state import (  # type: ignore[import-not-found]
            get_tp_group,
        )

        group = get_tp_group()
    # SGLang allocates under use_symmetric_memory(tp_group), which the flag and a one-rank
    # group turn into plain memory: nothing to reserve then.
    if not is_symmetric_memory_enabled() or getattr(group, "world_size", None) == 1:
        return
    seal = _seal()
    log.info("reserving %d GiB of symmetric memory for SGLang's TP group", gib)
    # Blocks are cached per stream: reserve on the stream the forward passes allocate on.
    with torch.get_device_module(device).stream(forward_stream):
        symm_rs.reserve(gib << 30, group, **seal)
