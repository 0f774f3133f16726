"""A newer libnccl preloaded in place of torch's: ``doctor`` judges the library that runs.

The NVIDIA NCCL wheel of torch's CUDA family, at a version other than the one torch was built
with, is downloaded (``pip download --no-deps``) and only its ``libnccl.so.2`` is unpacked, under
``target/`` and never into site-packages (that would overwrite torch's file). A process started
with it in ``LD_PRELOAD`` imports torch, then symm_rs, and runs ``doctor --json``: torch's NCCL
calls and symm_rs's go to that one library, and nothing about it is a problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "target" / "nccl-preload"
# Newer than any torch release here was built with; the second one when torch has the first.
NEWER = {"nvidia-nccl-cu13": ("2.32.6", "2.31.2"), "nvidia-nccl-cu12": ("2.32.3", "2.31.2")}


def _torch_nccl_wheel() -> tuple[str, str]:
    """``(distribution, version)`` of the NVIDIA NCCL wheel installed beside torch."""
    for name in NEWER:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    pytest.skip("torch came without an NVIDIA NCCL wheel (a CPU-only or source build)")


def _preload_library() -> tuple[Path, str]:
    """The unpacked ``libnccl.so.2`` of a version other than torch's, and that version."""
    name, installed = _torch_nccl_wheel()
    version = next(v for v in NEWER[name] if v != installed)
    library = CACHE / f"{name}-{version}" / "libnccl.so.2"
    if library.is_file():
        return library, version
    download = CACHE / "download"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--dest", str(download), f"{name}=={version}"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"pip download {name}=={version} failed:\n{done.stderr[-2000:]}")
        pytest.skip(f"pip download {name}=={version} failed (offline?)")
    wheel = next(download.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    library.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        partial = library.with_suffix(".part")
        partial.write_bytes(archive.read("nvidia/nccl/lib/libnccl.so.2"))
        partial.rename(library)  # whole or absent, should the test be stopped mid-way
    wheel.unlink()
    return library, version


def test_doctor_judges_the_preloaded_library_torch_and_symm_rs_share() -> None:
    library, version = _preload_library()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "SYMM_RS_"))}
    env["LD_PRELOAD"] = str(library)
    done = subprocess.run(
        [sys.executable, "-m", "symm_rs", "doctor", "--json", "--no-check"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    report = json.loads(done.stdout)
    nccl = report["nccl"]
    assert nccl["version"] == version, nccl
    assert os.path.realpath(nccl["path"]) == os.path.realpath(library)
    assert nccl["origin"] == "already loaded in this process"
    # torch may map its own copy too (by path); its NCCL calls still go to the preloaded one.
    assert os.path.realpath(library) in nccl["loaded_libraries"]
    assert nccl["torch_library"] == os.path.realpath(library)
    assert nccl["same_as_torch"] is True
    assert report["known_issues"] == []
    assert not any("libnccl" in p or "NCCL" in p for p in report["problems"]), report
    if report["torch_nccl"] != version:  # torch reports the version it was built with
        assert any(f"this process runs NCCL {version}" in n for n in report["notes"])
    if not report["problems"]:
        assert done.returncode == 0, done.stderr
