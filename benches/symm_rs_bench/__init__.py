"""The repository's benchmark: symmetric memory against its baselines, on 2 or more GPUs. Run it
from a checkout as python -m symm_rs bench (or PYTHONPATH=benches python -m symm_rs_bench).

One process per GPU; every section compares with its baseline in the same processes. Sizes are
bytes per rank (all-gather input, all-reduce buffer, reduce-scatter output) of bf16 zeros.

* registration, first, on an empty pool: the first window on a communicator (20 MiB), 16 new
  segments registered at one context exit, symm_rs.reserve(1 GiB); last, destroy_pool().
* collectives: all-gather, all-reduce and reduce-scatter through torch.distributed on
  caching-allocator buffers (plain) and symmetric windows (symm). Eager: N back-to-back calls
  between CUDA events; graph: R replays of a CUDA graph of K calls. Before each repetition the
  GPUs are idle and the ranks meet; N, K and R fit a time budget, equal on every rank. A rank's
  latency is its median over repetitions; the run reports the maximum over ranks.
* communicator: symm_rs.Communicator against torch.distributed on the same symmetric buffers
  (1 KiB to 1 MiB, eager): GPU time, host time to issue, and wall time per call.
* context: use_symmetric_memory enter+exit with nothing new, against torch.cuda.use_mem_pool
  and the raw begin/end/release calls.
* cp: the context-parallel KV all-gather (uneven bf16 tokens per rank, 8 x 128 and 1 x 576
  rows): symm_rs's Rust helper (with its copy kernel, and with driver copies), its torch path,
  and SGLang's pad + all-gather + cat on ordinary buffers, eager and in CUDA graphs (see
  benches/symm_rs_bench/cp_gather.py).
* PyTorch's own symmetric memory (torch.distributed._symmetric_memory), what a user would pick
  instead, up to 64 MiB: in collectives, beside plain and symm at each size, its one-shot and
  two-shot all-reduce kernels and an all-gather of copies into peers' buffers (torch_one_shot,
  torch_two_shot, torch_copy); in torch_nccl, in processes of their own, the same on its NCCL
  backend (symm_mem.set_backend("NCCL")) against plain NCCL. Each is checked once against plain
  NCCL (exact) before it is timed; one this torch lacks or that raises is recorded as
  {"unavailable": reason}. Multicast stays off (NCCL_NVLS_ENABLE=0,
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 unless set).
* coldstart: fresh interpreters: import torch, import symm_rs, the first symmetric allocation
  and the first registration.

Writes <out>/bench_<N>gpu<tag>.json and .png and prints the Markdown table. A section failing on
every rank is recorded; one failing on some ranks only stops the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

import symm_rs
from symm_rs_bench.coldstart import run_coldstart
from symm_rs_bench.config import (
    add_arguments,
    config_from_args,
    format_bytes,
    output_stem,
    parse_env,
)
from symm_rs_bench.launch import multicast_off, run_ranks
from symm_rs_bench.merge import merge_results
from symm_rs_bench.report import plot_results, render_baselines, render_markdown

# torch (and the rank code, which needs it) is imported by the functions that run: `bench --help`
# builds its options from this module.

__all__ = ["add_arguments", "run"]
OTHER_ENV = ("TORCH_NCCL_", "SYMM_RS_", "TORCH_SYMM_MEM_", "NVSHMEM_", "CUDA_VISIBLE_DEVICES")


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_info(world: int) -> dict[str, Any]:
    """Machine, versions and environment (the ranks inherit this process's environment)."""
    import torch

    gpu, nccl = torch.cuda.get_device_name(0), symm_rs.library_info()
    environ = sorted(os.environ.items())
    return {
        "machine": {"gpu": gpu, "gpu_count": visible_gpu_count(), "gpus_used": world},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, nccl.version)),
            "nccl_path": nccl.path,
            "symm_rs": symm_rs.__version__,
            "python": platform.python_version(),
        },
        "env": {k: v for k, v in environ if k.startswith("NCCL_")},
        "other_env": {k: v for k, v in environ if k.startswith(OTHER_ENV)},
    }


def _gpu_count_problem(world_size: int | None, visible: int) -> str:
    """Why ``--world-size`` cannot run on ``visible`` GPUs, or ``""``."""
    seen = (
        f"torch sees {visible} GPU{'' if visible == 1 else 's'}"
        if visible
        else ("torch sees no GPU (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)")
    )
    if world_size is None and visible < 2:
        return f"needs 2 or more GPUs, one process each; {seen}"
    if world_size is not None and world_size < 2:
        return f"--world-size must be 2 or more (one process per GPU); got {world_size}"
    if world_size is not None and world_size > visible:
        return f"--world-size {world_size} needs {world_size} GPUs; {seen}"
    return ""


def run(args: argparse.Namespace) -> int:
    """The benchmark run: returns 0, 1 (errors, recorded in the JSON) or 2 (usage)."""
    try:
        cfg, env_set = config_from_args(args), parse_env(args.env)
        output_stem(2, args.tag)  # checks the tag
    except ValueError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    os.environ.update(env_set)  # before anything starts CUDA or NCCL: the ranks inherit it
    multicast_off()
    visible = visible_gpu_count()
    world = visible if args.world_size is None else args.world_size
    problem = _gpu_count_problem(args.world_size, visible)
    if problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    started, now = time.perf_counter(), datetime.datetime.now(datetime.timezone.utc)
    sizes = ", ".join(map(format_bytes, cfg.sizes))
    print(f"symm_rs bench: {world} GPUs, {sizes}; {', '.join(cfg.sections)}", flush=True)
    sections: dict[str, dict[int, Any]] = {}
    errors: dict[int, str] = {}
    launches = []
    if set(cfg.sections) - {"coldstart", "torch_nccl"}:
        from symm_rs_bench.sections import bench_rank

        launches.append(bench_rank)
    if "torch_nccl" in cfg.sections:  # torch's symm-mem backend is chosen once per process
        from symm_rs_bench.torch_symm import torch_nccl_rank

        launches.append(torch_nccl_rank)
    for fn in launches:
        outcomes = run_ranks(fn, world, args=(cfg,), timeout=args.timeout, grace=15.0)
        for rank, (ok, value) in enumerate(outcomes):
            if not ok or "error" in value:
                error = value["error"] if ok else value
                errors[rank] = f"{errors[rank]}; {error}" if rank in errors else error
            for name, data in (value["sections"] if ok else {}).items():
                sections.setdefault(name, {})[rank] = data
    if "coldstart" in cfg.sections:
        print("[coldstart] fresh processes", flush=True)
        sections["coldstart"] = run_coldstart(world, min(args.timeout, 180.0))
    result = merge_results(
        world_size=world,
        sections=sections,
        rank_errors=errors,
        timestamp=now.isoformat(),
        **run_info(world),
        env_set=env_set,
        config={**asdict(cfg), "timeout_s": args.timeout},
        method=__doc__,
        elapsed_s=round(time.perf_counter() - started, 3),
    )
    stem = os.path.abspath(os.path.join(args.out, output_stem(world, args.tag)))
    with open(stem + ".json", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    plot = "not drawn (--no-plot)"
    if not args.no_plot:
        plot = plot_results(result, stem + ".png") or f"{stem}.png"
    print("\n" + render_markdown(result), flush=True)
    baselines = render_baselines(result)
    if baselines:
        print("\n" + baselines, flush=True)
    for error in result["errors"]:
        print(f"error: {error.strip()[:2000]}", file=sys.stderr)
    # Last, below the long table, where a reader looks once the run is over.
    print(f"results (JSON): {stem}.json\nplot: {plot}", flush=True)
    return 1 if result["errors"] else 0
