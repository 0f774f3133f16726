"""Stubs for ``symm_rs._native``, the Rust core. Use the ``symm_rs`` package API instead; these
are the building blocks it is made of."""

from os import PathLike
from typing import Any, Optional, Union

__version__: str
LIBRARY_ENV: str

class SymmetricMemoryError(RuntimeError):
    """Base class of the errors symm_rs raises about NCCL and symmetric memory."""

class NcclLibraryError(SymmetricMemoryError):
    """libnccl is missing, too old, or lacks a symbol symm_rs needs."""

class NcclError(SymmetricMemoryError):
    """An NCCL call returned an error."""

class RegistrationError(SymmetricMemoryError):
    """A symmetric window could not be registered (NULL window, or ranks that disagree)."""

def load_nccl(wheel_candidates: list[Union[str, PathLike[str]]] = ...) -> dict[str, Any]:
    """Loads the process-wide libnccl (the one already loaded first) and describes it.

    Returns:
        ``path``, ``origin``, ``version`` (tuple), ``version_code``, ``windows_supported``,
        ``windows_problem`` and ``notes``.

    Raises:
        NcclLibraryError: no usable library.
    """

def probe_nccl(path: Union[str, PathLike[str]]) -> dict[str, Any]:
    """Opens one libnccl by path, apart from the process-wide one, and describes it."""

def register_pending(comm: int) -> int:
    """Registers every pool segment ``comm`` has not registered yet; collective.

    Raises:
        NcclLibraryError: NCCL cannot register windows.
        NcclError: ncclCommWindowRegister failed.
        RegistrationError: NCCL returned a NULL window.
        ValueError: ``comm`` is NULL or not readable memory.
    """

def release_comm(comm: int) -> int:
    """Deregisters every window ``comm`` holds; returns how many."""

def pending_sizes(comm: int) -> list[int]:
    """Sizes of the segments ``comm`` would register next, in order."""

def is_registered(ptr: int, nbytes: int, comm: int) -> bool:
    """Whether ``[ptr, ptr + nbytes)`` lies inside one window of ``comm``."""

def segment_of(ptr: int, nbytes: int) -> Optional[tuple[int, int, int]]:
    """``(ptr, size, device)`` of the pool segment holding the range, if any."""

def segment_position(ptr: int, nbytes: int) -> Optional[tuple[int, int]]:
    """``(position in allocation order, byte offset)`` of the range in its segment, if any."""

def comm_size(comm: int) -> int:
    """``ncclCommCount``."""

def comm_rank(comm: int) -> int:
    """``ncclCommUserRank``."""

def comm_device(comm: int) -> int:
    """``ncclCommCuDevice``."""

def take_last_error() -> Optional[str]:
    """This thread's most recent allocator-plug failure, cleared once read."""

def mark_exiting() -> None:
    """From now on the free plug leaves segments to the operating system (interpreter exit)."""

def stats() -> dict[str, Any]:
    """Segments, bytes, windows per communicator, and failure counters."""

def all_gather_on(comm: int, send: int, recv: int, count: int, dtype: int, stream: int) -> None:
    """``ncclAllGather`` on any communicator, for symm_rs's own control exchanges."""

def group_start() -> None:
    """``ncclGroupStart``."""

def group_end() -> None:
    """``ncclGroupEnd``."""

def check_reduce_op(op: str) -> None:
    """Raises ValueError unless ``op`` is sum, prod, max, min or avg."""

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
    def all_gather(self, send: int, recv: int, count: int, dtype: int, stream: int) -> None: ...
    def all_reduce(
        self, send: int, recv: int, count: int, dtype: int, op: str, stream: int
    ) -> None: ...
    def reduce_scatter(
        self, send: int, recv: int, count: int, dtype: int, op: str, stream: int
    ) -> None: ...
