"""Can NCCL run its symmetric kernels on this communicator?

Registration succeeding says nothing: NCCL 2.27 and 2.28 hand back a window even where they will
never use a symmetric kernel, and each communicator still reserves a large symmetric address
range (140 GB per communicator measured on 2 and 4 x H200, NCCL 2.28.9). The answer comes from
what NCCL's sources require, per version, checked against the topology of the ranks:

* every version: more than one rank; windows (NCCL >= 2.27.3); ``NCCL_WIN_ENABLE`` and
  ``NCCL_CUMEM_ENABLE`` not 0;
* 2.27.x and 2.28.x: every rank on one node (no symmetric kernel spans nodes); every pair of
  GPUs with CUDA peer-to-peer access (NVLink or PCIe). 2.27 also obeys ``NCCL_P2P_DISABLE=1``.
  2.28 ignores it, but not forcing the network transport: with both ``NCCL_P2P_DISABLE=1`` and
  ``NCCL_SHM_DISABLE=1`` no symmetric kernel ran (measured, 2.28.9);
* 2.29 and later: single node, every pair of GPUs linked directly by NVLink, and not
  ``NCCL_P2P_DISABLE=1`` (PCIe-only nodes get none). Across nodes NCCL >= 2.29 has symmetric
  all-gather and reduce-scatter only through GIN with NVLink multicast, which symm_rs does not
  count on.

Sources: NVIDIA/nccl ``src/init.cc`` (``symmetricSupport``), ``src/scheduler/symmetric_sched.cc``
and ``src/enqueue.cc`` (``ncclSymkAvailable``) at v2.27.3, v2.28.9, v2.29.2 and v2.30.7.
The verdict is computed the same way on every rank from what all ranks report (one exchange
each way, once per communicator): ranks never disagree about skipping registration.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import socket
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

from symm_rs import _native, agreement, env
from symm_rs.groups import Group, on_forget, resolve
from symm_rs.library import library_info

log = logging.getLogger("symm_rs")


class NoSymmetricKernelsWarning(UserWarning):
    """A group's communicator cannot run NCCL's symmetric kernels, so symm_rs does not register
    its buffers (once per communicator)."""


@dataclass(frozen=True)
class SymmetricKernels:
    """Whether NCCL will run symmetric kernels on a communicator, and why (not)."""

    supported: bool
    reason: str

    def __bool__(self) -> bool:
        return self.supported


# Verdict codes, shared by every rank; 0 is "supported".
_REASONS = {
    0: "every rank is on one node and every GPU pair is linked as NCCL {v} requires",
    1: "ranks span {hosts} nodes, and NCCL {v} runs no symmetric kernel across nodes",
    2: "GPUs {pair} have no CUDA peer-to-peer access, which NCCL {v}'s symmetric kernels need",
    3: "GPUs {pair} are not linked directly by NVLink, which NCCL {v} requires",
    4: "NCCL_P2P_DISABLE=1 (on rank {rank}) turns symmetric kernels off in NCCL {v}",
    5: "NCCL_P2P_DISABLE=1 and NCCL_SHM_DISABLE=1 (on rank {rank}) force the network transport, "
    "and NCCL {v} then runs no symmetric kernel",
    6: "NCCL_WIN_ENABLE=0 (on rank {rank}) turns symmetric windows off",
    7: "NCCL_CUMEM_ENABLE=0 (on rank {rank}) turns off the cuMem memory symmetric windows need",
    8: "NCCL {v} cannot register symmetric windows (needs >= 2.27.3)",
}

_verdicts: dict[int, SymmetricKernels] = {}
_warned: set[int] = set()
_lock = threading.Lock()


def _forget(comm: int) -> None:
    with _lock:
        _verdicts.pop(comm, None)
        _warned.discard(comm)


on_forget(_forget)


def _env_off(name: str) -> bool:
    return os.environ.get(name, "").strip() == "0"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip() not in ("", "0")


def _host_key() -> int:
    """The same on every process of one machine (boot included), different across machines."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    digest = hashlib.sha256(f"{socket.gethostname()}/{boot}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def _bus_id(device: int) -> int:
    """The GPU's PCI address packed as domain << 24 | bus << 16 | device << 8."""
    import torch

    props = torch.cuda.get_device_properties(device)
    domain = int(getattr(props, "pci_domain_id", 0))
    return (
        domain << 24
        | int(getattr(props, "pci_bus_id", 0)) << 16
        | int(getattr(props, "pci_device_id", 0)) << 8
    )


def _bus_text(bus: int) -> str:
    return f"{bus >> 24:08x}:{(bus >> 16) & 0xFF:02x}:{(bus >> 8) & 0xFF:02x}.0"


class _Nvml:
    """The two NVML calls needed for peer-to-peer status, loaded from the driver's library."""

    P2P_READ = 0
    P2P_NVLINK = 2

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self._by_bus = lib.nvmlDeviceGetHandleByPciBusId_v2
        self._by_bus.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self._p2p = lib.nvmlDeviceGetP2PStatus
        self._p2p.argtypes = [
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_int),
        ]

    def _handle(self, bus: int) -> ctypes.c_void_p:
        handle = ctypes.c_void_p()
        if self._by_bus(_bus_text(bus).encode(), ctypes.byref(handle)) != 0:
            raise OSError(f"no NVML device at {_bus_text(bus)}")
        return handle

    def linked(self, a: int, b: int, capability: int) -> bool:
        status = ctypes.c_int(-1)
        code = self._p2p(self._handle(a), self._handle(b), capability, ctypes.byref(status))
        return code == 0 and status.value == 0  # NVML_P2P_STATUS_OK


def _nvml() -> Optional[_Nvml]:
    try:
        return _Nvml()
    except (OSError, AttributeError):
        return None


def _local_verdict(
    version: tuple[int, int, int], rows: list[list[int]], rank: int
) -> tuple[int, list[int]]:
    """This rank's verdict code and its details, from every rank's report."""
    if version < (2, 27, 3):
        return 8, []
    for r, (_, _, flags) in enumerate(rows):
        if flags & 4:
            return 6, [r]
        if flags & 8:
            return 7, [r]
    hosts = {host for host, _, _ in rows}
    if len(hosts) > 1:
        return 1, [len(hosts)]
    for r, (_, _, flags) in enumerate(rows):
        p2p_off, shm_off = bool(flags & 1), bool(flags & 2)
        if version >= (2, 29, 0) or version < (2, 28, 0):
            if p2p_off:
                return 4, [r]
        elif p2p_off and shm_off:
            return 5, [r]
    nvml = _nvml()
    if nvml is None:
        return 0, []  # nothing to check the links with: trust NCCL's own choice
    mine = rows[rank][1]
    for r, (_, bus, _) in enumerate(rows):
        if r == rank or bus == mine:
            continue
        try:
            if version >= (2, 29, 0):
                if not nvml.linked(mine, bus, _Nvml.P2P_NVLINK):
                    return 3, [rank, r]
            elif not nvml.linked(mine, bus, _Nvml.P2P_READ):
                return 2, [rank, r]
        except OSError:
            continue  # a device NVML cannot see from here: leave the pair to NCCL
    return 0, []


def _describe(code: int, details: list[int], version: tuple[int, int, int]) -> str:
    v = ".".join(map(str, version))
    fields = {"v": v, "rank": details[0] if details else "?", "hosts": details[0] if details else 0}
    if len(details) >= 2:
        fields["pair"] = f"of ranks {details[0]} and {details[1]}"
    return _REASONS[code].format(**fields)


def symmetric_kernels(group: object, timeout: Optional[float] = None) -> SymmetricKernels:
    """Whether NCCL can run its symmetric kernels on ``group``'s communicator, and why (not).
    Collective the first time per communicator (two small exchanges); cached after.

    Raises:
        AgreementError: not every rank took part within the timeout.
    """
    resolved = resolve(group)
    if resolved is None:
        return SymmetricKernels(False, "a one-rank group has no peers to share memory with")
    cached = _verdicts.get(resolved.comm)
    if cached is not None:
        return cached
    version = tuple(library_info()["version"])
    flags = (
        _env_on("NCCL_P2P_DISABLE")
        | _env_on("NCCL_SHM_DISABLE") << 1
        | _env_off("NCCL_WIN_ENABLE") << 2
        | _env_off("NCCL_CUMEM_ENABLE") << 3
    )
    rows = agreement.exchange(
        resolved, "topology", [_host_key(), _bus_id(resolved.device), flags], timeout
    )
    code, details = _local_verdict(version, [row[:3] for row in rows], resolved.rank)
    verdicts = agreement.exchange(resolved, "verdict", [code, *details, -1, -1][:3], timeout)
    failing = next((row for row in verdicts if row[0] != 0), None)
    if failing is None:
        verdict = SymmetricKernels(True, _describe(0, [], version))
    else:
        verdict = SymmetricKernels(
            False, _describe(failing[0], [x for x in failing[1:] if x >= 0], version)
        )
    with _lock:
        _verdicts[resolved.comm] = verdict
    log.info("%s: symmetric kernels %s: %s", resolved.name, bool(verdict), verdict.reason)
    return verdict


def known_verdict(group: Group) -> Optional[bool]:
    """The cached answer for ``group``, without communicating (``None`` if not asked yet)."""
    verdict = _verdicts.get(group.comm)
    return None if verdict is None else verdict.supported


def should_register(group: Group, timeout: Optional[float] = None) -> bool:
    """Whether to register ``group``'s pending segments: yes where NCCL can use them; where it
    cannot, warn once per communicator and skip (``SYMM_RS_REGISTER=always`` registers
    anyway; ``SYMM_RS_STRICT=1`` raises instead)."""
    verdict = symmetric_kernels(group, timeout)
    if verdict.supported:
        return True
    message = (
        f"{group.name}: NCCL cannot run symmetric kernels on this communicator ({verdict.reason}); "
        "symm_rs allocates its buffers from the pool but does not register them, which saves "
        "the registration time and NCCL's symmetric address range"
    )
    if env.read_flag(env.STRICT):
        raise _native.RegistrationError(f"{message} (SYMM_RS_STRICT=1 makes this an error)")
    with _lock:
        first = group.comm not in _warned
        _warned.add(group.comm)
    if first:
        warnings.warn(message, NoSymmetricKernelsWarning, stacklevel=4)
    return env.read_choice(env.REGISTER, env.REGISTER_CHOICES) == "always"
