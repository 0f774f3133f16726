"""``python -m symm_rs doctor`` on a machine without GPUs: it says so, exits 0 when nothing is
wrong and 1 when something is, validates the SYMM_RS_* variables, reports known-bad NCCL
releases and libnccl files that two wheels share, and reads NCCL's tuning log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from symm_rs import cli, doctor, gpu_check, library, nccl_log

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")


def _doctor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "SYMM_RS_"))}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "symm_rs", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.stdout.lstrip().startswith("{"), done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


# --- the command, end to end, in a subprocess ----------------------------------------------


@no_gpu
def test_plain_report_names_torch_nccl_and_the_missing_gpus() -> None:
    done = _doctor()
    assert done.returncode == 0, done.stdout + done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("symm_rs "), first  # not torch's "Failed to initialize NumPy"
    assert "NumPy" not in done.stdout + done.stderr
    assert "GPUs: none visible to torch" in done.stdout
    assert "NCCL " in done.stdout and "libnccl.so" in done.stdout
    assert "check: skipped: no GPU visible to torch" in done.stdout
    assert "result: no problem found" in done.stdout


@no_gpu
def test_json_report_is_machine_readable() -> None:
    done = _doctor("--json")
    assert done.returncode == 0, done.stderr
    report = _json(done)
    assert report["gpus"] == [] and report["problems"] == []
    assert report["nccl"]["windows_supported"] is True
    assert report["nccl"]["same_as_torch"] is True
    assert report["torch_features"]["MemPool"] is True
    assert report["environment"] == {"variables": {}, "problems": [], "warnings": []}
    assert report["known_issues"] == []  # this machine's torch ships NCCL >= 2.30.7
    assert report["shared_libraries"] == []


@no_gpu
def test_require_gpu_turns_no_gpu_into_exit_status_1() -> None:
    done = _doctor("--json", "--require-gpu")
    assert done.returncode == 1
    report = _json(done)
    assert report["problems"] == ["no GPU visible to torch (--require-gpu)"]
    assert any("nvidia-smi" in a for a in report["advice"])


@no_gpu
def test_disabled_windows_become_a_problem_with_advice() -> None:
    done = _doctor("--json", NCCL_WIN_ENABLE="0", NCCL_CUMEM_ENABLE="0")
    assert done.returncode == 1
    report = _json(done)
    assert "NCCL_WIN_ENABLE=0" in report["problems"]
    assert "NCCL_CUMEM_ENABLE=0" in report["problems"]
    assert any("unset NCCL_WIN_ENABLE" in a for a in report["advice"])


@no_gpu
def test_ignored_library_override_is_reported() -> None:
    done = _doctor("--json", SYMM_RS_NCCL_LIBRARY="/nowhere/libnccl.so.2")
    assert done.returncode == 1
    report = _json(done)
    assert any(
        "SYMM_RS_NCCL_LIBRARY=/nowhere/libnccl.so.2 was not used" in p for p in report["problems"]
    )
    # The variable check says the same path does not exist.
    assert report["environment"]["problems"] == [
        "SYMM_RS_NCCL_LIBRARY=/nowhere/libnccl.so.2: no such file"
    ]
    assert any("unset SYMM_RS_NCCL_LIBRARY" in a for a in report["advice"])
    assert not any("different NCCL builds" in a for a in report["advice"])


@no_gpu
def test_override_naming_the_loaded_library_is_not_a_problem(tmp_path: Path) -> None:
    loaded = _json(_doctor("--json"))["nccl"]["path"]
    link = tmp_path / "libnccl.so.2"
    link.symlink_to(loaded)  # another name for the very same file: compared by real path
    done = _doctor("--json", SYMM_RS_NCCL_LIBRARY=str(link))
    report = _json(done)
    assert done.returncode == 0, report["problems"]
    assert report["problems"] == []
    assert any("names the libnccl already loaded" in n for n in report["notes"])
    assert report["environment"]["variables"] == {"SYMM_RS_NCCL_LIBRARY": str(link)}


@no_gpu
def test_environment_values_are_validated() -> None:
    done = _doctor(
        "--json",
        SYMM_RS_RESERVE="lots",
        SYMM_RS_VERIFY="maybe",
        SYMM_RS_DEBUG="1",
        SYMM_RS_STRICT="no",
        SYMM_RS_VERIFFY="1",
    )
    assert done.returncode == 1
    report = _json(done)
    environment = report["environment"]
    assert environment["variables"]["SYMM_RS_RESERVE"] == "lots"
    assert len(environment["problems"]) == 2
    assert any("SYMM_RS_RESERVE: not a byte size: 'lots'" in p for p in report["problems"])
    assert any("SYMM_RS_VERIFY: not a boolean: 'maybe'" in p for p in report["problems"])
    assert environment["warnings"] == report["warnings"]
    assert report["warnings"][0].startswith("SYMM_RS_VERIFFY is not a symm_rs variable")


@no_gpu
def test_unknown_variable_alone_is_a_warning_not_a_failure() -> None:
    done = _doctor(SYMM_RS_VERIFFY="1")
    assert done.returncode == 0, done.stdout
    assert "warning: SYMM_RS_VERIFFY is not a symm_rs variable" in done.stdout


# --- known NCCL defects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "affected"),
    [
        ((2, 27, 3), False),
        ((2, 27, 7), False),
        ((2, 28, 0), True),
        ((2, 28, 9), True),
        ((2, 29, 7), True),
        ((2, 30, 6), True),
        ((2, 30, 7), False),
        ((2, 31, 2), False),
        ((3, 0, 0), False),
    ],
)
def test_known_bad_nccl_releases(version: tuple[int, int, int], affected: bool) -> None:
    issues = [t for t in library.known_nccl_issues(version) if "issues/1924" in t]
    assert bool(issues) is affected
    if affected:
        [text] = issues
        assert "2.28.0 to 2.30.6" in text and "fixed in 2.30.7" in text
        assert "https://github.com/NVIDIA/nccl/issues/1924" in text
        assert "upgrade NCCL to >= 2.30.7" in text
        assert "programmatic dependent launch" in text


_REAL_LIBRARY_INFO = library.library_info


def _fake_nccl(monkeypatch: pytest.MonkeyPatch, version: tuple[int, int, int]) -> None:
    info = types.SimpleNamespace(**_REAL_LIBRARY_INFO().as_dict())
    info.version = version
    monkeypatch.setattr(library, "library_info", lambda: info)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: version)


def test_doctor_reports_a_known_bad_nccl_with_advice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_nccl(monkeypatch, (2, 28, 9))
    report = doctor.diagnose(run_check=False)
    [issue] = [i for i in report["known_issues"] if i["fixed_in"] == "2.30.7"]
    assert issue["nccl"] == "2.28.9" and issue["fixed_in"] == "2.30.7"
    assert issue["affected"] == "2.28.0 to 2.30.6"
    assert issue["reference"] == "https://github.com/NVIDIA/nccl/issues/1924"
    assert issue["problem"] in report["problems"]
    assert issue["advice"] in report["advice"]
    assert cli.main(["doctor", "--json", "--no-check"]) == 1
    assert json.loads(capsys.readouterr().out)["known_issues"] == report["known_issues"]
    _fake_nccl(monkeypatch, (2, 30, 7))
    report = doctor.diagnose(run_check=False)
    assert report["known_issues"] == []


def _fake_running_nccl(
    monkeypatch: pytest.MonkeyPatch, running: tuple[int, int, int], built: tuple[int, int, int]
) -> None:
    """The process runs NCCL ``running`` (preloaded in place of torch's) while torch reports
    the version it was built with, ``built``."""
    info = types.SimpleNamespace(**_REAL_LIBRARY_INFO().as_dict())
    info.version = running
    monkeypatch.setattr(library, "library_info", lambda: info)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: built)


@no_gpu
def test_the_running_nccl_is_judged_not_the_one_torch_was_built_with(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The GPU host's case: 2.30.7 preloaded over torch's 2.28.9. Nothing to report.
    _fake_running_nccl(monkeypatch, running=(2, 30, 7), built=(2, 28, 9))
    report = doctor.diagnose(run_check=False)
    assert report["known_issues"] == [] and report["problems"] == []
    assert report["nccl"]["same_as_torch"] and report["torch_nccl"] == "2.28.9"
    assert any(
        "torch was built with NCCL 2.28.9; this process runs NCCL 2.30.7" in n
        for n in report["notes"]
    )
    assert cli.main(["doctor", "--no-check"]) == 0
    assert "torch was built with NCCL 2.28.9" in capsys.readouterr().out
    # The other way round, the defect of the library that runs is found.
    _fake_running_nccl(monkeypatch, running=(2, 28, 9), built=(2, 30, 7))
    report = doctor.diagnose(run_check=False)
    assert any("issues/1924" in p for p in report["problems"])


@no_gpu
def test_a_defect_symm_rs_steers_around_is_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_running_nccl(monkeypatch, running=(2, 27, 7), built=(2, 27, 7))
    report = doctor.diagnose(run_check=False)
    [issue] = report["known_issues"]
    assert issue["steered_around"] and "Communicator" in issue["how_steered"]
    assert report["problems"] == []
    assert any("16-bit" in w and "keep per-rank counts" in w for w in report["warnings"])
    assert cli.main(["doctor", "--no-check"]) == 0
    # The launch race has no way around it in symm_rs: a problem, exit status 1.
    _fake_running_nccl(monkeypatch, running=(2, 29, 7), built=(2, 29, 7))
    report = doctor.diagnose(run_check=False)
    assert [i["steered_around"] for i in report["known_issues"]] == [False, True]
    assert len(report["problems"]) == 1 and "issues/1924" in report["problems"][0]
    assert cli.main(["doctor", "--no-check"]) == 1
    capsys.readouterr()


def test_torch_calling_another_libnccl_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    ours = os.path.realpath(str(library.library_info().path))
    other = "/opt/x/libnccl.so.2"
    monkeypatch.setattr(library, "loaded_nccl_libraries", lambda: [ours, other])
    monkeypatch.setattr(library, "global_nccl_library", lambda: other)
    report = doctor.diagnose(run_check=False)
    assert not report["nccl"]["same_as_torch"]
    [text] = [p for p in report["problems"] if "torch's NCCL calls go to" in p]
    assert f"torch's NCCL calls go to {other}" in text and ours in text
    assert doctor.ADVICE["nccl_mismatch"] in report["advice"]
    # A copy that is mapped but shadowed by the library in use is only a note.
    monkeypatch.setattr(library, "global_nccl_library", lambda: ours)
    report = doctor.diagnose(run_check=False)
    assert report["nccl"]["same_as_torch"]
    assert not any("torch's NCCL calls" in p for p in report["problems"])
    assert any(n.startswith("also mapped but never called") and other in n for n in report["notes"])


def test_torch_calls_the_libnccl_symm_rs_uses() -> None:
    ours = os.path.realpath(str(library.library_info().path))
    # torch's own libnccl is a local dependency of libtorch_cuda (not in the global scope)
    # unless something preloaded one; either way it is the file symm_rs uses.
    assert library.global_nccl_library() in (None, ours)
    assert library.loaded_nccl_libraries() == [ours]
    assert doctor.diagnose(run_check=False)["nccl"]["same_as_torch"]


def test_loaded_libraries_come_from_the_process_map(tmp_path: Path) -> None:
    lib = tmp_path / "libnccl.so.2.30.7"
    lib.write_bytes(b"")
    (tmp_path / "libnccl.so.2").symlink_to(lib.name)
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f00-7f01 r--p 00000000 fd:01 1 {tmp_path / 'libnccl.so.2'}\n"
        f"7f01-7f02 r-xp 00001000 fd:01 1 {lib}\n"
        "7f02-7f03 r--p 00000000 fd:01 2 /usr/lib/libc.so.6\n"
        "7f03-7f04 rw-p 00000000 00:00 0 \n"
    )
    assert library.loaded_nccl_libraries(str(maps)) == [str(lib)]
    assert library.loaded_nccl_libraries(str(tmp_path / "missing")) == []
    # In this process: torch's libnccl, the one symm_rs uses.
    running = library.loaded_nccl_libraries()
    assert running == [os.path.realpath(str(library.library_info().path))]


# --- two wheels that install the same libnccl ------------------------------------------------


def _fake_distribution(
    site: Path, name: str, version: str, files: list[str], requires: list[str]
) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    (info / "METADATA").write_text("\n".join(metadata) + "\n")
    record = [f"{f},," for f in files] + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_bytes(b"")


@pytest.fixture
def shared_site(tmp_path: Path) -> Path:
    """A site directory where nvidia-nccl-cu12 and torch's nvidia-nccl-cu13 both install
    nvidia/nccl/lib/libnccl.so.2."""
    site = tmp_path / "site"
    lib = "nvidia/nccl/lib/libnccl.so.2"
    _fake_distribution(site, "nvidia-nccl-cu12", "2.27.3", [lib, "nvidia/nccl/include/nccl.h"], [])
    _fake_distribution(site, "nvidia-nccl-cu13", "2.30.7", [lib], [])
    _fake_distribution(
        site,
        "torch",
        "2.15.0",
        ["torch/__init__.py"],
        ['nvidia-nccl-cu13==2.30.7; platform_system == "Linux"', "numpy"],
    )
    _fake_distribution(site, "other-lib", "1.0", ["other/lib/libnccl_helper.txt"], [])
    return site


def test_shared_libnccl_is_found_with_the_one_to_remove(shared_site: Path) -> None:
    [shared] = library.shared_nccl_libraries([str(shared_site)])
    assert shared.path == os.path.realpath(shared_site / "nvidia/nccl/lib/libnccl.so.2")
    assert shared.distributions == ("nvidia-nccl-cu12 2.27.3", "nvidia-nccl-cu13 2.30.7")
    assert shared.keep == "nvidia-nccl-cu13 2.30.7"
    assert shared.advice.startswith("pip uninstall -y nvidia-nccl-cu12, then restore")
    assert "pip install --force-reinstall --no-deps nvidia-nccl-cu13==2.30.7" in shared.advice


def test_shared_libnccl_without_torch_names_all_owners(tmp_path: Path) -> None:
    site = tmp_path / "site"
    lib = "nvidia/nccl/lib/libnccl.so.2"
    _fake_distribution(site, "nvidia-nccl-cu12", "2.27.3", [lib], [])
    _fake_distribution(site, "nvidia-nccl-cu13", "2.28.9", [lib], [])
    [shared] = library.shared_nccl_libraries([str(site)])
    assert shared.keep is None
    assert "nvidia-nccl-cu12, nvidia-nccl-cu13" in shared.advice


def test_one_owner_per_libnccl_is_fine(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_distribution(site, "nvidia-nccl-cu13", "2.30.7", ["nvidia/nccl/lib/libnccl.so.2"], [])
    assert library.shared_nccl_libraries([str(site)]) == []


def test_doctor_reports_a_shared_libnccl(
    monkeypatch: pytest.MonkeyPatch, shared_site: Path
) -> None:
    real = library.shared_nccl_libraries
    monkeypatch.setattr(
        library, "shared_nccl_libraries", lambda path=None: real([str(shared_site)])
    )
    report = doctor.diagnose(run_check=False)
    [shared] = report["shared_libraries"]
    assert shared["keep"] == "nvidia-nccl-cu13 2.30.7"
    assert shared["problem"] in report["problems"]
    assert "nvidia-nccl-cu12 2.27.3 and nvidia-nccl-cu13 2.30.7" in shared["problem"]
    assert shared["advice"] in report["advice"]


# --- NCCL's tuning log -----------------------------------------------------------------------

SAMPLE_LOG = """\
gpu-host:4242:4300 [0] NCCL INFO NCCL_DEBUG_SUBSYS set by environment to TUNING.
gpu-host:4242:4300 [0] NCCL INFO AllGather: 64 Bytes -> Algo RING proto LL channel{Lo..Hi}={0..0}
gpu-host:4242:4300 [0] NCCL INFO AllGather [Symmetric]: 2097152 Bytes -> Kernel AllGather_LL nchannels 16 nthreads 512 nWorks 1
gpu-host:4242:4300 [0] NCCL INFO AllReduce [Symmetric]: 4096 Bytes -> Kernel AllReduce_AGxLL_R nchannels 2 nthreads 512 nWorks 1 cgaClusterSize 2
gpu-host:4242:4300 [0] NCCL INFO ReduceScatter: 1048576 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..31}
gpu-host:4242:4300 [0] NCCL INFO Channel 00/24 : 0 1
"""  # noqa: E501


def test_tuning_log_env_names_the_debug_variables(tmp_path: Path) -> None:
    assert nccl_log.tuning_log_env(tmp_path) == {
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_SUBSYS": "TUNING",
        "NCCL_DEBUG_FILE": str(tmp_path / "nccl.%h.%p"),
    }


def test_tuning_log_lines_are_parsed() -> None:
    records = nccl_log.parse_tuning_log(SAMPLE_LOG)
    assert [(r.collective, r.nbytes, r.symmetric, r.kernel) for r in records] == [
        ("AllGather", 64, False, "RING/LL"),
        ("AllGather", 2097152, True, "AllGather_LL"),
        ("AllReduce", 4096, True, "AllReduce_AGxLL_R"),
        ("ReduceScatter", 1048576, False, "RING/SIMPLE"),
    ]
    assert records[1].line == SAMPLE_LOG.splitlines()[2]
    assert nccl_log.parse_line("gpu-host:1:2 [0] NCCL INFO Channel 00/24 : 0 1") is None
    [symmetric] = nccl_log.symmetric_records(records, "AllGather")
    assert symmetric.nbytes == 2097152
    assert len(nccl_log.symmetric_records(records)) == 2


def test_tuning_log_files_of_every_process_are_read(tmp_path: Path) -> None:
    lines = SAMPLE_LOG.splitlines()
    (tmp_path / "nccl.gpu-host.4242").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "nccl.gpu-host.4243").write_text("\n".join(lines[2:]) + "\n")
    assert len(nccl_log.read_tuning_log(tmp_path)) == 4
    assert nccl_log.read_tuning_log(tmp_path / "missing") == []


def test_tuning_log_evidence_confirms_only_a_symmetric_all_gather() -> None:
    evidence = gpu_check.tuning_log_evidence(nccl_log.parse_tuning_log(SAMPLE_LOG))
    assert evidence["confirmed"] and evidence["bytes_match"]
    assert evidence["symmetric_kernels"] == ["AllGather_LL"]
    assert evidence["expected_bytes"] == gpu_check.CHECK_BYTES == 2097152
    regular_only = "\n".join(SAMPLE_LOG.splitlines()[:2] + SAMPLE_LOG.splitlines()[3:])
    evidence = gpu_check.tuning_log_evidence(nccl_log.parse_tuning_log(regular_only))
    assert not evidence["confirmed"]
    assert evidence["regular_all_gather"] and not evidence["symmetric_all_gather"]
    assert not gpu_check.tuning_log_evidence([])["confirmed"]


def test_render_shows_problems_warnings_and_the_verdict() -> None:
    report = {
        "symm_rs": "0.1.0",
        "torch": "2.15.0",
        "torch_cuda": "13.2",
        "gpus": ["H100", "H100"],
        "nccl": None,
        "check": "symmetric all-gather over 2 GPUs: exact; NCCL's tuning log shows ...",
        "tuning_log": gpu_check.tuning_log_evidence(nccl_log.parse_tuning_log(SAMPLE_LOG)),
        "environment": {"variables": {"SYMM_RS_VERIFY": "1"}},
        "warnings": ["w"],
        "problems": ["p"],
        "advice": ["a"],
    }
    text = doctor.render(report)
    assert "NCCL tuning log: gpu-host:4242:4300 [0] NCCL INFO AllGather [Symmetric]" in text
    assert "environment: SYMM_RS_VERIFY=1" in text
    assert "warning: w\nproblem: p\nadvice: a\nresult: 1 problem(s) found" in text


def test_expandable_segments_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    # Finding 11 of the never-hang issue: the setting was neither tested nor reported.
    from symm_rs import doctor

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    report = doctor.diagnose(run_check=False)
    assert report["pytorch_cuda_alloc_conf"] == "expandable_segments:True"
    assert any("expandable_segments" in note for note in report["notes"])
