"""The engines' own ``PyNcclCommunicator`` over symm_rs's shims, on a GPU.

Each engine's communicator module is imported from the pinned wheel's own files
(``scripts/extract_engines.py --carry`` copies them to ``.engines/``; the device has no network),
with ``symm_rs.compat.sglang`` / ``symm_rs.compat.vllm`` installed in ``sys.modules`` in place of
the engine's ``pynccl_allocator`` before anything of the engine is imported, and small stand-ins
for the rest of the engine (tests/engines/engine_modules.py). Then, per engine:

* SGLang 0.5.23: the flag is published through SGLang's own ``runtime_context``; buffers are
  allocated and collectives run in ``GroupCoordinator``'s order (``use_symmetric_memory``, the
  debug check, ``change_state(enable=True)``, the engine communicator's all-reduce / all-gather /
  reduce-scatter), eagerly and under CUDA graphs captured in SGLang's order
  (``set_graph_pool_id`` once, two warm-ups on the capture stream per batch size, largest first).
* vLLM 0.34: the engine's own ``register_nccl_symmetric_ops`` and
  ``torch.ops.vllm.all_reduce_symmetric_with_copy``, and ``cuda_communicator``'s all-gather and
  reduce-scatter order, eagerly and under graphs captured in vLLM's order (warm-ups with no
  graph pool set, the pool set at capture time by vLLM's own ``cudagraph_pool.capture_pool``).
  vLLM's communicator disables itself on NCCL < 2.29.7: the cases then record why and stop.

Every output is compared exactly with the same computation on plain buffers (integer-valued
data: reduction order cannot matter); graph replays run with fresh inputs and eager tensors
allocated between replays, which must not be overwritten. NCCL's tuning log is read for
``[Symmetric]`` lines: recorded, never required (two ranks sharing one GPU run NCCL's network
transport, which has no symmetric kernels). Runs with 2 ranks, on two GPUs or on one GPU shared
by both ranks (each with its own ``NCCL_HOSTID``).
"""

from __future__ import annotations

import os
import sys
import types
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

import symm_rs
from symm_rs.compat import sglang as sg
from symm_rs.compat import vllm as vl

from harness import Ctx, log_nccl_to, nccl_log_of_this_process

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINES_DIR = os.path.join(os.path.dirname(HERE), "engines")
if ENGINES_DIR not in sys.path:
    sys.path.insert(0, ENGINES_DIR)

import engine_modules as em  # noqa: E402

LOG_DIR = os.environ.get("SYMM_RS_ENGINE_LOG_DIR", "/tmp/symm_rs_engines_own_nccl_log")
HIDDEN = 256
BATCH_SIZES = [8, 4, 2, 1]  # captured largest first, as both engines do
REPLAYS = 20
VLLM_MIN_NCCL = (2, 29, 7)  # vLLM 0.34's PyNcclCommunicator needs ncclCommSuspend
NULL_WINDOW_NCCL = (2, 29, 2)  # from here NCCL answers registration without symmetric support
# with a NULL window; before it, it returns a window symm_rs can register and check

SGLANG_MODULES = (
    *em.SGLANG_CONFIG,
    "sglang.srt.distributed.device_communicators.pynccl_wrapper",
    "sglang.srt.distributed.device_communicators.pynccl",
)
VLLM_MODULES = (*em.VLLM_PYNCCL, "vllm.compilation.cudagraph_pool")


def setup_rank(rank: int, world_size: int) -> None:
    log_nccl_to(LOG_DIR)


def _symmetric_lines() -> int:
    path = nccl_log_of_this_process(LOG_DIR)
    if path is None:
        return 0
    with open(path, errors="replace") as f:
        return sum("[Symmetric]" in line for line in f)


def _kernels_expected(ctx: Ctx, group: Any) -> bool:
    """Whether this run must show NCCL's symmetric kernels on ``group``: one GPU per rank and
    symm_rs's verdict (NCCL's own rules) says they run. A shared GPU never runs them."""
    if ctx.shared_gpu:
        return False
    verdict = symm_rs.symmetric_kernels(group)
    ctx.details["verdict"] = verdict.reason
    return bool(verdict)


def _expect_symmetric_lines(ctx: Ctx, expected: bool, lines: int, what: str) -> None:
    """On NVLink GPUs NCCL (>= 2.28) logs each symmetric kernel on rank 0; on a shared GPU it
    must log none. ``expected``: ``_kernels_expected``, asked on every rank (its first answer
    per communicator is collective)."""
    if ctx.shared_gpu:
        assert lines == 0, f"{what}: NCCL logged symmetric kernels on a shared GPU"
    elif ctx.rank == 0 and expected:
        assert lines > 0, f"{what}: NCCL logged no [Symmetric] kernel"


def loaded_nccl() -> tuple[int, ...]:
    """The version of the libnccl in this process (a preloaded one included), not the one
    torch was built with."""
    return tuple(symm_rs.library_info().version)


# -- loading the engines --------------------------------------------------------------------


def load_engine(name: str, root: Optional[str] = None) -> types.SimpleNamespace:
    """The engine's own modules, imported from ``root`` (default: the carried ``.engines/``
    copy) with the shim in place of its allocator module. Kept for the whole process."""
    if root is None:
        carried = em.carried_root(name)
        if carried is None:
            raise FileNotFoundError(
                f"no carried {name} sources under .engines/: run "
                "`python scripts/extract_engines.py --carry` and carry .engines"
            )
        root = str(carried)
    engine = em.Engine(name, em.Path(root))
    if name == "sglang":
        engine.standins(em.sglang_standins())
        engine.standins(em.sglang_config_standins(force=True))
        engine.install_shim(sg)
        engine.load(*SGLANG_MODULES)
        pynccl = sys.modules["sglang.srt.distributed.device_communicators.pynccl"]
        return types.SimpleNamespace(
            engine=engine,
            root=root,
            pynccl=pynccl,
            runtime_context=sys.modules["sglang.srt.runtime_context"],
        )
    engine.standins(em.vllm_standins())
    engine.install_shim(vl)
    engine.load(*VLLM_MODULES)
    return types.SimpleNamespace(
        engine=engine,
        root=root,
        pynccl=sys.modules["vllm.distributed.device_communicators.pynccl"],
        cudagraph_pool=sys.modules["vllm.compilation.cudagraph_pool"],
    )


_state: dict[str, Any] = {}


def _gloo(ctx: Ctx) -> Any:
    """A CPU group over all ranks: the engines' communicators are built on one."""
    if "gloo" not in _state:
        _state["gloo"] = dist.new_group(list(range(ctx.world_size)), backend="gloo")
    return _state["gloo"]


def _engine(name: str) -> types.SimpleNamespace:
    if name not in _state:
        _state[name] = load_engine(name)
    return _state[name]


def _data(rows: int, seed: int, rank: int, device: Any) -> torch.Tensor:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 31 + rank)
    values = torch.randint(-4, 5, (rows, HIDDEN), generator=gen).to(torch.bfloat16)
    return values.to(device)


def _exact(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        raise AssertionError(f"{name}: {int((diff > 0).sum())} elements differ (max {diff.max()})")


# -- SGLang -----------------------------------------------------------------------------------


class Coordinator:
    """The parts of SGLang 0.5.23's ``GroupCoordinator`` its symmetric-memory path runs, in its
    order (``parallel_state.py``: ``all_reduce``'s pynccl branch, ``all_gather`` and
    ``_all_gather_into_tensor``, ``reduce_scatter`` and ``_reduce_scatter_tensor``)."""

    def __init__(self, pynccl_comm: Any, cpu_group: Any, rank: int, world_size: int) -> None:
        self.pynccl_comm, self.cpu_group = pynccl_comm, cpu_group
        self.rank_in_group, self.world_size = rank, world_size
        self.is_first_rank = rank == 0
        self.unique_name = "tp:0"
        self.device = pynccl_comm.device

    def all_reduce(self, input_: torch.Tensor) -> torch.Tensor:
        sg.debug_check_symmetric_mempool(self, {"input": input_}, "all_reduce")
        with self.pynccl_comm.change_state(enable=True):
            self.pynccl_comm.all_reduce(input_)
        return input_

    def all_gather(self, input_: torch.Tensor) -> torch.Tensor:
        size = (input_.shape[0] * self.world_size, *input_.shape[1:])
        with sg.use_symmetric_memory(self, disabled=not sg.is_allocation_symmetric()):
            output = torch.empty(size, dtype=input_.dtype, device=input_.device)
        sg.debug_check_symmetric_mempool(self, {"output": output}, "all_gather_into_tensor")
        with self.pynccl_comm.change_state(enable=True):
            self.pynccl_comm.all_gather(output, input_)
        return output

    def reduce_scatter(self, input_: torch.Tensor) -> torch.Tensor:
        with sg.use_symmetric_memory(self):
            input_tensor = input_.movedim(0, 0).contiguous()
        size = (input_tensor.shape[0] // self.world_size, *input_tensor.shape[1:])
        with sg.use_symmetric_memory(self):
            output = torch.empty(size, dtype=input_tensor.dtype, device=input_tensor.device)
        sg.debug_check_symmetric_mempool(
            self, {"output": output, "input": input_tensor}, "reduce_scatter_tensor"
        )
        with self.pynccl_comm.change_state(enable=True):
            self.pynccl_comm.reduce_scatter(output, input_tensor)
        return output


def _sglang_forward(coord: Coordinator, x: torch.Tensor, seen: Optional[list[bool]]) -> Any:
    """A layer's communication as SGLang model code runs it: the output of a matmul allocated
    under ``use_symmetric_memory(tp_group)`` and all-reduced in place, then an all-gather and a
    reduce-scatter through the coordinator."""
    with sg.use_symmetric_memory(coord, disabled=not sg.is_allocation_symmetric()):
        h = torch.empty_like(x)
    torch.mul(x, coord.rank_in_group + 1, out=h)
    h = coord.all_reduce(h)
    gathered = coord.all_gather(h)
    scattered = coord.reduce_scatter(gathered)
    if seen is not None:
        seen.extend(sg.is_tensor_in_symmetric_mempool(t) for t in (h, gathered, scattered))
    return h + scattered


def _publish(rc: Any, on: bool) -> None:
    em.publish_exec_comm(rc, enable_symm_mem=on)


def _sglang_setup(ctx: Ctx) -> tuple[types.SimpleNamespace, Coordinator]:
    loaded = _engine("sglang")
    if "sglang_coord" not in _state:
        comm = loaded.pynccl.PyNcclCommunicator(
            group=_gloo(ctx), device=ctx.device, is_symmetric_memory_enabled=True
        )
        _state["sglang_coord"] = Coordinator(comm, _gloo(ctx), ctx.rank, ctx.world_size)
    # Registration is forced where NCCL returns windows without symmetric support (two ranks on
    # one GPU have none), so that real windows are made and checked; newer NCCL would return a
    # NULL window there, so auto lets symm_rs skip registering.
    always = loaded_nccl() < NULL_WINDOW_NCCL
    os.environ["SYMM_RS_REGISTER"] = "always" if always else "auto"
    ctx.details["register"] = os.environ["SYMM_RS_REGISTER"]
    return loaded, _state["sglang_coord"]


def case_sglang_own_communicator_loads_with_the_shim(ctx: Ctx) -> None:
    loaded, coord = _sglang_setup(ctx)
    allocator = sys.modules[em.ALLOCATOR["sglang"]]
    assert allocator is sg, f"{em.ALLOCATOR['sglang']} is {allocator!r}, not the shim"
    assert loaded.pynccl.__file__.startswith(loaded.root), loaded.pynccl.__file__
    ctx.details.update(
        shared_gpu=getattr(ctx, "shared_gpu", None),
        pynccl=loaded.pynccl.__file__,
        nccl_loaded=".".join(map(str, loaded_nccl())),
        engine_nccl_version=coord.pynccl_comm.nccl_version,
        torch_nccl=".".join(map(str, torch.cuda.nccl.version())),
    )
    assert coord.pynccl_comm.available and hasattr(coord.pynccl_comm, "comm")


def case_sglang_flag_from_the_engines_runtime_context(ctx: Ctx) -> None:
    loaded, coord = _sglang_setup(ctx)
    rc = loaded.runtime_context
    em.unpublish(rc)
    off_unpublished = not sg.is_symmetric_memory_enabled()
    _publish(rc, False)
    off = not sg.is_symmetric_memory_enabled()
    x = _data(4, 1, ctx.rank, ctx.device)
    with sg.use_symmetric_memory(coord):
        plain = torch.empty_like(x)
    _publish(rc, True)
    assert off_unpublished and off and sg.is_symmetric_memory_enabled()
    assert not sg.is_tensor_in_symmetric_mempool(plain), "flag off must give plain memory"


def _eager_exact(
    ctx: Ctx,
    expected: bool,
    plain: Callable[[torch.Tensor], torch.Tensor],
    symmetric: Callable[[torch.Tensor, list[bool]], torch.Tensor],
) -> None:
    """An engine's forward at 1, 3, 8 and 64 rows through the shim (``symmetric`` notes in its
    list whether each buffer lay in a window), exact against its plain-buffer run; every buffer
    in a window where registration is forced or kernels are ``expected``."""
    before = _symmetric_lines()
    for seed, rows in enumerate([1, 3, 8, 64]):
        x = _data(rows, seed, ctx.rank, ctx.device)
        want = plain(x)
        seen: list[bool] = []
        got = symmetric(x, seen)
        torch.cuda.synchronize()
        _exact(f"rows={rows}", got, want)
        ctx.details[f"registered_rows{rows}"] = seen
        if ctx.details["register"] == "always" or expected:
            assert all(seen), f"rows={rows}: buffers outside windows: {seen}"
    ctx.details["symmetric_log_lines"] = _symmetric_lines() - before
    _expect_symmetric_lines(ctx, expected, ctx.details["symmetric_log_lines"], "eager")


def _captures_checked(
    ctx: Ctx,
    expected: bool,
    seen: dict[int, list[bool]],
    lines_per_bs: dict[int, int],
    before: int,
    registered: bool,
    lines_from: int,
) -> None:
    """Records what each capture found in windows and what NCCL logged; requires every buffer
    in a window (``registered``) and [Symmetric] lines from capture number ``lines_from`` on."""
    ctx.details["registered_in_capture"] = {str(bs): v for bs, v in seen.items()}
    ctx.details["symmetric_log_lines"] = _symmetric_lines() - before
    ctx.details["symmetric_lines_per_capture"] = {str(bs): n for bs, n in lines_per_bs.items()}
    if registered:
        assert all(all(v) for v in seen.values()), seen
    for bs in list(lines_per_bs)[lines_from:]:
        _expect_symmetric_lines(ctx, expected, lines_per_bs[bs], f"capture at batch size {bs}")


def case_sglang_eager_collectives_exact(ctx: Ctx) -> None:
    loaded, coord = _sglang_setup(ctx)
    rc = loaded.runtime_context
    _eager_exact(
        ctx,
        _kernels_expected(ctx, coord.pynccl_comm),
        lambda x: _sglang_plain(rc, coord, x),
        lambda x, seen: _sglang_forward(coord, x, seen),
    )


def case_sglang_graphs_in_sglangs_order_exact(ctx: Ctx) -> None:
    loaded, coord = _sglang_setup(ctx)
    rc = loaded.runtime_context
    _publish(rc, True)
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device=ctx.device)
    statics = {bs: _data(bs, 100 + bs, ctx.rank, ctx.device) for bs in BATCH_SIZES}
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}
    seen: dict[int, list[bool]] = {}
    lines_per_bs: dict[int, int] = {}
    expected = _kernels_expected(ctx, coord.pynccl_comm)
    before = _symmetric_lines()
    sg.set_graph_pool_id(pool)  # once per capture session, before the warm-ups
    try:
        for bs in BATCH_SIZES:
            for _ in range(2):  # SGLang's two warm-ups, each after a barrier
                torch.cuda.synchronize()
                dist.barrier(group=_gloo(ctx))
                with torch.cuda.stream(stream):
                    _sglang_forward(coord, statics[bs], None)
            graph = torch.cuda.CUDAGraph()
            seen[bs] = []
            at = _symmetric_lines()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = _sglang_forward(coord, statics[bs], seen[bs])
            torch.cuda.synchronize()
            lines_per_bs[bs] = _symmetric_lines() - at
            graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        _replay_and_compare(
            ctx,
            graphs,
            statics,
            lambda x: _sglang_plain(rc, coord, x),
            lambda: sg.use_symmetric_memory(coord),
        )
    finally:
        sg.set_graph_pool_id(None)
    # SGLang's order warms the capture pool up before the first capture: every buffer a captured
    # collective uses is registered before NCCL bakes its kernel into the graph, from the first.
    registered = ctx.details["register"] == "always" or expected
    _captures_checked(ctx, expected, seen, lines_per_bs, before, registered, lines_from=0)
    del graphs, graph, out
    _release_capture_pool(ctx, pool)


def _sglang_plain(rc: Any, coord: Coordinator, x: torch.Tensor) -> torch.Tensor:
    _publish(rc, False)
    try:
        return _sglang_forward(coord, x, None)
    finally:
        _publish(rc, True)


def _replay_and_compare(
    ctx: Ctx,
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]],
    statics: dict[int, torch.Tensor],
    plain: Callable[[torch.Tensor], torch.Tensor],
    eager_context: Callable[[], Any],
) -> None:
    """Replays every graph with fresh inputs, each output exact against ``plain``; tensors
    allocated eagerly between replays (under the shims' contexts) must survive them."""
    keep: list[tuple[torch.Tensor, float]] = []
    for step in range(REPLAYS):
        bs = BATCH_SIZES[step % len(BATCH_SIZES)]
        graph, out = graphs[bs]
        statics[bs].copy_(_data(bs, 1000 + step, ctx.rank, ctx.device))
        graph.replay()
        torch.cuda.synchronize()
        _exact(f"replay {step} bs={bs}", out, plain(statics[bs]))
        with eager_context():
            eager = torch.full((bs, HIDDEN), float(step + 7), device=ctx.device)
        keep.append((eager, float(step + 7)))
    torch.cuda.synchronize()
    for eager, value in keep:
        assert bool((eager == value).all()), "a replay overwrote a tensor allocated eagerly"
    ctx.details["replays"] = REPLAYS


def case_sglang_release(ctx: Ctx) -> None:
    _, coord = _sglang_setup(ctx)
    ctx.details["windows_released"] = symm_rs.release(coord.pynccl_comm)
    os.environ.pop("SYMM_RS_REGISTER", None)


# -- vLLM -------------------------------------------------------------------------------------


def _vllm_setup(ctx: Ctx) -> Optional[tuple[types.SimpleNamespace, Any]]:
    """vLLM's loaded modules and its own communicator, or ``None`` (reason in the details)
    when that communicator disabled itself."""
    loaded = _engine("vllm")
    os.environ["VLLM_USE_NCCL_SYMM_MEM"] = "1"
    if "vllm_comm" not in _state:
        _state["vllm_comm"] = loaded.pynccl.PyNcclCommunicator(group=_gloo(ctx), device=ctx.device)
    comm = _state["vllm_comm"]
    ctx.details["nccl_loaded"] = ".".join(map(str, loaded_nccl()))
    if not getattr(comm, "available", False):
        try:
            symm_rs.groups.resolve_comm(comm)
        except ValueError as e:
            ctx.details["symm_rs_says"] = str(e)
        ctx.details["skipped"] = (
            f"vLLM 0.34's PyNcclCommunicator disabled itself: it needs NCCL >= "
            f"{'.'.join(map(str, VLLM_MIN_NCCL))} (ncclCommSuspend) and this process has "
            f"{ctx.details['nccl_loaded']}; preload a newer one (scripts/carry_nccl.py)"
        )
        return None
    os.environ["SYMM_RS_REGISTER"] = "always" if loaded_nccl() < NULL_WINDOW_NCCL else "auto"
    ctx.details["register"] = os.environ["SYMM_RS_REGISTER"]
    if "vllm_ops" not in _state:
        loaded.pynccl.register_nccl_symmetric_ops(comm)  # the engine's own op, over the shim
        _state["vllm_ops"] = True
    return loaded, comm


def _vllm_forward(comm: Any, x: torch.Tensor, seen: Optional[list[bool]]) -> torch.Tensor:
    """vLLM's symmetric-memory collectives: its ``all_reduce_symmetric_with_copy`` op, then an
    all-gather and a reduce-scatter in ``cuda_communicator``'s order (output, resp. staged
    input and output, allocated under ``nccl_symm_mem_context``; the result cloned out)."""
    ws = comm.world_size
    reduced = torch.ops.vllm.all_reduce_symmetric_with_copy(x * (comm.rank + 1))
    with vl.nccl_symm_mem_context(comm):
        gathered = torch.empty(
            (reduced.shape[0] * ws, *reduced.shape[1:]), dtype=x.dtype, device=x.device
        )
    comm.all_gather(gathered, reduced)
    gathered_out = gathered.clone()
    if vl.is_symmetric_memory_tensor(gathered_out):
        staged = gathered_out
    else:
        with vl.nccl_symm_mem_context(comm):
            staged = torch.empty_like(gathered_out)
        staged.copy_(gathered_out)
    with vl.nccl_symm_mem_context(comm):
        scattered = torch.empty(
            (gathered_out.shape[0] // ws, *gathered_out.shape[1:]), dtype=x.dtype, device=x.device
        )
    comm.reduce_scatter(scattered, staged)
    if seen is not None:
        seen.extend(vl.is_symmetric_memory_tensor(t) for t in (gathered, staged, scattered))
    return scattered.clone() + reduced


def _vllm_plain(comm: Any, x: torch.Tensor) -> torch.Tensor:
    os.environ["VLLM_USE_NCCL_SYMM_MEM"] = "0"
    try:
        return _vllm_forward(comm, x, None)
    finally:
        os.environ["VLLM_USE_NCCL_SYMM_MEM"] = "1"


def case_vllm_own_communicator_loads_with_the_shim(ctx: Ctx) -> None:
    loaded = _engine("vllm")
    allocator = sys.modules[em.ALLOCATOR["vllm"]]
    assert allocator is vl, f"{em.ALLOCATOR['vllm']} is {allocator!r}, not the shim"
    assert loaded.pynccl.__file__.startswith(loaded.root), loaded.pynccl.__file__
    ctx.details["pynccl"] = loaded.pynccl.__file__
    if _vllm_setup(ctx) is None:
        # The communicator is an accepted kind that holds no communicator: say so, and why.
        assert "disabled" in ctx.details.get("symm_rs_says", ""), ctx.details
        return
    assert vl.is_symmetric_memory_enabled()


def case_vllm_eager_collectives_exact(ctx: Ctx) -> None:
    setup = _vllm_setup(ctx)
    if setup is None:
        ctx.skip(ctx.details["skipped"])
    _, comm = setup
    _eager_exact(
        ctx,
        _kernels_expected(ctx, comm),
        lambda x: _vllm_plain(comm, x),
        lambda x, seen: _vllm_forward(comm, x, seen),
    )


def case_vllm_graphs_in_vllms_order_exact(ctx: Ctx) -> None:
    setup = _vllm_setup(ctx)
    if setup is None:
        ctx.skip(ctx.details["skipped"])
    loaded, comm = setup
    global_pool = torch.cuda.graph_pool_handle()  # vLLM's one graph pool for all captures
    config = types.SimpleNamespace(use_cumem_cudagraph_pool=False)
    stream = torch.cuda.Stream(device=ctx.device)
    statics = {bs: _data(bs, 200 + bs, ctx.rank, ctx.device) for bs in BATCH_SIZES}
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any]] = {}
    seen: dict[int, list[bool]] = {}
    lines_per_bs: dict[int, int] = {}
    expected = _kernels_expected(ctx, comm)
    before = _symmetric_lines()
    try:
        with torch.cuda.stream(stream):
            for bs in BATCH_SIZES:
                _vllm_forward(comm, statics[bs], None)  # warm-up: no graph pool set yet
                graph = torch.cuda.CUDAGraph()
                seen[bs] = []
                at = _symmetric_lines()
                # vLLM's own capture_pool sets the shim's graph pool at capture time.
                with (
                    loaded.cudagraph_pool.capture_pool(global_pool, config) as pool,
                    torch.cuda.graph(graph, pool=pool, stream=torch.cuda.current_stream()),
                ):
                    out = _vllm_forward(comm, statics[bs], seen[bs])
                torch.cuda.synchronize()
                lines_per_bs[bs] = _symmetric_lines() - at
                graphs[bs] = (graph, out)
        torch.cuda.synchronize()
        _replay_and_compare(
            ctx,
            graphs,
            statics,
            lambda x: _vllm_plain(comm, x),
            lambda: vl.nccl_symm_mem_context(comm),
        )
    finally:
        vl.set_graph_pool_id(None)
    # Registration recorded, not required: the first capture's buffers are new segments of the
    # capture pool, registered only after it (docs/engines.md); later captures reuse registered
    # blocks, so [Symmetric] lines are required from the second capture on.
    _captures_checked(ctx, expected, seen, lines_per_bs, before, registered=False, lines_from=1)
    del graphs, graph, out
    _release_capture_pool(ctx, global_pool)


def _release_capture_pool(ctx: Ctx, pool: Any) -> None:
    """Frees the graph pool's symmetric capture pool once its graphs are gone (recorded: a
    tensor still alive there is a finding, not this case's subject)."""
    try:
        ctx.details["capture_pool_segments_freed"] = symm_rs.release_graph_pool(pool)
    except symm_rs.SymmetricMemoryError as e:
        ctx.details["capture_pool_not_freed"] = str(e)


def case_vllm_release(ctx: Ctx) -> None:
    comm = _state.get("vllm_comm")
    if comm is not None and getattr(comm, "available", False):
        ctx.details["windows_released"] = symm_rs.release(comm)
    os.environ.pop("SYMM_RS_REGISTER", None)
    os.environ.pop("VLLM_USE_NCCL_SYMM_MEM", None)
