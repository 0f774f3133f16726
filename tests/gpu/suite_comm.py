"""symm_rs.Communicator on real GPUs: every dtype NCCL has, eager and inside a replayed CUDA
graph, against torch.distributed on the same data; argument errors before NCCL is called; the
Communicator accepted as a group by use_symmetric_memory; and the size policy (calls routed to
the window-less twin by size, exact, in graphs and groups, and NCCL's tuning log agreeing).

With ranks sharing one GPU (``--shared-gpu``) every check runs but the symmetric-kernel ones:
buffers must be registered windows of the communicator instead, and NCCL must log no symmetric
kernel."""

from __future__ import annotations

import glob
import os
from typing import Any

import torch
import torch.distributed as dist

import symm_rs

from harness import Ctx, log_nccl_to

INT_DTYPES = [torch.int8, torch.uint8, torch.int32, torch.int64]
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
FP8_DTYPES = [
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d
]
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}
N = 4099  # elements per rank: odd, so no kernel gets an aligned size for free

_comm: Any = None
# NCCL's tuning log, one file per process, shared by the ranks of one run (children of the
# harness): the policy case reads what NCCL chose for its calls.
LOG_DIR = f"/tmp/symm_rs_comm_nccl_log.{os.getppid()}"


def setup_rank(rank: int, world_size: int) -> None:
    log_nccl_to(LOG_DIR)


def _communicator(ctx: Ctx) -> symm_rs.Communicator:
    global _comm
    if _comm is None or _comm.closed:
        _comm = symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device)
    return _comm


def _integers(n: int, rank: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    # On the current device, which the harness sets to the rank's (ctx.device).
    base = torch.arange(n, device="cuda", dtype=torch.int64)
    return ((base * 5 + rank * 3 + salt) % 7).to(dtype)


def _buffers(
    comm: symm_rs.Communicator, dtype: torch.dtype, symmetric: bool, n: int = N
) -> dict[str, torch.Tensor]:
    ws = comm.size
    shapes = {"ag_in": n, "ag_out": n * ws, "ar": n, "ar_out": n, "rs_in": n * ws, "rs_out": n}
    if symmetric:
        with symm_rs.use_symmetric_memory(comm):
            return {k: torch.empty(v, dtype=dtype, device=comm.device) for k, v in shapes.items()}
    return {k: torch.empty(v, dtype=dtype, device=comm.device) for k, v in shapes.items()}


def _fill(bufs: dict[str, torch.Tensor], rank: int, dtype: torch.dtype, random: bool) -> None:
    if random:
        gen = torch.Generator(device="cuda").manual_seed(1234 + rank)
        for key in ("ag_in", "ar", "rs_in"):
            bufs[key].copy_(torch.randn(bufs[key].numel(), generator=gen, device="cuda").to(dtype))
    else:
        for salt, key in enumerate(("ag_in", "ar", "rs_in")):
            bufs[key].copy_(_integers(bufs[key].numel(), rank, dtype, salt))


def _ours(comm: symm_rs.Communicator, b: dict[str, torch.Tensor]) -> None:
    comm.all_gather_into_tensor(b["ag_out"], b["ag_in"])
    comm.all_reduce(b["ar"], out=b["ar_out"])
    comm.reduce_scatter_tensor(b["rs_out"], b["rs_in"])


def _torch(group: Any, b: dict[str, torch.Tensor]) -> None:
    dist.all_gather_into_tensor(b["ag_out"], b["ag_in"], group=group)
    b["ar_out"].copy_(b["ar"])
    dist.all_reduce(b["ar_out"], group=group)
    dist.reduce_scatter_tensor(b["rs_out"], b["rs_in"], group=group)


def _differences(
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    dtype: torch.dtype,
    exact: bool,
    label: str,
) -> list[str]:
    """What differs, described; collected rather than raised so every rank keeps issuing the
    same collectives (a rank that stops early would leave the others hanging)."""
    found = []
    for key in ("ag_out", "ar_out", "rs_out"):
        a, b = ours[key].double(), ref[key].double()
        if key == "ag_out" or exact:
            same = torch.equal(ours[key], ref[key])
        else:
            tol = TOLERANCE[dtype] * ours["ag_out"].numel() / N
            same = bool(torch.allclose(a, b, atol=tol, rtol=tol))
        if not same:
            bad = (a != b).nonzero().flatten()
            first = int(bad[0]) if bad.numel() else -1
            found.append(
                f"{label} {key}: {bad.numel()} of {a.numel()} differ, first at {first}: "
                f"ours {a[first].item() if first >= 0 else None} vs torch "
                f"{b[first].item() if first >= 0 else None}"
            )
    return found


def _check_dtype(ctx: Ctx, dtype: torch.dtype, graph: bool) -> list[str]:
    comm = _communicator(ctx)
    ours = _buffers(comm, dtype, symmetric=True)
    ref = _buffers(comm, dtype, symmetric=False)
    problems = []
    for random in [False, True] if dtype in TOLERANCE else [False]:
        _fill(ours, ctx.rank, dtype, random)
        _fill(ref, ctx.rank, dtype, random)
        if graph:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                _ours(comm, ours)  # warm-up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                _ours(comm, ours)
            for key in ("ag_out", "ar_out", "rs_out"):
                ours[key].zero_()
            for _ in range(3):
                g.replay()
        else:
            _ours(comm, ours)
        _torch(ctx.group, ref)
        torch.cuda.synchronize()
        label = f"{dtype} graph={graph} random={random}"
        problems += _differences(ours, ref, dtype, exact=not random, label=label)
    return problems


def _check_all(ctx: Ctx, graph: bool) -> None:
    problems = []
    for dtype in INT_DTYPES + FLOAT_DTYPES:
        problems += _check_dtype(ctx, dtype, graph=graph)
    ctx.details["dtypes"] = [str(d) for d in INT_DTYPES + FLOAT_DTYPES]
    ctx.details["problems"] = problems
    assert not problems, "; ".join(problems)


def case_every_dtype_eager_matches_torch_distributed(ctx: Ctx) -> None:
    _check_all(ctx, graph=False)


def case_every_dtype_in_replayed_cuda_graph(ctx: Ctx) -> None:
    _check_all(ctx, graph=True)


def case_fp8_all_gather_is_bit_exact(ctx: Ctx) -> None:
    comm = _communicator(ctx)
    done = []
    for dtype in FP8_DTYPES:
        with symm_rs.use_symmetric_memory(comm):
            inp = torch.empty(N, dtype=dtype, device=ctx.device)
            out = torch.empty(N * comm.size, dtype=dtype, device=ctx.device)
        inp.copy_(_integers(N, ctx.rank, torch.float32).to(dtype))
        comm.all_gather_into_tensor(out, inp)
        expected = torch.cat([_integers(N, r, torch.float32).to(dtype) for r in range(comm.size)])
        torch.cuda.synchronize()
        assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), f"{dtype}"
        done.append(str(dtype))
    ctx.details["fp8"] = done


def case_buffers_are_symmetric_for_the_communicator(ctx: Ctx) -> None:
    comm = _communicator(ctx)
    with symm_rs.use_symmetric_memory(comm):
        t = torch.empty(1 << 20, dtype=torch.bfloat16, device=ctx.device)
    ctx.expect_window(t, comm, "a buffer of the Communicator's context")
    assert comm.comm == symm_rs.groups.resolve_comm(comm)
    assert comm.size == ctx.world_size and comm.rank == ctx.rank


def case_wrong_arguments_raise_before_nccl(ctx: Ctx) -> None:
    comm = _communicator(ctx)
    ws = comm.size
    on = ctx.device
    x = torch.zeros(8, device=on)
    cases = [
        (
            lambda: comm.all_gather_into_tensor(
                torch.zeros(8 * ws, device=on, dtype=torch.float16), x
            ),
            TypeError,
            "must match",
        ),
        (
            lambda: comm.all_gather_into_tensor(torch.zeros(8 * ws + 1, device=on), x),
            ValueError,
            "size * inp.numel()",
        ),
        (
            lambda: comm.all_gather_into_tensor(torch.zeros(8 * ws, device=on), x.cpu()),
            ValueError,
            "inp is not a CUDA tensor",
        ),
        (lambda: comm.all_reduce(torch.zeros(8, 2, device=on).t()), ValueError, "contiguous"),
        (
            lambda: comm.all_reduce(torch.zeros(8, device=on, dtype=torch.bool)),
            TypeError,
            "NCCL has no type",
        ),
        (lambda: comm.all_reduce(x, op="xor"), ValueError, "op must be one of"),
        (
            lambda: comm.reduce_scatter_tensor(torch.zeros(3, device=on), x),
            ValueError,
            "size * out.numel()",
        ),
        (lambda: comm.all_reduce(x, stream=42), TypeError, "stream"),
    ]
    if torch.cuda.device_count() > 1:  # another GPU than the communicator's
        other = (ctx.device.index + 1) % torch.cuda.device_count()
        cases.append(
            (
                lambda: comm.all_reduce(torch.zeros(8, device=f"cuda:{other}")),
                ValueError,
                "runs on cuda",
            )
        )
    for call, kind, text in cases:
        try:
            call()
        except kind as e:
            assert text in str(e), f"{kind.__name__} without {text!r}: {e}"
        else:
            raise AssertionError(f"no {kind.__name__} ({text!r})")
    ctx.details["checked_errors"] = len(cases)


def case_grouped_collectives_and_close(ctx: Ctx) -> None:
    comm = _communicator(ctx)
    a = torch.full((1024,), float(ctx.rank), device=ctx.device)
    b = torch.full((1024,), 1.0, device=ctx.device)
    with symm_rs.nccl_group():
        comm.all_reduce(a)
        comm.all_reduce(b)
    torch.cuda.synchronize()
    assert torch.equal(a, torch.full_like(a, float(sum(range(ctx.world_size)))))
    assert torch.equal(b, torch.full_like(b, float(ctx.world_size)))
    comm.close()
    comm.close()  # idempotent
    assert comm.closed
    try:
        comm.all_reduce(a)
    except ValueError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a closed communicator accepted a collective")
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device) as fresh:
        fresh.all_reduce(b)
        torch.cuda.synchronize()
        assert torch.equal(b, torch.full_like(b, float(ctx.world_size**2)))
    assert fresh.closed


def case_even_16bit_counts_run_symmetric_kernels_exactly(ctx: Ctx) -> None:
    """N above is odd, so 16-bit calls there take the staging path; here the per-rank counts
    are even, so all-gather and reduce-scatter run on the windows themselves (no staging).
    On a shared GPU the windows are registered but run NCCL's regular kernels."""
    comm = _communicator(ctx)
    ws = ctx.world_size
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for n in (4098, 1 << 16):
            with symm_rs.use_symmetric_memory(comm):
                ag_in = torch.empty(n, dtype=dtype, device=ctx.device)
                ag_out = torch.empty(n * ws, dtype=dtype, device=ctx.device)
                rs_in = torch.empty(n * ws, dtype=dtype, device=ctx.device)
                rs_out = torch.empty(n, dtype=dtype, device=ctx.device)
            ag_in.copy_(_integers(n, ctx.rank, dtype))
            rs_in.copy_(_integers(n * ws, ctx.rank, dtype, 1))
            # The native call's own decision: even counts run on the windows ("main"), with no
            # staging copy ("stage" would have launched nothing).
            current = torch.cuda.current_stream()
            handle = (current.cuda_stream, current.device.index)
            assert comm._native.run("all_gather", ag_out, ag_in, handle, "sum") == "main"
            assert comm._native.run("reduce_scatter", rs_out, rs_in, handle, "sum") == "main"
            torch.cuda.synchronize()
            expected_ag = torch.cat([_integers(n, r, dtype) for r in range(ws)])
            expected_rs = sum(_integers(n * ws, r, torch.float64, 1) for r in range(ws))
            expected_rs = expected_rs[ctx.rank * n : (ctx.rank + 1) * n]
            row = {
                "dtype": str(dtype),
                "count": n,
                "all_gather": torch.equal(ag_out, expected_ag),
                "reduce_scatter": torch.equal(rs_out.double(), expected_rs),
                "in_window": ctx.in_window(ag_out, comm) and ctx.in_window(rs_in, comm),
            }
            rows.append(row)
    ctx.details["rows"] = rows
    assert all(r["all_gather"] and r["reduce_scatter"] and r["in_window"] for r in rows), rows


# The policy case's table and sizes: per rank, 2048 elements (4 or 8 KiB) stay on the
# communicator, 98304 (192 or 384 KiB) go to the twin; sizes no other case uses.
POLICY_TABLE = "all_gather:64K-;all_reduce:64K-;reduce_scatter:64K-"
POLICY_COUNTS = (2048, 3 << 15)
OPS = {"ag_out": "all_gather", "ar_out": "all_reduce", "rs_out": "reduce_scatter"}


def _log_offsets() -> dict[str, int]:
    return {path: os.path.getsize(path) for path in glob.glob(os.path.join(LOG_DIR, "nccl.*"))}


def _log_since(offsets: dict[str, int]) -> list[str]:
    lines: list[str] = []
    for path in glob.glob(os.path.join(LOG_DIR, "nccl.*")):
        with open(path, errors="replace") as f:
            f.seek(offsets.get(path, 0))
            lines += [line for line in f.read().splitlines() if "Bytes ->" in line]
    return lines


def case_policy_routes_by_size_exactly(ctx: Ctx) -> None:
    """Policy on (a fixed table): each collective below and above its threshold, eager, in a
    replayed CUDA graph and inside nccl_group(), matches torch.distributed on plain buffers;
    NCCL logs no symmetric kernel for a call routed to the twin, and does for the others."""
    supported = symm_rs.symmetric_kernels(ctx.group).supported
    torch.cuda.synchronize()
    offsets = _log_offsets()
    comm = symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device)
    free = torch.cuda.mem_get_info(ctx.device)[0]
    policy = comm.enable_policy(POLICY_TABLE)
    torch.cuda.synchronize()
    ctx.details["twin_memory_bytes_at_creation"] = free - torch.cuda.mem_get_info(ctx.device)[0]
    assert policy.mechanism == "twin" and policy.twin_comm not in (0, comm.comm)
    assert comm.policy is policy and policy.table.to_text() == POLICY_TABLE
    ctx.details.update(per_call_selection=policy.per_call_selection, note=policy.note)
    problems: list[str] = []
    routes = {}
    for n in POLICY_COUNTS:
        for dtype in (torch.float32, torch.bfloat16):
            nbytes = n * torch.tensor([], dtype=dtype).element_size()
            routes[f"{dtype} x {n}"] = {op: comm.route(op, nbytes) for op in OPS.values()}
            ours = _buffers(comm, dtype, symmetric=True, n=n)
            ref = _buffers(comm, dtype, symmetric=False, n=n)
            _fill(ours, ctx.rank, dtype, random=False)
            _fill(ref, ctx.rank, dtype, random=False)
            _torch(ctx.group, ref)
            for how in ("eager", "graph", "group"):
                for key in OPS:
                    ours[key].zero_()
                if how == "graph":
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        _ours(comm, ours)  # warm-up outside the capture
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        _ours(comm, ours)
                    for key in OPS:
                        ours[key].zero_()
                    graph.replay()
                elif how == "group":
                    with symm_rs.nccl_group():
                        _ours(comm, ours)
                else:
                    _ours(comm, ours)
                torch.cuda.synchronize()
                label = f"policy {dtype} n={n} {how}"
                problems += _differences(ours, ref, dtype, exact=True, label=label)
                if how == "graph":
                    graph.reset()  # before close(): NCCL's destruction waits for live graphs
                    del graph
    torch.cuda.synchronize()
    ctx.details.update(routes=routes, problems=problems)
    assert not problems, "; ".join(problems)
    assert routes["torch.float32 x 2048"] == dict.fromkeys(OPS.values(), "main"), routes
    assert routes[f"torch.float32 x {3 << 15}"] == dict.fromkeys(OPS.values(), "twin"), routes

    dist.barrier(group=ctx.group, device_ids=[ctx.device.index])
    lines = _log_since(offsets)
    twin_bytes = {
        n * size * k for n in POLICY_COUNTS[1:] for size in (2, 4) for k in (1, ctx.world_size)
    }
    main_bytes = {
        n * size * k for n in POLICY_COUNTS[:1] for size in (2, 4) for k in (1, ctx.world_size)
    }
    symmetric = [line for line in lines if "[Symmetric]" in line]
    wrong = [
        line for line in symmetric if int(line.split(" Bytes ->")[0].split()[-1]) in twin_bytes
    ]
    right = [
        line for line in symmetric if int(line.split(" Bytes ->")[0].split()[-1]) in main_bytes
    ]
    ctx.details.update(
        tuning_lines=len(lines), symmetric_on_twin=wrong[:3], symmetric_on_main=len(right)
    )
    comm.close()
    assert comm.closed
    if ctx.rank == 0 and lines:  # NCCL >= 2.28 logs kernel choices on rank 0 only
        assert not wrong, f"calls routed to the twin ran symmetric kernels: {wrong[:3]}"
        assert right or not supported, "no symmetric kernel logged for the communicator's calls"
    if ctx.shared_gpu:  # different NCCL hosts: no symmetric kernel anywhere
        assert not supported and not symmetric, symmetric[:3]


def case_calibration_agrees_on_one_table(ctx: Ctx) -> None:
    """symm_rs.calibrate on a few sizes: every rank gets the same, valid table, and the table in
    use is restored."""
    with symm_rs.Communicator.from_process_group(ctx.group, device=ctx.device, policy=True) as c:
        before = c.policy.table
        table = symm_rs.calibration.calibrate(
            c, sizes=[1 << 10, 1 << 16, 1 << 20, 16 << 20], reps=3, iters=10
        )
        texts: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(texts, table.to_text(), group=ctx.group)
        assert c.policy.table == before
        torch.cuda.synchronize()
    ctx.details.update(table=table.to_text(), default=before.to_text())
    assert len(set(texts)) == 1, texts
    assert symm_rs.policy.PolicyTable.parse(texts[0]) == table
