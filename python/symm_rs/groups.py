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

Communicators die with their groups. ``release(group)`` deregisters first. torch's
``ProcessGroup.shutdown`` and ``ProcessGroup.abort`` (which ``destroy_process_group`` and
``_abort_process_group`` call, however they were imported) are wrapped so that a shutdown
deregisters the windows of the groups symm_rs has seen first and an abort forgets them without
NCCL calls; a group that disappears otherwise (its object collected, a ``symm_rs.Communicator``
closed or collected) is forgotten too. A destroyed communicator is never passed to NCCL again,
and an address NCCL reuses starts clean: no cached size, rank, peer set or verdict survives.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from symm_rs import _native
from symm_rs.library import library_info

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
        import torch

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


@functools.lru_cache(maxsize=1)
def _dist() -> Any:
    """``torch.distributed`` when it is usable (imported on first need)."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not dist.is_available():
        return None
    _wrap_shutdown_and_abort(dist.ProcessGroup)
    return dist


def is_process_group(group: object) -> bool:
    dist = _dist()
    return dist is not None and isinstance(group, dist.ProcessGroup)


def _group_name(pg: Any) -> str:
    name = getattr(pg, "group_name", None)
    return f"ProcessGroup {name!r}" if name else _describe(pg)


def store_of(pg: Any) -> Optional[Any]:
    """The store of a ProcessGroup (every rank of it reaches the same keys), if any."""
    dist = _dist()
    getter = getattr(dist.distributed_c10d, "_get_process_group_store", None)
    try:
        if getter is not None:
            return getter(pg)
        return dist.distributed_c10d._world.pg_map[pg][1]
    except (KeyError, RuntimeError, ValueError):
        return None


# -- peer sets ------------------------------------------------------------------------------

_peer_sets: dict[tuple[str, object], int] = {}
_peer_set_ids = itertools.count(1)  # 0 is symm_rs._native's "any communicator" tag


def peer_set(ranks: Optional[tuple[int, ...]], comm: int) -> int:
    """The peer-set id of a group over global ``ranks`` (any order), or, when they are
    unknown, of the communicator ``comm`` alone (until it is released or forgotten)."""
    key: tuple[str, object] = ("ranks", tuple(sorted(ranks))) if ranks else ("comm", comm)
    with _lock:
        found = _peer_sets.get(key)
        if found is None:
            found = _peer_sets[key] = next(_peer_set_ids)
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
                found = _process_group_ranks(_dist(), candidate, size)
                if found is not None:
                    return found
    return None


# -- ProcessGroups --------------------------------------------------------------------------

# The CUDA device each ProcessGroup's communicator runs on. torch looks the communicator up by
# the *thread's* current device, and a thread that never called set_device is on device 0, so
# the device is learned once (bound device, else the first resolution's device) and pinned.
_pg_devices: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
_pg_groups: weakref.WeakKeyDictionary[Any, Group] = weakref.WeakKeyDictionary()
_lock = threading.RLock()  # re-entrant: a finalizer may run while it is held


def _process_group_device(pg: Any) -> int:
    import torch

    known = _pg_devices.get(pg)
    if known is not None:
        return known
    bound = getattr(pg, "bound_device_id", None)
    if bound is not None and getattr(bound, "type", None) == "cuda" and bound.index is not None:
        device = int(bound.index)
    else:
        if not torch.cuda.is_available():
            raise _native.SymmetricMemoryError(
                "symmetric memory needs a CUDA GPU, and torch sees none; "
                "pass disabled=True to run this code path without one"
            )
        device = torch.cuda.current_device()
    _pg_devices[pg] = device
    return device


def _process_group_comm(pg: Any, device: int) -> int:
    import torch

    on = torch.device("cuda", device)
    try:
        backend = pg._get_backend(on)
    except RuntimeError as e:
        raise TypeError(
            f"{_group_name(pg)} has no backend for {on}: {e}. "
            "Symmetric memory needs an NCCL process group"
        ) from None
    getter = getattr(backend, "comm_ptr", None) or getattr(backend, "_comm_ptr", None)
    if getter is None:
        raise TypeError(
            f"{_group_name(pg)} uses backend {type(backend).__name__}, which exposes no NCCL "
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
    return _as_address(comm, f"{_group_name(pg)} communicator")


def _owner_abort(pg: Any) -> Callable[[], None]:
    ref = weakref.ref(pg)

    def abort() -> None:
        group = ref()
        if group is not None:
            group.abort()

    return abort


def _torch_gather(pg: Any) -> Callable[..., None]:
    ref = weakref.ref(pg)

    def gather(out: Any, inp: Any, stream: Any) -> None:
        import torch

        dist = _dist()
        group = ref()
        if group is None:
            raise _native.SymmetricMemoryError("the ProcessGroup was destroyed")
        if stream is None:
            dist.all_gather_into_tensor(out, inp, group=group)
            return
        # torch.distributed has no stream argument: it runs after the current stream.
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            dist.all_gather_into_tensor(out, inp, group=group)

    return gather


def _process_group_ranks(dist: Any, pg: Any, size: int) -> Optional[tuple[int, ...]]:
    try:
        ranks = tuple(int(r) for r in dist.get_process_group_ranks(pg))
    except (RuntimeError, ValueError):
        return None
    return ranks if len(ranks) == size else None


def _resolve_process_group(pg: Any) -> Optional[Group]:
    cached = _pg_groups.get(pg)
    if cached is not None:
        return cached
    dist = _dist()
    size = int(pg.size())
    if size == 1:
        return None
    device = _process_group_device(pg)
    comm = _process_group_comm(pg, device)
    store = store_of(pg)
    group = Group(
        comm=comm,
        size=size,
        rank=int(dist.get_rank(pg)),
        device=device,
        name=_group_name(pg),
        # The group name is unique per group in this job, so rounds of a destroyed group and
        # of its successor (whose communicator may get the same address) never share keys.
        channel=Channel(store, f"pg-{getattr(pg, 'group_name', '')}")
        if store is not None
        else None,
        peer_set=peer_set(_process_group_ranks(dist, pg, size), comm),
        gather=_torch_gather(pg),
        abort=_owner_abort(pg),
    )
    with _lock:
        _pg_groups[pg] = group
    _watch(pg, comm)
    return group


# -- everything else ------------------------------------------------------------------------

# Non-ProcessGroup resolutions by communicator address: asking NCCL costs microseconds, and an
# address stays the same communicator until it is released or forgotten (which drops it here).
_by_comm: dict[int, Group] = {}


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
    cached = _by_comm.get(comm)
    if cached is not None and (channel is None or cached.channel == channel):
        return cached if cached.size > 1 else None
    library_info()
    size, rank, device = _native.comm_info(comm)
    peers = peer_set(_ranks_of(owner, int(size)), comm)
    abort = getattr(owner, "_symm_rs_abort", None)
    group = Group(comm, int(size), int(rank), int(device), name, channel, peers, abort=abort)
    with _lock:
        _by_comm[comm] = group
    return group if group.size > 1 else None


def _address(group: object) -> tuple[int, str, Optional[Channel]]:
    """The communicator address of a group that is not a ProcessGroup, with a name for
    messages and its out-of-band channel, without asking NCCL anything."""
    if isinstance(group, bool):
        raise TypeError(f"group must be {ACCEPTED}; got a bool")
    if isinstance(group, int):
        comm = _as_address(group, "the raw ncclComm_t")
        return comm, f"comm {comm:#x}", None
    pynccl = getattr(group, "pynccl_comm", None)
    if pynccl is not None:
        if not hasattr(pynccl, "comm"):
            _raise_if_disabled(pynccl)
            raise TypeError(f"{_describe(group)}.pynccl_comm has no .comm attribute")
        comm = _as_address(pynccl.comm, f"{_describe(group)}.pynccl_comm.comm")
        tag = str(getattr(group, "unique_name", "") or "pynccl")
        channel = _channel_of(group, tag) or _channel_of(pynccl, tag)
        return comm, f"{_describe(group)} {tag}", channel
    if hasattr(group, "pynccl_comm"):
        raise ValueError(
            f"{_describe(group)}.pynccl_comm is None: this group has no NCCL communicator "
            "(enable pynccl for it, or pass the communicator the collective will run on)"
        )
    if hasattr(group, "comm"):
        comm = _as_address(group.comm, f"{_describe(group)}.comm")
        return comm, _describe(group), _channel_of(group, "pynccl")
    _raise_if_disabled(group)
    raise TypeError(f"group must be {ACCEPTED}; got {_describe(group)}")


def _raise_if_disabled(comm: object) -> None:
    """An engine's PyNcclCommunicator that disabled itself (``available=False``, no ``.comm``)."""
    if getattr(comm, "available", None) is not False:
        return
    try:
        loaded = "NCCL " + ".".join(map(str, library_info()["version"]))
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
    if isinstance(group, Group):
        return group if group.size > 1 and group.comm else None
    if is_process_group(group):
        return _resolve_process_group(group)
    return _resolve_comm(*_address(group), owner=group)


def peers(group: object) -> Group:
    """``group``'s rank, size and all-gather, for collectives that do not need to register:
    like ``resolve``, but a one-rank group is a ``Group`` too, and a ProcessGroup of any backend
    or an object that only gathers (``all_gather_into_tensor``, ``.rank``, ``.size``) needs no
    NCCL communicator (``comm`` is then 0).

    Raises:
        TypeError: ``group`` is none of the kinds in ``GATHER_ACCEPTED``.
        ValueError: this process is not in the ProcessGroup.
    """
    if isinstance(group, Group):
        return group
    if is_process_group(group):
        cached = _pg_groups.get(group)
        if cached is not None:
            return cached
        rank = int(_dist().get_rank(group))
        if rank < 0:
            raise ValueError("this process is not a member of the ProcessGroup passed as group")
        name, gather = _group_name(group), _torch_gather(group)
        return Group(0, int(group.size()), rank, -1, name, gather=gather)
    method = getattr(group, "all_gather_into_tensor", None)
    knows_comm = hasattr(group, "comm") or hasattr(group, "pynccl_comm")
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
    if is_process_group(group):
        resolved = _resolve_process_group(group)
        return 0 if resolved is None else resolved.comm
    return _address(group)[0]


# -- lifetime -------------------------------------------------------------------------------

# Called with a communicator address when it is released or forgotten, so that state kept
# elsewhere about it (capabilities, verification rounds) goes with it.
_forget_hooks: list[Callable[[int], None]] = []


def on_forget(hook: Callable[[int], None]) -> None:
    """Runs ``hook(comm)`` whenever symm_rs releases or forgets a communicator."""
    _forget_hooks.append(hook)


def drop_cached(comm: int) -> None:
    """Forgets what symm_rs's Python side cached about ``comm`` (its windows stay)."""
    with _lock:
        _by_comm.pop(comm, None)
        _peer_sets.pop(("comm", comm), None)  # a successor at this address is another group
        watcher = _watchers.pop(comm, None)
        if watcher is not None:
            watcher.detach()
        for pg, group in list(_pg_groups.items()):
            if group.comm == comm:
                _pg_groups.pop(pg, None)
    for hook in _forget_hooks:
        hook(comm)


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
    drop_cached(comm)
    return int(_native.release_comm(comm))


def _cached_comm(group: object) -> Optional[int]:
    """The communicator symm_rs already resolved for ``group``, without creating one."""
    if is_process_group(group):
        cached = _pg_groups.get(group)
        return None if cached is None else cached.comm
    return None


def forget(comm: int) -> int:
    """Forgets a communicator that was destroyed without ``release``: its windows are dropped
    without NCCL calls. Returns how many windows were dropped."""
    drop_cached(comm)
    return int(_native.forget_comm(comm))


# One finalizer per watched communicator. It is detached once the communicator is released or
# forgotten, so that a later communicator NCCL creates at the same address is never forgotten
# by the old group's finalizer.
_watchers: dict[int, weakref.finalize] = {}


def _watch(pg: Any, comm: int) -> None:
    # If the group object goes away without destroy_process_group (or before symm_rs's hook was
    # installed), its communicator is gone with it: forget, never deregister on it.
    with _lock:
        if comm not in _watchers:
            _watchers[comm] = weakref.finalize(pg, _forget_if_unreleased, comm)


def _forget_if_unreleased(comm: int) -> None:
    try:
        forget(comm)
    except Exception:  # a finalizer must not raise, least of all at interpreter exit
        pass


def _windows_go_first(original: Callable[..., Any], deregister: bool) -> Callable[..., Any]:
    """``ProcessGroup.shutdown``/``abort`` that first release (``deregister``: shutdown,
    while the communicator still exists; deregistration is local, so no rank can hang on it)
    or forget (abort: no NCCL call on a communicator that may be broken) what symm_rs holds
    for the group."""

    @functools.wraps(original)
    def wrapper(pg: Any, *args: Any, **kwargs: Any) -> Any:
        resolved = _pg_groups.get(pg)
        if resolved is not None:
            drop_cached(resolved.comm)
            _release_or_forget(resolved.comm, deregister)
        return original(pg, *args, **kwargs)

    wrapper._symm_rs_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _release_or_forget(comm: int, deregister: bool) -> None:
    if deregister:
        try:
            _native.release_comm(comm)
            return
        except Exception:
            pass  # the communicator goes regardless: its windows must never be used again
    _native.forget_comm(comm)


def _wrap_shutdown_and_abort(process_group: Any) -> None:
    for name, deregister in (("shutdown", True), ("abort", False)):
        original = getattr(process_group, name, None)
        if original is None or getattr(original, "_symm_rs_wrapped", False):
            continue
        setattr(process_group, name, _windows_go_first(original, deregister))
