"""Scenarios run by tests/test_stand_in.py, each in a fresh process that never imports torch.

    SYMM_RS_NCCL_LIBRARY=/tmp/.../libnccl_stand_in.so python scenarios.py <name> [args...]

symm_rs always uses a libnccl.so.2 already in the process (torch's), so the stand-in can only be
tested where torch was never imported: ``symm_rs._native`` is loaded directly (native_loader.py),
the allocator plugs are called through ctypes exactly as torch's CUDAPluggableAllocator calls
them, and the stand-in's knobs and counters are reached through ctypes on the same library.
A scenario checks with ``check``/``raises`` and prints ``SCENARIO OK <name>`` when all held.
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import threading
import traceback
import types
from typing import Any, Callable

# The exceptions the core raises are symm_rs.errors' (pure Python: no torch, no native module).
from symm_rs import errors

from native_loader import load_native, native_path

_native = load_native()
SCENARIOS: dict[str, Callable[..., None]] = {}

# symm_rs refuses communicator addresses that are not readable memory (it would crash on them),
# so the stand-in's fake communicators are addresses of real, never-freed host buffers.
_COMM_STORAGE: list[Any] = []


def fake_comm() -> int:
    """A readable address to serve as a stand-in ncclComm_t."""
    buffer = ctypes.create_string_buffer(64)
    _COMM_STORAGE.append(buffer)
    return ctypes.addressof(buffer)


COMM_A = fake_comm()
COMM_B = fake_comm()
KIB = 1024


class ScenarioFailure(AssertionError):
    pass


def check(condition: object, message: str) -> None:
    """An assert that survives ``python -O`` and says what was expected."""
    if not condition:
        raise ScenarioFailure(message)


def raises(exc_type: type[BaseException], fn: Callable[..., Any], *args: Any) -> str:
    """Calls ``fn(*args)``, checks it raises ``exc_type`` (exactly that class or a subclass), and
    returns the message."""
    try:
        result = fn(*args)
    except exc_type as e:
        return str(e)
    except BaseException as e:
        raise ScenarioFailure(
            f"{fn.__name__}{args} raised {type(e).__name__}: {e}; expected {exc_type.__name__}"
        ) from e
    raise ScenarioFailure(f"{fn.__name__}{args} returned {result!r}; expected {exc_type.__name__}")


def contains_all(message: str | None, *parts: str) -> None:
    check(message is not None, f"expected a message containing {parts}, got None")
    assert message is not None
    missing = [p for p in parts if p not in message]
    check(not missing, f"message lacks {missing}: {message!r}")


class StandIn:
    """The stand-in libnccl symm_rs loads (dlopen of the same path gives the same handle)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or os.environ["SYMM_RS_NCCL_LIBRARY"]
        self.lib = ctypes.CDLL(self.path)
        self.lib.stand_in_set.argtypes = [ctypes.c_char_p, ctypes.c_long]
        self.lib.stand_in_set.restype = ctypes.c_int
        self.lib.stand_in_get.argtypes = [ctypes.c_char_p]
        self.lib.stand_in_get.restype = ctypes.c_long

    def set(self, key: str, value: int) -> None:
        check(self.lib.stand_in_set(key.encode(), value) == 0, f"unknown stand-in knob {key}")

    def get(self, key: str) -> int:
        value = int(self.lib.stand_in_get(key.encode()))
        check(value >= 0, f"unknown stand-in counter {key}")
        return value

    def counters(self) -> dict[str, int]:
        keys = ("allocs", "frees", "registers", "deregisters", "live_windows")
        return {k: self.get(k) for k in keys}


class Plugs:
    """``symm_rs_alloc``/``symm_rs_free`` called as torch's CUDAPluggableAllocator calls them.
    ctypes releases the GIL around each call, so threads really run the plugs concurrently."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL(native_path())
        self.lib.symm_rs_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.lib.symm_rs_alloc.restype = ctypes.c_void_p
        self.lib.symm_rs_free.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        self.lib.symm_rs_free.restype = None
        self.lib.symm_rs_abi_version.argtypes = []
        self.lib.symm_rs_abi_version.restype = ctypes.c_char_p

    def alloc(self, size: int, device: int = 0) -> int:
        """The pointer, or 0 for NULL."""
        return self.lib.symm_rs_alloc(size, device, None) or 0

    def alloc_ok(self, size: int, device: int = 0) -> int:
        ptr = self.alloc(size, device)
        check(ptr != 0, f"symm_rs_alloc({size}) returned NULL: {_native.take_last_error()}")
        return ptr

    def free(self, ptr: int, size: int, device: int = 0) -> None:
        self.lib.symm_rs_free(ptr, size, device, None)


def scenario(fn: Callable[..., None]) -> Callable[..., None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def stats() -> Any:
    return _native.stats()


def comm_of(s: Any, comm: int) -> Any:
    """The ``CommStats`` of ``comm`` in ``s`` (a ``Stats``), or ``None``."""
    return next((c for c in s.communicators if c.comm == comm), None)


def load_nccl(wheels: list[str]) -> Any:
    """``_native.load_nccl`` as ``symm_rs.library`` calls it: the Rust core reads no variable,
    so the stand-in's path (``SYMM_RS_NCCL_LIBRARY``) is passed along."""
    return _native.load_nccl(wheels, os.environ.get("SYMM_RS_NCCL_LIBRARY"))


def expect_clean(si: StandIn) -> None:
    """Everything allocated was freed, every window deregistered, nothing failed."""
    c = si.counters()
    s = stats()
    check(c["live_windows"] == 0, f"windows left registered: {c}")
    check(c["deregisters"] == c["registers"], f"registers != deregisters: {c}")
    check(c["frees"] == c["allocs"], f"allocs != frees: {c}")
    check(s.segments == 0 and s.bytes == 0, f"segments left in the table: {s}")
    check(s.segments_tracked == s.segments_freed == c["allocs"], f"{s} vs {c}")
    check(s.windows_registered == s.windows_deregistered == c["registers"], f"{s} vs {c}")
    for key in ("deregistration_failures", "alloc_failures", "free_failures", "leaked_segments"):
        check(s[key] == 0, f"stats[{key!r}] = {s[key]}")


# --- loading ------------------------------------------------------------------------------


@scenario
def load_stand_in() -> None:
    si = StandIn()
    info = load_nccl([])
    check(info.origin == "SYMM_RS_NCCL_LIBRARY", f"origin: {info}")
    check(os.path.realpath(info.path) == os.path.realpath(si.path), f"path: {info}")
    check(tuple(info.version) == (2, 28, 9), f"version: {info}")
    check(info.version_code == 22809, f"version_code: {info}")
    check(info.windows_supported is True, f"windows: {info}")
    check(info.windows_problem is None, f"windows_problem: {info}")
    check(list(info.notes) == [], f"notes: {info}")
    # A second load returns the same library, whatever the candidates.
    again = load_nccl(["/nonexistent/libnccl.so.2"])
    check(again == info, f"second load differs: {again} vs {info}")
    abi = Plugs().lib.symm_rs_abi_version().decode()
    check(abi == _native.__version__, f"symm_rs_abi_version {abi} != {_native.__version__}")


@scenario
def load_too_old() -> None:
    si = StandIn()
    si.set("version", 22600)  # read by symm_rs when it loads the library, so set it first
    info = load_nccl([])
    check(tuple(info.version) == (2, 26, 0), f"version: {info}")
    check(info.windows_supported is False, f"windows: {info}")
    contains_all(info.windows_problem, si.path, "2.26.0", "2.27.3")
    message = raises(errors.NcclLibraryError, _native.register_pending, 1)
    contains_all(message, si.path, "2.26.0", "2.27.3", "ncclCommWindowRegister")
    check(si.get("registers") == 0, "registered on a library too old for windows")
    # The pool itself (ncclMemAlloc, 2.19+) still works without windows.
    plugs = Plugs()
    ptr = plugs.alloc_ok(64 * KIB)
    plugs.free(ptr, 64 * KIB)
    expect_clean(si)


@scenario
def load_no_windows() -> None:
    si = StandIn()
    info = load_nccl([])
    check(tuple(info.version) == (2, 28, 9), f"version: {info}")
    check(info.windows_supported is False, f"windows: {info}")
    contains_all(info.windows_problem, si.path, "ncclCommWindowRegister")
    message = raises(errors.NcclLibraryError, _native.register_pending, COMM_A)
    contains_all(message, si.path, "ncclCommWindowRegister")
    plugs = Plugs()
    ptr = plugs.alloc_ok(8 * KIB)
    check(_native.release_comm(COMM_A) == 0, "release_comm without windows")
    plugs.free(ptr, 8 * KIB)
    check(_native.take_last_error() is None, "a plug failed")
    check(si.get("frees") == 1, "the segment was not freed")
    check(stats().segments == 0, f"{stats()}")


@scenario
def load_missing() -> None:
    path = os.environ["SYMM_RS_NCCL_LIBRARY"]
    message = raises(errors.NcclLibraryError, load_nccl, [])
    contains_all(message, path, "SYMM_RS_NCCL_LIBRARY", "pip install nvidia-nccl")
    # The plug loads lazily too: it must return NULL and keep the same explanation.
    check(Plugs().alloc(4096) == 0, "alloc without a library returned a pointer")
    contains_all(_native.take_last_error(), "symm_rs_alloc", path)
    check(stats().alloc_failures == 1, f"{stats()}")
    # Still failing, not cached as something else.
    raises(errors.NcclLibraryError, load_nccl, [])


@scenario
def load_missing_says_why() -> None:
    # dlopen's own reason (dlerror) is what tells a missing file from a missing dependency.
    raises(errors.NcclLibraryError, load_nccl, [])
    message = raises(errors.NcclLibraryError, load_nccl, [])
    contains_all(message, "No such file or directory")


@scenario
def load_not_nccl() -> None:
    message = raises(errors.NcclLibraryError, load_nccl, [])
    contains_all(message, "ncclGetVersion")


@scenario
def load_not_nccl_names_path() -> None:
    path = os.environ["SYMM_RS_NCCL_LIBRARY"]
    message = raises(errors.NcclLibraryError, load_nccl, [])
    contains_all(message, path)


@scenario
def load_real_wheel(path: str, version: str) -> None:
    check("SYMM_RS_NCCL_LIBRARY" not in os.environ, "the override must not be set here")
    expected = tuple(int(p) for p in version.split(".")[:3])
    info = load_nccl([path])
    check(info.origin == "NVIDIA NCCL wheel", f"origin: {info}")
    check(os.path.realpath(info.path) == os.path.realpath(path), f"path: {info} vs {path}")
    check(tuple(info.version) == expected, f"version: {info} vs wheel {version}")
    check(info.windows_supported is True, f"windows: {info}")
    check(info.windows_problem is None, f"windows_problem: {info}")
    probe = _native.probe_nccl(path)
    check(tuple(probe.version) == expected, f"probe version: {probe}")
    check(os.path.realpath(probe.path) == os.path.realpath(path), f"probe path: {probe}")
    check(probe.windows_supported is True, f"probe windows: {probe}")
    with open("/proc/self/maps") as maps:
        check(os.path.realpath(path) in maps.read(), "the wheel's libnccl is not mapped")


# --- plugs and table ----------------------------------------------------------------------


@scenario
def plugs_and_table() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    sizes = [32 * KIB, 8 * KIB, 16 * KIB]
    ptrs = [plugs.alloc_ok(size) for size in sizes]
    check(len(set(ptrs)) == 3, f"duplicate pointers {ptrs}")
    s = stats()
    check(s.segments == 3 and s.bytes == sum(sizes), f"{s}")
    listed = [_native.segment_of(p, 1) for p in ptrs]
    check(listed == [(p, size, 0) for p, size in zip(ptrs, sizes)], f"segments {listed}")
    check(list(_native.pending_sizes(COMM_A)) == sizes, "pending not in allocation order")

    check(_native.register_pending(COMM_A) == 3, "register_pending count")
    check(si.get("registers") == 3 and si.get("live_windows") == 3, f"{si.counters()}")
    check(_native.register_pending(COMM_A) == 0, "second register_pending registered again")
    check(si.get("registers") == 3, f"registered twice: {si.counters()}")
    check(list(_native.pending_sizes(COMM_A)) == [], "still pending after registration")
    s = stats()
    a = comm_of(s, COMM_A)
    check(a.windows == 3 and a.window_bytes == sum(sizes), f"{a}")
    check(a.pending_segments == 0 and a.device == 0, f"{a}")
    check(s.windows_registered == 3, f"{s}")

    # Lookups: the whole range must lie inside one segment registered with that communicator.
    p, size = ptrs[0], sizes[0]
    check(_native.is_registered(p, size, COMM_A), "whole segment")
    check(_native.is_registered(p + 100, 200, COMM_A), "inside")
    check(_native.is_registered(p + size - 1, 1, COMM_A), "last byte")
    check(_native.is_registered(p + size - 1, 0, COMM_A), "zero bytes at the last byte")
    check(not _native.is_registered(p + size - 8, 16, COMM_A), "straddling the end")
    check(not _native.is_registered(p - 8, 16, COMM_A), "straddling the start")
    check(not _native.is_registered(p, size, COMM_B), "other communicator")
    outside = max(ptrs[i] + sizes[i] for i in range(3)) + 4096
    check(not _native.is_registered(outside, 1, COMM_A), "outside every segment")
    check(_native.segment_of(p + 100, 200) == (p, size, 0), f"{_native.segment_of(p + 100, 200)}")
    check(_native.segment_of(p + size - 8, 16) is None, "segment_of straddling")
    check(_native.segment_of(outside, 1) is None, "segment_of outside")

    # A segment allocated after A's registration; B registers everything, A only the new one.
    ptrs.append(plugs.alloc_ok(4 * KIB))
    sizes.append(4 * KIB)
    check(list(_native.pending_sizes(COMM_A)) == [4 * KIB], "pending after a new segment")
    check(list(_native.pending_sizes(COMM_B)) == sizes, "pending for a fresh communicator")
    check(_native.register_pending(COMM_B) == 4, "B registers the whole pool")
    check(_native.register_pending(COMM_A) == 1, "A registers only the new segment")
    check(si.get("live_windows") == 8, f"{si.counters()}")
    check(all(len(w) == 2 for *_, w in _native.segments()), f"{_native.segments()}")
    for p, size in zip(ptrs, sizes):
        check(_native.is_registered(p, size, COMM_A) and _native.is_registered(p, size, COMM_B), "")

    # release_comm deregisters only that communicator's windows and forgets it.
    check(_native.release_comm(COMM_A) == 4, "release_comm count")
    check(si.get("live_windows") == 4 and si.get("deregisters") == 4, f"{si.counters()}")
    check(comm_of(stats(), COMM_A) is None, "released communicator still listed")
    check(not _native.is_registered(ptrs[0], 1, COMM_A), "A's window survived release_comm")
    check(_native.is_registered(ptrs[0], 1, COMM_B), "B's window was released with A's")
    check(_native.release_comm(COMM_A) == 0, "second release_comm")
    check(_native.release_comm(fake_comm()) == 0, "release_comm of an unknown communicator")

    # Free a segment in the middle: its window is deregistered, then it is freed; B's index
    # stays right (nothing pending, nothing registered twice).
    before = si.counters()
    plugs.free(ptrs[1], sizes[1])
    after = si.counters()
    check(after["deregisters"] == before["deregisters"] + 1, f"{before} -> {after}")
    check(after["frees"] == before["frees"] + 1, f"{before} -> {after}")
    check(after["live_windows"] == 3, f"{after}")
    check(_native.segment_of(ptrs[1], 1) is None, "freed segment still tracked")
    check(_native.register_pending(COMM_B) == 0, "B re-registered after a free")
    del ptrs[1], sizes[1]
    # A seen again starts from scratch and registers what is left, in order.
    check(list(_native.pending_sizes(COMM_A)) == sizes, "pending for a released communicator")
    check(_native.register_pending(COMM_A) == 3, "A after release")

    for p, size in zip(ptrs, sizes):
        plugs.free(p, size)
    check(_native.take_last_error() is None, "a plug failed")
    expect_clean(si)
    check(si.get("allocs") == 4, f"{si.counters()}")


@scenario
def other_device_segments() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    # Without a CUDA driver the plug's device guard is a no-op; the device is still recorded.
    on_1 = plugs.alloc_ok(8 * KIB, device=1)
    on_0 = plugs.alloc_ok(4 * KIB, device=0)
    check(_native.segment_of(on_1, 1) == (on_1, 8 * KIB, 1), f"{_native.segment_of(on_1, 1)}")
    check(list(_native.pending_sizes(COMM_A)) == [4 * KIB], "pending crosses devices")
    check(_native.register_pending(COMM_A) == 1, "the stand-in's communicators are on device 0")
    check(not _native.is_registered(on_1, 1, COMM_A), "device 1 segment registered on device 0")
    check(_native.is_registered(on_0, 1, COMM_A), "device 0 segment")
    a = comm_of(stats(), COMM_A)
    check(a.windows == 1 and a.pending_segments == 0, f"{a}")
    plugs.free(on_1, 8 * KIB, device=1)
    plugs.free(on_0, 4 * KIB, device=0)
    expect_clean(si)


# --- faults -------------------------------------------------------------------------------


@scenario
def alloc_failure() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    si.set("fail_alloc", 1)  # the stand-in then writes 0xdeadbeef into *ptr, like a real OOM
    ptr = plugs.alloc(64 * KIB)
    check(ptr == 0, f"symm_rs_alloc returned {ptr:#x} for a failed ncclMemAlloc, not NULL")
    message = _native.take_last_error()
    contains_all(message, "symm_rs_alloc", "ncclMemAlloc", "ncclUnhandledCudaError")
    check(_native.take_last_error() is None, "take_last_error did not clear")
    s = stats()
    check(s.alloc_failures == 1 and s.segments == 0, f"{s}")
    check(_native.segment_of(0xDEADBEEF, 1) is None, "the garbage pointer was tracked")
    check(si.get("allocs") == 0, f"{si.counters()}")

    si.set("fail_alloc", 0)
    ptr = plugs.alloc_ok(64 * KIB)
    check(_native.register_pending(COMM_A) == 1, "register after a failed alloc")
    plugs.free(ptr, 64 * KIB)
    check(_native.take_last_error() is None, "a plug failed after recovery")
    s = stats()
    check(s.alloc_failures == 1 and s.segments == 0, f"{s}")
    check(si.get("live_windows") == 0 and si.get("frees") == 1, f"{si.counters()}")

    # Size 0 is refused before NCCL is asked.
    check(plugs.alloc(0) == 0, "size 0 gave a pointer")
    contains_all(_native.take_last_error(), "size 0")
    check(stats().alloc_failures == 2 and si.get("allocs") == 1, f"{stats()}")


@scenario
def alloc_failure_detail() -> None:
    si = StandIn()
    load_nccl([])
    si.set("fail_alloc", 1)
    check(Plugs().alloc(64 * KIB) == 0, "failed alloc gave a pointer")
    # NCCL's own explanation (ncclGetLastError) is what says it was an out-of-memory.
    contains_all(_native.take_last_error(), "ncclMemAlloc", "out of memory")


@scenario
def null_alloc() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    si.set("null_alloc", 1)
    check(plugs.alloc(4 * KIB) == 0, "NULL from ncclMemAlloc became a pointer")
    contains_all(_native.take_last_error(), "symm_rs_alloc", "ncclMemAlloc", "NULL")
    s = stats()
    check(s.alloc_failures == 1 and s.segments == 0, f"{s}")
    si.set("null_alloc", 0)
    ptr = plugs.alloc_ok(4 * KIB)
    plugs.free(ptr, 4 * KIB)
    check(stats().segments == 0 and _native.take_last_error() is None, f"{stats()}")


@scenario
def register_failure_then_retry() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    sizes = [4 * KIB, 8 * KIB, 12 * KIB, 16 * KIB]
    ptrs = [plugs.alloc_ok(size) for size in sizes]

    si.set("fail_register_at", 3)  # the third registration from now fails
    message = raises(errors.NcclError, _native.register_pending, COMM_A)
    contains_all(message, "ncclCommWindowRegister", "stand-in: injected registration failure")
    contains_all(message, "ncclInvalidUsage")
    check(si.get("registers") == 2, f"{si.counters()}")
    registered = [_native.is_registered(p, 1, COMM_A) for p in ptrs]
    check(registered == [True, True, False, False], f"first two in allocation order: {registered}")
    check(list(_native.pending_sizes(COMM_A)) == sizes[2:], "pending after the failure")
    s = stats()
    check(s.windows_registered == 2 and comm_of(s, COMM_A).windows == 2, f"{s}")
    check(comm_of(s, COMM_A).pending_segments == 2, f"{s}")

    # The retry registers exactly the rest, in order: fail the second of the two to prove it.
    si.set("fail_register_at", 2)
    raises(errors.NcclError, _native.register_pending, COMM_A)
    registered = [_native.is_registered(p, 1, COMM_A) for p in ptrs]
    check(registered == [True, True, True, False], f"third next: {registered}")
    check(_native.register_pending(COMM_A) == 1, "the last retry registers the last segment")
    check(si.get("registers") == 4, f"registered more than once: {si.counters()}")
    check(_native.register_pending(COMM_A) == 0, "nothing left")
    check(all(_native.is_registered(p, size, COMM_A) for p, size in zip(ptrs, sizes)), "")

    for p, size in zip(ptrs, sizes):
        plugs.free(p, size)
    expect_clean(si)


@scenario
def null_window_makes_the_communicator_plain() -> None:
    # NCCL answers "no symmetric memory on this communicator" with success and a NULL window
    # (2.29+, e.g. across hosts). That is NCCL's verdict, the same on every rank: no error,
    # nothing recorded, and nothing registered on that communicator again; others unaffected.
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    ptrs = [plugs.alloc_ok(8 * KIB), plugs.alloc_ok(8 * KIB)]
    si.set("null_window", 1)
    check(_native.register_pending(COMM_A) == 0, "a NULL window made a window")
    check(_native.is_plain(COMM_A), "a NULL window must make the communicator plain")
    check(_native.is_up_to_date(COMM_A), "a plain communicator has nothing to register")
    check(not any(_native.is_registered(p, 1, COMM_A) for p in ptrs), "NULL window recorded")
    s = stats()
    check(s.windows_registered == 0, f"{s}")
    check(all(not w for *_, w in _native.segments()), f"{_native.segments()}")
    check(comm_of(s, COMM_A).plain, f"{s}")
    check(comm_of(s, COMM_A).pending_segments == 0, f"{s}")
    check(si.get("live_windows") == 0, f"{si.counters()}")

    si.set("null_window", 0)
    registers = si.get("registers")
    check(_native.register_pending(COMM_A) == 0, "a plain communicator registered again")
    check(si.get("registers") == registers, "a plain communicator reached NCCL's register")
    check(_native.register_pending(COMM_B) == 2, "another communicator is not affected")
    for p in ptrs:
        plugs.free(p, 8 * KIB)
    c = si.counters()
    check(c["live_windows"] == 0 and c["frees"] == 2, f"{c}")
    s = stats()
    check(s.windows_registered == s.windows_deregistered == 2 and s.segments == 0, f"{s}")


@scenario
def deregister_failure_at_free() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    ptr = plugs.alloc_ok(16 * KIB)
    check(_native.register_pending(COMM_A) == 1 and _native.register_pending(COMM_B) == 1, "")

    si.set("fail_deregister", 1)
    plugs.free(ptr, 16 * KIB)  # must neither crash nor unwind into the caller
    c = si.counters()
    check(c["frees"] == 0, f"ncclMemFree ran on a segment NCCL still maps: {c}")
    check(c["live_windows"] == 2, f"{c}")
    s = stats()
    check(s.leaked_segments == 1 and s.free_failures == 1, f"{s}")
    check(s.deregistration_failures == 2, f"{s}")
    check(s.segments == 0, f"the leaked segment is still handed out: {s}")
    message = _native.take_last_error()
    contains_all(message, "symm_rs_free", hex(ptr), "not freed", "2 window(s)")
    contains_all(message, "ncclCommWindowDeregister", "injected deregistration failure")

    # The process keeps working once deregistration works again.
    si.set("fail_deregister", 0)
    ptr = plugs.alloc_ok(16 * KIB)
    check(_native.register_pending(COMM_A) == 1, "register after a leak")
    plugs.free(ptr, 16 * KIB)
    check(_native.take_last_error() is None, "a plug failed after recovery")
    c = si.counters()
    check(c["frees"] == 1 and c["live_windows"] == 2, f"{c}")
    s = stats()
    check(s.leaked_segments == 1 and s.free_failures == 1 and s.segments == 0, f"{s}")


@scenario
def release_comm_failure_keeps_segment_safe() -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    ptr = plugs.alloc_ok(16 * KIB)
    check(_native.register_pending(COMM_A) == 1, "register")
    si.set("fail_deregister", 1)
    message = raises(errors.NcclError, _native.release_comm, COMM_A)
    contains_all(message, "ncclCommWindowDeregister")
    check(si.get("live_windows") == 1, f"{si.counters()}")
    si.set("fail_deregister", 0)
    # NCCL still maps the segment through COMM_A's window. Either a retry of release_comm or
    # the free must deregister it first; otherwise the segment must be kept (leaked), never
    # handed to ncclMemFree under a live window.
    _native.release_comm(COMM_A)
    plugs.free(ptr, 16 * KIB)
    c = si.counters()
    check(
        c["live_windows"] == 0 or c["frees"] == 0,
        f"ncclMemFree ran while NCCL still held a window on the segment: {c}",
    )


@scenario
def null_communicator() -> None:
    load_nccl([])
    contains_all(raises(ValueError, _native.comm_info, 0), "ncclCommCount", "NULL")
    contains_all(raises(ValueError, _native.register_pending, 0), "NULL")
    check(_native.comm_info(COMM_A) == (2, 0, 0), "size, rank and device of the stand-in")
    check(comm_of(stats(), COMM_A) is None, "queries must not register a communicator")


# --- concurrency --------------------------------------------------------------------------


@scenario
def stress(threads: str = "8", iterations: str = "200") -> None:
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    n_threads, n_iter = int(threads), int(iterations)
    shared = [fake_comm() for _ in range(3)]
    own = [fake_comm() for _ in range(n_threads)]
    all_comms = set(shared) | set(own)
    errors: list[str] = []
    live: set[int] = set()
    live_lock = threading.Lock()
    workers_done = threading.Event()
    start = threading.Barrier(n_threads + len(shared) + 1)
    samples = [0]

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException:
                errors.append(traceback.format_exc())

        return run

    def worker(index: int) -> None:
        rng = random.Random(index)
        start.wait()
        for _ in range(n_iter):
            size = rng.choice((4, 8, 12, 64)) * KIB
            ptr = plugs.alloc(size)
            check(ptr != 0, f"alloc failed: {_native.take_last_error()}")
            with live_lock:
                check(ptr not in live, f"{ptr:#x} handed out twice")
                live.add(ptr)
            roll = rng.random()
            if roll < 0.5:
                comm = own[index] if roll < 0.25 else rng.choice(shared)
                _native.register_pending(comm)
                # The segment was tracked before this call, so it is now in a window of comm.
                check(_native.is_registered(ptr, size, comm), f"{ptr:#x} not in {comm:#x}")
            check(_native.segment_of(ptr, size) == (ptr, size, 0), f"{ptr:#x} lost")
            with live_lock:
                live.remove(ptr)
            plugs.free(ptr, size)

    def registrar(comm: int) -> None:
        start.wait()
        while not workers_done.is_set():
            _native.register_pending(comm)

    def sampler() -> None:
        while not workers_done.is_set():
            listing = _native.segments()  # one consistent snapshot, under the table lock
            for ptr, _, _, comms in listing:
                # A window per (segment, communicator) at most.
                check(len(set(comms)) == len(comms), f"duplicate windows on {ptr:#x}: {comms}")
                check(set(comms) <= set(all_comms), f"unknown communicator on {ptr:#x}")
            samples[0] += 1

    pool = [threading.Thread(target=guarded(lambda i=i: worker(i))) for i in range(n_threads)]
    helpers = [threading.Thread(target=guarded(lambda c=c: registrar(c))) for c in shared]
    watcher = threading.Thread(target=guarded(sampler))
    for t in (*pool, *helpers):
        t.start()
    watcher.start()
    start.wait()
    for t in pool:
        t.join(timeout=50)
    workers_done.set()
    for t in (*helpers, watcher):
        t.join(timeout=10)
    check(not any(t.is_alive() for t in (*pool, *helpers, watcher)), "a thread hung")
    check(not errors, "thread failures:\n" + "\n".join(errors[:3]))
    check(samples[0] > 0, "the sampler never ran")

    total = n_threads * n_iter
    c = si.counters()
    check(c["allocs"] == total and c["frees"] == total, f"{c} (expected {total})")
    check(c["registers"] > 0, f"nothing was registered: {c}")
    expect_clean(si)
    check(_native.take_last_error() is None, "a plug failed")
    for comm in all_comms:
        check(_native.release_comm(comm) == 0, "windows left after every segment was freed")
    print(f"stress: {total} segments, {c['registers']} windows, {samples[0]} snapshots")


class FakeDtype:
    """Stands for a torch dtype: a singleton whose ``str`` is torch's name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __str__(self) -> str:
        return f"torch.{self.name}"


BF16, F32 = FakeDtype("bfloat16"), FakeDtype("float32")


# symm_rs hands NCCL a pointer only from a real ``torch.Tensor``; these processes must not import
# torch (it would bring its own libnccl), so a stand-in ``torch`` module supplies the class.
_fake_torch = types.ModuleType("torch")


class _TensorBase:
    """The stand-in ``torch.Tensor``."""


_fake_torch.Tensor = _TensorBase  # type: ignore[attr-defined]


def use_fake_torch() -> None:
    sys.modules.setdefault("torch", _fake_torch)


class LooksLikeATensor:
    """Just the methods ``_native`` reads from a torch tensor, and nothing else."""

    def __init__(self, ptr: int, numel: int, dtype: FakeDtype = BF16, device: int = 0) -> None:
        self.ptr, self.n, self.dtype, self.device_index = ptr, numel, dtype, device

    def data_ptr(self) -> int:
        return self.ptr

    def numel(self) -> int:
        return self.n

    def get_device(self) -> int:
        return self.device_index

    def is_contiguous(self) -> bool:
        return True


class FakeTensor(LooksLikeATensor, _TensorBase):
    """A stand-in ``torch.Tensor``."""


@scenario
def communicator_routing() -> None:
    """The Communicator core on the stand-in: launches on the communicator, the policy twin
    made by ncclCommSplit and the calls the route table sends to it, the staging answer for odd
    16-bit counts on windows, argument errors, and a close that destroys both."""
    si = StandIn()
    use_fake_torch()
    load_nccl([])
    c = _native.NcclCommunicator(b"x" * 128, 0, 2, 0)
    check(si.get("comms_made") == 1 and c.twin_comm is None, f"{si.get('comms_made')}")
    plugs = Plugs()
    seg_small, seg_big = plugs.alloc_ok(64 * KIB), plugs.alloc_ok(128 * KIB)
    check(_native.register_pending(c.comm) == 2, "windows on the communicator")
    small, big = FakeTensor(seg_small, 4096), FakeTensor(seg_big, 8192)
    stream = (0, 0)
    # Finding 13: an object with a tensor's methods could name any address; it never reaches
    # NCCL.
    impostor = LooksLikeATensor(seg_big, 8192)
    message = raises(TypeError, c.run, "all_gather", impostor, small, stream)
    contains_all(message, "out must be a torch.Tensor", "LooksLikeATensor")
    check(si.get("launches") == 0, "an impostor reached NCCL")
    check(c.run("all_gather", big, small, stream) == "main", "all-gather on the communicator")
    check(si.get("last_comm") == c.comm and si.get("last_count") == 4096, "launch arguments")

    everything = _native.RouteTable([("all_reduce", 0, None)])
    message = raises(errors.SymmetricMemoryError, c.set_route, everything)
    contains_all(message, "no policy twin")
    c.enable_twin()
    c.enable_twin()  # idempotent
    twin = c.twin_comm
    check(si.get("splits") == 1 and twin not in (None, c.comm), f"twin {twin}")
    c.set_route(_native.RouteTable([("all_reduce", 8 * KIB, None), ("reduce_scatter", 0, 4 * KIB)]))
    check(c.run("all_reduce", small, small, stream) == "twin", "8 KiB all-reduce: twin")
    check(si.get("last_comm") == twin, "launched on the twin")
    half = FakeTensor(seg_small, 2048)
    check(c.run("all_reduce", half, half, stream, "max") == "main", "4 KiB all-reduce: main")
    check(si.get("last_comm") == c.comm, "launched on the communicator")
    check(c.run("reduce_scatter", FakeTensor(seg_small, 1024), half, stream) == "twin", "rs")
    check(c.run("all_gather", big, small, stream) == "main", "all-gather stays")

    # Odd 16-bit per-rank counts on windows: nothing launched, the caller stages.
    c.set_stage_unaligned(True)
    launches = si.get("launches")
    odd_in, odd_out = FakeTensor(seg_small, 4095), FakeTensor(seg_big, 8190)
    check(c.run("all_gather", odd_out, odd_in, stream) == "stage", "odd bf16 all-gather")
    check(si.get("launches") == launches, "a staged call launched")
    odd32 = (FakeTensor(seg_big, 8190, F32), FakeTensor(seg_small, 4095, F32))
    check(c.run("all_gather", odd32[0], odd32[1], stream) == "main", "odd fp32: no staging")
    outside = FakeTensor(fake_comm(), 8190)
    check(c.run("all_gather", outside, odd_in, stream) == "main", "staging output: launched")
    c.set_route(_native.RouteTable([("all_gather", 0, None)]))
    check(c.run("all_gather", odd_out, odd_in, stream) == "twin", "on the twin: no staging")

    contains_all(raises(ValueError, _native.RouteTable, [("broadcast", 0, None)]), "broadcast")
    cpu = FakeTensor(seg_small, 4096, device=-1)
    contains_all(raises(ValueError, c.run, "all_reduce", cpu, cpu, stream), "not a CUDA tensor")
    contains_all(raises(TypeError, c.run, "all_reduce", object(), small, stream), "torch.Tensor")
    bad = FakeTensor(seg_small, 4096, FakeDtype("complex64"))
    contains_all(raises(TypeError, c.run, "all_reduce", bad, bad, stream), "NCCL has no type")

    c.close()
    c.close()
    check(si.get("comms_destroyed") == 2, f"destroyed {si.get('comms_destroyed')}")
    contains_all(raises(ValueError, lambda: c.twin_comm), "closed")
    contains_all(raises(ValueError, c.run, "all_reduce", small, small, stream), "closed")
    plugs.free(seg_small, 64 * KIB)
    plugs.free(seg_big, 128 * KIB)
    expect_clean(si)


@scenario
def communicator_host_cost(calls: str = "20000") -> None:
    """Host cost per call of the native launch path against a ctypes call of the same stand-in
    ncclAllGather that reads ``data_ptr()``/``numel()`` per call (as SGLang's pynccl does).
    Prints the two figures; the stand-in launch itself costs nanoseconds."""
    import time

    si = StandIn()
    use_fake_torch()
    load_nccl([])
    c = _native.NcclCommunicator(b"x" * 128, 0, 2, 0)
    plugs = Plugs()
    seg_small, seg_big = plugs.alloc_ok(64 * KIB), plugs.alloc_ok(128 * KIB)
    small, big = FakeTensor(seg_small, 4096), FakeTensor(seg_big, 8192)
    f = si.lib.ncclAllGather
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    f.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
    comm, n = c.comm, int(calls)

    def native() -> None:
        c.run("all_gather", big, small, (0, 0), "sum")

    def raw() -> None:
        f(small.data_ptr(), big.data_ptr(), small.numel(), 9, comm, 0)

    figures = {}
    for name, fn in (("native", native), ("ctypes", raw)) * 2:  # the second round counts
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        figures[name] = (time.perf_counter() - t0) / n * 1e6
    print(
        f"host cost per call: native {figures['native']:.2f} us, ctypes {figures['ctypes']:.2f} us"
    )
    check(si.get("launches") == 4 * n, "every call launched")
    c.close()
    plugs.free(seg_small, 64 * KIB)
    plugs.free(seg_big, 128 * KIB)


# --- never hang, never crash -----------------------------------------------------------------


@scenario
def communicator_drop_releases_the_gil() -> None:
    """Finding 4: a Communicator collected without close() destroys its communicator, which can
    wait on the GPU; the GIL must be released meanwhile, or every other thread stops too."""
    si = StandIn()
    load_nccl([])
    c = _native.NcclCommunicator(b"x" * 128, 0, 2, 0)
    si.set("destroy_sleep_ms", 800)
    ticks = [0]
    running = threading.Event()
    stop = threading.Event()

    def spin() -> None:
        running.set()
        while not stop.is_set():
            ticks[0] += 1

    spinner = threading.Thread(target=spin)
    spinner.start()
    running.wait()
    before = ticks[0]
    del c  # the drop destroys it: 800 ms inside ncclCommDestroy
    during = ticks[0] - before
    stop.set()
    spinner.join()
    check(si.get("comms_destroyed") == 1, "the dropped communicator was not destroyed")
    check(during > 10_000, f"another thread ran only {during} steps during the drop: GIL held")


@scenario
def communicator_abort_forgets_its_windows() -> None:
    """ncclCommAbort for symm_rs's own Communicator: no deregistration on a communicator that
    may be broken, and no window of it left for a later free to deregister."""
    si = StandIn()
    use_fake_torch()
    load_nccl([])
    c = _native.NcclCommunicator(b"x" * 128, 0, 2, 0)
    plugs = Plugs()
    ptrs = [plugs.alloc_ok(8 * KIB), plugs.alloc_ok(8 * KIB)]
    check(_native.register_pending(c.comm) == 2, "register")
    c.abort()
    c.abort()  # idempotent
    check(si.get("comms_aborted") == 1 and si.get("comms_destroyed") == 0, "abort")
    check(c.closed, "an aborted communicator must read as closed")
    check(si.get("deregisters") == 0, "abort deregistered on the aborted communicator")
    for p in ptrs:
        plugs.free(p, 8 * KIB)
    check(si.get("deregisters") == 0, "a later free deregistered on the aborted communicator")
    check(si.get("frees") == 2, "segments not freed")


@scenario
def close_after_a_failed_deregistration_never_uses_the_dead_communicator() -> None:
    """Finding 7: close() destroyed the communicator although a failed deregistration had put
    its windows back; the next free then deregistered on the destroyed communicator."""
    si = StandIn()
    load_nccl([])
    c = _native.NcclCommunicator(b"x" * 128, 0, 2, 0)
    comm = c.comm
    plugs = Plugs()
    ptr = plugs.alloc_ok(8 * KIB)
    check(_native.register_pending(comm) == 1, "register")
    si.set("fail_deregister", 1)
    raises(errors.SymmetricMemoryError, c.close)
    check(si.get("comms_destroyed") == 1, "close must still destroy the communicator")
    si.set("fail_deregister", 0)
    deregisters = si.get("deregisters")
    plugs.free(ptr, 8 * KIB)
    check(si.get("deregisters") == deregisters, "a free deregistered on a destroyed communicator")
    check(si.get("frees") == 1, "the segment was not freed")
    check(not _native.is_registered(ptr, 1, comm), "a window of a destroyed communicator is left")


@scenario
def symmetric_support_is_nccls_own_answer() -> None:
    si = StandIn()
    load_nccl([])
    check(_native.symmetric_support(COMM_A) is True, "NCCL said yes")
    check(si.get("last_props_version") == 22809, f"asked for {si.get('last_props_version')}")
    si.set("symmetric_support", 0)
    check(_native.symmetric_support(COMM_A) is False, "NCCL said no")
    check(si.get("property_queries") == 2, "one query per call")


@scenario
def symmetric_support_asks_for_the_2_29_layout_at_most() -> None:
    # Newer layouts make the query initialise NCCL's device runtime: never as a side effect.
    si = StandIn()
    si.set("version", 23007)
    load_nccl([])
    check(_native.symmetric_support(COMM_A) is True, "NCCL said yes")
    check(si.get("last_props_version") == 22902, f"asked for {si.get('last_props_version')}")


@scenario
def a_sealed_pool_refuses_new_segments_at_once() -> None:
    StandIn()
    load_nccl([])
    plugs = Plugs()
    previous = _native.allocate_for(5, 9)
    try:
        first = plugs.alloc_ok(8 * KIB)
        _native.seal_pool(5, 9, "sealed after reserve() of 8192 bytes; reserve more")
        check(plugs.alloc(8 * KIB) == 0, "a sealed pool grew")
        contains_all(_native.take_last_error(), "refused", "sealed after reserve()", "8192")
        _native.allocate_for(5, 10)  # another pool of the same ranks is not sealed
        other = plugs.alloc_ok(8 * KIB)
        _native.allocate_for(5, 9)
        check(_native.unseal_pool(5, 9) and not _native.unseal_pool(5, 9), "unseal")
        again = plugs.alloc_ok(8 * KIB)
    finally:
        _native.allocate_for(*previous)
    check(stats().alloc_failures == 1, f"{stats()}")
    for p in (first, other, again):
        plugs.free(p, 8 * KIB)


@scenario
def a_plan_fixes_what_is_registered() -> None:
    """Finding 5: the ranks agree on the plan's sizes, and exactly the plan is registered,
    whatever another thread allocates in between."""
    si = StandIn()
    load_nccl([])
    plugs = Plugs()
    first = plugs.alloc_ok(8 * KIB)
    plan = _native.plan_registration(COMM_A)
    check(plan is not None and plan.sizes == [8 * KIB], f"plan {plan and plan.sizes}")
    later = plugs.alloc_ok(16 * KIB)  # allocated between the agreement and the registration
    check(plan.register() == (1, False), "the plan registered something else")
    check(list(_native.pending_sizes(COMM_A)) == [16 * KIB], "the later segment is pending")
    raises(ValueError, plan.register)  # once only
    check(si.get("registers") == 1, f"{si.counters()}")
    # A cancelled plan registers nothing and leaves its segments pending.
    plan = _native.plan_registration(COMM_A)
    plan.cancel()
    check(list(_native.pending_sizes(COMM_A)) == [16 * KIB], "cancel lost a segment")
    check(_native.plan_registration(COMM_B).sizes == [8 * KIB, 16 * KIB], "B's plan")
    for p, size in ((first, 8 * KIB), (later, 16 * KIB)):
        plugs.free(p, size)


@scenario
def the_free_plug_never_waits_unboundedly() -> None:
    """Finding 4: the free plug waited without limit for a segment being registered, while
    torch held its allocator mutex: one dead peer froze every allocation of the device."""
    si = StandIn()
    load_nccl([])
    _native.set_wait_limit(0.2)
    plugs = Plugs()
    ptr = plugs.alloc_ok(8 * KIB)
    plan = _native.plan_registration(COMM_A)  # pins the segment, as a registration in NCCL
    import time

    start = time.monotonic()
    plugs.free(ptr, 8 * KIB)
    waited = time.monotonic() - start
    check(waited < 5, f"the free plug waited {waited:.1f} s")
    contains_all(_native.take_last_error(), "still being registered", "kept allocated")
    s = stats()
    check(s.leaked_segments == 1 and s.free_failures == 1, f"{s}")
    check(si.get("frees") == 0, "a pinned segment was freed")
    plan.cancel()


def main() -> None:
    name, args = sys.argv[1], sys.argv[2:]
    try:
        SCENARIOS[name](*args)
    except ScenarioFailure as e:
        traceback.print_exc()
        # The parent tells an expectation that did not hold from a crash by this line.
        print(f"SCENARIO FAILED {name}: {e}", flush=True)
        sys.exit(1)
    # Not expectations of the core but of the set-up: failing here is never an expected failure.
    check(
        sys.modules.get("torch", _fake_torch) is _fake_torch,
        "torch was imported: the stand-in would not be used",
    )
    if "SYMM_RS_NCCL_LIBRARY" in os.environ:
        with open("/proc/self/maps") as maps:
            mapped = maps.read()
        check("libnccl.so.2" not in mapped, "a real libnccl.so.2 is mapped into this process")
    print(f"SCENARIO OK {name}")


if __name__ == "__main__":
    main()
