"""Turning the many kinds of "group" engines pass around into one NCCL communicator.

Accepted, in the order they are tried:

* a ``torch.distributed.ProcessGroup`` with an NCCL backend (its communicator comes from
  ``comm_ptr()``/``_comm_ptr()``, torch >= 2.8; created eagerly here if torch has not yet);
* an object with ``.pynccl_comm.comm`` (SGLang's ``GroupCoordinator``);
* an object with ``.comm`` holding a ``ctypes.c_void_p`` or an ``int`` (vLLM's and SGLang's
  ``PyNcclCommunicator``, and ``symm_rs.Communicator``);
* a raw ``int`` ncclComm_t address.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any, Optional

from symm_rs import _native
from symm_rs.library import library_info

ACCEPTED = (
    "a torch.distributed ProcessGroup with an NCCL backend, a symm_rs.Communicator, an object "
    "with .comm (ctypes.c_void_p or int, e.g. PyNcclCommunicator) or .pynccl_comm.comm (e.g. "
    "SGLang's GroupCoordinator), or a raw int ncclComm_t"
)


@dataclass(frozen=True)
class ResolvedGroup:
    """A group reduced to what symm_rs needs: its communicator and its size."""

    comm: int
    size: int
    description: str


def _describe(group: object) -> str:
    return f"{type(group).__module__}.{type(group).__qualname__}"


def _as_address(value: object, where: str) -> int:
    if isinstance(value, ctypes.c_void_p):
        value = value.value or 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where} must be a ctypes.c_void_p or an int, got {_describe(value)}")
    if value <= 0:
        raise ValueError(
            f"{where} is {value:#x}: not a live ncclComm_t (is the communicator initialised?)"
        )
    return value


def _process_group_type() -> Optional[type]:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return dist.ProcessGroup if dist.is_available() else None


_PROCESS_GROUP = _process_group_type()


def _is_process_group(group: object) -> bool:
    return _PROCESS_GROUP is not None and isinstance(group, _PROCESS_GROUP)


def _process_group_size(group: Any) -> int:
    return int(group.size())


def _process_group_comm(group: Any) -> int:
    import torch

    if not torch.cuda.is_available():
        raise _native.SymmetricMemoryError(
            "symmetric memory needs a CUDA GPU, and torch sees none; "
            "pass disabled=True to run this code path without one"
        )
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        backend = group._get_backend(device)
    except RuntimeError as e:
        raise TypeError(
            f"ProcessGroup {_group_name(group)} has no backend for {device}: {e}. "
            "Symmetric memory needs an NCCL process group"
        ) from None
    getter = getattr(backend, "comm_ptr", None) or getattr(backend, "_comm_ptr", None)
    if getter is None:
        raise TypeError(
            f"ProcessGroup {_group_name(group)} uses backend {type(backend).__name__}, which "
            "exposes no NCCL communicator (needs the NCCL backend and torch >= 2.8)"
        )
    comm = int(getter())
    if comm == 0:
        # torch creates communicators lazily; every rank enters the context together, so
        # creating it here is as collective as the registration that follows.
        backend.eager_connect_single_device(device)
        comm = int(getter())
    return _as_address(comm, f"ProcessGroup {_group_name(group)} communicator")


def _group_name(group: Any) -> str:
    name = getattr(group, "group_name", None)
    return repr(name) if name else _describe(group)


def resolve_comm(group: object) -> int:
    """The ncclComm_t address behind ``group``.

    Raises:
        TypeError: ``group`` is none of the accepted kinds.
        ValueError: it is, but holds no live communicator.
    """
    if isinstance(group, bool):
        raise TypeError(f"group must be {ACCEPTED}; got a bool")
    if isinstance(group, int):
        return _as_address(group, "the raw ncclComm_t")
    if _is_process_group(group):
        return _process_group_comm(group)
    pynccl = getattr(group, "pynccl_comm", None)
    if pynccl is not None:
        if not hasattr(pynccl, "comm"):
            raise TypeError(f"{_describe(group)}.pynccl_comm has no .comm attribute")
        return _as_address(pynccl.comm, f"{_describe(group)}.pynccl_comm.comm")
    if hasattr(group, "pynccl_comm"):
        raise ValueError(
            f"{_describe(group)}.pynccl_comm is None: this group has no NCCL communicator "
            "(enable pynccl for it, or pass the communicator the collective will run on)"
        )
    if hasattr(group, "comm"):
        return _as_address(group.comm, f"{_describe(group)}.comm")
    raise TypeError(f"group must be {ACCEPTED}; got {_describe(group)}")


# ProcessGroup -> {device: resolution}. Engines enter the context per layer, and asking torch
# for the backend and communicator costs several microseconds; a process group's communicator
# on a device does not change while the group lives (the weak key drops it with the group).
_process_groups: weakref.WeakKeyDictionary[Any, dict[int, Optional[ResolvedGroup]]] = (
    weakref.WeakKeyDictionary()
)


def _resolve_process_group(group: Any) -> Optional[ResolvedGroup]:
    import torch

    per_device = _process_groups.get(group)
    device = torch.cuda.current_device() if torch.cuda.is_initialized() else -1
    if per_device is not None and device in per_device:
        return per_device[device]
    size = _process_group_size(group)
    resolved = (
        None if size == 1 else ResolvedGroup(_process_group_comm(group), size, _group_name(group))
    )
    _process_groups.setdefault(group, {})[device] = resolved
    return resolved


def forget(group: object) -> None:
    """Drops what was cached about ``group`` (its communicator is about to be destroyed)."""
    if _is_process_group(group):
        _process_groups.pop(group, None)


def resolve(group: object) -> Optional[ResolvedGroup]:
    """``group`` as a communicator and size, or ``None`` for a one-rank group (nothing to share).

    Raises:
        TypeError: ``group`` is none of the accepted kinds.
        ValueError: it is, but holds no live communicator.
    """
    if _is_process_group(group):
        return _resolve_process_group(group)
    comm = resolve_comm(group)
    library_info()
    size = int(_native.comm_size(comm))
    if size == 1:
        return None
    return ResolvedGroup(comm, size, _describe(group))
