"""Which libnccl symm_rs uses, and what it can do.

The library is loaded once per process by the Rust core: the ``libnccl.so.2`` already loaded
(torch's) first, then ``SYMM_RS_NCCL_LIBRARY``, then the NVIDIA wheels found on ``sys.path``,
then the system's. This module hands it the variable and the wheel candidates, and caches the
description, a typed ``LibraryInfo``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

from symm_rs import _native, env
from symm_rs.errors import NcclLibraryError

LibraryInfo = _native.LibraryInfo

_WHEEL_LIBRARY = os.path.join("nvidia", "nccl", "lib", "libnccl.so.2")
log = logging.getLogger("symm_rs")
_lock = threading.Lock()
_info: Optional[LibraryInfo] = None


def wheel_candidates() -> list[str]:
    """``nvidia/nccl/lib/libnccl.so.2`` under every ``sys.path`` entry that has one."""
    found: list[str] = []
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), _WHEEL_LIBRARY)
        if os.path.isfile(candidate) and candidate not in found:
            found.append(candidate)
    return found


def _import_torch_first() -> None:
    """Imports torch, when it is installed, so that its libnccl.so.2 is loaded before symm_rs
    chooses one: a communicator of a torch group is only valid in torch's library. (``import
    symm_rs`` itself no longer imports torch.)"""
    if "torch" in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401


def library_info() -> LibraryInfo:
    """Loads NCCL if needed and describes it: ``path``, ``origin``, ``version``,
    ``windows_supported`` (and ``windows_problem``), ``notes``.

    Raises:
        NcclLibraryError: no usable libnccl was found.
    """
    global _info
    if _info is None:
        _import_torch_first()
        with _lock:
            if _info is None:
                info = _native.load_nccl(wheel_candidates(), env.read_nccl_library())
                log.info(
                    "NCCL %s from %s (%s)",
                    ".".join(map(str, info.version)),
                    info.path,
                    info.origin,
                )
                for note in info.notes:
                    log.warning("%s", note)
                _info = info
    return _info


def nccl_version() -> tuple[int, int, int]:
    """``(major, minor, patch)`` of the libnccl symm_rs uses."""
    major, minor, patch = library_info().version
    return (major, minor, patch)


def nccl_library() -> str:
    """Absolute path of the libnccl symm_rs uses."""
    return str(library_info().path)


def require_windows() -> None:
    """Raises ``NcclLibraryError`` unless the library can register symmetric windows."""
    info = library_info()
    if not info.windows_supported:
        raise NcclLibraryError(info.windows_problem)


def _dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


@dataclass(frozen=True)
class NcclIssue:
    """A known NCCL defect that affects symmetric memory: releases ``first`` up to (not
    including) ``fixed`` have it. ``steered`` says how symm_rs avoids it in its own calls, and
    is empty when it cannot: ``doctor`` counts the first kind as a warning, the second as a
    problem."""

    first: tuple[int, int, int]
    fixed: tuple[int, int, int]
    summary: str
    reference: str
    steered: str = ""

    def affects(self, version: tuple[int, int, int]) -> bool:
        return self.first <= tuple(version)[:3] < self.fixed

    @property
    def affected(self) -> str:
        last = (*self.fixed[:2], self.fixed[2] - 1) if self.fixed[2] > 0 else None
        upper = _dotted(last) if last is not None else f"before {_dotted(self.fixed)}"
        return f"{_dotted(self.first)} to {upper}"

    @property
    def advice(self) -> str:
        return (
            f"upgrade NCCL to >= {_dotted(self.fixed)}: a torch release that depends on it, or "
            "pip install -U the nvidia-nccl-cuXX wheel your torch uses (pip then warns that "
            "torch pins an older one)"
        )

    def describe(self, version: tuple[int, int, int]) -> str:
        return (
            f"NCCL {_dotted(tuple(version)[:3])} (affected: {self.affected}; fixed in "
            f"{_dotted(self.fixed)}): {self.summary} ({self.reference})"
        )


# Known NCCL defects in symmetric kernels, oldest first.
NCCL_ISSUES: tuple[NcclIssue, ...] = (
    NcclIssue(
        first=(2, 28, 0),
        fixed=(2, 30, 7),
        summary="symmetric kernels are launched with programmatic dependent launch but lost "
        "their grid-dependency wait, so a collective can read its input before the kernel "
        "that wrote it has finished: silently wrong results, above all under CUDA-graph replay",
        reference="https://github.com/NVIDIA/nccl/issues/1924",
    ),
    NcclIssue(
        first=(2, 27, 0),
        fixed=(2, 30, 3),
        summary="symmetric LL kernels corrupt 16-bit data whose per-rank size is not a multiple "
        "of 4 bytes (odd bf16/fp16 counts): in-place all-gather wrong on every rank and "
        "reduce-scatter wrong on some, measured on 2.28.9 (symm_rs's Communicator and CP helper "
        "steer around it); NCCL 2.30.3 fixes 'data corruption in symmetric LL kernels with "
        "unaligned buffer'",
        reference="https://github.com/NVIDIA/nccl/releases/tag/v2.30.3-1",
        steered="symm_rs's Communicator stages such calls outside the windows and its CP helper "
        "pads every slot to 16 bytes; code that calls torch.distributed on symmetric buffers "
        "itself should keep per-rank counts of 16-bit data even",
    ),
)


# NCCL's own per-call algorithm choice, if a release adds one. Up to NCCL 2.30.7 (the newest
# source read, src/nccl.h.in) there is none: algorithms are chosen per communicator, by
# NCCL_ALGO or the tuner plugin, and no ncclAllReduceConfig or similar exists.
PER_CALL_SYMBOLS = ("ncclAllReduceConfig",)


def per_call_selection(path: str) -> tuple[bool, str]:
    """``(available, note)`` for the libnccl at ``path``: whether it offers NCCL's own per-call
    algorithm choice, which the size policy would use instead of a twin communicator."""
    try:
        lib = ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
    except OSError as e:
        return False, f"could not inspect {path}: {e}"
    found = [name for name in PER_CALL_SYMBOLS if hasattr(lib, name)]
    if not found:
        return False, (
            "this NCCL has no per-call algorithm selection (none up to 2.30.7); the policy "
            "routes through a window-less twin communicator"
        )
    return True, (
        f"this NCCL exports {', '.join(found)}, but symm_rs does not know its signature yet; "
        "the policy routes through a window-less twin communicator"
    )


def loaded_nccl_libraries(maps: str = "/proc/self/maps") -> list[str]:
    """The libnccl files mapped into this process (real paths, in the order first mapped): the
    one to judge, whatever torch reports as the version it was built with. Empty where
    ``maps`` cannot be read (not Linux)."""
    try:
        with open(maps) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        path = fields[5].strip() if len(fields) == 6 else ""
        name = os.path.basename(path)
        if name.startswith("libnccl") and ".so" in name:
            real = os.path.realpath(path)
            if real not in found:
                found.append(real)
    return found


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def global_nccl_library() -> Optional[str]:
    """The file whose ``ncclGetVersion`` a library that links NCCL by name (torch's) calls:
    the first definition in the process's global symbol scope, found as the dynamic linker
    finds it (``dlsym`` on the global handle, then ``dladdr``). A libnccl preloaded with
    ``LD_PRELOAD`` comes first there, even when torch also maps its own copy by path. ``None``
    when no libnccl is in the global scope."""
    process = ctypes.CDLL(None)
    try:
        symbol = process.ncclGetVersion
        dladdr = process.dladdr
    except AttributeError:
        return None
    info = _DlInfo()
    dladdr.argtypes = (ctypes.c_void_p, ctypes.POINTER(_DlInfo))
    address = ctypes.cast(symbol, ctypes.c_void_p).value
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def nccl_issues(version: tuple[int, int, int]) -> list[NcclIssue]:
    """The entries of ``NCCL_ISSUES`` that affect NCCL ``version``."""
    return [issue for issue in NCCL_ISSUES if issue.affects(version)]


def known_nccl_issues(version: tuple[int, int, int]) -> list[str]:
    """One sentence (with the advice) per known defect of NCCL ``version`` that affects
    symmetric memory; empty when none is known."""
    return [f"{issue.describe(version)}; {issue.advice}" for issue in nccl_issues(version)]


@dataclass(frozen=True)
class SharedLibrary:
    """One libnccl file that several installed distributions claim: installing the later one
    overwrote the earlier one's copy, and uninstalling either deletes the file for both."""

    path: str
    distributions: tuple[str, ...]  # "name version", in name order
    keep: Optional[str]  # the one torch requires, when torch names one of them

    @property
    def advice(self) -> str:
        names = [d.split()[0] for d in self.distributions]
        if self.keep is None:
            return (
                f"{self.path} belongs to {', '.join(names)} at once: uninstall all but the one "
                "your torch was built against, then reinstall that one with pip install "
                "--force-reinstall --no-deps NAME==VERSION"
            )
        keep = self.keep.split()[0]
        remove = [n for n in names if n != keep]
        return (
            f"pip uninstall -y {' '.join(remove)}, then restore torch's copy with pip install "
            f"--force-reinstall --no-deps {keep}=={self.keep.split()[1]} (uninstalling "
            f"{' '.join(remove)} deletes the shared file)"
        )


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _torch_requirements(distributions: list[Any]) -> set[str]:
    names: set[str] = set()
    for dist in distributions:
        if _canonical(dist.metadata.get("Name", "")) != "torch":
            continue
        for requirement in dist.requires or ():
            head = requirement.split(";")[0].strip()
            name = head
            for stop in "<>=!~[ (":
                name = name.split(stop)[0]
            names.add(_canonical(name))
    return names


def shared_nccl_libraries(path: Optional[list[str]] = None) -> list[SharedLibrary]:
    """libnccl files that two or more installed distributions install at the same place (for
    example ``nvidia-nccl-cu12`` and ``nvidia-nccl-cu13``, both ``nvidia/nccl/lib/libnccl.so.2``).

    ``path`` is the list of directories to look in (``sys.path`` when ``None``).
    """
    from importlib import metadata

    found = list(
        metadata.distributions(path=path) if path is not None else metadata.distributions()
    )
    owners: dict[str, list[str]] = {}
    for dist in found:
        name = dist.metadata.get("Name") or "?"
        label = f"{name} {dist.version}"
        for file in dist.files or ():
            if not (file.name.startswith("libnccl") and ".so" in file.name):
                continue
            real = os.path.realpath(str(dist.locate_file(file)))
            if label not in owners.setdefault(real, []):
                owners[real].append(label)
    wanted = _torch_requirements(found)
    shared = []
    for real, labels in sorted(owners.items()):
        if len(labels) < 2:
            continue
        labels = sorted(labels)
        keep = [label for label in labels if _canonical(label.split()[0]) in wanted]
        shared.append(SharedLibrary(real, tuple(labels), keep[0] if len(keep) == 1 else None))
    return shared
