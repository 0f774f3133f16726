"""``python -m symm_rs doctor`` on a machine without GPUs: it says so, exits cleanly, and turns
known misconfigurations into problems with advice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU report")


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


def test_plain_report_names_torch_nccl_and_the_missing_gpus() -> None:
    done = _doctor()
    assert done.returncode == 0, done.stderr
    assert "GPUs: none visible to torch" in done.stdout
    assert "NCCL " in done.stdout and "libnccl.so" in done.stdout
    assert "check: skipped: no GPU visible to torch" in done.stdout


def test_json_report_is_machine_readable() -> None:
    done = _doctor("--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["gpus"] == [] and report["problems"] == []
    assert report["nccl"]["windows_supported"] is True
    assert report["nccl"]["same_as_torch"] is True
    assert report["torch_features"]["MemPool"] is True


def test_disabled_windows_become_a_problem_with_advice() -> None:
    report = json.loads(_doctor("--json", NCCL_WIN_ENABLE="0", NCCL_CUMEM_ENABLE="0").stdout)
    assert "NCCL_WIN_ENABLE=0" in report["problems"]
    assert "NCCL_CUMEM_ENABLE=0" in report["problems"]
    assert any("unset NCCL_WIN_ENABLE" in a for a in report["advice"])


def test_ignored_library_override_is_reported() -> None:
    report = json.loads(_doctor("--json", SYMM_RS_NCCL_LIBRARY="/nowhere/libnccl.so.2").stdout)
    assert any(
        "SYMM_RS_NCCL_LIBRARY=/nowhere/libnccl.so.2 was not used" in p for p in report["problems"]
    )
