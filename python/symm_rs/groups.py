"""One abstraction for the many kinds of "group" engines pass around.

``resolve(group)`` turns any accepted kind into a ``Group``: the NCCL communicator, its size,
this process's rank, the CUDA device the communicator runs on, how to all-gather on it, and an
out-of-band channel (a ``torch.distributed`` store) for cross-rank checks that must not hang.
Accepted, in the order they are tried:

* a ``torch.distributed.ProcessGroup`` with an NCCL backend (its communicator comes from
  ``_comm_ptr()``, torch >= 2.8; created eagerly here if torch has not yet);
* a ``symm_rs.Communicator``;
* an object with ``.pynccl_comm.comm`` (SGLang's ``GroupCoordinator``);
* an object with ``.comm`` holding a ``ctypes.c_void_p`` or an ``int`` (vLLM's and SGLang's
  ``PyNcclCommunicator``);
* a raw ``int`` ncclComm_t address.

Each ``Group`` names its *peer set*: a process-local id of the ranks it spans (global ranks
of ``torch.distributed``'s world when known, else the communicator alone). Every communicator
over the same ranks shares one symmetric pool (``symm_rs.pool``): the ranks of a group run the
same allocations, while sub-groups of it do not, so a pool shared with a sub-group would grow
differently on different ranks and their registrations would not line up.

``kind_of(group)`` is the one place the kinds are told apart (a ``GroupKind``, the Rust core's
enum, which the native context's cache also reads). Communicators die with their groups:
``release(group)`` deregisters first, and ``symm_rs.lifetime`` forgets what was cached about
them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from symm_rs import _native, lifetime, process_groups
from symm_rs.library import library_info
from symm_rs.lifetime import drop_cached, forget, on_forget
from symm_rs.process_groups import is_process_group, store_of

GroupKind = _native.GroupKind

ACCEPTED = (
    "a torch.distributed ProcessGroup with an NCCL backend, a symm_rs.Communicator, an object "
    "with .comm (ctypes.c_void_p or int, e.g. PyNcclCommunicator) or .pynccl_comm.comm (e.g. "
    "SGLang's GroupCoordinator), or a raw int ncclComm_t"
)
# What collectives that never register (disabled=True) also accept: any backend, and objects
# that only know how to gather.
GATHER_ACCEPTED = (
    f"{ACCEPTED}; with disabled=True also a ProcessGroup of any backend, or an object with "
    "all_gather_into_tensor(output, input, stream=None), .rank and .size"
)


@dataclass(frozen=True)
class Channel:
    """A key-value store every rank of a group reaches (torch's ``Store``), with a tag that
    names the communicator in it: cross-rank checks over it time out instead of hanging."""

    store: Any
    tag: str


@dataclass(frozen=True)
class Group:
    """A group reduced to what symm_rs needs, resolved once per call."""

    comm: int
    size: int
    rank: int
    device: int
    name: str
    channel: Optional[Channel] = None
    # The pool this group allocates from and registers: one per set of ranks (``peer_set``).
    peer_set: int = 0
    # How to all-gather on this group: torch's collective for a ProcessGroup, else NCCL directly.
    gather: Optional[Callable[..., None]] = field(default=None, compare=False, repr=False)
    # How its owner aborts it (a ProcessGroup's abort, a symm_rs.Communicator's), when a peer
    # failed and SYMM_RS_ON_FAILURE=abort; None where symm_rs knows no owner's way.
    abort: Optional[Callable[[], None]] = field(default=None, compare=False, repr=False)

    def all_gather_into_tensor(self, out: Any, inp: Any, stream: Any = None) -> None:
        """``inp`` of every rank into ``out``, in rank order, on ``stream`` (default: the
        current stream of the group's device)."""
        if self.gather is not None:
            self.gather(out, inp, stream)
            return
        s = stream if stream is not None else torch.cuda.current_stream(self.device)
        _native.run_collective(self.comm, "all_gather", out, inp, (s.cuda_stream, self.device))


def _describe(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


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


# -- peer sets ------------------------------------------------------------------------------


def peer_set(ranks: Optional[tuple[int, ...]], comm: int) -> int:
    """The peer-set id of a group over global ``ranks`` (any order), or, when they are
    unknown, of the communicator ``comm`` alone (until it is released or forgotten)."""
    key: tuple[str, object] = ("ranks", tuple(sorted(ranks))) if ranks else ("comm", comm)
    with lifetime.lock:
        found = lifetime.peer_sets.get(key)
        if found is None:
            found = lifetime.peer_sets[key] = next(lifetime.peer_set_ids)
    return found


def _ranks_of(group: object, size: int) -> Optional[tuple[int, ...]]:
    """The global ranks behind an engine's group object, when it says: a
    ``symm_rs.Communicator`` made from a ProcessGroup, or the CPU ProcessGroup an engine keeps
    next to its communicator (SGLang's ``cpu_group``, on the coordinator or its
    ``pynccl_comm``; vLLM's ``group``)."""
    for owner in (group, getattr(group, "pynccl_comm", None)):
        ranks = getattr(owner, "_symm_rs_ranks", None)
        if ranks is not None and len(ranks) == size:
            return tuple(int(r) for r in ranks)
        for attr in ("cpu_group", "group"):
            candidate = getattr(owner, attr, None)
            if ranks is None and candidate is not None and is_process_group(candidate):
                found = process_groups.ranks_of(candidate, size)
                if found is not None:
                    return found
    return None


# -- ProcessGroups --------------------------------------------------------------------------


def _resolve_process_group(pg: Any) -> Optional[Group]:
    cached = lifetime.process_groups.get(pg)
    if cached is not None:
        return cached
    size = int(pg.size())
    if size == 1:
        return None
    device = process_groups.device_of(pg)
    name = process_groups.group_name(pg)
    comm = _as_address(process_groups.comm_of(pg, device), f"{name} communicator")
    store = store_of(pg)
    group = Group(
        comm=comm,
        size=size,
        rank=int(process_groups.dist.get_rank(pg)),
        device=device,
        name=name,
        # The group name is unique per group in this job, so rounds of a destroyed group and
        # of its successor (whose communicator may get the same address) never share keys.
        channel=Channel(store, f"pg-{getattr(pg, 'group_name', '')}")
        if store is not None
        else None,
        peer_set=peer_set(process_groups.ranks_of(pg, size), comm),
        gather=process_groups.torch_gather(pg),
        abort=process_groups.owner_abort(pg),
    )
    with lifetime.lock:
        lifetime.process_groups[pg] = group
    lifetime.watch(pg, comm)
    return group


# -- everything else ------------------------------------------------------------------------


def _channel_of(owner: object, tag: str) -> Optional[Channel]:
    """The out-of-band channel an engine's group object carries: symm_rs.Communicator's, or the
    store of a CPU ProcessGroup next to the communicator (SGLang's ``cpu_group``, vLLM's
    ``group``, a stateless group's ``store``)."""
    channel = getattr(owner, "_symm_rs_channel", None)
    if isinstance(channel, Channel):
        return channel
    for attr in ("cpu_group", "group"):
        candidate = getattr(owner, attr, None)
        if candidate is not None and is_process_group(candidate):
            store = store_of(candidate)
            if store is not None:
                return Channel(store, tag)
        store = getattr(candidate, "store", None)
        if store is not None and hasattr(store, "set") and hasattr(store, "wait"):
            return Channel(store, tag)
    return None


def _resolve_comm(
    comm: int, name: str, channel: Optional[Channel], owner: object = None
) -> Optional[Group]:
    cached = lifetime.by_comm.get(comm)
    if cached is not None and (channel is None or cached.channel == channel):
        return cached if cached.size > 1 else None
    library_info()
    size, rank, device = _native.comm_info(comm)
    peers = peer_set(_ranks_of(owner, int(size)), comm)
    abort = getattr(owner, "_symm_rs_abort", None)
    group = Group(comm, int(size), int(rank), int(device), name, channel, peers, abort=abort)
    with lifetime.lock:
        lifetime.by_comm[comm] = group
    return group if group.size > 1 else None


def kind_of(group: object) -> Optional[GroupKind]:
    """Which kind of group ``group`` is, in the order they are tried (``None``: none of them;
    ``resolve`` then says why). The one classification: resolution and the native context's
    cache both follow it."""
    if isinstance(group, Group):
        return GroupKind.GROUP
    if isinstance(group, bool):
        return None
    if isinstance(group, int):
        return GroupKind.ADDRESS
    if is_process_group(group):
        return GroupKind.PROCESS_GROUP
    if getattr(group, "pynccl_comm", None) is not None:
        return GroupKind.PYNCCL
    if not hasattr(group, "pynccl_comm") and hasattr(group, "comm"):
        return GroupKind.COMM
    return None


def _address(group: object, kind: Optional[GroupKind]) -> tuple[int, str, Optional[Channel]]:
    """The communicator address of a group that is not a ProcessGroup, with a name for
    messages and its out-of-band channel, without asking NCCL anything."""
    if kind is GroupKind.ADDRESS:
        comm = _as_address(group, "the raw ncclComm_t")
        return comm, f"comm {comm:#x}", None
    if kind is GroupKind.PYNCCL:
        pynccl = group.pynccl_comm  # type: ignore[attr-defined]
        if not hasattr(pynccl, "comm"):
            _raise_if_disabled(pynccl)
            raise TypeError(f"{_describe(group)}.pynccl_comm has no .comm attribute")
        comm = _as_address(pynccl.comm, f"{_describe(group)}.pynccl_comm.comm")
        tag = str(getattr(group, "unique_name", "") or "pynccl")
        channel = _channel_of(group, tag) or _channel_of(pynccl, tag)
        return comm, f"{_describe(group)} {tag}", channel
    if kind in (GroupKind.COMM, GroupKind.GROUP):
        comm = _as_address(group.comm, f"{_describe(group)}.comm")  # type: ignore[attr-defined]
        return comm, _describe(group), _channel_of(group, "pynccl")
    if isinstance(group, bool):
        raise TypeError(f"group must be {ACCEPTED}; got a bool")
    if hasattr(group, "pynccl_comm"):
        raise ValueError(
            f"{_describe(group)}.pynccl_comm is None: this group has no NCCL communicator "
            "(enable pynccl for it, or pass the communicator the collective will run on)"
        )
    _raise_if_disabled(group)
    raise TypeError(f"group must be {ACCEPTED}; got {_describe(group)}")


def _raise_if_disabled(comm: object) -> None:
    """An engine's PyNcclCommunicator that disabled itself (``available=False``, no ``.comm``)."""
    if getattr(comm, "available", None) is not False:
        return
    try:
        loaded = "NCCL " + ".".join(map(str, library_info().version))
    except Exception:  # the message must not fail for want of a library
        loaded = "no loadable NCCL"
    why = (
        "it spans one rank"
        if getattr(comm, "world_size", None) == 1
        else (
            f"it could not load libnccl, or VLLM_DISABLE_PYNCCL is set (vLLM >= 0.34 needs NCCL "
            f">= 2.29.7, for ncclCommSuspend; this process has {loaded})"
        )
    )
    raise ValueError(f"{_describe(comm)} is disabled (available=False, no .comm): {why}")


def resolve(group: object) -> Optional[Group]:
    """``group`` as a ``Group``, or ``None`` for a one-rank group (nothing to share).

    Raises:
        TypeError: ``group`` is none of the accepted kinds.
        ValueError: it is, but holds no live communicator.
    """
    kind = kind_of(group)
    if kind is GroupKind.GROUP:
        return group if group.size > 1 and group.comm else None  # type: ignore[attr-defined]
    if kind is GroupKind.PROCESS_GROUP:
        return _resolve_process_group(group)
    return _resolve_comm(*_address(group, kind), owner=group)


def peers(group: object) -> Group:
    """``group``'s rank, size and all-gather, for collectives that do not need to register:
    like ``resolve``, but a one-rank group is a ``Group`` too, and a ProcessGroup of any backend
    or an object that only gathers (``all_gather_into_tensor``, ``.rank``, ``.size``) needs no
    NCCL communicator (``comm`` is then 0).

    Raises:
        TypeError: ``group`` is none of the kinds in ``GATHER_ACCEPTED``.
        ValueError: this process is not in the ProcessGroup.
    """
    kind = kind_of(group)
    if kind is GroupKind.GROUP:
        return group  # type: ignore[return-value]
    if kind is GroupKind.PROCESS_GROUP:
        cached = lifetime.process_groups.get(group)
        if cached is not None:
            return cached
        rank = int(process_groups.dist.get_rank(group))
        if rank < 0:
            raise ValueError("this process is not a member of the ProcessGroup passed as group")
        name, gather = process_groups.group_name(group), process_groups.torch_gather(group)
        return Group(0, int(group.size()), rank, -1, name, gather=gather)
    method = getattr(group, "all_gather_into_tensor", None)
    knows_comm = kind is not None or hasattr(group, "pynccl_comm")
    if callable(method) and not knows_comm and hasattr(group, "rank") and hasattr(group, "size"):
        return Group(
            comm=0,
            size=_int_attribute(group, "size"),
            rank=_int_attribute(group, "rank"),
            device=-1,
            name=_describe(group),
            gather=lambda out, inp, stream: method(out, inp, stream=stream),
        )
    try:
        resolved = resolve(group)
    except TypeError:
        raise TypeError(f"group must be {GATHER_ACCEPTED}; got {_describe(group)}") from None
    if resolved is None:
        return Group(0, 1, 0, -1, _describe(group), gather=lambda out, inp, stream: out.copy_(inp))
    return resolved


def _int_attribute(group: object, name: str) -> int:
    value = getattr(group, name)
    # Accept a method as well as a plain attribute: communicator wrappers differ on this.
    if callable(value):
        value = value()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_describe(group)}.{name} must be an int, got {_describe(value)}")
    return value


def resolve_comm(group: object) -> int:
    """The ncclComm_t address behind ``group`` (0 for a one-rank ProcessGroup). Asks NCCL
    nothing about it, except for a ProcessGroup, whose communicator torch may create now.

    Raises:
        TypeError: ``group`` is none of the accepted kinds.
        ValueError: it is, but holds no live communicator.
    """
    kind = kind_of(group)
    if kind is GroupKind.PROCESS_GROUP:
        resolved = _resolve_process_group(group)
        return 0 if resolved is None else resolved.comm
    return _address(group, kind)[0]


# -- releasing -------------------------------------------------------------------------------


def release(group: object) -> int:
    """Deregisters every window ``group`` holds and forgets what symm_rs knows about its
    communicator. Call it before destroying the communicator (``destroy_process_group`` on a
    group symm_rs has seen does it for you; ``Communicator.close`` too). Local to this rank.
    Returns how many windows were released."""
    comm = _cached_comm(group)
    if comm is None:
        resolved = resolve(group)
        if resolved is None:
            return 0
        comm = resolved.comm
    lifetime.drop_cached(comm)
    return int(_native.release_comm(comm))


def _cached_comm(group: object) -> Optional[int]:
    """The communicator symm_rs already resolved for ``group``, without creating one."""
    if is_process_group(group):
        cached = lifetime.process_groups.get(group)
        return None if cached is None else cached.comm
    return None


__all__ = [
    "ACCEPTED",
    "GATHER_ACCEPTED",
    "Channel",
    "Group",
    "GroupKind",
    "drop_cached",
    "forget",
    "is_process_group",
    "kind_of",
    "on_forget",
    "peer_set",
    "peers",
    "release",
    "resolve",
    "resolve_comm",
    "store_of",
]
