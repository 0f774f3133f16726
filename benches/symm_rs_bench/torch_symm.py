"""PyTorch's own symmetric memory (``torch.distributed._symmetric_memory``) as baselines: what a
user would pick instead of symm_rs. Every series is checked once against plain NCCL (exact, on
integer-valued inputs) before it is timed, and degrades to ``{"unavailable": reason}`` where this
torch lacks an op or backend, or where the op raises, instead of stopping the run.

Series (``buffers`` of a collectives row):

* ``torch_one_shot``: ``torch.ops.symm_mem.one_shot_all_reduce_out(buf[:n], "sum", group_name,
  out)`` (``one_shot_all_reduce`` where ``_out`` is missing); ``buf`` from ``symm_mem.empty``
  and ``symm_mem.rendezvous``; every rank reads every peer's buffer.
* ``torch_two_shot``: ``torch.ops.symm_mem.two_shot_all_reduce_(buf[:n], "sum", group_name)``
  (in place: reduce-scatter, then all-gather, through peers' buffers).
* ``torch_copy`` (all-gather; torch symm-mem has no all-gather op but a multicast one, which is
  off here): ``barrier``, a copy of this rank's input into its slot of every peer's output
  buffer (``handle.get_buffer(peer, ...)``), ``barrier``.
* section ``torch_nccl`` (its own processes: the backend is chosen before the first allocation):
  ``symm_mem.set_backend("NCCL")``; ``torch_nccl`` is ``torch.distributed``'s all-reduce and
  all-gather on those buffers, ``torch_nccl_one_shot``/``torch_nccl_two_shot`` the ops above,
  and ``plain`` the same process's caching-allocator reference.

No multicast (``multimem_*``) op is used; ``launch.multicast_off`` keeps torch, NCCL and NVSHMEM
from creating multicast objects.
"""

from __future__ import annotations

import gc
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from symm_rs_bench.config import MODES, MiB, format_bytes
from symm_rs_bench.timing import BenchAbort, Rank, time_eager, time_graph

# The largest size (bytes per rank) a torch series is measured at: one buffer of this size
# (and world times it for all-gather) is allocated once, as engines allocate theirs.
TORCH_SYMM_MAX_BYTES = 64 * MiB
# Series per op, in the collectives section (torch's default backend) and in torch_nccl.
CUDA_SERIES = {"all_reduce": ("torch_one_shot", "torch_two_shot"), "all_gather": ("torch_copy",)}
NCCL_SERIES = {
    "all_reduce": ("plain", "torch_nccl", "torch_nccl_one_shot", "torch_nccl_two_shot"),
    "all_gather": ("plain", "torch_nccl"),
}
API = {
    "torch_one_shot": "torch.ops.symm_mem.one_shot_all_reduce_out (or one_shot_all_reduce)",
    "torch_two_shot": "torch.ops.symm_mem.two_shot_all_reduce_",
    "torch_copy": "_SymmetricMemory.get_buffer(peer) copies between two barrier()s",
    "torch_nccl": "torch.distributed all_reduce / all_gather_into_tensor on symm_mem.empty "
    "buffers, backend NCCL",
    "plain": "torch.distributed on caching-allocator buffers (this process's reference)",
}
API["torch_nccl_one_shot"] = API["torch_one_shot"] + ", backend NCCL"
API["torch_nccl_two_shot"] = API["torch_two_shot"] + ", backend NCCL"


def symm_mem_module() -> Any:
    """``torch.distributed._symmetric_memory`` (raises ImportError where this torch lacks it)."""
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem


def symm_op(name: str) -> Callable[..., Any]:
    """``torch.ops.symm_mem.<name>``; raises ``AttributeError`` (or RuntimeError) if missing."""
    return getattr(torch.ops.symm_mem, name)


def one_shot_call(inp: Any, out: Any, group_name: str) -> Callable[[], Any]:
    """One-shot all-reduce of ``inp`` (a symmetric tensor) into ``out``: the ``_out`` op where
    this torch has it, otherwise the allocating op and a copy."""
    try:
        op = symm_op("one_shot_all_reduce_out")
        return lambda: op(inp, "sum", group_name, out)
    except (AttributeError, RuntimeError):
        alloc = symm_op("one_shot_all_reduce")
        return lambda: out.copy_(alloc(inp, "sum", group_name))


def two_shot_call(buf: Any, group_name: str) -> Callable[[], Any]:
    """Two-shot all-reduce of ``buf`` (a symmetric tensor), in place."""
    op = symm_op("two_shot_all_reduce_")
    return lambda: op(buf, "sum", group_name)


def rendezvous(tensor: Any, group_name: str) -> Any:
    """``symm_mem.rendezvous(tensor, group_name)``, after ``enable_symm_mem_for_group`` where
    this torch has it (needed up to torch 2.8, deprecated and harmless after)."""
    symm_mem = symm_mem_module()
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            enable(group_name)
    return symm_mem.rendezvous(tensor, group_name)


def agreed(r: Rank, fn: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """``(fn(), None)`` when it succeeds on every rank; ``(None, reason)`` when it raises on
    any (the ranks agree on the gloo group, so every rank takes the same branch)."""
    try:
        value, error = fn(), None
    except Exception as e:  # any failure of a baseline becomes "unavailable"
        value, error = None, f"{type(e).__name__}: {e}".strip()[:400]
    failed = round(r.all_reduce(float(error is not None), dist.ReduceOp.SUM))
    if not failed:
        return value, None
    return None, error or f"raised on {failed} of {r.world} ranks (not this one)"


def pattern(n: int, rank: int, dtype: Any, device: Any) -> Any:
    """Small integers (-2..2 plus the rank): every sum over 8 ranks is exact in bf16."""
    return ((torch.arange(n, device=device) % 5) - 2 + rank).to(dtype)


class TorchSymm:
    """Two symmetric tensors from ``symm_mem.empty``, rendezvous'd on ``group``: ``a``
    (``max_bytes``: all-reduce buffer, all-gather input) and ``b`` (``world`` times that:
    all-gather output)."""

    def __init__(self, r: Rank, max_bytes: int, dtype: Any = torch.bfloat16) -> None:
        symm_mem = symm_mem_module()
        self.r, self.dtype = r, dtype
        self.group_name = r.group.group_name
        n = max_bytes // torch.tensor([], dtype=dtype).element_size()
        self.a = symm_mem.empty(n, dtype=dtype, device=r.device)
        self.b = symm_mem.empty(n * r.world, dtype=dtype, device=r.device)
        self.ha = rendezvous(self.a, self.group_name)
        self.hb = rendezvous(self.b, self.group_name)
        get_backend = getattr(symm_mem, "get_backend", None)
        self.backend = get_backend(r.device) if get_backend is not None else None
        self.a.zero_()
        self.b.zero_()
        torch.cuda.synchronize()

    def call(self, series: str, op: str, nbytes: int) -> tuple[Callable[[], Any], Any, Any]:
        """``(fn, input, output)`` of ``series`` at ``nbytes`` per rank: ``fn`` reads
        ``input`` (this rank's data) and leaves the result in ``output``."""
        r, n = self.r, nbytes // self.a.element_size()
        a, out_ag = self.a[:n], self.b[: n * r.world]
        if series in ("torch_one_shot", "torch_nccl_one_shot"):
            out = torch.zeros(n, dtype=self.dtype, device=r.device)
            return one_shot_call(a, out, self.group_name), a, out
        if series in ("torch_two_shot", "torch_nccl_two_shot"):
            return two_shot_call(a, self.group_name), a, a
        if series == "torch_nccl" and op == "all_reduce":
            return (lambda: dist.all_reduce(a, group=r.group)), a, a
        if series == "torch_nccl":
            return (lambda: dist.all_gather_into_tensor(out_ag, a, group=r.group)), a, out_ag
        if series == "torch_copy":
            inp = torch.zeros(n, dtype=self.dtype, device=r.device)
            slots = [self.hb.get_buffer(p, (n,), self.dtype, r.rank * n) for p in range(r.world)]
            barrier = self.hb.barrier

            def copy_all_gather() -> None:
                barrier(channel=0)  # every peer has read its previous result
                for slot in slots:
                    slot.copy_(inp)
                barrier(channel=0)  # every peer's copy into this rank has landed

            return copy_all_gather, inp, out_ag
        if series == "plain":
            small = torch.zeros(n, dtype=self.dtype, device=r.device)
            if op == "all_reduce":
                return (lambda: dist.all_reduce(small, group=r.group)), small, small
            big = torch.zeros(n * r.world, dtype=self.dtype, device=r.device)
            return (lambda: dist.all_gather_into_tensor(big, small, group=r.group)), small, big
        raise ValueError(f"unknown torch symmetric-memory series {series!r} for {op}")

    def close(self) -> None:
        """Drops the buffers (torch frees them with the handles)."""
        self.a = self.b = self.ha = self.hb = None  # type: ignore[assignment]
        gc.collect()


def check_exact(r: Rank, fn: Callable[[], Any], op: str, inp: Any, out: Any) -> None:
    """One call of ``fn`` on ``pattern`` inputs against plain NCCL's result; then zeros (so
    that repeated sums cannot overflow while timing).

    Raises:
        AssertionError: an element differs.
    """
    n = inp.numel()
    inp.copy_(pattern(n, r.rank, inp.dtype, inp.device))
    if op == "all_reduce":
        expected = inp.clone()
        dist.all_reduce(expected, group=r.group)
    else:
        expected = torch.empty(n * r.world, dtype=inp.dtype, device=inp.device)
        dist.all_gather_into_tensor(expected, inp.clone(), group=r.group)
    torch.cuda.synchronize()
    r.barrier()
    fn()
    torch.cuda.synchronize()
    got = out[: expected.numel()]
    if not torch.equal(got, expected):
        wrong = int((got != expected).sum().item())
        raise AssertionError(f"not exact: {wrong} of {expected.numel()} elements differ")
    r.barrier()
    inp.zero_()
    out.zero_()
    torch.cuda.synchronize()
    r.barrier()


def measure(
    r: Rank, ts: Optional[TorchSymm], series: str, op: str, nbytes: int, setup_error: str = ""
) -> list[dict[str, Any]]:
    """Rows of ``series`` at ``nbytes``, eager then graph: checked once, then timed; each row
    either timed or ``{"unavailable": reason}``."""
    key = {"op": op, "bytes": nbytes, "buffers": series}
    if ts is None or setup_error:
        why = setup_error or "torch symmetric memory not set up"
        return [{**key, "mode": mode, "unavailable": why} for mode in MODES]
    if nbytes > TORCH_SYMM_MAX_BYTES:
        why = f"not measured above {format_bytes(TORCH_SYMM_MAX_BYTES)} per rank"
        return [{**key, "mode": mode, "unavailable": why} for mode in MODES]
    made, why = agreed(r, lambda: ts.call(series, op, nbytes))
    if why is None:
        fn, inp, out = made
        _, why = agreed(r, lambda: check_exact(r, fn, op, inp, out))
    if why is not None:
        return [{**key, "mode": mode, "unavailable": why} for mode in MODES]
    rows = []
    eager, why = agreed(r, lambda: time_eager(r, fn))
    if why is not None:
        return [{**key, "mode": mode, "unavailable": why} for mode in MODES]
    estimate_s = eager.pop("estimate_s")
    rows.append({**key, "mode": "eager", **eager})
    graph, why = agreed(r, lambda: time_graph(r, fn, estimate_s))
    if why is not None:
        rows.append({**key, "mode": "graph", "unavailable": f"not captured: {why}"})
    else:
        rows.append({**key, "mode": "graph", **graph})
    torch.cuda.synchronize()
    return rows


def series_summary(
    rows: list[dict[str, Any]], names: dict[str, tuple[str, ...]], setup_error: str = ""
) -> dict[str, Any]:
    """Per series: its op and API, and ``unavailable`` (the first reason) where no row of it
    was timed."""
    out: dict[str, Any] = {}
    for op, series in names.items():
        for name in series:
            mine = [x for x in rows if (x["op"], x["buffers"]) == (op, name)]
            entry: dict[str, Any] = {"op": op, "api": API[name]}
            if setup_error or not any("unavailable" not in x for x in mine):
                reasons = [x["unavailable"] for x in mine if "unavailable" in x]
                entry["unavailable"] = setup_error or (reasons[0] if reasons else "not run")
            out[f"{op}/{name}"] = entry
    return out


def setup(r: Rank, sizes: list[int], backend: Optional[str] = None) -> tuple[Any, str]:
    """``(TorchSymm, "")`` sized for ``sizes`` (up to ``TORCH_SYMM_MAX_BYTES``), or ``(None,
    reason)``; with ``backend``, ``symm_mem.set_backend(backend)`` first."""
    largest = max([s for s in sizes if s <= TORCH_SYMM_MAX_BYTES], default=0)
    if not largest:
        return None, f"no size at or below {format_bytes(TORCH_SYMM_MAX_BYTES)}"

    def make() -> TorchSymm:
        if backend is not None:
            set_backend = getattr(symm_mem_module(), "set_backend", None)
            if set_backend is None:
                raise AttributeError("this torch has no symm_mem.set_backend")
            set_backend(backend)
        return TorchSymm(r, largest)

    ts, why = agreed(r, make)
    return ts, why or ""


def torch_nccl(r: Rank) -> dict[str, Any]:
    """The ``torch_nccl`` section: torch symmetric memory with the NCCL backend, against plain
    NCCL in the same processes (``NCCL_SERIES``)."""
    ts, setup_error = setup(r, r.cfg.sizes, backend="NCCL")
    sizes = [s for s in r.cfg.sizes if s <= TORCH_SYMM_MAX_BYTES]
    r.expect(len(sizes) * sum(len(s) for s in NCCL_SERIES.values()) * len(MODES))
    rows: list[dict[str, Any]] = []
    for nbytes in sizes:
        for op, series in NCCL_SERIES.items():
            for name in series:
                got = measure(r, ts, name, op, nbytes, setup_error)
                rows += got
                for row in got:
                    shown = (
                        f"{row['median_us']:.1f} us"
                        if "median_us" in row
                        else f"unavailable ({row['unavailable'][:60]})"
                    )
                    r.step(f"{op} {format_bytes(nbytes)} {name} {row['mode']}: {shown}")
    out: dict[str, Any] = {
        "backend": ts.backend if ts is not None else None,
        "series": series_summary(rows, NCCL_SERIES, setup_error),
        "rows": rows,
    }
    if setup_error:
        out["unavailable"] = setup_error
    if ts is not None:
        ts.close()
    return out


def torch_nccl_rank(rank: int, world: int, cfg: Any) -> dict[str, Any]:
    """One GPU's ``torch_nccl`` run, in processes of its own (the backend is process-wide and
    chosen before the first symmetric allocation): ``{"sections": {"torch_nccl": data}}``."""
    from symm_rs_bench.launch import init_nccl

    started = time.perf_counter()
    r = Rank(rank, world, init_nccl(rank, world, timeout_s=60.0), cfg)
    r.log(f"[setup] {world} ranks up in {time.perf_counter() - started:.1f} s (torch_nccl)")
    try:
        data = r.section("torch_nccl", torch_nccl)
    except BenchAbort as e:  # no teardown: the ranks may be stuck in a collective
        return {"sections": {}, "error": f"BenchAbort: {e}"}
    gc.collect()
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return {"sections": {"torch_nccl": data}}
