"""Fetches the pinned engine wheels (tests/engines/versions.txt) without their dependencies and
unpacks their Python sources, for the contract tests and the GPU suite that run the engines' own
code against symm_rs's shims::

    python scripts/extract_engines.py           # fetch and unpack into the cache; print the paths
    python scripts/extract_engines.py --carry   # also copy what the GPU suite imports to .engines/

The cache is ``$XDG_CACHE_HOME/symm_rs_engines`` (default ``~/.cache/symm_rs_engines``), outside
the repository. ``<name>-<version>/`` there holds every ``.py`` file of the wheel's package and
``SOURCE.json`` (wheel file name and SHA-256), written last: a folder without it is redone. The
wheel is fetched with ``pip download --no-deps --only-binary=:all:`` for CPython 3.11 on
manylinux_2_34 x86_64, whatever interpreter runs this, so every machine reads the same files
(vLLM's wheel is ~240 MB, SGLang's ~40 MB; each is deleted once unpacked).

``--carry`` writes ``.engines/<name>-<version>/`` (git-ignored, well under 1 MiB): only the modules
in ``CARRY_MODULES``, which tests/gpu/suite_engines_own.py imports from the engines' own files.
A GPU machine has no network, so the lead names ``.engines`` in the device call's ``carry``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from file_digest import sha256

REPO = Path(__file__).resolve().parent.parent
VERSIONS = REPO / "tests" / "engines" / "versions.txt"
CARRY_DIR = REPO / ".engines"
# The tags the wheels are fetched for. The sources are the same in every build of a release;
# fixing the tags makes the fetch the same on every machine (SGLang ships per-CPython wheels).
PYTHON_VERSION = "3.11"
# pip matches a wheel's platform tag exactly, so each glibc baseline a release may use is listed.
PLATFORMS = (
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)

# The module each engine's symmetric-memory code imports, which the shims replace.
ALLOCATOR = {
    "sglang": "sglang.srt.distributed.device_communicators.pynccl_allocator",
    "vllm": "vllm.distributed.device_communicators.pynccl_allocator",
}

# The engines' own modules that the GPU suite imports from their files; what it needs from the
# rest of each engine is a small stand-in (tests/engines/engine_modules.py).
CARRY_MODULES: dict[str, tuple[str, ...]] = {
    "sglang": (
        "sglang.srt.arg_groups.prefill_buffer_ceiling",
        "sglang.srt.distributed.device_communicators.pynccl",
        "sglang.srt.distributed.device_communicators.pynccl_wrapper",
        "sglang.srt.environ",
        "sglang.srt.runtime_context",
    ),
    "vllm": (
        "vllm.compilation.cudagraph_pool",
        "vllm.distributed.device_communicators.pynccl",
        "vllm.distributed.device_communicators.pynccl_wrapper",
        "vllm.envs",
        "vllm.logger",
        "vllm.logging_utils",
        "vllm.logging_utils.formatter",
        "vllm.logging_utils.lazy",
        "vllm.logging_utils.log_time",
        "vllm.logging_utils.torch_tensor",
        "vllm.logging_utils.uvicorn_logging",
        "vllm.utils.nccl",
    ),
}


class FetchError(RuntimeError):
    """A pinned wheel could not be fetched or unpacked (the message says why)."""


def pins(path: Path = VERSIONS) -> dict[str, str]:
    """``{name: version}`` from the pin file (``name==version`` lines, ``#`` comments)."""
    found: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {raw!r}")
        found[name.strip()] = version.strip()
    return found


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "symm_rs_engines"


def module_file(root: Path, module: str) -> Path:
    """The file of ``module`` (a module or a package) under an unpacked source ``root``."""
    base = root.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.exists() else base.with_suffix(".py")


def _download(requirement: str, into: Path, timeout: float) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON_VERSION,
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        "--disable-pip-version-check",
        "--no-input",
        "--quiet",
        "--dest",
        str(into),
        requirement,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {requirement} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise FetchError(f"pip download {requirement} failed: {' / '.join(tail)}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels in {into}")
    return wheels[0]


def fetch(name: str, version: str, cache: Optional[Path] = None, timeout: float = 900) -> Path:
    """The unpacked sources of ``name==version`` (fetched on first use).

    Raises:
        FetchError: pip could not fetch the wheel (no network, no such release) or it holds no
            ``name/`` package.
    """
    cache = cache or cache_dir()
    root = cache / f"{name}-{version}"
    if (root / "SOURCE.json").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{name}-") as scratch:
        work = Path(scratch)
        wheel = _download(f"{name}=={version}", work / "wheel", timeout)
        unpacked = work / "src"
        count = 0
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if member.filename.startswith(f"{name}/") and member.filename.endswith(".py"):
                    archive.extract(member, unpacked)
                    count += 1
        if count == 0:
            raise FetchError(f"{wheel.name} holds no {name}/*.py files")
        source = {"wheel": wheel.name, "sha256": sha256(wheel), "py_files": count}
        (unpacked / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
        if root.exists():  # an unfinished earlier attempt
            shutil.rmtree(root)
        os.replace(unpacked, root)
    return root


def fetch_all(cache: Optional[Path] = None) -> dict[str, Path]:
    """Every pinned engine's unpacked sources, by name."""
    return {name: fetch(name, version, cache) for name, version in pins().items()}


def carry(dest: Path = CARRY_DIR, cache: Optional[Path] = None) -> dict[str, Path]:
    """Copies ``CARRY_MODULES`` of every pinned engine to ``dest/<name>-<version>/``."""
    made: dict[str, Path] = {}
    wanted = {f"{n}-{v}" for n, v in pins().items()}
    if dest.exists():
        for stale in dest.iterdir():
            if stale.is_dir() and stale.name not in wanted:
                shutil.rmtree(stale)
    for name, root in fetch_all(cache).items():
        target = dest / root.name
        if target.exists():
            shutil.rmtree(target)
        for module in CARRY_MODULES.get(name, ()):
            source = module_file(root, module)
            if not source.exists():
                raise FetchError(f"{name}: {module} is not in the wheel (renamed?)")
            copied = target / source.relative_to(root)
            copied.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copied)
        shutil.copy2(root / "SOURCE.json", target / "SOURCE.json")
        made[name] = target
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", action="store_true", help="also write .engines/")
    args = parser.parse_args()
    try:
        roots = carry() if args.carry else fetch_all()
    except FetchError as e:
        print(f"extract_engines: {e}", file=sys.stderr)
        return 1
    for name, root in roots.items():
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"{name}: {root} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
