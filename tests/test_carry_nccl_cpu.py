"""scripts/carry_nccl.py: a library split into checked parts, carried one per call, assembled
on the other side, and preloaded for a command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "carry_nccl.py"
sys.path.insert(0, str(SCRIPT.parent))

import carry_nccl  # noqa: E402


@pytest.fixture
def library(tmp_path: Path) -> Path:
    path = tmp_path / "libnccl.so.2"
    path.write_bytes(os.urandom(200_000) + b"\0" * 300_000)  # partly compressible
    return path


def _one_call(prepared: Path, part: str, to: Path) -> Path:
    """What one device call carries: the manifest and one part."""
    if to.exists():
        shutil.rmtree(to)
    to.mkdir()
    shutil.copy2(prepared / "manifest.json", to)
    shutil.copy2(prepared / part, to)
    return to


def test_parts_carried_one_per_call_assemble_the_library(library: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "carry"
    manifest = carry_nccl.prepare(library, prepared, part_bytes=64 << 10, version="9.9.9")
    names = [p["name"] for p in manifest["parts"]]
    assert len(names) >= 3
    assert all((prepared / n).stat().st_size <= 64 << 10 for n in names)
    dest = tmp_path / "device"
    for index, name in enumerate(names):
        ready = carry_nccl.receive(_one_call(prepared, name, tmp_path / "call"), dest)
        assert (ready is None) == (index < len(names) - 1)
        assert carry_nccl._status(dest).startswith(f"{index + 1} of {len(names)} parts")
    assert ready is not None and ready.read_bytes() == library.read_bytes()
    # A later call (say, the run) finds it ready without parts.
    assert carry_nccl.receive(_one_call(prepared, names[0], tmp_path / "call"), dest) == ready


def test_a_damaged_part_is_refused(library: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "carry"
    manifest = carry_nccl.prepare(library, prepared, part_bytes=64 << 10, version="9.9.9")
    call = _one_call(prepared, manifest["parts"][1]["name"], tmp_path / "call")
    damaged = call / manifest["parts"][1]["name"]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(ValueError, match="SHA-256"):
        carry_nccl.receive(call, tmp_path / "device")


def test_run_preloads_the_library_for_the_command(library: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "carry"
    manifest = carry_nccl.prepare(library, prepared, part_bytes=1 << 20, version="9.9.9")
    dest = tmp_path / "device"
    assert carry_nccl.receive(prepared, dest) is not None
    assert json.loads((dest / "manifest.json").read_text())["version"] == "9.9.9"
    env = carry_nccl.preload_environment(dest / "libnccl.so.2", {"LD_PRELOAD": "/x.so"})
    assert env["LD_PRELOAD"] == f"{dest / 'libnccl.so.2'}:/x.so"
    assert env["VLLM_NCCL_SO_PATH"] == env["SGLANG_NCCL_SO_PATH"] == str(dest / "libnccl.so.2")
    # The fake library is no ELF file: the dynamic loader says so and runs the command anyway.
    printed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--dest",
            str(dest),
            "run",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['SGLANG_NCCL_SO_PATH'])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SGLANG_NCCL_SO_PATH"},
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.strip() == str(dest / "libnccl.so.2")
    assert manifest["sha256"]


def test_run_refuses_before_the_library_is_assembled(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(tmp_path), "run", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "not assembled yet" in done.stderr
