"""CPU tests of ``python -m symm_rs bench``: its options, iteration planning, merging and
rendering (the committed results too), the agreement that keeps ranks in step, and a whole run
of the rank code over gloo with stand-ins for CUDA and the symmetric pool. No GPU needed."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed as dist

import symm_rs
import symm_rs_bench as bench
from symm_rs import cli, cp
from symm_rs.comm import resolve_policy
from symm_rs.policy import Policy
from symm_rs_bench import comm_calls, config, merge, progress, report, sections, timing
from symm_rs_bench.launch import run_ranks

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESULTS = Path(__file__).resolve().parents[1] / "benches" / "results"
COMMITTED = sorted(RESULTS.glob("bench_*.json"))
# docs/results.md's table for bench_4gpu.json, first and last rows (CUDA-graph replay).
README_4GPU_ROWS = (
    "| 1 KiB | 11.7 | 11.0 | 12.6 | 9.6 | 11.7 | 10.5 |",
    "| 256 MiB | 2520 | 2380 | 1195 | 1532 | 2518 | 3801 |",
)


# -- options ------------------------------------------------------------------------------------


def _config(*argv: str) -> config.BenchConfig:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.config_from_args(parser.parse_args(list(argv)))


def test_sizes() -> None:
    assert config.DEFAULT_SIZES == [KiB, 8 * KiB, 64 * KiB, 512 * KiB, 4 * MiB, 32 * MiB, 256 * MiB]
    assert config.parse_sizes("4M,1K, 512KiB,1k,8 kb,1024") == [KiB, 8 * KiB, 512 * KiB, 4 * MiB]
    for bad in ("", " , ", "6", "2", "1.5M", "four"):
        with pytest.raises(ValueError):
            config.parse_sizes(bad)


def test_config_defaults_quick_and_overrides() -> None:
    cfg = _config()
    assert cfg.sizes == config.DEFAULT_SIZES and cfg.sections == list(config.SECTIONS)
    assert (cfg.reps, cfg.warmup, cfg.target_s, cfg.max_iters) == (5, 5, 0.05, 200)
    quick = _config("--quick")
    assert quick.reps < cfg.reps and quick.max_iters < cfg.max_iters
    assert quick.registration_segments < cfg.registration_segments
    custom = _config(
        "--quick", "--reps", "7", "--sizes", "1K,4M", "--sections", "context", "collectives"
    )
    assert (custom.reps, custom.sizes, custom.sections) == (
        7,
        [KiB, 4 * MiB],
        ["collectives", "context"],
    )
    with pytest.raises(ValueError, match="reps"):
        _config("--reps", "0")
    with pytest.raises(SystemExit):
        _config("--sections", "collective")
    json.dumps(bench.asdict(cfg))  # travels into the JSON


def test_parse_env_output_stem_and_format_bytes() -> None:
    assert config.parse_env(None) == {}
    assert config.parse_env(["NCCL_SYM_CTAS=16", "A=b=c", "X="]) == {
        "NCCL_SYM_CTAS": "16",
        "A": "b=c",
        "X": "",
    }
    for bad in ("NCCL_SYM_CTAS", "=3", "1A=2", "A B=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            config.parse_env([bad])
    assert config.output_stem(4) == "bench_4gpu"
    assert (
        config.output_stem(2, "ctas16") == config.output_stem(2, "_ctas16") == "bench_2gpu_ctas16"
    )
    assert config.output_stem(2, "-x.1") == "bench_2gpu-x.1"
    with pytest.raises(ValueError, match="--tag"):
        config.output_stem(2, "a/b")
    sizes = {KiB: "1 KiB", 512 * KiB: "512 KiB", 256 * MiB: "256 MiB", GiB: "1 GiB", 1536: "1536 B"}
    assert {n: config.format_bytes(n) for n in sizes} == sizes


# -- iteration planning -------------------------------------------------------------------------

DEFAULT, QUICK = config.BenchConfig(), config.BenchConfig(reps=3, target_s=0.015, max_iters=50)


def test_iteration_budget() -> None:
    # 50 ms over 5 repetitions at 1.5 ms per call (256 MiB all-reduce): 6 calls.
    assert timing.iterations_for(1.5e-3, DEFAULT) == 6
    assert timing.iterations_for(1e-4, DEFAULT) == 100
    # Slower than the budget: the minimum, 5; tiny, zero or unknown: the maximum.
    assert timing.iterations_for(0.1, DEFAULT) == 5
    for est in (15e-6, 0.0, float("nan"), float("inf")):
        assert timing.iterations_for(est, DEFAULT) == 200
    assert timing.iterations_for(1e-6, QUICK) == 50


def test_graph_plan() -> None:
    # Small calls: 10 per graph, replays capped so a repetition holds at most max_iters calls.
    assert timing.graph_plan(15e-6, DEFAULT) == (10, 20)
    assert timing.graph_plan(1e-5, QUICK) == (10, 5)
    # 1.5 ms calls: at most ~5 ms of work per graph, about 10 ms per repetition.
    assert timing.graph_plan(1.5e-3, DEFAULT) == (3, 3)
    # Calls longer than the graph budget: one per graph.
    assert timing.graph_plan(20e-3, DEFAULT) == (1, 1)
    assert timing.graph_plan(float("nan"), DEFAULT) == (10, 20)
    for est in (1e-6, 3e-5, 4e-4, 2.4e-3, 0.5):
        calls, replays = timing.graph_plan(est, DEFAULT)
        assert 1 <= calls <= 10 and 1 <= replays and calls * replays <= 200


# -- merging and rendering ----------------------------------------------------------------------


def _collective_rows(scale: float) -> list[dict[str, Any]]:
    """Every (op, bytes, mode, buffers): plain 20 us and symm 10 us at 1 KiB, 5 times that at
    4 MiB, times ``scale``."""
    rows = []
    for nbytes in (KiB, 4 * MiB):
        for op, mode, kind in itertools.product(config.OPS, config.MODES, config.BUFFERS):
            median = (20.0 if kind == "plain" else 10.0) * (1 if nbytes == KiB else 5) * scale
            rows.append({"op": op, "bytes": nbytes, "mode": mode, "buffers": kind})
            rows[-1].update(median_us=median, iters=9)
    return rows


def _synthetic() -> dict[str, Any]:
    """Two ranks' numbers for every section, merged; rank 1 is 10% slower in collectives."""
    per_rank = {
        "collectives": {0: {"rows": _collective_rows(1.0)}, 1: {"rows": _collective_rows(1.1)}},
        "communicator": {
            r: {
                "rows": [
                    {"op": op, "bytes": KiB, "path": path, "wall_us": w * (1 + r), "event_us": w}
                    for op in ("all_gather", "all_reduce")
                    for path, w in (("symm_rs", 20.0), ("torch", 35.0))
                ]
            }
            for r in (0, 1)
        },
        "context": {
            r: {"symm_rs.use_symmetric_memory": {"median_batch_us": 13.0 + r}} for r in (0, 1)
        },
        "coldstart": {
            0: {"symm_rs_total_ms": 30.0, "import_torch_ms": 3600.0},
            1: {"error": "boom"},
        },
        "registration": {
            r: {
                "first": {"register_ms_per_window": 18.0 + r},
                "destroy_pool": {"ms_per_window": 4.6},
            }
            for r in (0, 1)
        },
    }
    meta = {
        "machine": {"gpu": "NVIDIA H100 80GB HBM3"},
        "versions": {"torch": "2.11.0", "nccl": "2.28.9"},
    }
    return merge.merge_results(
        world_size=2, sections=per_rank, rank_errors={}, env_set={"NCCL_SYM_CTAS": "16"}, **meta
    )


def test_merge_takes_the_maximum_over_ranks_of_each_median() -> None:
    result = _synthetic()
    assert result["schema"] == merge.SCHEMA and result["world_size"] == 2
    rows = {
        (x["op"], x["bytes"], x["mode"], x["buffers"]): x
        for x in result["sections"]["collectives"]["rows"]
    }
    assert len(rows) == 2 * 3 * 2 * 2
    row = rows[("all_gather", KiB, "graph", "plain")]
    assert row["latency_us"] == 22.0 and row["per_rank_us"] == [20.0, 22.0] and row["iters"] == 9
    comm = result["sections"]["communicator"]["rows"][0]
    assert (comm["wall_us"], comm["per_rank_wall_us"], comm["event_us"]) == (
        40.0,
        [20.0, 40.0],
        20.0,
    )
    context = result["sections"]["context"]
    assert context["rank0"]["symm_rs.use_symmetric_memory"]["median_batch_us"] == 13.0
    assert context["max_over_ranks"]["symm_rs.use_symmetric_memory"]["median_batch_us"] == 14.0
    assert (
        result["sections"]["registration"]["max_over_ranks"]["first"]["register_ms_per_window"]
        == 19.0
    )
    assert result["errors"] == ["coldstart: boom (rank 1)"]
    assert json.loads(json.dumps(result)) == result


def test_merge_with_a_missing_rank() -> None:
    result = merge.merge_results(
        world_size=2,
        sections={"collectives": {0: {"rows": _collective_rows(1.0), "elapsed_s": 1.0}}},
        rank_errors={1: "rank 1 exited with code -6 before answering"},
    )
    rows = result["sections"]["collectives"]["rows"]
    assert all(r["latency_us"] is None and r["per_rank_us"][1] is None for r in rows)
    assert result["sections"]["collectives"]["elapsed_s"] == 1.0
    assert result["errors"] == ["rank 1: rank 1 exited with code -6 before answering"]


def test_render_markdown() -> None:
    lines = report.render_markdown(_synthetic()).splitlines()
    assert (
        "CUDA-graph replay" in lines[0]
        and "NVIDIA H100" in lines[0]
        and "NCCL_SYM_CTAS=16" in lines[0]
    )
    assert lines[2:] == [
        "| bytes | AG plain | AG symm | AR plain | AR symm | RS plain | RS symm |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| 1 KiB | 22.0 | 11.0 | 22.0 | 11.0 | 22.0 | 11.0 |",
        "| 4 MiB | 110 | 55.0 | 110 | 55.0 | 110 | 55.0 |",
    ]
    assert "eager" in report.render_markdown(_synthetic(), mode="eager").splitlines()[0]
    assert "no collectives measured" in report.render_markdown({"sections": {}})


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_results_render(path: Path, tmp_path: Path) -> None:
    result = json.loads(path.read_text())
    lines = report.render_markdown(result).splitlines()
    assert len(lines) == 4 + len(config.DEFAULT_SIZES)
    assert "n/a" not in "\n".join(lines)
    if path.name == "bench_4gpu.json":
        assert lines[4] == README_4GPU_ROWS[0] and lines[-1] == README_4GPU_ROWS[1]
        results = (RESULTS.parents[1] / "docs" / "results.md").read_text()
        assert "\n".join(lines[4:]) in results
    why = report.plot_results(result, str(tmp_path / "plot.png"))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert why is not None and "matplotlib" in why
        return
    assert why is None
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_committed_results_exist() -> None:
    assert {p.name for p in COMMITTED} >= {"bench_2gpu.json", "bench_4gpu.json"}


# -- command line -------------------------------------------------------------------------------


def test_cli_without_gpus_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "symm_rs", "bench", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert done.returncode == 2, done.stderr
    assert "bench: needs 2 or more GPUs, one process each; torch sees no GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_main_checks_gpu_count_and_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 2)
    for argv, message in (
        (["--world-size", "4"], "bench: --world-size 4 needs 4 GPUs; torch sees 2 GPUs"),
        (["--world-size", "1"], "bench: --world-size must be 2 or more (one process per GPU)"),
        (["--sizes", "6"], "multiples of 4"),
        (["--env", "NOVALUE"], "KEY=VALUE"),
        (["--tag", "a/b"], "--tag"),
    ):
        assert cli.main(["bench", *argv]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 1)
    assert cli.main(["bench"]) == 2
    assert "needs 2 or more GPUs, one process each; torch sees 1 GPU\n" in capsys.readouterr().err


# -- keeping ranks in step, over gloo -----------------------------------------------------------


def _init_gloo(rank: int, world: int, timeout_s: float = 60.0) -> Any:
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    return dist.group.WORLD


def _raise(r: timing.Rank) -> dict[str, Any]:
    raise RuntimeError(f"rank {r.rank} broke")


def _fail_on_rank_1(r: timing.Rank) -> dict[str, Any]:
    return _raise(r) if r.rank == 1 else {}


def _agreement(rank: int, world: int) -> dict[str, Any]:
    r = timing.Rank(rank, world, _init_gloo(rank, world), config.BenchConfig())
    out = {"fine": r.section("fine", lambda r: {"rank": r.rank}), "max": r.all_reduce(rank + 1)}
    out["uniform"] = r.section("uniform", _raise)
    try:
        r.section("partial", _fail_on_rank_1)
    except timing.BenchAbort as e:
        out["abort"] = str(e)
    return out


def test_sections_agree_on_failures() -> None:
    outcomes = run_ranks(_agreement, 2, timeout=120)
    assert all(ok for ok, _ in outcomes), outcomes
    for rank, (_, out) in enumerate(outcomes):
        assert out["fine"]["rank"] == rank and "error" not in out["fine"] and out["max"] == 2.0
        assert out["uniform"]["error"] == f"RuntimeError: rank {rank} broke"
    assert outcomes[0][1]["abort"] == "[partial] failed on 1 of 2 ranks (this rank succeeded)"
    assert outcomes[1][1]["abort"].endswith("(this rank: RuntimeError: rank 1 broke)")


def _fail_fast(rank: int, world: int) -> None:
    if rank == 0:
        raise RuntimeError("rank 0 broke")
    time.sleep(100)  # as a rank stuck in a collective would


def test_run_ranks_grace_stops_the_others() -> None:
    started = time.monotonic()
    (ok0, error0), (ok1, error1) = run_ranks(_fail_fast, 2, timeout=110, grace=2.0)
    assert time.monotonic() - started < 60
    assert not ok0 and "rank 0 broke" in error0
    assert not ok1 and "killed 2 s after another rank failed" in error1


# -- a whole run on CPU: the rank code over gloo, with stand-ins for CUDA and the pool ----------


class _Event:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other: _Event) -> float:
        return max(1e-6, (other.t - self.t) * 1e3)


class _Anything:
    """A stream, graph or pool that does nothing."""

    id = (0, 1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _Communicator:
    comm = 0x1000

    def __init__(self, group: Any) -> None:
        self.group = group
        self.policy: Any = None

    @classmethod
    def from_process_group(cls, group: Any, device: int) -> _Communicator:
        return cls(group)

    def all_gather_into_tensor(self, out: Any, inp: Any) -> None:
        dist.all_gather_into_tensor(out, inp, group=self.group)

    def all_reduce(self, tensor: Any) -> None:
        dist.all_reduce(tensor, group=self.group)

    def reduce_scatter_tensor(self, out: Any, inp: Any) -> None:
        out.copy_(
            inp[: out.numel()]
        )  # gloo has no reduce_scatter_tensor; the cost is beside the point

    def enable_policy(self, table: Any = True) -> Any:
        self.policy = Policy(resolve_policy(table, 2), "twin", 0x2000, False, "stand-in")  # type: ignore[arg-type]
        return self.policy

    set_policy_table = enable_policy

    def route(self, op: str, nbytes: int) -> str:
        return "twin" if self.policy.table.use_twin(op, nbytes) else "main"

    def close(self) -> None:
        pass


class _CpuRank(timing.Rank):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.device = torch.device("cpu")


def _dry_rank(rank: int, world: int, cfg: config.BenchConfig) -> dict[str, Any]:
    """``sections.bench_rank`` with CUDA, NCCL and the symmetric pool replaced by stand-ins."""
    stats = {"windows_registered": 0, "windows_deregistered": 0}

    def context(owner: Any, disabled: bool = False, verify: bool = True) -> Any:
        stats["windows_registered"] += not disabled
        return contextlib.nullcontext()

    def destroy_pool() -> int:
        stats["windows_deregistered"] += stats["windows_registered"]
        return 3

    cuda = {
        "synchronize": lambda: None,
        "Event": _Event,
        "Stream": _Anything,
        "CUDAGraph": _Anything,
    }
    cuda.update(stream=lambda s: contextlib.nullcontext(), current_stream=lambda: _Anything())
    cuda.update(graph=lambda g, **kw: contextlib.nullcontext(), MemPool=_Anything)
    cuda.update(use_mem_pool=lambda pool: contextlib.nullcontext(), current_device=lambda: 0)
    cuda.update(mem_get_info=lambda device=None: (40 << 30, 80 << 30))
    cuda.update(graph_pool_handle=lambda: (0, 1))
    for name, value in cuda.items():
        setattr(torch.cuda, name, value)
    for name in (
        "_cuda_beginAllocateCurrentThreadToPool",
        "_cuda_endAllocateToPool",
        "_cuda_releasePool",
    ):
        setattr(torch._C, name, lambda device, pool: None)
    fakes = {
        "use_symmetric_memory": context,
        "is_symmetric": lambda t, o: True,
        "stats": lambda: types.SimpleNamespace(**stats),
    }
    fakes.update(
        register=lambda g: 0, release=lambda g: 0, reserve=lambda n, g: 5, destroy_pool=destroy_pool
    )
    fakes.update(Communicator=_Communicator)
    fakes.update(graph_capture=lambda pool: contextlib.nullcontext(), release_graph_pool=len)
    for name, value in fakes.items():
        setattr(symm_rs, name, value)
    symm_rs.pool.pool_usage = lambda: {"in_use_bytes": 0}
    # The CP helpers without symmetric memory (gloo has no NCCL communicator), at small sizes.
    gather = cp._gather
    cp._gather = lambda *args, **kw: gather(*args, **{**kw, "disabled": True})
    cfg.cp_tokens = [16, 64]
    sections.init_nccl, sections.Rank = _init_gloo, _CpuRank
    # The ctypes path needs a real libnccl; on gloo it is torch.distributed under another name.
    comm_calls.ctypes_collective = lambda op, small, big, comm: sections.collective(
        op, small, big, dist.group.WORLD
    )
    return sections.bench_rank(rank, world, cfg)


def test_dry_run_of_the_whole_bench_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cold = {"symm_rs_total_ms": 30.0, "import_torch_ms": 3600.0}
    meta = {"machine": {"gpu": "Stand-in GPU"}, "versions": {"torch": torch.__version__}}
    monkeypatch.setenv("NCCL_SYM_CTAS", "unset")  # bench sets --env variables in its own process
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(bench, "run_info", lambda world: {**meta, "env": dict(os.environ)})
    monkeypatch.setattr(
        bench, "run_coldstart", lambda world, timeout: {r: cold for r in range(world)}
    )
    monkeypatch.setattr(
        bench, "run_ranks", lambda fn, world, **kw: run_ranks(_dry_rank, world, **kw)
    )
    argv = ["bench", "--out", str(tmp_path), "--tag", "dry", "--sizes", "2K,1M", "--quick"]
    argv += ["--no-plot", "--env", "NCCL_SYM_CTAS=16", "--timeout", "240"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "bench_2gpu_dry.json").read_text())
    assert result["errors"] == [] and result["env_set"] == {"NCCL_SYM_CTAS": "16"}
    assert result["env"]["NCCL_SYM_CTAS"] == "16"
    assert result["method"] == bench.__doc__ and result["config"]["sizes"] == [2 * KiB, MiB]
    s = result["sections"]
    assert set(s) == set(config.SECTIONS)
    rows = s["collectives"]["rows"]
    assert len(rows) == 2 * 3 * 2 * 2 and all(
        r["latency_us"] and len(r["per_rank_us"]) == 2 for r in rows
    )
    assert all(5 <= r["iters"] <= 50 for r in rows if r["mode"] == "eager")
    assert all(1 <= r["calls_per_graph"] <= 10 for r in rows if r["mode"] == "graph")
    comm = s["communicator"]["rows"]
    assert [(r["op"], r["bytes"], r["path"]) for r in comm][:3] == [
        ("all_gather", 2 * KiB, "symm_rs"),
        ("all_gather", 2 * KiB, "ctypes"),
        ("all_gather", 2 * KiB, "torch"),
    ]
    assert len(comm) == 2 * 3 * 3 and all(r["wall_us"] and r["iters"] == 50 for r in comm)
    checks = s["communicator"]["checks"]
    assert len(checks) == 2 * 3 and all("not_slower_than_ctypes" in c for c in checks)
    policy = s["policy"]
    assert len(policy["rows"]) == 2 * 3 * 3 and all(r["latency_us"] for r in policy["rows"])
    assert {r["path"] for r in policy["rows"]} == {"plain", "symm", "policy"}
    assert len(policy["checks"]) == 2 * 3 and isinstance(policy["all_ok"], bool)
    # The table is the crossover this run's collectives section measured, and every call
    # went where that table says.
    assert policy["table_source"].startswith("measured")
    table = symm_rs.policy.PolicyTable.parse(policy["table"])
    for c in policy["checks"]:
        assert c["route"] == ("twin" if table.use_twin(c["op"], c["bytes"]) else "main"), c
    assert policy["twin_memory"]["at_creation_bytes"] == 0 and policy["mechanism"] == "twin"
    context = s["context"]["rank0"]
    assert context["iterations_per_batch"] == 250
    for name in (
        "symm_rs.use_symmetric_memory",
        "torch.cuda.use_mem_pool",
        "raw begin/end/release",
    ):
        assert context[name]["median_batch_us"] > 0
    cp_rows = s["cp"]["rows"]
    assert len(cp_rows) == 2 * 2 * 4 * 2 and all(len(r["per_rank_us"]) == 2 for r in cp_rows)
    assert {(r["tokens"], r["shape"]) for r in cp_rows} == {
        (t, shape) for t in (16, 64) for shape in ("8x128", "1x576")
    }
    assert {r["path"] for r in cp_rows} == {
        "symm_rs",
        "symm_rs_driver_copies",
        "symm_rs_python",
        "sglang",
    }
    assert s["cp"]["mismatches"] == [] and s["cp"]["most_mismatches_on_a_rank"] == 0
    registration = s["registration"]["rank0"]
    assert registration["first"]["windows_registered"] == 1
    assert registration["reserve"]["segments_created"] == 5
    assert registration["destroy_pool"]["segments_freed"] == 3
    assert s["coldstart"]["max_over_ranks"] == cold
    assert "| bytes | AG plain | AG symm | AR plain | AR symm | RS plain | RS symm |" in out
    assert "| 2 KiB |" in out and "| 1 MiB |" in out
    # Where the results went, last and with absolute paths.
    assert out.rstrip().splitlines()[-2:] == [
        f"results (JSON): {tmp_path / 'bench_2gpu_dry.json'}",
        "plot: not drawn (--no-plot)",
    ]


# -- progress ------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _FakeTqdm:
    """tqdm's interface as Progress uses it, recording the calls."""

    calls: ClassVar[list[tuple[Any, ...]]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.calls.append(("bar", kwargs["desc"], kwargs["total"]))

    def update(self, n: int) -> None:
        self.calls.append(("update", n))

    def close(self) -> None:
        self.calls.append(("close",))

    @classmethod
    def write(cls, line: str, file: Any = None) -> None:
        cls.calls.append(("write", line))


def test_progress_without_tqdm_prints_numbered_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed: import fails
    shown = progress.Progress(_Terminal())
    assert not shown.bars
    shown.start("collectives", 2)
    shown.step("all_gather 1 KiB plain eager: 12.0 us")
    shown.step("all_gather 1 KiB symm eager: 10.0 us")
    shown.start("context")
    shown.step("enter+exit: 1.9 us")
    shown.note("[context] done in 1.0 s")
    assert capsys.readouterr().out.splitlines() == [
        "[collectives 1/2] all_gather 1 KiB plain eager: 12.0 us",
        "[collectives 2/2] all_gather 1 KiB symm eager: 10.0 us",
        "[context 1] enter+exit: 1.9 us",
        "[context] done in 1.0 s",
    ]


def test_progress_with_tqdm_draws_a_bar_per_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=_FakeTqdm))
    _FakeTqdm.calls.clear()
    assert not progress.Progress(io.StringIO()).bars  # no terminal: plain lines
    shown = progress.Progress(_Terminal())
    assert shown.bars
    shown.start("cp", 16)
    shown.step("1024 x 8x128 symm_rs eager: 51.0 us")
    shown.close()
    assert _FakeTqdm.calls == [
        ("bar", "cp", 16),
        ("write", "[cp 1/16] 1024 x 8x128 symm_rs eager: 51.0 us"),
        ("update", 1),
        ("close",),
    ]
