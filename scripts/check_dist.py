"""make dist-check: what ``make dist`` wrote is what a release may publish.

For every wheel in the folder (``dist/`` by default):

- its name says abi3 for the lowest Python ``requires-python`` admits, and manylinux_2_28 or
  older for its architecture; ``auditwheel show`` agrees with that tag;
- its extension needs nothing from the system but the C library (no libpython, no CUDA, no
  libnccl: those are found at run time), and no glibc symbol version newer than the tag's;
- it holds the package, its stub and ``py.typed``, and its metadata the bounds and extras of
  pyproject.toml.

The wheel for this machine's architecture is then installed into a clean virtualenv (no
system site-packages, no torch) and run with no Rust on ``PATH``: ``import symm_rs._native``,
the allocator plugs' symbols, ``import symm_rs``, ``--version`` and ``--help``. Last, a wheel is
built from the sdist with pip (isolated build, as a user's ``pip install symm_rs-*.tar.gz`` does)
and must hold the same package files.

python scripts/check_dist.py [dist]
"""

from __future__ import annotations

import email.parser
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_GLIBC = (2, 28)
# What the extension may link: the C library's parts and the loader (everything else it loads
# with dlopen at run time).
ALLOWED_NEEDED = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}
MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}
PACKAGE_FILES = {"symm_rs/__init__.py", "symm_rs/_native.pyi", "symm_rs/py.typed", "symm_rs/cli.py"}


class CheckError(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckError(message)


def pyproject_value(key: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'^{key}\s*=\s*"([^"]*)"', text, re.MULTILINE)
    check(match is not None, f"pyproject.toml has no {key}")
    assert match is not None
    return match.group(1)


def glibc_tag(platform_tag: str) -> tuple[int, int]:
    """``(2, 28)`` from ``manylinux_2_28_x86_64``; the legacy aliases as the glibc they mean."""
    legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
    for name, version in legacy.items():
        if platform_tag.startswith(name + "_"):
            return version
    match = re.match(r"manylinux_(\d+)_(\d+)_", platform_tag)
    check(match is not None, f"not a manylinux tag: {platform_tag}")
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def elf_facts(data: bytes) -> tuple[str, set[str], set[tuple[int, int]]]:
    """The extension's machine, the libraries it needs, and the glibc versions it needs."""
    import io

    from elftools.elf.elffile import ELFFile  # auditwheel's dependency

    elf = ELFFile(io.BytesIO(data))
    needed: set[str] = set()
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is not None:
        needed = {tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"}
    versions: set[tuple[int, int]] = set()
    verneed = elf.get_section_by_name(".gnu.version_r")
    if verneed is not None:
        for _, auxiliaries in verneed.iter_versions():
            for aux in auxiliaries:
                match = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", aux.name)
                if match:
                    versions.add((int(match.group(1)), int(match.group(2))))
    return elf["e_machine"], needed, versions


def check_wheel(wheel: Path) -> str:
    """The static checks of one wheel; returns its architecture."""
    name, version, python_tag, abi_tag, platform_tag = wheel.stem.split("-")
    low = pyproject_value("requires-python").split(",")[0].removeprefix(">=")
    check(name == "symm_rs", f"{wheel.name}: distribution name {name}")
    check(python_tag == "cp" + low.replace(".", ""), f"{wheel.name}: python tag, wanted cp{low}")
    check(abi_tag == "abi3", f"{wheel.name}: not an abi3 wheel")
    arch = next((a for a in MACHINES if platform_tag.endswith("_" + a)), "")
    check(bool(arch), f"{wheel.name}: unknown architecture in {platform_tag}")
    check(glibc_tag(platform_tag) <= MAX_GLIBC, f"{wheel.name}: {platform_tag} is newer than 2.28")

    shown = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    check(shown.returncode == 0, f"auditwheel show {wheel.name}: {shown.stderr}")
    text = " ".join(shown.stdout.split())
    match = re.search(r'consistent with the following platform tag: "([^"]+)"', text)
    check(match is not None, f"auditwheel show {wheel.name} names no tag:\n{shown.stdout}")
    assert match is not None
    check(match.group(1) == platform_tag, f"{wheel.name}: auditwheel says {match.group(1)}")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        [extension] = [n for n in names if re.fullmatch(r"symm_rs/_native\.abi3\.so", n)]
        machine, needed, glibc = elf_facts(archive.read(extension))
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
    check(machine == MACHINES[arch], f"{wheel.name}: extension is {machine}, not {arch}")
    check(needed <= ALLOWED_NEEDED, f"{wheel.name}: links {sorted(needed - ALLOWED_NEEDED)}")
    newest = max(glibc, default=(0, 0))
    check(newest <= glibc_tag(platform_tag), f"{wheel.name}: needs GLIBC_{newest[0]}.{newest[1]}")
    check(PACKAGE_FILES <= names, f"{wheel.name}: lacks {sorted(PACKAGE_FILES - names)}")
    check(
        metadata["Requires-Python"].replace(" ", "") == pyproject_value("requires-python"),
        f"{wheel.name}: Requires-Python {metadata['Requires-Python']}",
    )
    check(metadata["Version"] == version, f"{wheel.name}: metadata version {metadata['Version']}")
    extras = set(metadata.get_all("Provides-Extra") or [])
    check({"dev", "progress"} <= extras, f"{wheel.name}: extras {sorted(extras)}")
    print(
        f"ok: {wheel.name}: {platform_tag} (auditwheel agrees), needs {sorted(needed)}, "
        f"glibc <= {newest[0]}.{newest[1]}"
    )
    return arch


def without_rust() -> dict[str, str]:
    """This environment with every Rust toolchain directory off ``PATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_HOME", "RUSTUP_HOME")}
    keep = [
        d
        for d in env.get("PATH", "").split(os.pathsep)
        if d and not (Path(d) / "cargo").exists() and not (Path(d) / "rustc").exists()
    ]
    env["PATH"] = os.pathsep.join(keep)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    return env


def check_install(wheel: Path, work: Path) -> None:
    """The wheel in a clean virtualenv, used with no Rust and no torch."""
    home = work / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    python = str(home / "bin" / "python")
    env = without_rust()
    check(shutil.which("cargo", path=env["PATH"]) is None, "cargo is still on PATH")

    def run(*args: str) -> str:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=600, env=env, cwd=str(work)
        )
        check(done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    probe = (
        "import ctypes, importlib.util, sys\n"
        "import symm_rs._native as native\n"
        "assert native.__file__.startswith(sys.prefix), native.__file__\n"
        "plugs = ctypes.CDLL(native.__file__)\n"
        "assert plugs.symm_rs_alloc and plugs.symm_rs_free\n"
        "import symm_rs\n"
        "assert importlib.util.find_spec('torch') is None, 'torch in the clean virtualenv'\n"
        "assert 'torch' not in sys.modules\n"
        "print(native.__version__)\n"
    )
    version = run(python, "-c", probe).strip()
    check(version == wheel.name.split("-")[1], f"the module says version {version}")
    shown = run(python, "-m", "symm_rs", "--version")
    check(shown.startswith(f"symm_rs {version} "), f"--version printed {shown!r}")
    check("usage: python -m symm_rs" in run(python, "-m", "symm_rs", "--help"), "no --help")
    check("usage: symm-rs doctor" in run(str(home / "bin" / "symm-rs"), "doctor", "--help"), "")
    print(f"ok: {wheel.name} installs and imports in a clean virtualenv without Rust or torch")


def check_sdist(sdist: Path, wheel: Path, work: Path) -> None:
    """A wheel built from the sdist the way pip builds it for a user."""
    out = work / "from_sdist"
    env = dict(os.environ)
    # Compiled crates kept between local runs; the sources still come from the unpacked sdist.
    env.setdefault("CARGO_TARGET_DIR", str(ROOT / "target" / "sdist-check"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(sdist)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
        cwd=str(work),
    )
    check(done.returncode == 0, f"pip wheel {sdist.name} failed:\n{done.stdout}\n{done.stderr}")
    [built] = out.glob("symm_rs-*.whl")

    def package_files(path: Path) -> set[str]:
        with zipfile.ZipFile(path) as archive:
            return {n for n in archive.namelist() if n.startswith("symm_rs/")}

    missing = package_files(wheel) ^ package_files(built)
    check(not missing, f"the wheel built from {sdist.name} differs in {sorted(missing)}")
    print(f"ok: {sdist.name} builds {built.name} with the same package files")


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist").resolve()
    wheels = sorted(folder.glob("symm_rs-*.whl"))
    sdists = sorted(folder.glob("symm_rs-*.tar.gz"))
    try:
        wanted = f"{folder}: wanted wheels and one sdist (make dist)"
        check(bool(wheels) and len(sdists) == 1, wanted)
        arches = {check_wheel(wheel): wheel for wheel in wheels}
        machine = platform.machine()
        check(machine in arches, f"no wheel for this machine ({machine}): {sorted(arches)}")
        with tempfile.TemporaryDirectory(prefix="symm_rs_dist_") as work:
            check_install(arches[machine], Path(work))
            check_sdist(sdists[0], arches[machine], Path(work))
    except CheckError as e:
        print(f"dist-check FAILED: {e}", file=sys.stderr)
        return 1
    print(f"dist-check passed: {', '.join(p.name for p in [*wheels, *sdists])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
