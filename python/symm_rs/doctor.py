"""``python -m symm_rs doctor``: what a user needs to know before relying on symm_rs."""

from __future__ import annotations

import os
from typing import Any

CHECK_ELEMENTS = 1 << 20  # 2 MiB of bf16 per rank: large enough to need a fresh pool segment


def symmetric_all_gather_check(rank: int, world_size: int) -> dict[str, Any]:
    """One rank of the doctor's check: a symmetric all-gather compared with the expected bytes."""
    import torch
    import torch.distributed as dist

    import symm_rs
    from symm_rs.launch import init_nccl

    group = init_nccl(rank, world_size)
    try:
        with symm_rs.use_symmetric_memory(group):
            send = torch.empty(CHECK_ELEMENTS, dtype=torch.bfloat16, device="cuda")
            recv = torch.empty(CHECK_ELEMENTS * world_size, dtype=torch.bfloat16, device="cuda")
        pattern = torch.arange(CHECK_ELEMENTS, device="cuda", dtype=torch.float32) % 251
        send.copy_((pattern + rank).to(torch.bfloat16))
        dist.all_gather_into_tensor(recv, send, group=group)
        expected = torch.cat([(pattern + r).to(torch.bfloat16) for r in range(world_size)])
        torch.cuda.synchronize()
        return {
            "exact": bool(torch.equal(recv, expected)),
            "send_symmetric": symm_rs.is_symmetric(send, group),
            "recv_symmetric": symm_rs.is_symmetric(recv, group),
            "windows": symm_rs.stats()["windows_registered"],
        }
    finally:
        symm_rs.release(group)
        dist.destroy_process_group()


def diagnose(run_check: bool = True) -> dict[str, Any]:
    """Everything ``doctor`` reports, as a dict."""
    import torch

    from symm_rs import __version__, library_info

    report: dict[str, Any] = {
        "symm_rs": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": [],
        "problems": [],
    }
    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        info = library_info()
        report["nccl"] = {
            "path": info["path"],
            "origin": info["origin"],
            "version": ".".join(map(str, info["version"])),
            "windows_supported": info["windows_supported"],
        }
        if not info["windows_supported"]:
            report["problems"].append(info["windows_problem"])
        report["problems"].extend(info["notes"])
    except Exception as e:
        report["nccl"] = None
        report["problems"].append(str(e))
    if not cuda_ok:
        report["check"] = "skipped: no GPU visible to torch"
        return report
    if len(report["gpus"]) < 2:
        report["check"] = "skipped: a symmetric all-gather needs at least 2 GPUs"
        return report
    if not run_check or not (report["nccl"] or {}).get("windows_supported"):
        report["check"] = "skipped"
        return report
    from symm_rs.launch import run_ranks

    world_size = len(report["gpus"])
    outcomes = run_ranks(symmetric_all_gather_check, world_size, timeout=180)
    report["check_ranks"] = [value if ok else {"error": value} for ok, value in outcomes]
    passed = all(
        ok and v["exact"] and v["send_symmetric"] and v["recv_symmetric"] for ok, v in outcomes
    )
    report["check"] = f"symmetric all-gather over {world_size} GPUs: " + (
        "exact, buffers registered as symmetric windows" if passed else "FAILED"
    )
    if not passed:
        report["problems"].append("the symmetric all-gather check failed; see check_ranks")
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"symm_rs {report['symm_rs']}",
        f"torch {report['torch']} (CUDA {report['torch_cuda']})",
    ]
    gpus = report["gpus"]
    if gpus:
        lines.append(f"GPUs: {len(gpus)} ({', '.join(sorted(set(gpus)))})")
    else:
        lines.append("GPUs: none visible to torch (symmetric memory needs CUDA GPUs)")
    if report.get("cuda_visible_devices") is not None:
        lines.append(f"CUDA_VISIBLE_DEVICES={report['cuda_visible_devices']}")
    nccl = report.get("nccl")
    if nccl:
        lines.append(f"NCCL {nccl['version']} at {nccl['path']} ({nccl['origin']})")
        lines.append(
            "symmetric windows: " + ("supported" if nccl["windows_supported"] else "NOT supported")
        )
    else:
        lines.append("NCCL: not found")
    lines.append(f"check: {report['check']}")
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)
