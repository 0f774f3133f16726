"""What symm_rs reads from a ``torch.distributed`` ProcessGroup: its NCCL communicator (made
now if torch has not yet), the device it runs on, its store, its global ranks, and how to gather
on it and abort it. ``symm_rs.groups`` builds a ``Group`` from these.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from symm_rs import lifetime
from symm_rs.errors import SymmetricMemoryError


@functools.lru_cache(maxsize=1)
def usable() -> bool:
    """Whether this torch has ``torch.distributed``; the first answer also wraps
    ``ProcessGroup.shutdown``/``abort`` (``symm_rs.lifetime``)."""
    if not dist.is_available():
        return False
    lifetime.wrap_shutdown_and_abort(dist.ProcessGroup)
    return True


def is_process_group(group: object) -> bool:
    return usable() and isinstance(group, dist.ProcessGroup)


def group_name(pg: Any) -> str:
    """A ProcessGroup's name for messages."""
    name = getattr(pg, "group_name", None)
    return f"ProcessGroup {name!r}" if name else f"{type(pg).__module__}.{type(pg).__qualname__}"


def store_of(pg: Any) -> Optional[Any]:
    """The store of a ProcessGroup (every rank of it reaches the same keys), if any."""
    getter = getattr(dist.distributed_c10d, "_get_process_group_store", None)
    try:
        if getter is not None:
            return getter(pg)
        return dist.distributed_c10d._world.pg_map[pg][1]
    except (KeyError, RuntimeError, ValueError):
        return None


# The CUDA device each ProcessGroup's communicator runs on. torch looks the communicator up by
# the *thread's* current device, and a thread that never called set_device is on device 0, so
# the device is learned once (bound device, else the first resolution's device) and pinned.
_devices: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def device_of(pg: Any) -> int:
    """The CUDA device of a ProcessGroup's communicator, learned once and pinned."""
    known = _devices.get(pg)
    if known is not None:
        return known
    bound = getattr(pg, "bound_device_id", None)
    if bound is not None and getattr(bound, "type", None) == "cuda" and bound.index is not None:
        device = int(bound.index)
    else:
        if not torch.cuda.is_available():
            raise SymmetricMemoryError(
                "symmetric memory needs a CUDA GPU, and torch sees none; "
                "pass disabled=True to run this code path without one"
            )
        device = torch.cuda.current_device()
    _devices[pg] = device
    return device


def comm_of(pg: Any, device: int) -> int:
    """The ``ncclComm_t`` address of a ProcessGroup's communicator on ``device`` (0 if torch
    still has none after creating it), made now if torch has not yet."""
    on = torch.device("cuda", device)
    try:
        backend = pg._get_backend(on)
    except RuntimeError as e:
        raise TypeError(
            f"{group_name(pg)} has no backend for {on}: {e}. "
            "Symmetric memory needs an NCCL process group"
        ) from None
    getter = getattr(backend, "comm_ptr", None) or getattr(backend, "_comm_ptr", None)
    if getter is None:
        raise TypeError(
            f"{group_name(pg)} uses backend {type(backend).__name__}, which exposes no NCCL "
            "communicator (needs the NCCL backend and torch >= 2.8)"
        )
    # torch keys its communicators by the thread's current device: ask on the group's.
    with torch.cuda.device(device):
        comm = int(getter())
        if comm == 0:
            # torch creates communicators lazily; every rank enters the context together, so
            # creating it here is as collective as the registration that follows.
            backend.eager_connect_single_device(on)
            comm = int(getter())
    return comm


def owner_abort(pg: Any) -> Callable[[], None]:
    """How the owner aborts ``pg`` (its own ``abort``), without keeping it alive."""
    ref = weakref.ref(pg)

    def abort() -> None:
        group = ref()
        if group is not None:
            group.abort()

    return abort


def torch_gather(pg: Any) -> Callable[..., None]:
    """torch's all-gather on ``pg`` as a ``Group.gather``, without keeping it alive."""
    ref = weakref.ref(pg)

    def gather(out: Any, inp: Any, stream: Any) -> None:
        group = ref()
        if group is None:
            raise SymmetricMemoryError("the ProcessGroup was destroyed")
        if stream is None:
            dist.all_gather_into_tensor(out, inp, group=group)
            return
        # torch.distributed has no stream argument: it runs after the current stream.
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            dist.all_gather_into_tensor(out, inp, group=group)

    return gather


def ranks_of(pg: Any, size: int) -> Optional[tuple[int, ...]]:
    """The global ranks of ``pg``, when torch knows all ``size`` of them."""
    try:
        ranks = tuple(int(r) for r in dist.get_process_group_ranks(pg))
    except (RuntimeError, ValueError):
        return None
    return ranks if len(ranks) == size else None
