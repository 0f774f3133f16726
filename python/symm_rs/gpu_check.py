"""``doctor``'s multi-GPU check: one process per GPU runs a symmetric all-gather, compares it with
the expected bytes, and NCCL's tuning log says which kernel ran.

The processes are spawned here (bounded: a rank that hangs is killed after the timeout); the
repository's own launcher for the benchmarks and GPU tests lives outside the package
(``benches/symm_rs_bench/launch.py``).
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import symm_rs
from symm_rs.errors import NoSymmetricKernelsWarning
from symm_rs.nccl_log import read_tuning_log, symmetric_records, tuning_log_env

CHECK_ELEMENTS = 1 << 20  # 2 MiB of bf16 per rank: large enough to need a fresh pool segment
CHECK_BYTES = CHECK_ELEMENTS * 2
NO_SYMMETRIC_KERNEL_ADVICE = (
    "NCCL ran its regular kernels on registered buffers: check that NCCL_ALGO/NCCL_PROTO are "
    "unset and that every GPU pair has NVLink (nvidia-smi topo -m)"
)


def init_nccl(
    rank: int, world_size: int, device: Optional[int] = None, timeout_s: float = 120.0
) -> Any:
    """``init_process_group("nccl")`` in a spawned rank, bound to GPU ``device`` (default: the
    rank's own), with the communicator made eagerly. Returns the world group."""
    device = rank if device is None else device
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl",
        rank=rank,
        world_size=world_size,
        device_id=torch.device("cuda", device),
        timeout=timedelta(seconds=timeout_s),
    )
    return dist.group.WORLD


def symmetric_all_gather_check(
    rank: int, world_size: int, log_dir: Optional[str] = None
) -> dict[str, Any]:
    """One rank of the doctor's check: a symmetric all-gather compared with the expected bytes.

    With ``log_dir``, NCCL's tuning log is switched on for this process first (before NCCL
    initialises), one file per process in ``log_dir``.
    """
    if log_dir is not None:
        # Before the process group: NCCL reads these when it initialises.
        os.environ.update(tuning_log_env(log_dir))
    group = init_nccl(rank, world_size)
    try:
        verdict = symm_rs.symmetric_kernels(group)
        with warnings.catch_warnings():
            # The verdict is reported below; the context's own warning would repeat it.
            warnings.simplefilter("ignore", NoSymmetricKernelsWarning)
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
            "windows": symm_rs.stats().windows_registered,
            "symmetric_kernels": {"supported": verdict.supported, "reason": verdict.reason},
        }
    finally:
        symm_rs.release(group)
        dist.destroy_process_group()


def tuning_log_evidence(records: list[Any], expected_bytes: int = CHECK_BYTES) -> dict[str, Any]:
    """What NCCL's tuning log says about the check's all-gather: ``confirmed`` when it logged
    a symmetric kernel for an all-gather."""
    symmetric = symmetric_records(records, "AllGather")
    regular = [r for r in records if r.collective == "AllGather" and not r.symmetric]
    return {
        "confirmed": bool(symmetric),
        "expected_bytes": expected_bytes,
        "records": len(records),
        "symmetric_all_gather": [r.line for r in symmetric],
        "symmetric_kernels": sorted({r.kernel for r in symmetric}),
        "regular_all_gather": [r.line for r in regular],
        "bytes_match": any(r.nbytes == expected_bytes for r in symmetric),
    }


def free_port() -> int:
    """A free TCP port on the loopback interface, for torch.distributed's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answer(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    out: Any,
    setup: Optional[Callable[[int], None]],
) -> None:
    """One spawned rank: torch.distributed's env:// variables, ``setup(rank)`` when given, then
    ``fn``'s answer (or why it failed) into ``out``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        if setup is not None:
            setup(rank)
        out.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as e:  # the parent reports it
        out.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    setup: Optional[Callable[[int], None]] = None,
) -> tuple[list[Any], Any]:
    """``fn(rank, world_size, *args)`` started in one spawned process per rank (after
    ``setup(rank)``, a picklable function, when given): the processes, and the queue each
    answers into as ``(rank, ok, answer or why)``. The one place symm_rs spawns ranks (the
    repository's benchmark launcher builds on it)."""
    context = mp.get_context("spawn")
    answers = context.Queue()
    port = free_port()
    ranks = [
        context.Process(
            target=_answer, args=(r, world_size, port, fn, args, answers, setup), daemon=True
        )
        for r in range(world_size)
    ]
    for process in ranks:
        process.start()
    return ranks, answers


def run_ranks(
    fn: Callable[..., Any], world_size: int, args: tuple = (), timeout: float = 180.0
) -> list[tuple[bool, Any]]:
    """``fn(rank, world_size, *args)`` in one spawned process per rank: per rank ``(True,
    answer)`` or ``(False, why)``. A rank without an answer after ``timeout`` seconds is
    killed."""
    ranks, answers = spawn_ranks(fn, world_size, args)
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world_size and time.monotonic() < deadline:
        try:
            rank, ok, value = answers.get(timeout=1.0)
            got[rank] = (ok, value)
        except queue.Empty:
            if not any(process.is_alive() for process in ranks):
                break
    for process in ranks:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    missing = (False, f"no answer within {timeout:.0f} s")
    return [got.get(r, missing) for r in range(world_size)]


def run(report: dict[str, Any], problem: Any, advice: str) -> None:
    """Runs the check on every GPU of ``report`` and adds what it found (``problem(text,
    advice)`` for each problem)."""
    world_size = len(report["gpus"])
    with tempfile.TemporaryDirectory(prefix="symm_rs_doctor_") as log_dir:
        outcomes = run_ranks(symmetric_all_gather_check, world_size, (log_dir,), timeout=180)
        records = read_tuning_log(log_dir)
    evidence = tuning_log_evidence(records)
    report["tuning_log"] = evidence
    report["check_ranks"] = [value if ok else {"error": value} for ok, value in outcomes]
    predicted = [v["symmetric_kernels"] for ok, v in outcomes if ok]
    supported = bool(predicted) and all(p["supported"] for p in predicted)
    report["symmetric_kernels"] = (
        {"supported": supported, "reason": predicted[0]["reason"]} if predicted else None
    )
    if predicted and not supported:
        reason = predicted[0]["reason"]
        _report_no_symmetric_kernels(report, problem, advice, outcomes, evidence, reason)
        return
    exact = all(
        ok and v["exact"] and v["send_symmetric"] and v["recv_symmetric"] for ok, v in outcomes
    )
    passed = exact and evidence["confirmed"]
    if passed:
        kernels = ", ".join(evidence["symmetric_kernels"])
        verdict = f"exact; NCCL's tuning log shows the symmetric kernel {kernels}"
    elif exact:
        verdict = "FAILED: exact, but NCCL's tuning log shows no symmetric kernel"
    else:
        verdict = "FAILED"
    report["check"] = f"symmetric all-gather over {world_size} GPUs: {verdict}"
    if not exact:
        problem("the symmetric all-gather check failed; see check_ranks")
    elif not evidence["records"]:
        problem(
            "NCCL wrote no tuning log for the check (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=TUNING), "
            "so no symmetric kernel could be confirmed",
            advice,
        )
    elif not evidence["confirmed"]:
        problem(
            "NCCL's tuning log shows no symmetric kernel for the check's all-gather: "
            + "; ".join(evidence["regular_all_gather"][:2]),
            advice,
        )


def _report_no_symmetric_kernels(
    report: dict[str, Any],
    problem: Any,
    advice: str,
    outcomes: list[tuple[bool, Any]],
    evidence: dict[str, Any],
    reason: str,
) -> None:
    """symm_rs predicted that NCCL cannot run symmetric kernels here: the check then expects
    exact results on unregistered buffers and no symmetric kernel in NCCL's log."""
    world_size = len(report["gpus"])
    exact = all(ok and v["exact"] for ok, v in outcomes)
    report["check"] = (
        f"symmetric kernels: no ({reason}); all-gather over {world_size} GPUs "
        f"{'exact' if exact else 'FAILED'} on unregistered pool buffers"
    )
    problem(
        f"NCCL cannot run symmetric kernels on this machine ({reason}): symm_rs allocates but "
        "does not register, so it brings no speed-up here",
        advice,
    )
    if not exact:
        problem("the all-gather check failed; see check_ranks")
    if evidence["confirmed"]:
        problem(
            "NCCL's tuning log shows a symmetric kernel where symm_rs predicted none; "
            "please report this with the doctor's --json output"
        )
