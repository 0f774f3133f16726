"""Can NCCL run its symmetric kernels on this communicator?

Registration succeeding says little: NCCL 2.27 and 2.28 hand back a window even where they will
never use a symmetric kernel, and each communicator still reserves a large symmetric address
range (140 GB per communicator measured on 2 and 4 x H200, NCCL 2.28.9). The verdict follows
NCCL's own judgement wherever NCCL gives one:

* NCCL >= 2.28 answers itself: ``ncclCommQueryProperties`` reports ``deviceApiSupport``,
  which is the communicator's ``symmetricSupport`` (NVIDIA/nccl ``src/init.cc``); and
  NCCL >= 2.29 answers a registration it cannot serve with a NULL window, which makes the
  communicator plain on every rank alike (``nccl_refused``);
* "one node" is NCCL's notion of a node: its host hash, which ``NCCL_HOSTID`` overrides (several
  ranks of one machine with different ids are different nodes to NCCL, and to symm_rs);
* every version: windows need NCCL >= 2.27.3; ``NCCL_WIN_ENABLE`` and ``NCCL_CUMEM_ENABLE`` not
  0. Only where NCCL cannot answer (2.27.x) does symm_rs judge the links itself, from what
  NCCL's sources require: CUDA peer-to-peer between every pair of GPUs (NVML), not
  ``NCCL_P2P_DISABLE=1``.

Sources: NVIDIA/nccl ``src/init.cc`` (``symmetricSupport``, ``ncclCommQueryProperties``),
``src/scheduler/symmetric_sched.cc`` and ``src/enqueue.cc`` (``ncclSymkAvailable``) at v2.27.3,
v2.28.9, v2.29.2 and v2.30.7. Every rank posts its part in the communicator's first registration
round (``symm_rs.registration``) and computes the verdict from the same rows: ranks never
disagree about skipping registration.
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
from symm_rs.errors import NoSymmetricKernelsWarning, RegistrationError, SymmetricMemoryError
from symm_rs.groups import Group, on_forget, resolve
from symm_rs.library import library_info

log = logging.getLogger("symm_rs")


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
    9: "NCCL {v} reports no symmetric support for this communicator (ncclCommQueryProperties, "
    "rank {rank})",
    10: "NCCL {v} answered its registration with a NULL window (no symmetric support here)",
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
    """NCCL's own identity of this host: ``NCCL_HOSTID`` when set (then NCCL treats ranks with
    different ids as different nodes, even on one machine), else host name and boot id, as
    NCCL's ``getHostHash`` does."""
    host_id = os.environ.get("NCCL_HOSTID", "").strip()
    if host_id:
        text = f"NCCL_HOSTID={host_id}"
    else:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot = f.read().strip()
        except OSError:
            boot = ""
        text = f"{socket.gethostname()}/{boot}"
    digest = hashlib.sha256(text.encode()).digest()
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
    """The NVML calls needed for peer-to-peer status, loaded from the driver's library."""

    P2P_READ = 0
    P2P_NVLINK = 2

    def __init__(self) -> None:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        if lib.nvmlInit_v2() != 0:
            raise OSError("nvmlInit failed")
        self._by_bus = lib.nvmlDeviceGetHandleByPciBusId_v2
        self._by_bus.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        self._by_index = lib.nvmlDeviceGetHandleByIndex_v2
        self._by_index.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self._index = lib.nvmlDeviceGetIndex
        self._index.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)]
        self._count = lib.nvmlDeviceGetCount_v2
        self._count.argtypes = [ctypes.POINTER(ctypes.c_uint)]
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

    def links(self, bus: int, capability: int) -> tuple[int, int]:
        """``(NVML index of the GPU at bus, bitmask of the NVML indices it is linked to)``:
        NVML indexes every GPU of the host the same way in every process, so ranks can compare
        these without knowing each other's GPUs first."""
        mine = self._handle(bus)
        index, count = ctypes.c_uint(), ctypes.c_uint()
        if self._index(mine, ctypes.byref(index)) != 0 or self._count(ctypes.byref(count)) != 0:
            raise OSError("NVML could not index the GPUs")
        mask = 0
        for other in range(min(count.value, 62)):
            if other == index.value:
                continue
            handle, status = ctypes.c_void_p(), ctypes.c_int(-1)
            if self._by_index(other, ctypes.byref(handle)) != 0:
                continue
            code = self._p2p(mine, handle, capability, ctypes.byref(status))
            if code == 0 and status.value == 0:  # NVML_P2P_STATUS_OK
                mask |= 1 << other
        return index.value, mask


def _nvml() -> Optional[_Nvml]:
    try:
        return _Nvml()
    except (OSError, AttributeError):
        return None


# What each rank posts for the verdict, once per communicator, inside its first registration
# round: NCCL's host identity, the GPU's bus id, the NCCL_* switches, NCCL's own answer (1, 0,
# or -1 where this NCCL cannot say), and the NVML index and link mask (-1 where unknown).
TOPOLOGY_INTS = 6


def _flags() -> int:
    return (
        _env_on("NCCL_P2P_DISABLE")
        | _env_on("NCCL_SHM_DISABLE") << 1
        | _env_off("NCCL_WIN_ENABLE") << 2
        | _env_off("NCCL_CUMEM_ENABLE") << 3
    )


def topology_record(group: Group) -> list[int]:
    """This rank's part of the verdict (see ``TOPOLOGY_INTS``)."""
    try:
        said = _native.symmetric_support(group.comm)
    except SymmetricMemoryError:
        said = None
    answer = -1 if said is None else int(bool(said))
    bus = _bus_id(group.device)
    index, mask = -1, -1
    if answer < 0:  # only NCCL without its own answer needs the links judged here
        nvml = _nvml()
        if nvml is not None:
            version = tuple(library_info().version)
            kind = _Nvml.P2P_NVLINK if version >= (2, 29, 0) else _Nvml.P2P_READ
            try:
                index, mask = nvml.links(bus, kind)
            except OSError:
                index, mask = -1, -1
    return [_host_key(), bus, _flags(), answer, index, mask]


def verdict_from(version: tuple[int, int, int], rows: list[list[int]]) -> SymmetricKernels:
    """The verdict from every rank's ``topology_record``; every rank computes the same one from
    the same rows. NCCL's own answer decides where every rank has it."""
    code, details = _code(version, rows)
    return SymmetricKernels(code == 0, _describe(code, details, version))


def _code(version: tuple[int, int, int], rows: list[list[int]]) -> tuple[int, list[int]]:
    if version < (2, 27, 3):
        return 8, []
    for r, row in enumerate(rows):
        if row[2] & 4:
            return 6, [r]
        if row[2] & 8:
            return 7, [r]
    hosts = {row[0] for row in rows}
    if len(hosts) > 1:
        return 1, [len(hosts)]
    answers = [row[3] for row in rows]
    if all(a >= 0 for a in answers):
        refusing = next((r for r, a in enumerate(answers) if a == 0), None)
        return (0, []) if refusing is None else (9, [refusing])
    for r, row in enumerate(rows):
        p2p_off, shm_off = bool(row[2] & 1), bool(row[2] & 2)
        if version >= (2, 29, 0) or version < (2, 28, 0):
            if p2p_off:
                return 4, [r]
        elif p2p_off and shm_off:
            return 5, [r]
    for r, row in enumerate(rows):
        if row[5] < 0:
            continue  # NVML could not say: leave the pair to NCCL
        for s, other in enumerate(rows):
            if s == r or other[4] < 0 or other[4] == row[4]:
                continue
            if not (row[5] >> other[4]) & 1:
                return (3 if version >= (2, 29, 0) else 2), [r, s]
    return 0, []


def _describe(code: int, details: list[int], version: tuple[int, int, int]) -> str:
    v = ".".join(map(str, version))
    fields = {"v": v, "rank": details[0] if details else "?", "hosts": details[0] if details else 0}
    if len(details) >= 2:
        fields["pair"] = f"of ranks {details[0]} and {details[1]}"
    return _REASONS[code].format(**fields)


def settle(group: Group, rows: list[list[int]]) -> SymmetricKernels:
    """Records the verdict for ``group`` from every rank's topology record (the same rows on
    every rank, from one round)."""
    verdict = verdict_from(tuple(library_info().version), rows)
    with _lock:
        _verdicts[group.comm] = verdict
    log.info("%s: symmetric kernels %s: %s", group.name, bool(verdict), verdict.reason)
    return verdict


def nccl_refused(group: Group) -> None:
    """NCCL answered a registration on ``group`` with a NULL window: NCCL's own verdict (it
    decides per communicator, so every rank got the same answer). Warn once; the communicator
    is plain from now on."""
    verdict = SymmetricKernels(False, _REASONS[10].format(v=".".join(map(str, _version()))))
    with _lock:
        _verdicts[group.comm] = verdict
    _warn_once(group, verdict)


def _version() -> tuple[int, int, int]:
    major, minor, patch = library_info().version
    return (int(major), int(minor), int(patch))


def symmetric_kernels(group: object, timeout: Optional[float] = None) -> SymmetricKernels:
    """Whether NCCL can run its symmetric kernels on ``group``'s communicator, and why (not).
    Collective the first time per communicator (one agreement round: it is part of the first
    registration otherwise); cached after.

    Raises:
        AgreementError: not every rank took part within the timeout.
    """
    resolved = resolve(group)
    if resolved is None:
        return SymmetricKernels(False, "a one-rank group has no peers to share memory with")
    cached = _verdicts.get(resolved.comm)
    if cached is not None:
        return cached
    rows = agreement.exchange(resolved, "verdict", topology_record(resolved), timeout)
    return settle(resolved, [row[:TOPOLOGY_INTS] for row in rows])


def known_verdict(group: Group) -> Optional[bool]:
    """The cached answer for ``group``, without communicating (``None`` if not asked yet)."""
    verdict = _verdicts.get(group.comm)
    return None if verdict is None else verdict.supported


def _warn_once(group: Group, verdict: SymmetricKernels) -> None:
    message = (
        f"{group.name}: NCCL cannot run symmetric kernels on this communicator ({verdict.reason}); "
        "symm_rs allocates its buffers from the pool but does not register them, on every rank "
        "alike, which saves the registration time and NCCL's symmetric address range"
    )
    with _lock:
        first = group.comm not in _warned
        _warned.add(group.comm)
    if first:
        warnings.warn(message, NoSymmetricKernelsWarning, stacklevel=5)


def should_register(group: Group) -> bool:
    """Whether to register ``group``'s pending segments, from its settled verdict: yes where
    NCCL can use them; where it cannot, warn once per communicator and skip
    (``SYMM_RS_REGISTER=always`` registers anyway; ``SYMM_RS_STRICT=1`` raises instead)."""
    verdict = _verdicts.get(group.comm)
    if verdict is None or verdict.supported:
        return True
    if env.read_flag(env.STRICT):
        raise RegistrationError(
            f"{group.name}: NCCL cannot run symmetric kernels on this communicator "
            f"({verdict.reason}) (SYMM_RS_STRICT=1 makes this an error)"
        )
    if env.read_choice(env.REGISTER, env.REGISTER_CHOICES) == "always":
        return True
    _warn_once(group, verdict)
    return False
