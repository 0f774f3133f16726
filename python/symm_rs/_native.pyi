"""Stubs for ``symm_rs._native``, the Rust core. Use the ``symm_rs`` package API instead; these
are the building blocks it is made of. The exceptions it raises are ``symm_rs.errors``'; it reads
no environment variable (``symm_rs.env`` does, and passes what the core needs)."""

from os import PathLike
from typing import Any, Callable, Optional, Union

__version__: str

# -- the tables the Rust core holds, read by Python ---------------------------------------------

COLLECTIVES: tuple[str, ...]
"""The collectives, as ``kind`` arguments name them (``CollectiveKind::ALL``)."""
REDUCE_OPS: tuple[str, ...]
"""The reductions, as ``op`` arguments name them (``ReduceOp::ALL``)."""
NCCL_DTYPE_NAMES: tuple[str, ...]
"""torch names of the dtypes NCCL has a type for."""
CP_COPY_MODES: tuple[str, ...]
"""How the CP all-gather can issue its copies, the default first (``SYMM_RS_CP_COPY``)."""

def reduce_op(op: str) -> str:
    """``op``'s name in ``REDUCE_OPS`` (aliases such as ``mean`` resolve).

    Raises:
        ValueError: not a reduction.
    """

class RouteTable:
    """A size-policy table as the core looks calls up in it (``symm_rs.policy.PolicyTable``
    asks it; a ``NcclCommunicator`` routes by it)."""

    def __new__(cls, entries: list[tuple[str, int, Optional[int]]]) -> RouteTable:
        """From ``(collective, low, high)`` rows: ``[low, high)`` bytes per rank.

        Raises:
            ValueError: an unknown collective or an empty range.
        """
    def to_twin(self, kind: str, nbytes: int) -> bool:
        """Whether a ``kind`` call of ``nbytes`` per rank goes to the window-less twin."""

# -- the library ---------------------------------------------------------------------------------

class LibraryInfo:
    """The libnccl in use (or one opened by path) and what it can do."""

    @property
    def path(self) -> str: ...
    @property
    def origin(self) -> str:
        """How it was found: already loaded in the process, ``SYMM_RS_NCCL_LIBRARY``, a wheel, the
        system's."""
    @property
    def version(self) -> tuple[int, int, int]: ...
    @property
    def version_code(self) -> int: ...
    @property
    def windows_supported(self) -> bool: ...
    @property
    def windows_problem(self) -> Optional[str]: ...
    @property
    def notes(self) -> list[str]: ...
    def as_dict(self) -> dict[str, Any]:
        """The same fields as a plain dict (for JSON)."""
    def __getitem__(self, key: str) -> Any:
        """``info["version"]``: the dict of earlier releases (deprecated)."""

def load_nccl(
    wheel_candidates: list[Union[str, PathLike[str]]] = ...,
    preferred: Optional[Union[str, PathLike[str]]] = None,
) -> LibraryInfo:
    """Loads the process-wide libnccl (the one already loaded first, then ``preferred``, then the
    wheels, then the system's) and describes it. The candidates are kept for a later lazy load
    (an allocator plug called first).

    Raises:
        NcclLibraryError: no usable library.
    """

def probe_nccl(path: Union[str, PathLike[str]]) -> LibraryInfo:
    """Opens one libnccl by path, apart from the process-wide one, and describes it."""

ALL_LANES: int
"""The lane that stands for every lane: a registration that takes every pool's segments."""

def allocate_for(peers: int, lane: int = 0) -> tuple[int, int]:
    """Tags the segments this thread allocates from now on with peer set ``peers`` and pool
    lane ``lane`` (0, 0: every communicator registers them, from any lane); returns the
    previous ``(peers, lane)``."""

def register_pending(comm: int, peers: int = 0, lane: int = ...) -> int:
    """Registers every pool segment of peer set ``peers`` (and every untagged one), seen from
    pool lane ``lane`` (default: every lane), that ``comm`` has not registered yet, with no
    agreement between ranks first; collective. A NULL window makes ``comm`` plain
    (``is_plain``) instead of raising. The segment table is not locked while NCCL registers.

    Raises:
        NcclLibraryError: NCCL cannot register windows.
        NcclError: ncclCommWindowRegister failed.
        SymmetricMemoryError: another registration of ``comm`` ran past the wait limit.
        ValueError: ``comm`` is NULL or not readable memory.
    """

class RegistrationPlan:
    """A planned registration: its segments are pinned and its list fixed until
    ``register()`` or ``cancel()`` (or collection)."""

    @property
    def sizes(self) -> list[int]:
        """Segment sizes, in registration order: what every rank must agree on."""
    @property
    def comm(self) -> int: ...
    def register(self) -> tuple[int, bool]:
        """Registers exactly the plan (collective; GIL released). Returns ``(windows made,
        NCCL answered with a NULL window)``."""
    def cancel(self) -> None:
        """Gives the plan up; its segments stay pending. Idempotent."""
    def __len__(self) -> int: ...

def plan_registration(comm: int, peers: int = 0, lane: int = ...) -> Optional[RegistrationPlan]:
    """Plans the registration of what ``comm`` has not registered of ``peers``'s pool lane
    ``lane``; ``None`` when there is nothing. Waits, boundedly, for another registration of
    ``comm``."""

def is_up_to_date(comm: int, lane: int = ...) -> bool:
    """Whether an exit on ``comm`` from ``lane`` has nothing to register."""

def make_plain(comm: int) -> None:
    """From now on ``comm`` registers nothing: its ranks use the pool as plain memory."""

def is_plain(comm: int) -> bool:
    """Whether ``comm`` registers nothing any more."""

def symmetric_support(comm: int) -> Optional[bool]:
    """NCCL's own answer (``ncclCommQueryProperties``), or ``None`` where it cannot say."""

def registrations_in_progress() -> list[tuple[int, int, list[int], float, int, int]]:
    """``(comm, peer set, sizes, seconds running, segments entered, OS thread id)`` of every
    registration NCCL is running now, oldest first."""

def set_wait_limit(seconds: float) -> None:
    """How long symm_rs's own waits last (``SYMM_RS_TIMEOUT``)."""

def route_opened() -> None:
    """Counts an allocation route about to begin; waits (boundedly) for a pool destruction."""

def route_closed() -> None:
    """Counts a route that ended."""

def begin_pool_drop() -> bool:
    """Starts destroying pools if no route is open (``True``); ``end_pool_drop`` must follow."""

def end_pool_drop() -> None: ...
def open_routes() -> int:
    """Allocation routes symm_rs has open now, on every thread."""

def seal_pool(peers: int, lane: int, note: str) -> None:
    """Sealed mode: a new segment for ``(peers, lane)`` fails at once, saying ``note``."""

def unseal_pool(peers: int, lane: int) -> bool:
    """Lets the pool grow again; returns whether it was sealed."""

def release_comm(comm: int) -> int:
    """Deregisters every window ``comm`` holds (local); returns how many."""

def forget_comm(comm: int) -> int:
    """Drops the windows of a destroyed communicator without calling NCCL; returns how many."""

def defer_registration(comm: int) -> None:
    """Postpones ``comm``'s registration (a capture or NCCL group is open)."""

def take_deferred() -> list[int]:
    """The postponed communicators, in first-seen order, cleared."""

def pending_sizes(comm: int, peers: int = 0, lane: int = ...) -> list[int]:
    """Sizes of the segments of ``peers`` (seen from ``lane``) that ``comm`` would register
    next, in order."""

def is_registered(ptr: int, nbytes: int, comm: int) -> bool:
    """Whether ``[ptr, ptr + nbytes)`` lies inside one window of ``comm`` (O(log n))."""

def segment_of(ptr: int, nbytes: int) -> Optional[tuple[int, int, int]]:
    """``(ptr, size, device)`` of the pool segment holding the range, if any."""

def window_comms(ptr: int, nbytes: int) -> list[int]:
    """The communicators holding a window that contains all of the range."""

def innermost_comm() -> Optional[int]:
    """The communicator of this thread's innermost active context, if one is active."""

def segments() -> list[tuple[int, int, int, list[int]]]:
    """Every pool segment in allocation order: ``(ptr, size, device, communicators with a
    window on it)``, read under one lock."""

def segment_position(ptr: int, nbytes: int) -> Optional[tuple[int, int]]:
    """``(position in allocation order, byte offset)`` of the range in its segment, if any."""

def comm_info(comm: int) -> tuple[int, int, int]:
    """``(ncclCommCount, ncclCommUserRank, ncclCommCuDevice)``.

    Raises:
        ValueError: ``comm`` is NULL or not readable memory.
    """

def take_last_error() -> Optional[str]:
    """This thread's most recent allocator-plug failure, cleared once read."""

def mark_exiting() -> None:
    """From now on the free plug leaves segments to the operating system (interpreter exit)."""

class CommStats:
    """What one communicator holds in the symmetric pools."""

    @property
    def comm(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def windows(self) -> int: ...
    @property
    def window_bytes(self) -> int: ...
    @property
    def pending_segments(self) -> int: ...
    @property
    def plain(self) -> bool:
        """It registers nothing (NCCL's NULL window, or no symmetric kernels on it)."""

class Stats:
    """The segment table's figures; no pool snapshot is taken."""

    @property
    def segments(self) -> int:
        """Pool segments alive (each one ``ncclMemAlloc`` allocation)."""
    @property
    def bytes(self) -> int: ...
    @property
    def communicators(self) -> list[CommStats]: ...
    @property
    def segments_tracked(self) -> int: ...
    @property
    def segments_freed(self) -> int: ...
    @property
    def windows_registered(self) -> int: ...
    @property
    def windows_deregistered(self) -> int: ...
    @property
    def windows_forgotten(self) -> int:
        """Windows dropped without an NCCL call: their communicator was destroyed."""
    @property
    def deregistration_failures(self) -> int: ...
    @property
    def deferred_registrations(self) -> int:
        """Communicators whose registration waits for the end of a capture or NCCL group."""
    @property
    def alloc_failures(self) -> int: ...
    @property
    def free_failures(self) -> int: ...
    @property
    def leaked_segments(self) -> int: ...
    @property
    def last_error(self) -> Optional[str]: ...
    def as_dict(self) -> dict[str, Any]:
        """The same figures as a plain dict (``communicators`` keyed by address)."""
    def __getitem__(self, key: str) -> Any:
        """``stats["windows_registered"]``: the dict of earlier releases (deprecated)."""

def stats() -> Stats:
    """Segments, bytes, windows per communicator, and failure counters."""

def run_collective(
    comm: int, kind: str, out: Any, inp: Any, stream: tuple[int, int], op: str = "sum"
) -> None:
    """Checks ``out``/``inp`` (torch tensors) against ``comm`` (its size and device, read from
    NCCL) and enqueues ``kind`` (all_gather, all_reduce, reduce_scatter) on ``stream``, given as
    ``(cudaStream_t, device index)``.

    Raises:
        TypeError: not tensors, a dtype NCCL lacks, or dtypes that differ.
        ValueError: wrong device, layout, element counts, op or kind.
    """

def group_start() -> None:
    """``ncclGroupStart``."""

def group_end() -> None:
    """``ncclGroupEnd``."""

def in_group() -> bool:
    """Whether this thread is between ``group_start`` and ``group_end``."""

def cp_all_gather(
    comm: int,
    rank: int,
    gathered: Any,
    input: Any,
    output: Optional[Any],
    counts: list[int],
    stream: tuple[int, int],
    copy: str = "kernel",
) -> str:
    """Enqueues the context-parallel all-gather on ``stream`` (``(cudaStream_t, device
    index)``): ``input`` into this rank's slot of ``gathered`` (``cp_plan``'s slot rows per
    rank), the rest of the slot zeroed, an in-place ``ncclAllGather`` on ``comm``, then every
    rank's ``counts[r]`` rows copied into ``output``, back to back. One launch of a batched copy
    kernel before the NCCL call and one after (or driver copies and memsets), all capturable in
    a CUDA graph.

    Arguments:
        comm: the ncclComm_t; its size must be ``len(counts)`` and its rank ``rank``.
        gathered: ``[slot * len(counts), *trailing]``, contiguous, on the communicator's device.
        input: ``[counts[rank], *trailing]``, contiguous.
        output: ``[sum(counts), *trailing]`` when some rank is padded, else ``None`` (the
            gathered buffer is then the result).
        copy: ``"kernel"`` or ``"driver"`` (``symm_rs.cp`` passes ``SYMM_RS_CP_COPY``'s choice).
            Where the kernel cannot be loaded on the GPU, driver copies are used and the
            ``symm_rs`` logger warns once per CUDA context.

    Returns:
        How the copies were issued: ``"kernel"`` or ``"driver"``.

    Raises:
        TypeError: not tensors, a dtype NCCL lacks, or dtypes that differ.
        ValueError: wrong shapes, devices or layout, overlapping buffers, a negative count, a
            communicator whose size or rank differs, or an unknown ``copy``.
        SymmetricMemoryError: no CUDA driver, or a driver call failed.
        NcclError: ncclAllGather failed.
    """

def cp_plan(rank: int, counts: list[int], row_bytes: int) -> tuple[int, list[tuple[int, int, int]]]:
    """``(slot rows, compaction copies as (source row, destination row, rows))`` of
    ``cp_all_gather`` for ``rank`` and rows of ``row_bytes``: each slot is padded to a multiple
    of 16 bytes; the list is empty when no rank is padded.

    Raises:
        ValueError: ``rank`` out of range, a negative count, or a size that overflows.
    """

class NcclCommunicator:
    """The Rust-owned communicator behind ``symm_rs.Communicator``."""

    def __new__(cls, unique_id: bytes, rank: int, size: int, device: int) -> NcclCommunicator: ...
    @staticmethod
    def unique_id() -> bytes:
        """A fresh 128-byte NCCL unique id."""
    @property
    def comm(self) -> int: ...
    @property
    def rank(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None:
        """Deregisters this communicator's windows and destroys it (idempotent; collective)."""
    def abort(self) -> None:
        """``ncclCommAbort``: destroys it without waiting for peers; windows are forgotten."""
    def run(self, kind: str, out: Any, inp: Any, stream: tuple[int, int], op: str = "sum") -> str:
        """Checks ``out``/``inp`` against this communicator, then enqueues ``kind`` on
        ``stream`` (``(cudaStream_t, device index)``). Returns ``"main"``, ``"twin"`` (routed
        to the policy's twin) or ``"stage"`` (nothing launched: the call needs a staging
        output, see ``set_stage_unaligned``)."""
    def set_stage_unaligned(self, on: bool) -> None:
        """Whether ``run`` answers ``"stage"`` for 16-bit all-gathers and reduce-scatters with
        an odd per-rank count on this communicator's windows."""
    def enable_twin(self) -> None:
        """Creates the size policy's window-less twin (``ncclCommSplit``; idempotent;
        collective). It routes nothing until ``set_route``."""
    def set_route(self, table: RouteTable) -> None:
        """Sends the calls ``table`` routes to the twin there; replaces the previous table."""
    @property
    def twin_comm(self) -> Optional[int]:
        """The twin's ``ncclComm_t`` address, or None without the policy."""

class use_symmetric_memory:
    """Allocate from the symmetric pool, and register new segments with ``group`` on exit
    (``symm_rs.use_symmetric_memory``; the common enter and exit run natively)."""

    disabled: bool
    graph_pool: Any
    timeout: Optional[float]
    @property
    def verify(self) -> bool:
        """As passed, else ``SYMM_RS_VERIFY`` read now (also read at each exit that
        registers)."""
    @verify.setter
    def verify(self, value: Optional[bool]) -> None: ...
    def __new__(
        cls,
        group: object,
        disabled: bool = False,
        graph_pool: Optional[Any] = None,
        verify: Optional[bool] = None,
        timeout: Optional[float] = None,
    ) -> use_symmetric_memory: ...
    @property
    def _resolved(self) -> Any: ...
    def __enter__(self) -> use_symmetric_memory: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool: ...

def set_graph_pool_id(pool_id: Optional[tuple[int, int]]) -> None:
    """Sets (``None``: clears) the graph pool id the captures that follow use."""

def graph_pool_id() -> Optional[tuple[int, int]]:
    """The graph pool id ``set_graph_pool_id`` set, if any."""

def pools_changed() -> None:
    """Pools were freed: no thread may route natively into a pool id it cached."""

def forget_group(comm: int) -> None:
    """Drops every cached group resolution to ``comm``."""

def routing_functions() -> tuple[Any, Any, Any]:
    """torch's ``(begin, end, release)`` routing functions, looked up once: the ones the native
    context calls, for ``symm_rs.pool`` to call too.

    Raises:
        SymmetricMemoryError: torch lacks one of them (symm_rs needs torch >= 2.8).
    """

# -- the seam of the native context: what symm_rs.context._enter takes and returns ------------

class GroupKind:
    """The kinds of group symm_rs accepts (``symm_rs.groups.kind_of`` classifies)."""

    GROUP: GroupKind
    PROCESS_GROUP: GroupKind
    ADDRESS: GroupKind
    PYNCCL: GroupKind
    COMM: GroupKind

class ContextTarget:
    """A group as the native context keeps it: the ``symm_rs.groups.Group`` (None for a one-rank
    group), its communicator, device and peer set, and its kind."""

    def __new__(
        cls,
        kind: Optional[GroupKind],
        group: Optional[Any],
        comm: int = 0,
        device: int = -1,
        peers: int = 0,
    ) -> ContextTarget: ...
    @property
    def kind(self) -> Optional[GroupKind]: ...
    @property
    def group(self) -> Optional[Any]: ...
    @property
    def comm(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def peers(self) -> int: ...

class OuterContext:
    """The context around the one being entered."""

    def route_needed(self, target: ContextTarget) -> bool:
        """Whether a context for ``target`` inside this one routes to a pool of its own.

        Raises:
            SymmetricMemoryError: ``target`` runs on another device.
        """

class Entered:
    """What ``symm_rs.context._enter`` hands back: the target, the route it began (an object
    with ``end()``; None: the context allocates where the one around it does), this thread's
    shared pool id when it routed there, and the pool's lane."""

    def __new__(
        cls,
        target: ContextTarget,
        route: Optional[Any] = None,
        shared_pool: Optional[Any] = None,
        lane: int = 0,
    ) -> Entered: ...

def set_context_rules(
    enter: Callable[..., Entered],
    exit: Callable[..., None],
    verify_default: Callable[[], bool],
) -> None:
    """Hands the native context the functions of ``symm_rs.context`` it calls (once, at that
    module's import): ``_enter`` and ``_exit`` on a group's first use, ``_verify_default`` for
    the ``verify`` attribute."""
