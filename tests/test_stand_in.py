"""symm_rs's core against a stand-in libnccl (and the real NCCL wheel's library), no GPU.

Importing torch loads torch's libnccl.so.2, which symm_rs then always uses, so every test runs
one scenario of tests/stand_in/scenarios.py in a fresh interpreter that never imports torch:
the extension is loaded directly, the allocator plugs are called through ctypes as torch calls
them, and the stand-in's failure knobs and counters are set and read through ctypes.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).parent / "stand_in" / "scenarios.py"
TIMEOUT_S = 60


def _native_extension() -> str | None:
    spec = importlib.util.find_spec("symm_rs")  # finds the package without running __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("_native*.so"))
        if found:
            return str(found[0])
    return None


pytestmark = pytest.mark.skipif(
    _native_extension() is None and not os.environ.get("SYMM_RS_TEST_NATIVE"),
    reason="symm_rs._native is not built and installed (maturin build + pip install)",
)


class ScenarioFailed(AssertionError):
    """An expectation inside the scenario did not hold (not a crash, hang or set-up problem)."""


def run_scenario(name: str, *args: str, library: Path | str | None = None) -> str:
    """Runs one scenario with ``SYMM_RS_NCCL_LIBRARY=library`` (unset when None); returns its
    stdout. Raises ScenarioFailed when an expectation failed, fails the test on anything else."""
    env = {k: v for k, v in os.environ.items() if k not in ("SYMM_RS_NCCL_LIBRARY", "LD_PRELOAD")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if library is not None:
        env["SYMM_RS_NCCL_LIBRARY"] = str(library)
    command = [sys.executable, str(SCENARIOS), name, *args]
    try:
        done = subprocess.run(
            command,
            env=env,
            cwd=SCENARIOS.parent,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scenario {name} hung (no exit within {TIMEOUT_S} s); output: {e.stdout!r}")
    output = f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    if done.returncode == 0 and f"SCENARIO OK {name}" in done.stdout:
        return done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("SCENARIO FAILED")]
    if failed and done.returncode == 1:
        raise ScenarioFailed(f"{failed[-1]}\n{output}")
    pytest.fail(f"scenario {name} crashed (exit code {done.returncode})\n{output}")


# --- 1. loading ---------------------------------------------------------------------------


def test_load_through_environment_variable(stand_in_lib):
    # origin "SYMM_RS_NCCL_LIBRARY", the stand-in's real path, version (2, 28, 9), windows on;
    # a second load_nccl returns the same library; the plug's ABI version matches __version__.
    run_scenario("load_stand_in", library=stand_in_lib)


def test_load_too_old_for_windows(stand_in_lib):
    # version 2.26.0 set before loading: windows_supported False, windows_problem and the
    # NcclLibraryError of register_pending name the path, 2.26.0 and 2.27.3; the pool still
    # allocates and frees.
    run_scenario("load_too_old", library=stand_in_lib)


def test_load_without_window_symbols(stand_in_no_windows_lib):
    # 2.28.9 but no ncclCommWindowRegister: windows_supported False, the reason names the
    # symbol and the path; register_pending raises NcclLibraryError; the pool still works.
    run_scenario("load_no_windows", library=stand_in_no_windows_lib)


def test_load_missing_library(tmp_path):
    # A SYMM_RS_NCCL_LIBRARY that does not exist: NcclLibraryError naming the path, the variable
    # and the wheel to install; the alloc plug (which loads lazily) returns NULL and says why.
    run_scenario("load_missing", library=tmp_path / "missing" / "libnccl.so.2")


def test_load_missing_library_says_why(tmp_path):
    run_scenario("load_missing_says_why", library=tmp_path / "missing" / "libnccl.so.2")


def test_load_library_that_is_not_nccl(stand_in_build):
    # A shared object without ncclGetVersion: NcclLibraryError naming the symbol.
    run_scenario("load_not_nccl", library=stand_in_build["not_nccl"])


def test_load_library_that_is_not_nccl_names_its_path(stand_in_build):
    run_scenario("load_not_nccl_names_path", library=stand_in_build["not_nccl"])


# --- 2. the real libnccl of the NVIDIA wheel ----------------------------------------------


def _nccl_wheel() -> tuple[str, str] | None:
    for distribution in ("nvidia-nccl-cu13", "nvidia-nccl-cu12"):
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        library = Path(str(dist.locate_file("nvidia/nccl/lib/libnccl.so.2")))
        if library.is_file():
            return str(library), dist.version
    return None


def test_load_real_nccl_wheel():
    wheel = _nccl_wheel()
    if wheel is None:
        pytest.skip("no nvidia-nccl-cu13/cu12 wheel with nvidia/nccl/lib/libnccl.so.2 installed")
    path, version = wheel
    # origin "NVIDIA NCCL wheel", same real path, the wheel's version, windows supported; and
    # probe_nccl(path) agrees.
    run_scenario("load_real_wheel", path, version)


# --- 3. plugs and the segment table -------------------------------------------------------


def test_plugs_and_segment_table(stand_in_lib):
    # alloc/stats/pending order; register_pending counts and never registers twice;
    # is_registered/segment_of for inside, boundary, straddling and outside ranges; two
    # communicators over one pool; release_comm only for its communicator; free deregisters
    # then frees and keeps the indices right; everything balanced at the end.
    run_scenario("plugs_and_table", library=stand_in_lib)


def test_segments_of_other_devices_are_skipped(stand_in_lib):
    run_scenario("other_device_segments", library=stand_in_lib)


# --- 4. faults ----------------------------------------------------------------------------


def test_failed_alloc_returns_null_not_garbage(stand_in_lib):
    # ncclMemAlloc fails and leaves 0xdeadbeef: the plug returns NULL, keeps the NCCL error,
    # counts it, tracks nothing; the next alloc works. Size 0 is refused.
    run_scenario("alloc_failure", library=stand_in_lib)


def test_failed_alloc_keeps_nccl_detail(stand_in_lib):
    run_scenario("alloc_failure_detail", library=stand_in_lib)


def test_alloc_returning_null_with_success(stand_in_lib):
    run_scenario("null_alloc", library=stand_in_lib)


def test_failed_registration_then_retry(stand_in_lib):
    # NcclError naming ncclCommWindowRegister and the stand-in's detail; the windows made
    # before the failure stay; each retry registers exactly the rest, in allocation order.
    run_scenario("register_failure_then_retry", library=stand_in_lib)


def test_a_null_window_makes_the_communicator_plain(stand_in_lib):
    # Success with a NULL window is NCCL's "no symmetric memory here": no error, nothing
    # recorded, the communicator registers nothing again; other communicators are unaffected.
    run_scenario("null_window_makes_the_communicator_plain", library=stand_in_lib)


def test_failed_deregistration_leaks_instead_of_freeing(stand_in_lib):
    # The free plug neither crashes nor calls ncclMemFree under a live window; leaked_segments,
    # free_failures and deregistration_failures count it; take_last_error explains.
    run_scenario("deregister_failure_at_free", library=stand_in_lib)


def test_failed_release_comm_never_frees_under_a_window(stand_in_lib):
    run_scenario("release_comm_failure_keeps_segment_safe", library=stand_in_lib)


def test_null_communicator_is_refused(stand_in_lib):
    run_scenario("null_communicator", library=stand_in_lib)


# --- 5. concurrency -----------------------------------------------------------------------


def test_concurrent_plugs_and_registration(stand_in_lib):
    # 8 threads x 200 alloc/(register)/free through ctypes while 3 threads register shared
    # communicators and one samples stats(): exact final balance, no duplicate windows.
    out = run_scenario("stress", "8", "200", library=stand_in_lib)
    assert "stress: 1600 segments" in out


# --- the Communicator core: launches, the policy twin, staging -----------------------------


def test_communicator_routing_on_the_stand_in(stand_in_lib):
    # ncclCommSplit makes the twin once; the route table sends [low, high) byte ranges per
    # collective to it; odd 16-bit counts on windows answer "stage" without a launch (never on
    # the twin); argument errors; close destroys both communicators.
    run_scenario("communicator_routing", library=stand_in_lib)


def test_communicator_host_cost_on_the_stand_in(stand_in_lib):
    out = run_scenario("communicator_host_cost", "5000", library=stand_in_lib)
    assert "host cost per call: native" in out


# --- never hang, never crash -----------------------------------------------------------------

NEVER_HANG = [
    "communicator_drop_releases_the_gil",
    "communicator_abort_forgets_its_windows",
    "close_after_a_failed_deregistration_never_uses_the_dead_communicator",
    "symmetric_support_is_nccls_own_answer",
    "symmetric_support_asks_for_the_2_29_layout_at_most",
    "a_sealed_pool_refuses_new_segments_at_once",
    "a_plan_fixes_what_is_registered",
    "the_free_plug_never_waits_unboundedly",
]


@pytest.mark.parametrize("name", NEVER_HANG)
def test_never_hang_on_the_stand_in(stand_in_lib, name):
    run_scenario(name, library=stand_in_lib)
