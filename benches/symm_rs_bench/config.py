"""What a bench run measures (sizes, sections, repetition counts) and the options that set it."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from symm_rs.env import parse_bytes

KiB, MiB = 1 << 10, 1 << 20
SECTIONS = (
    "collectives",
    "communicator",
    "policy",
    "context",
    "coldstart",
    "registration",
    "cp",
    "torch_nccl",
)
OPS = ("all_gather", "all_reduce", "reduce_scatter")
BUFFERS = ("plain", "symm")
MODES = ("eager", "graph")
DEFAULT_SIZES = [KiB * 8**k for k in range(7)]  # 1 KiB .. 256 MiB, every size README quotes
CP_TOKENS = [1024, 4096, 16384, 32768]  # tokens per rank of the CP all-gather (section cp)


@dataclass
class BenchConfig:
    """What every rank needs to know; travels to the spawned processes and into the JSON."""

    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    reps: int = 5  # repetitions; the median is reported
    warmup: int = 5
    target_s: float = 0.05  # time budget per (op, bytes, mode, buffers)
    max_iters: int = 200  # calls per repetition at most; the communicator section's count
    context_iters: int = 20000
    registration_segments: int = 16
    cp_tokens: list[int] = field(default_factory=lambda: list(CP_TOKENS))
    # PyTorch's own symmetric memory beside plain and symm in collectives (symm_rs_bench.torch_symm)
    torch_baselines: bool = True


def parse_sizes(text: str) -> list[int]:
    """``"1K,512KiB,4M"`` -> sorted distinct byte counts, each an even number of bf16 values
    (NCCL's symmetric kernels mishandle odd 16-bit counts; comm.py stages around them).

    Raises:
        ValueError: an entry is not a size or not a positive multiple of 4, or there is none.
    """
    sizes = sorted({parse_bytes(part) for part in text.split(",") if part.strip()})
    bad = [s for s in sizes if s < 4 or s % 4]
    if bad or not sizes:
        raise ValueError(f"--sizes needs positive multiples of 4 bytes, got {text!r}")
    return sizes


def parse_env(values: Optional[list[str]]) -> dict[str, str]:
    """``["NCCL_SYM_CTAS=16"]`` -> ``{"NCCL_SYM_CTAS": "16"}``.

    Raises:
        ValueError: an entry without ``=`` or without a valid name.
    """
    env = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def output_stem(world_size: int, tag: str = "") -> str:
    """``bench_<N>gpu<tag>``; a tag gets a leading ``_`` unless it starts with ``_``/``-``/``.``.

    Raises:
        ValueError: the tag holds characters other than letters, digits, ``.``, ``_``, ``-``.
    """
    if tag and not re.fullmatch(r"[A-Za-z0-9._-]+", tag):
        raise ValueError(f"--tag may hold letters, digits, '.', '_' and '-' only, got {tag!r}")
    if tag and tag[0] not in "_-.":
        tag = "_" + tag
    return f"bench_{world_size}gpu{tag}"


def format_bytes(nbytes: int) -> str:
    """``1024`` -> ``"1 KiB"``, ``4194304`` -> ``"4 MiB"``, ``1536`` -> ``"1536 B"``."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    add = parser.add_argument
    add("--world-size", type=int, help="GPUs to use (default: all visible; at least 2)")
    add("--out", default=os.path.join("benches", "results"), help="output folder")
    add("--tag", default="", help="file-name suffix: bench_<N>gpu<tag>.json")
    add("--sizes", help="bytes per rank, e.g. 1K,512K,4M (default 1K,8K,...,256M)")
    add("--reps", type=int, help="repetitions; the median is reported (default 5)")
    add("--quick", action="store_true", help="fewer calls, repetitions and segments")
    add(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=SECTIONS,
        metavar="SECTION",
        help=f"one or more of {', '.join(SECTIONS)} (default: all)",
    )
    add("--no-plot", action="store_true", help="write no PNG")
    add(
        "--no-torch",
        action="store_true",
        help="leave PyTorch's own symmetric memory out of collectives (section torch_nccl: "
        "leave it out of --sections)",
    )
    add("--env", action="append", metavar="KEY=VALUE", help="set for the ranks (repeatable)")
    add("--timeout", type=float, default=300.0, help="seconds before the ranks are killed")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The ``BenchConfig`` the options describe.

    Raises:
        ValueError: an option is out of range.
    """
    cfg = BenchConfig(sections=[s for s in SECTIONS if s in args.sections])
    cfg.torch_baselines = not getattr(args, "no_torch", False)
    if args.sizes:
        cfg.sizes = parse_sizes(args.sizes)
    if args.quick:
        cfg.reps, cfg.warmup, cfg.target_s, cfg.max_iters = 3, 2, 0.015, 50
        cfg.context_iters, cfg.registration_segments = 5000, 8
    cfg.reps = cfg.reps if args.reps is None else args.reps
    if cfg.reps < 1:
        raise ValueError(f"--reps must be at least 1, got {cfg.reps}")
    return cfg
