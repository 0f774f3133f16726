"""``doctor``: what a user needs to know before relying on symm_rs.

Every finding that stops symm_rs from working, or that gives wrong results symm_rs cannot steer
around, is a *problem* (the command then exits with status 1) and comes with advice. Findings
that do not are *warnings*: an unknown ``SYMM_RS_*`` name, or a known NCCL defect that symm_rs
steers around in its own calls. NCCL is judged by the library loaded in this process (torch's,
or one preloaded in its place), never by the version torch was built with.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from symm_rs import __version__, gpu_check, library
from symm_rs.env import NCCL_LIBRARY, PREFIX, environment_issues, read_nccl_library


def _torch_features() -> dict[str, bool]:
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
    "torch_without_nccl": "install a CUDA build of torch (README.md, 'Set-up'); this one has no "
    "NCCL",
    "graph_capture": "before CUDA-graph captures call symm_rs.set_graph_pool(pool) with the pool "
    "given to torch.cuda.graph(g, pool=pool) (torch >= 2.12 reports it itself)",
    "win_disabled": "unset NCCL_WIN_ENABLE (windows are off, registration returns NULL windows)",
    "cumem_disabled": "unset NCCL_CUMEM_ENABLE=0: symmetric windows need cuMem allocations",
    "nccl_mismatch": "load one libnccl per process: communicators of torch groups are only "
    "valid in the library that made them; import torch before symm_rs, unset "
    "SYMM_RS_NCCL_LIBRARY, and preload (LD_PRELOAD) a newer libnccl rather than adding one",
    "override_ignored": "unset SYMM_RS_NCCL_LIBRARY: torch's libnccl is already loaded and "
    "symm_rs uses it (a communicator is only valid in the library that made it)",
    "environment": "fix or unset the SYMM_RS_* variables named above (README.md, 'Environment "
    "variables')",
    "peer_access": "symmetric kernels need NVLink/P2P between every pair of GPUs in a group; "
    "use GPUs that can reach each other (nvidia-smi topo -m)",
    "no_symmetric_kernel": gpu_check.NO_SYMMETRIC_KERNEL_ADVICE,
    "no_gpu": "run on a machine with CUDA GPUs, or check CUDA_VISIBLE_DEVICES and the driver "
    "(nvidia-smi)",
}


def _nccl_environment_problems() -> list[dict[str, str]]:
    found = []
    if os.environ.get("NCCL_WIN_ENABLE", "1").strip() == "0":
        found.append({"problem": "NCCL_WIN_ENABLE=0", "advice": ADVICE["win_disabled"]})
    if os.environ.get("NCCL_CUMEM_ENABLE", "").strip() == "0":
        found.append({"problem": "NCCL_CUMEM_ENABLE=0", "advice": ADVICE["cumem_disabled"]})
    return found


def check_environment(environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """The ``SYMM_RS_*`` variables that are set, with the problems (values symm_rs cannot use)
    and warnings (names it does not know) found in them."""
    env = dict(os.environ if environ is None else environ)
    issues = environment_issues(env)
    return {
        "variables": {k: v for k, v in sorted(env.items()) if k.startswith(PREFIX)},
        "problems": [i.message for i in issues if i.fatal],
        "warnings": [i.message for i in issues if not i.fatal],
    }


def known_issues_report(version: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The known NCCL defects of ``version`` (``symm_rs.library.NCCL_ISSUES``), as JSON:
    ``steered_around`` with how symm_rs avoids the defect, or ``False`` and ``""`` when it
    cannot."""
    dotted = ".".join(map(str, version))
    return [
        {
            "nccl": dotted,
            "affected": issue.affected,
            "fixed_in": ".".join(map(str, issue.fixed)),
            "summary": issue.summary,
            "reference": issue.reference,
            "problem": issue.describe(version),
            "advice": issue.advice,
            "steered_around": bool(issue.steered),
            "how_steered": issue.steered,
        }
        for issue in library.nccl_issues(version)
    ]


def shared_libraries_report(path: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """libnccl files installed by more than one distribution, as JSON (see
    ``symm_rs.library.shared_nccl_libraries``)."""
    return [
        {
            "path": shared.path,
            "distributions": list(shared.distributions),
            "keep": shared.keep,
            "problem": f"{shared.path} is installed by {' and '.join(shared.distributions)}: the "
            "later install overwrote the earlier one's file, and uninstalling either deletes it",
            "advice": shared.advice,
        }
        for shared in library.shared_nccl_libraries(path)
    ]


def split_notes(
    notes: list[str], loaded_path: str, environ: Optional[dict[str, str]] = None
) -> tuple[list[str], list[str]]:
    """The Rust core's notes about how the library was chosen, as ``(problems, harmless)``: an
    ignored ``SYMM_RS_NCCL_LIBRARY`` that names the very file already loaded (compared by real
    path) is harmless."""
    env = os.environ if environ is None else environ
    wanted = env.get(NCCL_LIBRARY, "")
    problems, harmless = [], []
    for note in notes:
        same_file = (
            bool(wanted)
            and note.startswith(f"{NCCL_LIBRARY}=")
            and os.path.realpath(wanted) == os.path.realpath(loaded_path)
        )
        (harmless if same_file else problems).append(note)
    return problems, harmless


def _peer_access(count: int) -> dict[str, Any]:
    missing = [
        (a, b)
        for a in range(count)
        for b in range(count)
        if a != b and not torch.cuda.can_device_access_peer(a, b)
    ]
    return {"all_pairs": not missing, "missing": missing}


def _version_text(version: Any) -> Optional[str]:
    if version is None:
        return None
    if isinstance(version, (tuple, list)):
        return ".".join(map(str, version))
    return str(version)


def _version_tuple(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    try:
        major, minor, patch = (int(part) for part in (text or "").split(".")[:3])
    except ValueError:
        return None
    return (major, minor, patch)


def diagnose(run_check: bool = True, require_gpu: bool = False) -> dict[str, Any]:
    """Everything ``doctor`` reports, as a dict: versions, GPUs, the NCCL in use and torch's,
    window support, known NCCL defects, libnccl files shared by two wheels, the environment,
    the torch features symm_rs relies on, problems and warnings with advice, and (with 2+ GPUs)
    the result of a symmetric all-gather across them with NCCL's tuning-log evidence."""
    report: dict[str, Any] = {
        "symm_rs": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": [],
        "problems": [],
        "warnings": [],
        "advice": [],
        "notes": [],
    }

    def problem(text: str, advice: str = "") -> None:
        report["problems"].append(text)
        if advice and advice not in report["advice"]:
            report["advice"].append(advice)

    environment = check_environment()
    report["environment"] = environment
    for text in environment["problems"]:
        problem(text, ADVICE["environment"])
    report["warnings"].extend(environment["warnings"])
    for found in _nccl_environment_problems():
        problem(found["problem"], found["advice"])
    alloc_conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    report["pytorch_cuda_alloc_conf"] = alloc_conf or None
    if "expandable_segments:true" in alloc_conf.replace(" ", "").lower():
        # Reported, not judged: symm_rs's pools allocate through its own plugs, and a two-rank
        # run with it set was exact (the never-hang issue); torch's own buffers expand.
        report["notes"].append(
            "PYTORCH_CUDA_ALLOC_CONF sets expandable_segments:True: torch's own allocations use "
            "expandable segments; symm_rs's pools allocate through its ncclMemAlloc plugs"
        )

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

    try:
        # The version torch was *built* with: a newer libnccl preloaded in place of torch's
        # (LD_PRELOAD) is the one that runs, and the one judged below.
        torch_nccl = _version_text(torch.cuda.nccl.version())
    except Exception:
        torch_nccl = None
    report["torch_nccl"] = torch_nccl
    if torch_nccl is None:
        text = "torch reports no NCCL (a CPU-only build?)"
        if cuda_ok or require_gpu:
            problem(text, ADVICE["torch_without_nccl"])
        else:
            report["warnings"].append(text)

    report["known_issues"] = []
    try:
        info = library.library_info()
        ours = _version_text(info.version)
        loaded = library.loaded_nccl_libraries()
        ours_real = os.path.realpath(str(info.path))
        # The libnccl torch's calls bind to. torch may map its own copy by path beside one
        # preloaded in its place; the preloaded one still comes first in the global scope, and
        # the copy is mapped but never called.
        torch_library = library.global_nccl_library()
        if torch_library is None:  # not in the global scope: then one file must be all there is
            torch_library = loaded[0] if len(loaded) == 1 else None
        shadowed = [path for path in loaded if path not in (ours_real, torch_library)]
        report["nccl"] = {
            "path": info.path,
            "origin": info.origin,
            "version": ours,
            "windows_supported": info.windows_supported,
            "loaded_libraries": loaded,
            "torch_library": torch_library,
            "same_as_torch": torch_library == ours_real,
        }
        if not info.windows_supported:
            problem(info.windows_problem)
        if shadowed and torch_library == ours_real:
            report["notes"].append(
                "also mapped but never called (the libnccl in use comes first): "
                + ", ".join(shadowed)
            )
        if torch_library != ours_real and (torch_nccl is not None or len(loaded) > 1):
            problem(
                f"symm_rs uses NCCL {ours} from {info.path} ({info.origin}) but torch's "
                f"NCCL calls go to {torch_library or 'a libnccl symm_rs cannot name'} (loaded: "
                f"{', '.join(loaded) or 'none found'}): a communicator made by one library is "
                "invalid in the other",
                ADVICE["nccl_mismatch"],
            )
        elif torch_nccl is not None and torch_nccl != ours:
            report["notes"].append(
                f"torch was built with NCCL {torch_nccl}; this process runs NCCL {ours} "
                f"({info.path}), the one torch's NCCL calls go to: torch and symm_rs share "
                "it, and it is the one judged here"
            )
        note_problems, harmless = split_notes(list(info.notes), str(info.path))
        for note in note_problems:
            problem(note, ADVICE["override_ignored"])
        if harmless:
            report["notes"].append(
                f"{NCCL_LIBRARY}={read_nccl_library()} names the libnccl "
                "already loaded (the same file): it has no effect"
            )
        running = _version_tuple(ours)
        for issue in known_issues_report(running) if running is not None else []:
            report["known_issues"].append(issue)
            if issue["steered_around"]:
                report["warnings"].append(f"{issue['problem']}; {issue['how_steered']}")
            else:
                problem(issue["problem"], issue["advice"])
    except Exception as e:
        report["nccl"] = None
        problem(str(e))

    try:
        report["shared_libraries"] = shared_libraries_report()
    except Exception as e:  # metadata of some distribution unreadable: say so, go on
        report["shared_libraries"] = []
        report["warnings"].append(f"could not read the installed distributions: {e}")
    for shared in report["shared_libraries"]:
        problem(shared["problem"], shared["advice"])

    if not cuda_ok:
        report["check"] = "skipped: no GPU visible to torch"
        if require_gpu:
            problem("no GPU visible to torch (--require-gpu)", ADVICE["no_gpu"])
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
    gpu_check.run(report, problem, ADVICE["no_symmetric_kernel"])
    return report


def render(report: dict[str, Any]) -> str:
    """The report as the lines ``doctor`` prints."""
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
        lines.append(f"torch was built with NCCL {report['torch_nccl']}")
    variables = report.get("environment", {}).get("variables", {})
    if variables:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in variables.items()))
    missing = [name for name, ok in report.get("torch_features", {}).items() if not ok]
    if missing:
        lines.append(f"torch features missing: {', '.join(missing)}")
    lines.append(f"check: {report['check']}")
    evidence = report.get("tuning_log")
    if evidence:
        for line in evidence["symmetric_all_gather"][:4]:
            lines.append(f"NCCL tuning log: {line.strip()}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    for warning in report.get("warnings", []):
        lines.append(f"warning: {warning}")
    for problem in report["problems"]:
        lines.append(f"problem: {problem}")
    for advice in report["advice"]:
        lines.append(f"advice: {advice}")
    lines.append(
        f"result: {len(report['problems'])} problem(s) found"
        if report["problems"]
        else "result: no problem found"
    )
    return "\n".join(lines)
