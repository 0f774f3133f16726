"""Reproductions of the never-hang issue's findings that run on a CPU, against whichever
symm_rs this Python imports: run once with the release before the fix installed and once with
this one, to show each repro failing before and passing after.

    python tests/repro/never_hang_before_after.py [--stand-in PATH_TO_STAND_IN_LIBNCCL]

Each repro runs in a process of its own with a time limit (a hang is a failure, not a stuck
run) and prints PASS or FAIL with what it saw. The repros use only names both releases have.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAND_IN = HERE.parent / "stand_in"

# Finding 3: the group cache's lock held while `.comm` (a Python property) ran.
GIL_DEADLOCK = r"""
import threading, time
import symm_rs
from symm_rs import _native, context as ctx
from symm_rs.groups import Group

COMM = 0x5EED000
group = Group(comm=COMM, size=2, rank=0, device=0, name="fake", peer_set=COMM)
lanes = hasattr(_native, "plan_registration")  # the release with the fix
class Handle:
    def end(self): pass
ctx.resolve = lambda g: group
ctx._enter_slow = (lambda g, p, nested=False: (Handle(), None, 3)) if lanes else (
    lambda g, p, nested=False: (Handle(), None))
ctx._exit_register = lambda *a: None
ctx._exit_failed = lambda *a: None
ctx._enter_failed = lambda *a: None

class Slow:
    @property
    def comm(self):
        time.sleep(0.0005)
        return COMM

def work():
    group = Slow()  # one object per thread, so its resolution is cached and re-checked
    for _ in range(500):
        with symm_rs.use_symmetric_memory(group):
            pass

threads = [threading.Thread(target=work, daemon=True) for _ in range(2)]
[t.start() for t in threads]
[t.join(timeout=30) for t in threads]
print("deadlocked" if any(t.is_alive() for t in threads) else "finished")
"""

# Finding 6: a zero timeout became "no timeout" in torch's store.
ZERO_TIMEOUT = r"""
import sys, torch.distributed as dist
from symm_rs import agreement
from symm_rs.groups import Channel, Group
store = dist.FileStore(sys.argv[1], 2)
group = Group(0x1000, 2, 0, 0, "g", Channel(store, "zero"))
try:
    agreement.exchange(group, "verify", [1], timeout=0)
    print("returned")
except ValueError as e:
    print("refused:", e)
"""

# Finding 1: a rank failing inside a context on a fresh communicator posted under "verify",
# while its peers' first registration held "topology" and "verdict" rounds first.
DRIFT_RANK = r"""
import sys, time, torch.distributed as dist
from symm_rs import agreement
from symm_rs.groups import Channel, Group
rank, path = int(sys.argv[1]), sys.argv[2]
store = dist.FileStore(path, 3)
group = Group(0x1000, 3, rank, 0, "g", Channel(store, "drift"))
start = time.monotonic()
first = ""
try:
    if rank == 1:
        agreement.report_failure(group, "verify", "ValueError: rank 1's block failed")
    else:
        for topic in ("topology", "verdict", "verify"):
            agreement.exchange(group, topic, [rank], timeout=3)
except agreement.AgreementError as e:
    first = str(e)[:80]
took = time.monotonic() - start
try:
    rows = agreement.exchange(group, "verify", [7, rank], timeout=3)
    second = "in step" if rows == [[7, r] for r in range(3)] else f"drifted: {rows}"
except agreement.AgreementError as e:
    second = "error: " + str(e)[:80]
print(f"rank {rank}: first error after {took:.1f} s ({first!r}); next round: {second}")
"""


def run(code: str, *args: str, timeout: float = 60, env: dict | None = None) -> tuple[str, float]:
    start = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        out = done.stdout.strip() or done.stderr.strip().splitlines()[-1:] or ["(nothing)"]
        return (out if isinstance(out, str) else out[0]), time.monotonic() - start
    except subprocess.TimeoutExpired:
        return f"hung: killed after {timeout:.0f} s", time.monotonic() - start


def report(name: str, ok: bool, seen: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {seen}", flush=True)
    return ok


def drift() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", DRIFT_RANK, str(r), path],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(3)
        ]
        lines = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                out = "hung"
            lines.append(out.strip().splitlines()[-1] if out.strip() else "(nothing)")
    fast = all("first error after 0." in line for line in lines if not line.startswith("rank 1"))
    in_step = all("in step" in line for line in lines)
    return report("1. rounds stay in step after a failed rank", fast and in_step, " | ".join(lines))


def stand_in(scenario: str, library: str, native: str) -> tuple[bool, str]:
    env = {
        **os.environ,
        "SYMM_RS_NCCL_LIBRARY": library,
        "SYMM_RS_TEST_NATIVE": native,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        done = subprocess.run(
            [sys.executable, str(STAND_IN / "scenarios.py"), scenario],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=STAND_IN,
        )
    except subprocess.TimeoutExpired:
        return False, "hung"
    ok = f"SCENARIO OK {scenario}" in done.stdout
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    return ok, (lines[-1] if lines else "(nothing)")[:200]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stand-in", help="a compiled tests/stand_in/stand_in_nccl.c")
    args = parser.parse_args()
    spec = importlib.util.find_spec("symm_rs")
    assert spec and spec.submodule_search_locations
    location = next(iter(spec.submodule_search_locations))
    import symm_rs._native as native_module

    print(f"symm_rs from {location} (native {native_module.__file__})", flush=True)
    results = []
    seen, _ = run(GIL_DEADLOCK, timeout=60)
    results.append(
        report("3. no GIL/mutex deadlock between two contexts", seen == "finished", seen)
    )
    with tempfile.TemporaryDirectory() as tmp:
        seen, _ = run(ZERO_TIMEOUT, os.path.join(tmp, "store"), timeout=20)
    results.append(report("6. a zero timeout is refused", seen.startswith("refused"), seen))
    results.append(drift())
    if args.stand_in:
        native = glob.glob(os.path.join(location, "_native*.so"))[0]
        for name, scenario in (
            ("4. a dropped Communicator releases the GIL", "communicator_drop_releases_the_gil"),
            (
                "7. close after a failed deregistration never uses the dead communicator",
                "close_after_a_failed_deregistration_never_uses_the_dead_communicator",
            ),
            ("13. objects that only look like tensors never reach NCCL", "communicator_routing"),
        ):
            ok, seen = stand_in(scenario, args.stand_in, native)
            results.append(report(name, ok, seen))
    print(f"{sum(results)} of {len(results)} passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
