"""``symm_rs.Communicator``: an NCCL communicator owned by the Rust core.

Engines run collectives directly on their own communicator, on a chosen stream, inside CUDA
graphs. Every argument is checked here, before NCCL sees it, so a wrong device, dtype, size or
layout is a Python exception naming the argument rather than a hang or corrupt memory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional, Union

import torch

from symm_rs import _native
from symm_rs.library import library_info

# ncclDataType_t codes. fp8 exists from NCCL 2.24 on.
_NCCL_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0,
    torch.uint8: 1,
    torch.int32: 2,
    torch.int64: 4,
    torch.float16: 6,
    torch.float32: 7,
    torch.float64: 8,
    torch.bfloat16: 9,
}
for _name, _code in (("uint32", 3), ("uint64", 5)):
    if hasattr(torch, _name):
        _NCCL_DTYPES[getattr(torch, _name)] = _code
_FP8_DTYPES: dict[str, int] = {"float8_e4m3fn": 10, "float8_e5m2": 11}
_FP8_MIN_VERSION = (2, 24, 0)
# First NCCL assumed free of the odd-count 16-bit symmetric-kernel bug. Not known yet: every
# release is treated as affected until a GPU run shows otherwise.
_ODD_16BIT_FIXED = (99, 0, 0)

_CHECK_MODES = ("off", "warn", "raise")


def _mode_from_env() -> str:
    if os.environ.get("SYMM_RS_STRICT", "0") not in ("", "0"):
        return "raise"
    if os.environ.get("SYMM_RS_DEBUG", "0") not in ("", "0"):
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


class NotSymmetricWarning(UserWarning):
    """A Communicator collective ran on a buffer outside this communicator's windows, so NCCL
    could not use its symmetric kernels (``SYMM_RS_DEBUG=1`` reports it)."""


_warned_sites: set[tuple[str, int]] = set()


def nccl_dtype(dtype: torch.dtype) -> int:
    """The ``ncclDataType_t`` code for a torch dtype.

    Raises:
        TypeError: NCCL (this version) has no such type.
    """
    code = _NCCL_DTYPES.get(dtype)
    if code is not None:
        return code
    fp8 = _FP8_DTYPES.get(str(dtype).replace("torch.", ""))
    if fp8 is not None:
        version = tuple(library_info()["version"])
        if version >= _FP8_MIN_VERSION:
            return fp8
        raise TypeError(f"{dtype} needs NCCL >= 2.24 for collectives; this NCCL is {version}")
    supported = ", ".join(sorted(str(d).replace("torch.", "") for d in _NCCL_DTYPES))
    raise TypeError(
        f"NCCL has no type for {dtype}; supported: {supported}, float8_e4m3fn, float8_e5m2"
    )


class Communicator:
    """An NCCL communicator owned by symm_rs.

    Create it with ``Communicator.from_process_group(group)`` (the unique id travels through the
    group), or with ``Communicator(unique_id, rank, size, device)`` where rank 0 made the id with
    ``Communicator.unique_id()``. ``.comm`` is the ``ncclComm_t`` as an int, so the object can be
    passed as ``group`` to ``use_symmetric_memory`` and to other libraries. Closing (``close()``,
    ``with``, or garbage collection) deregisters its windows and destroys it; like every NCCL
    teardown it is collective.
    """

    __slots__ = ("__weakref__", "_device", "_native", "_torch_device")

    def __init__(
        self,
        unique_id: bytes,
        rank: int,
        size: int,
        device: Union[int, torch.device, None] = None,
    ) -> None:
        if not isinstance(unique_id, (bytes, bytearray)):
            raise TypeError(f"unique_id must be bytes, got {type(unique_id).__name__}")
        index = _device_index(device)
        library_info()
        self._native = _native.NcclCommunicator(bytes(unique_id), int(rank), int(size), index)
        self._device = index
        self._torch_device = torch.device("cuda", index)

    @staticmethod
    def unique_id() -> bytes:
        """A fresh NCCL unique id; make it on one rank and give it to all."""
        library_info()
        return bytes(_native.NcclCommunicator.unique_id())

    @classmethod
    def from_process_group(
        cls, group: Any = None, device: Union[int, torch.device, None] = None
    ) -> Communicator:
        """A new communicator over the ranks of a ``torch.distributed`` group (collective).

        The group only carries the unique id; it may use any backend (gloo works).
        """
        import torch.distributed as dist

        if group is None:
            group = dist.group.WORLD
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed.ProcessGroup, got {type(group)}")
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        box: list[Optional[bytes]] = [cls.unique_id() if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
        unique = box[0]
        assert unique is not None
        return cls(unique, rank, size, device)

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

    def close(self) -> None:
        """Deregisters this communicator's windows and destroys it. Idempotent; collective."""
        self._native.close()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "Communicator(closed)"
        return f"Communicator(rank={self.rank}, size={self.size}, device={self._torch_device})"

    # -- argument checks -------------------------------------------------------------------

    def _check_tensor(self, name: str, tensor: object) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.device != self._torch_device:
            raise ValueError(
                f"{name} is on {tensor.device}, but this communicator runs on {self._torch_device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
        return tensor

    def _check_pair(self, out: object, inp: object) -> tuple[torch.Tensor, torch.Tensor, int]:
        out_t = self._check_tensor("out", out)
        inp_t = self._check_tensor("inp", inp)
        if out_t.dtype != inp_t.dtype:
            raise TypeError(f"out is {out_t.dtype} but inp is {inp_t.dtype}; they must match")
        return out_t, inp_t, nccl_dtype(inp_t.dtype)

    def _stream(self, stream: Optional[torch.cuda.Stream]) -> int:
        if stream is None:
            return int(torch.cuda.current_stream(self._torch_device).cuda_stream)
        if not isinstance(stream, torch.cuda.Stream):
            raise TypeError(f"stream must be a torch.cuda.Stream or None, got {type(stream)}")
        if stream.device != self._torch_device:
            raise ValueError(
                f"stream is on {stream.device}, but this communicator runs on {self._torch_device}"
            )
        return int(stream.cuda_stream)

    def _check_windows(self, *tensors: torch.Tensor) -> None:
        from symm_rs.memory import _extent

        comm = self.comm
        outside = [t for t in tensors if t.numel() and not _native.is_registered(*_extent(t), comm)]
        if not outside:
            return
        message = (
            f"{len(outside)} buffer(s) of this collective lie outside every symmetric window of "
            "this communicator, so NCCL cannot use its symmetric kernels; allocate them inside "
            "symm_rs.use_symmetric_memory(<this communicator>)"
        )
        if _window_check == "raise":
            raise _native.RegistrationError(message)
        frame = sys._getframe(2)
        site = (frame.f_code.co_filename, frame.f_lineno)
        if site not in _warned_sites:
            _warned_sites.add(site)
            warnings.warn(message, NotSymmetricWarning, stacklevel=3)

    # -- collectives -----------------------------------------------------------------------

    def all_gather_into_tensor(
        self, out: torch.Tensor, inp: torch.Tensor, stream: Optional[torch.cuda.Stream] = None
    ) -> None:
        """Gathers every rank's ``inp`` into ``out`` (``size * inp.numel()`` elements), rank
        order, on ``stream`` (default: the current stream). Capturable in CUDA graphs."""
        out_t, inp_t, dtype = self._check_pair(out, inp)
        size = self.size
        if out_t.numel() != inp_t.numel() * size:
            raise ValueError(
                f"out must hold size * inp.numel() = {size} * {inp_t.numel()} elements, "
                f"got {out_t.numel()}"
            )
        handle = self._stream(stream)
        if _window_check != "off":
            self._check_windows(out_t, inp_t)
        self._into(
            out_t,
            inp_t,
            inp_t.numel(),
            stream,
            lambda recv: self._native.all_gather(
                inp_t.data_ptr(), recv, inp_t.numel(), dtype, handle
            ),
        )

    def reduce_scatter_tensor(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        op: str = "sum",
        stream: Optional[torch.cuda.Stream] = None,
    ) -> None:
        """Reduces ``inp`` (``size * out.numel()`` elements) across ranks and leaves this rank's
        block in ``out``. ``op`` is ``sum``, ``prod``, ``max``, ``min`` or ``avg``."""
        out_t, inp_t, dtype = self._check_pair(out, inp)
        _native.check_reduce_op(op)
        size = self.size
        if inp_t.numel() != out_t.numel() * size:
            raise ValueError(
                f"inp must hold size * out.numel() = {size} * {out_t.numel()} elements, "
                f"got {inp_t.numel()}"
            )
        handle = self._stream(stream)
        if _window_check != "off":
            self._check_windows(out_t, inp_t)
        self._into(
            out_t,
            inp_t,
            out_t.numel(),
            stream,
            lambda recv: self._native.reduce_scatter(
                inp_t.data_ptr(), recv, out_t.numel(), dtype, op, handle
            ),
        )

    def _into(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        count: int,
        stream: Optional[torch.cuda.Stream],
        launch: Callable[[int], None],
    ) -> None:
        """Runs ``launch(recv_address)`` into ``out``, or into a staging copy of it when
        ``_needs_staging`` says NCCL's symmetric kernel would get this call wrong."""
        if not self._needs_staging(count, out, inp):
            launch(out.data_ptr())
            return
        # Allocated, used and freed on the collective's stream, so reuse is stream-ordered.
        with torch.cuda.stream(_external(stream, self._torch_device)):
            staging = torch.empty_like(out)
            launch(staging.data_ptr())
            out.copy_(staging)

    def _needs_staging(self, count: int, out: torch.Tensor, inp: torch.Tensor) -> bool:
        """Whether this call must steer around NCCL's symmetric kernels: measured on H100 with
        NCCL 2.28.9, all-gather (in place always, reduce-scatter sometimes) returns wrong values
        for 16-bit data with an odd per-rank count when both buffers are in windows
        (tests/gpu/results/suite_alignment_*). NCCL picks a symmetric kernel only when both
        buffers are registered, so a staging output outside the windows keeps the call on its
        regular kernels."""
        if count % 2 == 0 or out.element_size() != 2:
            return False
        if tuple(library_info()["version"]) >= _ODD_16BIT_FIXED:
            return False
        from symm_rs.memory import _extent

        comm = self.comm
        return bool(
            _native.is_registered(*_extent(out), comm)
            and _native.is_registered(*_extent(inp), comm)
        )

    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        out: Optional[torch.Tensor] = None,
        stream: Optional[torch.cuda.Stream] = None,
    ) -> torch.Tensor:
        """Reduces ``tensor`` across ranks into ``out`` (default: in place). Returns ``out``."""
        tensor_t = self._check_tensor("tensor", tensor)
        out_t = tensor_t if out is None else self._check_tensor("out", out)
        if out_t.dtype != tensor_t.dtype:
            raise TypeError(f"out is {out_t.dtype} but tensor is {tensor_t.dtype}; they must match")
        if out_t.numel() != tensor_t.numel():
            raise ValueError(
                f"out must have as many elements as tensor ({tensor_t.numel()}), "
                f"got {out_t.numel()}"
            )
        dtype = nccl_dtype(tensor_t.dtype)
        _native.check_reduce_op(op)
        handle = self._stream(stream)
        if _window_check != "off":
            self._check_windows(out_t, tensor_t)
        self._native.all_reduce(
            tensor_t.data_ptr(), out_t.data_ptr(), tensor_t.numel(), dtype, op, handle
        )
        return out_t


@contextlib.contextmanager
def nccl_group() -> Iterator[None]:
    """``ncclGroupStart``/``ncclGroupEnd`` around the collectives issued inside, so that several
    of them (on one or several communicators) launch as one."""
    _native.group_start()
    try:
        yield
    finally:
        _native.group_end()


def _external(stream: Optional[torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream:
    return stream if stream is not None else torch.cuda.current_stream(device)


def _device_index(device: Union[int, torch.device, None]) -> int:
    if device is None:
        if not torch.cuda.is_available():
            raise _native.SymmetricMemoryError("Communicator needs a CUDA GPU, and torch sees none")
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
