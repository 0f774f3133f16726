"""``symm_rs.Communicator``: an NCCL communicator owned by the Rust core.

Engines run collectives directly on their own communicator, on a chosen stream, inside CUDA
graphs. Every buffer is checked against the communicator in Rust, next to the NCCL call it makes
sound, so a wrong device, dtype, size or layout is a Python exception naming the argument rather
than a hang or corrupt memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist

from symm_rs import _native, env
from symm_rs.checks import extent
from symm_rs.context import register_postponed_in_nccl_group
from symm_rs.errors import NotSymmetricWarning, RegistrationError, SymmetricMemoryError
from symm_rs.groups import Channel, drop_cached, store_of
from symm_rs.library import library_info, nccl_issues, per_call_selection
from symm_rs.ops import remember
from symm_rs.policy import Policy, PolicyTable, default_table

_CHECK_MODES = ("off", "warn", "raise")


def _mode_from_env() -> str:
    if env.read_flag(env.STRICT):
        return "raise"
    if env.read_flag(env.DEBUG):
        return "warn"
    return "off"


_window_check = _mode_from_env()


def set_window_check(mode: str) -> str:
    """What a Communicator collective does with a buffer outside its windows: ``"off"``
    (default), ``"warn"`` (once per call site; ``SYMM_RS_DEBUG=1``) or ``"raise"``
    (``SYMM_RS_STRICT=1``). Returns the previous mode.

    Raises:
        ValueError: unknown mode.
    """
    global _window_check
    if mode not in _CHECK_MODES:
        raise ValueError(f"mode must be one of {_CHECK_MODES}; got {mode!r}")
    previous, _window_check = _window_check, mode
    return previous


_warned_sites: set[tuple[str, int]] = set()


def _current_stream_getter() -> Callable[[int], int]:
    """The cheapest way to read a device's current ``cudaStream_t``: torch's raw getter (one C
    call, no ``torch.cuda.Stream`` object), else the public API."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw  # type: ignore[no-any-return]
    return lambda index: int(torch.cuda.current_stream(index).cuda_stream)


_current_stream = _current_stream_getter()


def _unaligned_ll_bug() -> bool:
    """Whether this NCCL has the symmetric LL kernels' unaligned 16-bit defect (see
    ``symm_rs.library.NCCL_ISSUES``; measured in tests/gpu/results/suite_alignment_*)."""
    version = library_info().version
    return any("unaligned" in issue.summary for issue in nccl_issues(version))


def resolve_policy(policy: Any, world_size: int) -> Optional[PolicyTable]:
    """The table a ``policy=`` argument asks for: None/False/"off" -> no policy; True/"auto"
    -> ``SYMM_RS_POLICY_TABLE`` if set, else the default for ``world_size``; a PolicyTable, its
    text form or a ``{collective: [(low, high), ...]}`` mapping -> that table.

    Raises:
        TypeError: a policy of another type.
        ValueError: a table that does not parse (also from the environment variable).
    """
    if policy is None or policy is False or policy == "off":
        return None
    if policy is True or policy == "auto":
        text = env.read_policy_table()
        return default_table(world_size) if text is None else PolicyTable.parse(text)
    if isinstance(policy, PolicyTable):
        return policy
    if isinstance(policy, str):
        return PolicyTable.parse(policy)
    if isinstance(policy, Mapping):
        return PolicyTable({op: tuple(tuple(s) for s in spans) for op, spans in policy.items()})
    raise TypeError(
        "policy must be None, True, 'auto', 'off', a PolicyTable, its text or a mapping; "
        f"got {type(policy).__name__}"
    )


class Communicator:
    """An NCCL communicator owned by symm_rs.

    Create it with ``Communicator.from_process_group(group)`` (the unique id travels through the
    group), or with ``Communicator(unique_id, rank, size, device)`` where rank 0 made the id with
    ``Communicator.unique_id()``. ``.comm`` is the ``ncclComm_t`` as an int, so the object can be
    passed as ``group`` to ``use_symmetric_memory`` and to other libraries. Closing (``close()``,
    ``with``, or garbage collection) deregisters its windows and destroys it; like every NCCL
    teardown it is collective.

    ``policy`` (default off) sends each collective to the faster of NCCL's symmetric kernels and
    its regular algorithms, by a table of byte ranges (see ``symm_rs.policy``): ``True`` uses
    ``SYMM_RS_POLICY_TABLE`` or the measured default for this world size; a ``PolicyTable`` or
    its text sets one. It costs a second NCCL communicator over the same ranks (its memory is
    measured in benches/results); every rank must use the same table.

    ``ranks`` (``from_process_group`` fills it in) are the global ranks it spans, in any order:
    groups over the same ranks then share one symmetric pool, so a buffer allocated for one of
    them is a window of each that registers. Without it, the communicator has a pool of its own.
    """

    __slots__ = (
        "__weakref__",
        "_device",
        "_forget",
        "_native",
        "_policy",
        "_symm_rs_channel",
        "_symm_rs_ranks",
        "_torch_device",
    )

    def __init__(
        self,
        unique_id: bytes,
        rank: int,
        size: int,
        device: Union[int, torch.device, None] = None,
        channel: Optional[Channel] = None,
        policy: Any = None,
        ranks: Optional[Sequence[int]] = None,
    ) -> None:
        if not isinstance(unique_id, (bytes, bytearray)):
            raise TypeError(f"unique_id must be bytes, got {type(unique_id).__name__}")
        index = _device_index(device)
        table = resolve_policy(policy, int(size))  # a bad policy fails before NCCL is called
        library_info()
        self._native = _native.NcclCommunicator(bytes(unique_id), int(rank), int(size), index)
        # Collected without close(): the native side destroys it; what symm_rs cached about
        # it must go too, before NCCL can hand its address to a new communicator.
        self._forget = weakref.finalize(self, drop_cached, int(self._native.comm))
        self._device = index
        self._torch_device = torch.device("cuda", index)
        # symm_rs's cross-rank checks on this communicator go through the store of the group
        # that carried its id, so they time out instead of hanging.
        self._symm_rs_channel = channel
        # The global ranks it spans, when known: buffers of every group over the same ranks
        # then come from one pool (symm_rs.groups.peer_set).
        self._symm_rs_ranks = None if ranks is None else tuple(int(r) for r in ranks)
        # Known once per communicator, not looked up per call; `run` decides staging in Rust.
        self._native.set_stage_unaligned(_unaligned_ll_bug())
        self._policy: Optional[Policy] = None
        if table is not None:
            self.enable_policy(table)
        remember(self)  # torch.ops.symm_rs.* find it by its address

    @staticmethod
    def unique_id() -> bytes:
        """A fresh NCCL unique id; make it on one rank and give it to all."""
        library_info()
        return bytes(_native.NcclCommunicator.unique_id())

    @classmethod
    def from_process_group(
        cls,
        group: Any = None,
        device: Union[int, torch.device, None] = None,
        policy: Any = None,
    ) -> Communicator:
        """A new communicator over the ranks of a ``torch.distributed`` group (collective).

        The group only carries the unique id (and symm_rs's cross-rank checks); it may use any
        backend (gloo works). ``policy`` as for ``Communicator``.
        """
        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group)}")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        resolve_policy(policy, size)  # a bad policy fails before the collective id exchange
        box: list[Optional[bytes]] = [cls.unique_id() if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        unique = box[0]
        assert unique is not None
        store = store_of(group)
        tag = "comm-" + hashlib.sha256(unique).hexdigest()[:16]
        channel = Channel(store, tag) if store is not None else None
        ranks = dist.get_process_group_ranks(group)
        return cls(unique, rank, size, device, channel, policy, ranks=ranks)

    @property
    def comm(self) -> int:
        """The ``ncclComm_t`` address (raises ValueError once closed)."""
        return int(self._native.comm)

    @property
    def rank(self) -> int:
        return int(self._native.rank)

    @property
    def size(self) -> int:
        return int(self._native.size)

    @property
    def device(self) -> torch.device:
        return self._torch_device

    @property
    def closed(self) -> bool:
        return bool(self._native.closed)

    # -- size policy -----------------------------------------------------------------------

    @property
    def policy(self) -> Optional[Policy]:
        """The size policy in use (table, mechanism, twin), or ``None`` when it is off."""
        return self._policy

    def enable_policy(self, policy: Any = True) -> Policy:
        """Turns the size policy on (or replaces its table): creates the window-less twin on
        first use, then routes by the table ``policy`` names (see ``Communicator``). Collective:
        the ranks check that they hold the same table, since ranks that route one call
        differently would wait on different communicators.

        Raises:
            ValueError: no table (``policy`` off), a table that does not parse, or ranks that
                disagree.
        """
        table = resolve_policy(policy, self.size)
        if table is None:
            raise ValueError("enable_policy needs a table or True; got an 'off' policy")
        self._agree_on(table.to_text())
        self._native.enable_twin()
        self._native.set_route(table.route_table)
        available, note = per_call_selection(library_info().path)
        twin = int(self._native.twin_comm)
        self._policy = Policy(table, "twin", twin, available, note)
        return self._policy

    def set_policy_table(self, table: Any) -> Policy:
        """``enable_policy(table)`` on a communicator whose policy is on. Collective."""
        if self._policy is None:
            raise ValueError("this Communicator's policy is off; use enable_policy(table)")
        return self.enable_policy(table)

    def route(self, op: str, nbytes: int) -> str:
        """Where an ``op`` call of ``nbytes`` per rank goes: ``"twin"`` or ``"main"``."""
        if self._policy is not None and self._policy.table.use_twin(op, nbytes):
            return "twin"
        return "main"

    def _agree_on(self, text: str) -> None:
        """Raises unless every rank passed the same ``text`` (two int64 all-reduces)."""
        digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")
        mine = torch.tensor([digest, -digest], dtype=torch.int64, device=self._torch_device)
        seen = mine.clone()
        self._native.run("all_reduce", seen, seen, self._handle(None), "max")
        if not torch.equal(seen.cpu(), mine.cpu()):
            raise ValueError(
                f"the ranks of this Communicator hold different policy tables (this rank: "
                f"{text!r}); set SYMM_RS_POLICY_TABLE alike on every rank"
            )

    def close(self) -> None:
        """Deregisters this communicator's windows and destroys it. Idempotent; collective.
        Destroy every CUDA graph that captured collectives on it first: NCCL waits for them."""
        if self._native.closed:
            return
        self._forget()  # symm_rs's caches; the native close releases the windows
        self._native.close()

    def abort(self) -> None:
        """``ncclCommAbort``: destroys it without waiting for peers or pending work, the way
        out when a peer failed (``SYMM_RS_ON_FAILURE=abort`` does it for symm_rs's own
        Communicators). Its windows are forgotten, not deregistered. Idempotent."""
        if self._native.closed:
            return
        self._forget()
        self._native.abort()

    # How symm_rs.groups finds the owner's abort for a group it resolved from this object.
    _symm_rs_abort = abort

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "Communicator(closed)"
        return f"Communicator(rank={self.rank}, size={self.size}, device={self._torch_device})"

    # -- collectives -----------------------------------------------------------------------

    def all_gather_into_tensor(
        self, out: torch.Tensor, inp: torch.Tensor, stream: Optional[torch.cuda.Stream] = None
    ) -> None:
        """Gathers every rank's ``inp`` into ``out`` (``size * inp.numel()`` elements), rank
        order, on ``stream`` (default: the current stream). Capturable in CUDA graphs."""
        self._run("all_gather", out, inp, "sum", stream)

    def reduce_scatter_tensor(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        op: str = "sum",
        stream: Optional[torch.cuda.Stream] = None,
    ) -> None:
        """Reduces ``inp`` (``size * out.numel()`` elements) across ranks and leaves this rank's
        block in ``out``. ``op`` is ``sum``, ``prod``, ``max``, ``min`` or ``avg``."""
        self._run("reduce_scatter", out, inp, op, stream)

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        out: Optional[torch.Tensor] = None,
        stream: Optional[torch.cuda.Stream] = None,
    ) -> torch.Tensor:
        """Reduces ``tensor`` across ranks into ``out`` (default: in place). Returns ``out``."""
        target = tensor if out is None else out
        self._run("all_reduce", target, tensor, op, stream)
        return target

    def _handle(self, stream: Optional[torch.cuda.Stream]) -> tuple[int, int]:
        """``(cudaStream_t, device index)`` of ``stream`` (default: the current stream)."""
        if stream is None:
            return (_current_stream(self._device), self._device)
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream)}")
        return (int(stream.cuda_stream), int(stream.device.index))

    def _run(
        self, kind: str, out: Any, inp: Any, op: str, stream: Optional[torch.cuda.Stream]
    ) -> None:
        """The common path: the stream handle, then one native call that reads and checks both
        tensors, picks the communicator (policy) and launches; the rest only when asked for."""
        if stream is None:  # the common case, inline
            handle = (_current_stream(self._device), self._device)
        else:
            handle = self._handle(stream)
        if _window_check != "off":
            self._check_windows(out, inp)
        if self._native.run(kind, out, inp, handle, op) == "stage":
            if stream is None:
                stream = torch.cuda.current_stream(self._torch_device)
            self._staged(kind, out, inp, op, stream, handle)

    def _staged(
        self,
        kind: str,
        out: torch.Tensor,
        inp: torch.Tensor,
        op: str,
        stream: torch.cuda.Stream,
        handle: tuple[int, int],
    ) -> None:
        """Runs the collective into a staging copy of ``out`` outside the windows, so NCCL uses
        its regular kernels, then copies it into ``out``. Inside ``nccl_group()`` the collective
        is only launched when the group ends, so the copy waits for that too."""
        with torch.cuda.stream(stream):
            staging = torch.empty_like(out)  # allocated, used and freed on the stream: ordered
        self._native.run(kind, staging, inp, handle, op)

        def copy_back() -> None:
            with torch.cuda.stream(stream):
                out.copy_(staging)

        if _native.in_group():
            _after_group(copy_back)
        else:
            copy_back()

    def _in_windows(self, tensor: torch.Tensor) -> bool:
        return bool(_native.is_registered(*extent(tensor), self.comm))

    def _check_windows(self, *tensors: Any) -> None:
        outside = [
            t
            for t in tensors
            if isinstance(t, torch.Tensor) and t.numel() and not self._in_windows(t)
        ]
        if not outside:
            return
        if _native.is_plain(self.comm):
            # Advice to allocate inside the context would be futile: no buffer can be a window.
            message = (
                f"{len(outside)} buffer(s) of this collective lie outside symmetric windows: "
                "NCCL refused symmetric windows on this communicator (it answered NULL windows, "
                "as NCCL >= 2.29 does for ranks it sees on different hosts), so symm_rs uses "
                "plain memory for it and NCCL runs no symmetric kernel on it"
            )
        else:
            message = (
                f"{len(outside)} buffer(s) of this collective lie outside every symmetric window "
                "of this communicator, so NCCL cannot use its symmetric kernels; allocate them "
                "inside symm_rs.use_symmetric_memory(<this communicator>)"
            )
        if _window_check == "raise":
            raise RegistrationError(message)
        frame = sys._getframe(3)
        site = (frame.f_code.co_filename, frame.f_lineno)
        if site not in _warned_sites:
            _warned_sites.add(site)
            warnings.warn(message, NotSymmetricWarning, stacklevel=4)


class _GroupState(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.after: list[Callable[[], None]] = []


_group_state = _GroupState()


def _after_group(callback: Callable[[], None]) -> None:
    _group_state.after.append(callback)


@contextlib.contextmanager
def nccl_group() -> Iterator[None]:
    """``ncclGroupStart``/``ncclGroupEnd`` around the collectives issued inside, so that several
    of them (on one or several communicators) launch as one. Work that must follow the launch
    (a staging copy, a registration postponed by a context that exited inside the group) runs
    when the outermost group ends."""
    _native.group_start()
    _group_state.depth += 1
    try:
        yield
    finally:
        _group_state.depth -= 1
        _native.group_end()
        if _group_state.depth == 0:
            after, _group_state.after = _group_state.after, []
            for callback in after:
                callback()
            register_postponed_in_nccl_group()


def _device_index(device: Union[int, torch.device, None]) -> int:
    if device is None:
        if not torch.cuda.is_available():
            raise SymmetricMemoryError("Communicator needs a CUDA GPU, and torch sees none")
        return int(torch.cuda.current_device())
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        return int(device.index if device.index is not None else torch.cuda.current_device())
    if isinstance(device, bool) or not isinstance(device, int):
        raise TypeError(f"device must be an int, a torch.device or None, got {type(device)}")
    if device < 0:
        raise ValueError(f"device must be >= 0, got {device}")
    return device
