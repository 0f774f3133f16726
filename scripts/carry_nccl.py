"""Carries a newer libnccl to a GPU machine that has an older one, and runs commands with it
preloaded, so that torch, symm_rs and the engines' ctypes wrappers all use that one library.

The library (2.30.7: ~252 MB, ~200 MB as xz) is larger than one device call may carry (64 MiB),
so it travels compressed, in parts, over consecutive calls to one warm machine (go back to back:
an idle machine is handed back, and /tmp with it).

Here, once (needs network; the wheel is cached in ~/.cache/symm_rs_nccl)::

    python scripts/carry_nccl.py prepare            # nvidia-nccl-cu13==2.30.7 by default
    # -> .nccl_carry/manifest.json and .nccl_carry/libnccl.so.2.xz.part00 ... part03
    #    (git-ignored; the command prints the exact calls below with the real part names)

On the device, one call per part, each carrying the manifest and that part::

    run(command="python3 scripts/carry_nccl.py receive",
        carry=[".nccl_carry/manifest.json", ".nccl_carry/libnccl.so.2.xz.part00"])
    run(command="python3 scripts/carry_nccl.py receive",
        carry=[".nccl_carry/manifest.json", ".nccl_carry/libnccl.so.2.xz.part01"])
    ...                                   # after the last part it prints "ready: ..."

``receive`` checks each part's SHA-256 and keeps it in /tmp/nccl/parts; once all are there it
joins and decompresses them to /tmp/nccl/libnccl.so.2 and checks the library's SHA-256. Then
every command that should use it runs under the wrapper (``--`` ends its own arguments)::

    python3 scripts/carry_nccl.py run -- python3 tests/gpu/harness.py suite_engines_own ...

which sets ``LD_PRELOAD=/tmp/nccl/libnccl.so.2`` (and the engines' ``VLLM_NCCL_SO_PATH`` /
``SGLANG_NCCL_SO_PATH``) and executes the command. ``status`` says which parts have arrived.
Judge the NCCL in use by the loaded library (``symm_rs.library_info()``), not by
``torch.cuda.nccl.version()``, which reports the version torch was built with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
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
CARRY_DIR = REPO / ".nccl_carry"
DEST = Path("/tmp/nccl")
LIBRARY = "libnccl.so.2"
PART_MIB = 56  # with the manifest, under a device call's 64 MiB
WHEEL_MEMBER = "nvidia/nccl/lib/libnccl.so.2"


def fetch_library(version: str, package: str = "nvidia-nccl-cu13") -> Path:
    """``libnccl.so.2`` from ``package==version`` (a cached wheel, else ``pip download``)."""
    cache = Path(os.path.expanduser("~")) / ".cache" / "symm_rs_nccl" / f"{package}-{version}"
    library = cache / LIBRARY
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "--dest",
                scratch,
                f"{package}=={version}",
            ],
            check=True,
        )
        (wheel,) = Path(scratch).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source:
            partial = cache / f"{LIBRARY}.partial"
            with open(partial, "wb") as out:
                shutil.copyfileobj(source, out)
        os.replace(partial, library)
    return library


def prepare(library: Path, carry_dir: Path, part_bytes: int, version: str) -> dict:
    """Compresses ``library`` with xz into parts of at most ``part_bytes`` under ``carry_dir``
    (replacing what was there) and writes ``manifest.json``. Returns the manifest."""
    if carry_dir.exists():
        shutil.rmtree(carry_dir)
    carry_dir.mkdir(parents=True)
    compressed = carry_dir / f"{LIBRARY}.xz"
    with open(library, "rb") as source, lzma.open(compressed, "wb", preset=6) as out:
        shutil.copyfileobj(source, out, 1 << 20)
    parts = []
    with open(compressed, "rb") as f:
        index = 0
        while True:
            chunk = f.read(part_bytes)
            if not chunk:
                break
            part = carry_dir / f"{LIBRARY}.xz.part{index:02d}"
            part.write_bytes(chunk)
            parts.append({"name": part.name, "sha256": hashlib.sha256(chunk).hexdigest()})
            index += 1
    compressed.unlink()
    manifest = {
        "library": LIBRARY,
        "version": version,
        "sha256": sha256(library),
        "bytes": library.stat().st_size,
        "parts": parts,
    }
    (carry_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def receive(carry_dir: Path, dest: Path) -> Optional[Path]:
    """Keeps the parts found in ``carry_dir`` under ``dest/parts`` (each checked), and once all
    of the manifest's parts are there, assembles ``dest/libnccl.so.2``. Returns its path when
    it is ready, else ``None``.

    Raises:
        ValueError: a part or the assembled library does not match the manifest.
        FileNotFoundError: no manifest was carried.
    """
    manifest = json.loads((carry_dir / "manifest.json").read_text())
    parts_dir = dest / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for part in manifest["parts"]:
        carried = carry_dir / part["name"]
        if carried.exists():
            if sha256(carried) != part["sha256"]:
                raise ValueError(f"{carried}: SHA-256 differs from the manifest's")
            shutil.copyfile(carried, parts_dir / part["name"])
    library = dest / manifest["library"]
    if library.exists() and sha256(library) == manifest["sha256"]:
        return library
    missing = [p["name"] for p in manifest["parts"] if not (parts_dir / p["name"]).exists()]
    if missing:
        return None
    partial = dest / f"{manifest['library']}.partial"
    with open(partial, "wb") as out:
        decompressor = lzma.LZMADecompressor()
        for part in manifest["parts"]:
            with open(parts_dir / part["name"], "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                    out.write(decompressor.decompress(chunk))
    if sha256(partial) != manifest["sha256"]:
        partial.unlink()
        raise ValueError("the assembled library's SHA-256 differs from the manifest's")
    os.replace(partial, library)
    return library


def preload_environment(library: Path, environ: Optional[dict] = None) -> dict:
    """The environment that makes every user of libnccl in a process load ``library``."""
    env = dict(os.environ if environ is None else environ)
    previous = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library}:{previous}" if previous else str(library)
    env.setdefault("VLLM_NCCL_SO_PATH", str(library))
    env.setdefault("SGLANG_NCCL_SO_PATH", str(library))
    return env


def _calls(manifest: dict) -> str:
    lines = [
        f'run(command="python3 scripts/carry_nccl.py receive", '
        f'carry=[".nccl_carry/manifest.json", ".nccl_carry/{part["name"]}"])'
        for part in manifest["parts"]
    ]
    lines.append("then: python3 scripts/carry_nccl.py run -- <command>")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry-dir", type=Path, default=CARRY_DIR)
    parser.add_argument("--dest", type=Path, default=DEST)
    sub = parser.add_subparsers(dest="action", required=True)
    prep = sub.add_parser("prepare", help="here: fetch, compress and split the library")
    prep.add_argument("--version", default="2.30.7")
    prep.add_argument("--library", type=Path, help="use this file instead of fetching")
    prep.add_argument("--part-mib", type=float, default=PART_MIB)
    sub.add_parser("receive", help="device: keep the carried part(s); assemble when complete")
    sub.add_parser("status", help="device: which parts have arrived")
    run = sub.add_parser("run", help="device: run a command with the library preloaded")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.action == "prepare":
        library = args.library or fetch_library(args.version)
        manifest = prepare(library, args.carry_dir, int(args.part_mib * (1 << 20)), args.version)
        print(f"{len(manifest['parts'])} part(s) in {args.carry_dir}; the device calls:")
        print(_calls(manifest))
        return 0
    if args.action == "receive":
        library = receive(args.carry_dir, args.dest)
        if library is None:
            print(f"waiting for more parts ({_status(args.dest)})")
        else:
            print(f"ready: {library}")
        return 0
    if args.action == "status":
        print(_status(args.dest))
        return 0
    library = args.dest / LIBRARY
    if not library.exists():
        print(f"{library} is not assembled yet ({_status(args.dest)})", file=sys.stderr)
        return 2
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command after --")
    os.execvpe(command[0], command, preload_environment(library))
    return 1  # not reached


def _status(dest: Path) -> str:
    try:
        manifest = json.loads((dest / "manifest.json").read_text())
    except FileNotFoundError:
        return "no part received"
    have = [p["name"] for p in manifest["parts"] if (dest / "parts" / p["name"]).exists()]
    return f"{len(have)} of {len(manifest['parts'])} parts of NCCL {manifest['version']}"


if __name__ == "__main__":
    raise SystemExit(main())
