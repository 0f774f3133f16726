"""The support matrix the manifests promise is the one the code and the lock file need.

- ``rust-version`` in Cargo.toml is at least every locked crate's own ``rust-version``: a user
  on that Rust must not meet a dependency that needs a newer one.
- ``requires-python`` has both bounds, and the abi3 floor of the wheel, ruff's and mypy's target
  and the classifiers all say the same lower bound and list the same versions.
- README.md states the same ranges.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
CARGO_TOML = (ROOT / "Cargo.toml").read_text()


def _version(text: str) -> tuple[int, int, int]:
    """``"1.88"`` and ``"1.88.0"`` alike as ``(1, 88, 0)``."""
    major, minor, patch = ([int(part) for part in text.split(".")] + [0, 0])[:3]
    return (major, minor, patch)


def _toml_string(text: str, key: str) -> str:
    """The string value of ``key = "..."`` (the first one; no TOML parser on Python 3.10)."""
    match = re.search(rf'^{re.escape(key)}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    assert match is not None, f"{key} not found"
    return match.group(1)


def _python_range() -> tuple[tuple[int, int], tuple[int, int]]:
    """``(lowest admitted, first excluded)`` from ``requires-python``."""
    spec = _toml_string(PYPROJECT, "requires-python")
    match = re.fullmatch(r">=(\d+)\.(\d+),\s*<(\d+)\.(\d+)", spec)
    assert match is not None, f"requires-python needs a lower and an upper bound: {spec!r}"
    low_major, low_minor, high_major, high_minor = (int(g) for g in match.groups())
    return (low_major, low_minor), (high_major, high_minor)


def _locked_packages() -> list[dict[str, object]]:
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.skip("cargo is not on PATH")
    done = subprocess.run(
        [cargo, "metadata", "--format-version", "1", "--locked"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    packages: list[dict[str, object]] = json.loads(done.stdout)["packages"]
    return packages


def test_rust_version_covers_every_locked_crate() -> None:
    packages = _locked_packages()
    ours = next(p for p in packages if p["name"] == "symm_rs")
    declared = _version(str(ours["rust_version"]))
    needs = {
        f"{p['name']} {p['version']}": _version(str(p["rust_version"]))
        for p in packages
        if p["name"] != "symm_rs" and p.get("rust_version")
    }
    assert needs, "cargo metadata reported no rust-version at all"
    highest = max(needs.values())
    too_new = sorted(name for name, version in needs.items() if version > declared)
    assert not too_new, (
        f"Cargo.toml says rust-version {ours['rust_version']} but these locked crates need more: "
        f"{too_new}; raise rust-version to {'.'.join(map(str, highest))} (README: minimum Rust)"
    )
    # The promise is no higher than the lock needs: a raised floor is a decision, not an accident.
    assert declared[:2] == highest[:2], (ours["rust_version"], highest)


def test_python_bounds_agree_everywhere() -> None:
    (low_major, low_minor), (high_major, high_minor) = _python_range()
    assert (low_major, high_major) == (3, 3)
    admitted = [f"3.{minor}" for minor in range(low_minor, high_minor)]
    # The abi3 wheel's floor is the lowest admitted version.
    assert f'"abi3-py3{low_minor}"' in CARGO_TOML
    assert _toml_string(PYPROJECT, "target-version") == f"py3{low_minor}"
    assert _toml_string(PYPROJECT, "python_version") == f"3.{low_minor}"
    classifiers = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', PYPROJECT)
    assert classifiers == admitted
    assert sys.version_info[:2] >= (low_major, low_minor)


def test_readme_states_the_ranges_the_manifests_give() -> None:
    readme = (ROOT / "README.md").read_text()
    (_, low_minor), (_, high_minor) = _python_range()
    rust = _toml_string(CARGO_TOML, "rust-version")
    assert f"Python 3.{low_minor} to 3.{high_minor - 1}" in readme
    assert f"Rust {rust} or newer" in readme
    torch_floor = re.search(r'"torch>=([\d.]+)"', PYPROJECT)
    assert torch_floor is not None
    assert f"torch {torch_floor.group(1)} or newer" in readme
    assert "NCCL 2.27.3 or newer" in readme
