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


def _torch_features() -> dict[str, bool]:
    import torch

    features = {
        "MemPool": hasattr(torch.cuda, "MemPool"),
        "CUDAPluggableAllocator": hasattr(torch.cuda.memory, "CUDAPluggableAllocator"),
        "_cuda_beginAllocateCurrentThreadToPool": hasattr(
            torch._C, "_cuda_beginAllocateCurrentThreadToPool"
        ),
        "CUDAGraph.get_currently_capturing_graph": hasattr(
            torch.cuda.CUDAGraph, "get_currently_capturing_graph"
        ),
        "ProcessGroupNCCL.comm_ptr": False,
    }
    try:
        from torch._C._distributed_c10d import ProcessGroupNCCL

        features["ProcessGroupNCCL.comm_ptr"] = hasattr(ProcessGroupNCCL, "comm_ptr") or hasattr(
            ProcessGroupNCCL, "_comm_ptr"
        )
    except ImportError:
        pass
    return features


# Each problem symm_rs can recognise, with what to do about it.
ADVICE = {
    "torch_features": "upgrade torch to 2.8 or later (pip install -U torch)",
    "graph_capture": "inside CUDA-graph captures pass use_symmetric_memory(group, "
    "graph_pool=pool) with the pool given to torch.cuda.graph(g, pool=pool)",
    "win_disabled": "unset NCCL_WIN_ENABLE (windows are off, registration returns NULL windows)",
    "cumem_disabled": "unset NCCL_CUMEM_ENABLE=0: symmetric windows need cuMem allocations",
    "nccl_mismatch": "torch and symm_rs use different NCCL builds; communicators of torch groups "
    "are only valid in torch's: import torch before symm_rs and unset SYMM_RS_NCCL_LIBRARY",
    "peer_access": "symmetric kernels need NVLink/P2P between every pair of GPUs in a group; "
    "use GPUs that can reach each other (nvidia-smi topo -m)",
}


def _environment_problems() -> list[dict[str, str]]:
    found = []
    if os.environ.get("NCCL_WIN_ENABLE", "1").strip() == "0":
        found.append({"problem": "NCCL_WIN_ENABLE=0", "advice": ADVICE["win_disabled"]})
    if os.environ.get("NCCL_CUMEM_ENABLE", "").strip() == "0":
        found.append({"problem": "NCCL_CUMEM_ENABLE=0", "advice": ADVICE["cumem_disabled"]})
    return found


def _peer_access(count: int) -> dict[str, Any]:
    import torch

    missing = [
        (a, b)
        for a in range(count)
        for b in range(count)
        if a != b and not torch.cuda.can_device_access_peer(a, b)
    ]
    return {"all_pairs": not missing, "missing": missing}


def diagnose(run_check: bool = True) -> dict[str, Any]:
    """Everything ``doctor`` reports, as a dict: versions, GPUs, the NCCL in use and torch's,
    window support, the torch features symm_rs relies on, problems with advice, and (with 2+
    GPUs) the result of a symmetric all-gather across them."""
    import torch

    from symm_rs import __version__, library_info

    report: dict[str, Any] = {
        "symm_rs": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": [],
        "problems": [],
        "advice": [],
        "symm_rs_env": {k: v for k, v in os.environ.items() if k.startswith("SYMM_RS_")},
    }

    def problem(text: str, advice: str = "") -> None:
        report["problems"].append(text)
        if advice and advice not in report["advice"]:
            report["advice"].append(advice)

    cuda_ok = torch.cuda.is_available()
    if cuda_ok:
        report["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    report["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    features = _torch_features()
    report["torch_features"] = features
    required = ("MemPool", "CUDAPluggableAllocator", "_cuda_beginAllocateCurrentThreadToPool")
    for name in (*required, "ProcessGroupNCCL.comm_ptr"):
        if not features[name]:
            problem(f"torch lacks {name}", ADVICE["torch_features"])
    if not features["CUDAGraph.get_currently_capturing_graph"]:
        report["advice"].append(ADVICE["graph_capture"])
    for found in _environment_problems():
        problem(found["problem"], found["advice"])
    try:
        torch_nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        torch_nccl = None
    report["torch_nccl"] = torch_nccl
    try:
        info = library_info()
        ours = ".".join(map(str, info["version"]))
        report["nccl"] = {
            "path": info["path"],
            "origin": info["origin"],
            "version": ours,
            "windows_supported": info["windows_supported"],
            "same_as_torch": info["origin"] == "already loaded in this process"
            and (torch_nccl is None or torch_nccl == ours),
        }
        if not info["windows_supported"]:
            problem(info["windows_problem"])
        if not report["nccl"]["same_as_torch"]:
            problem(
                f"symm_rs uses NCCL {ours} ({info['origin']}) but torch reports {torch_nccl}",
                ADVICE["nccl_mismatch"],
            )
        for note in info["notes"]:
            problem(note, ADVICE["nccl_mismatch"])
    except Exception as e:
        report["nccl"] = None
        problem(str(e))
    if not cuda_ok:
        report["check"] = "skipped: no GPU visible to torch"
        return report
    if len(report["gpus"]) < 2:
        report["check"] = "skipped: a symmetric all-gather needs at least 2 GPUs"
        return report
    report["peer_access"] = _peer_access(len(report["gpus"]))
    if not report["peer_access"]["all_pairs"]:
        problem(
            f"GPU pairs without peer access: {report['peer_access']['missing']}",
            ADVICE["peer_access"],
        )
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
        problem("the symmetric all-gather check failed; see check_ranks")
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
    if report.get("torch_nccl"):
        lines.append(f"torch's NCCL: {report['torch_nccl']}")
    missing = [name for name, ok in report.get("torch_features", {}).items() if not ok]
    if missing:
        lines.append(f"torch features missing: {', '.join(missing)}")
    lines.append(f"check: {report['check']}")
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    for advice in report["advice"]:
        lines.append(f"advice: {advice}")
    return "\n".join(lines)
