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
from symm_rs_bench import (
    comm_calls,
    config,
    launch,
    merge,
    progress,
    report,
    sections,
    timing,
    torch_symm,
)
from symm_rs_bench import policy as bench_policy
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
    baselines = _config("--sections", "torch_nccl", "collectives", "--sizes", "1K,64M")
    assert baselines.sections == ["collectives", "torch_nccl"]  # in SECTIONS' order
    assert config.SECTIONS[-1] == "torch_nccl" and baselines.sizes[-1] == 64 * MiB
    assert torch_symm.TORCH_SYMM_MAX_BYTES == 64 * MiB
    assert cfg.torch_baselines and not _config("--no-torch").torch_baselines
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


def _baseline_result() -> dict[str, Any]:
    """Two ranks with the torch baselines: one-shot timed, two-shot unavailable, the NCCL
    backend's section unavailable as a whole (this torch has no set_backend)."""

    def rows(scale: float) -> list[dict[str, Any]]:
        out = _collective_rows(scale)
        for nbytes in (KiB, 4 * MiB):
            for mode in config.MODES:
                key = {"op": "all_reduce", "bytes": nbytes, "mode": mode}
                out.append({**key, "buffers": "torch_one_shot", "median_us": 8.0 * scale})
                out.append({**key, "buffers": "torch_two_shot", "unavailable": "AttributeError: x"})
                ag = {**key, "op": "all_gather", "buffers": "torch_copy"}
                out.append(
                    {**ag, "median_us": 30.0}
                    if mode == "eager"
                    else {**ag, "unavailable": "not captured: y"}
                )
        return out

    series = torch_symm.series_summary(rows(1.0), torch_symm.CUDA_SERIES)
    nccl = {"backend": None, "rows": [], "unavailable": "AttributeError: no set_backend"}
    nccl["series"] = torch_symm.series_summary([], torch_symm.NCCL_SERIES, nccl["unavailable"])
    per_rank = {
        "collectives": {
            r: {"rows": rows(1.0 + 0.1 * r), "torch_symm": {"series": series}} for r in (0, 1)
        },
        "torch_nccl": {r: nccl for r in (0, 1)},
    }
    meta = {"machine": {"gpu": "NVIDIA H200"}, "versions": {"torch": "2.11.0", "nccl": "2.28.9"}}
    return merge.merge_results(world_size=2, sections=per_rank, rank_errors={}, **meta)


def test_merge_and_render_the_torch_baselines(tmp_path: Path) -> None:
    result = _baseline_result()
    assert result["errors"] == []  # unavailable is not an error
    rows = {
        (x["op"], x["bytes"], x["mode"], x["buffers"]): x
        for x in result["sections"]["collectives"]["rows"]
    }
    one = rows[("all_reduce", KiB, "graph", "torch_one_shot")]
    assert one["latency_us"] == 8.8 and one["per_rank_us"] == [8.0, 8.8]
    two = rows[("all_reduce", KiB, "graph", "torch_two_shot")]
    assert two["unavailable"] == "AttributeError: x" and "latency_us" not in two
    series = result["sections"]["collectives"]["torch_symm"]["series"]
    assert series["all_reduce/torch_two_shot"]["unavailable"] == "AttributeError: x"
    assert "unavailable" not in series["all_gather/torch_copy"]  # timed eagerly
    assert result["sections"]["torch_nccl"]["unavailable"] == "AttributeError: no set_backend"
    # The README table is unchanged by the new series.
    assert (
        report.render_markdown(result).splitlines()[2:]
        == report.render_markdown(_synthetic()).splitlines()[2:]
    )
    lines = report.render_baselines(result).splitlines()
    assert "Baselines" in lines[0] and "CUDA-graph replay" in lines[0] and "H200" in lines[0]
    assert lines[2] == "| bytes | " + " | ".join(c[3] for c in report.BASELINE_COLUMNS) + " |"
    assert lines[4] == (
        "| 1 KiB | 22.0 | 11.0 | 8.8 | unavail. | unavail. | unavail. | unavail. "
        "| 22.0 | 11.0 | unavail. | unavail. |"
    )
    assert lines[5].startswith("| 4 MiB | 110 | 55.0 | 8.8 | unavail. |")
    assert "- collectives all_reduce/torch_two_shot: AttributeError: x" in lines
    assert "- torch_nccl all_reduce/torch_nccl_one_shot: AttributeError: no set_backend" in lines
    eager = report.render_baselines(result, mode="eager").splitlines()
    assert eager[4].endswith("| 22.0 | 11.0 | 30.0 | unavail. |")
    # No torch series (every committed result so far): no table.
    assert report.render_baselines(_synthetic()) == ""
    assert report.unavailable_series({"sections": {}}) == []
    why = report.plot_results(result, str(tmp_path / "plot.png"))
    assert why is None or "matplotlib" in why


def test_the_policy_table_ignores_the_torch_series() -> None:
    """plain beats symm for all-reduce at 4 MiB: the table sends it to the twin, with the torch
    series beside them or without (both the merged document's and a rank's own rows)."""
    rows = []
    for nbytes in (KiB, 4 * MiB):
        for kind, us in (("plain", 10.0 if nbytes > KiB else 30.0), ("symm", 20.0)):
            rows.append({"op": "all_reduce", "bytes": nbytes, "mode": "graph", "buffers": kind})
            rows[-1].update(latency_us=us, median_us=us)
    torch_rows = [
        {"op": "all_reduce", "bytes": n, "mode": "graph", "buffers": b, "latency_us": 5.0}
        for n in (KiB, 4 * MiB)
        for b in ("torch_one_shot", "torch_two_shot")
    ]
    torch_rows += [{**x, "median_us": 5.0} for x in torch_rows[:1]]
    table = symm_rs.policy.table_from_bench({"sections": {"collectives": {"rows": rows}}})
    assert table.use_twin("all_reduce", 4 * MiB) and not table.use_twin("all_reduce", KiB)
    both = {"sections": {"collectives": {"rows": rows + torch_rows}}}
    assert symm_rs.policy.table_from_bench(both) == table
    rank = types.SimpleNamespace(done={"collectives": {"rows": rows + torch_rows}})
    rank.all_reduce = lambda value: value
    assert bench_policy._measured_table(rank) == table


def test_series_summary_and_measure_above_the_cap() -> None:
    summary = torch_symm.series_summary([], {"all_reduce": ("torch_one_shot",)}, "boom")
    assert summary == {
        "all_reduce/torch_one_shot": {
            "op": "all_reduce",
            "api": torch_symm.API["torch_one_shot"],
            "unavailable": "boom",
        }
    }
    assert (
        torch_symm.series_summary([], {"all_gather": ("torch_copy",)})["all_gather/torch_copy"][
            "unavailable"
        ]
        == "not run"
    )
    # No rank collective is made for a size above the cap or without a set-up: rank is unused.
    above = torch_symm.measure(None, object(), "torch_one_shot", "all_reduce", 128 * MiB)  # type: ignore[arg-type]
    assert [r["unavailable"] for r in above] == ["not measured above 64 MiB per rank"] * 2
    missing = torch_symm.measure(None, None, "torch_copy", "all_gather", KiB, "ImportError: z")  # type: ignore[arg-type]
    assert [(r["mode"], r["unavailable"]) for r in missing] == [
        ("eager", "ImportError: z"),
        ("graph", "ImportError: z"),
    ]


def test_a_missing_op_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_symm, "symm_op", _fake_symm_op)
    with pytest.raises(AttributeError, match="two_shot_all_reduce_"):
        torch_symm.two_shot_call(torch.zeros(4), "0")
    # one_shot_all_reduce_out missing: the allocating op and a copy.
    calls: list[str] = []

    def only_allocating(name: str) -> Any:
        if name != "one_shot_all_reduce":
            raise AttributeError(name)
        return lambda inp, op, group_name: calls.append(group_name) or inp * 2

    monkeypatch.setattr(torch_symm, "symm_op", only_allocating)
    out = torch.zeros(3)
    torch_symm.one_shot_call(torch.ones(3), out, "g")()
    assert calls == ["g"] and out.tolist() == [2.0, 2.0, 2.0]


def test_multicast_stays_off() -> None:
    env = {"NCCL_NVLS_ENABLE": "0", "PATH": "/bin"}
    assert launch.multicast_off(env) == {
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    assert env == {"PATH": "/bin", **launch.MULTICAST_OFF}
    assert launch.multicast_off(env) == {}  # set values are kept
    kept = {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    assert launch.MULTICAST_OFF == kept
    script = (RESULTS.parent / "run_gpu_benches.sh").read_text()
    assert (
        "export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1"
        in script
    )
    decode = (RESULTS.parent / "decode_step.py").read_text()
    assert "multicast_off()" in decode


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


class _FakeHandle:
    """A ``_SymmetricMemory`` stand-in over gloo: ``get_buffer`` gives every peer's slot as one
    staging tensor (the copy all-gather writes the same input to each), and ``barrier`` gathers
    the staged slots into every rank's buffer; it refuses to be captured in a graph."""

    def __init__(self, tensor: Any) -> None:
        self.tensor, self.staged = tensor, {}

    def get_buffer(self, peer: int, sizes: tuple[int, ...], dtype: Any, offset: int = 0) -> Any:
        n = sizes[0]
        return self.staged.setdefault(n, torch.zeros(n, dtype=dtype))

    def barrier(self, channel: int = 0) -> None:
        if _FAKE_SYMM_MEM["capturing"]:
            raise RuntimeError("stand-in barrier: not capturable")
        for n, slot in self.staged.items():
            dist.all_gather_into_tensor(self.tensor[: n * dist.get_world_size()], slot)


# The stand-in torch symmetric memory's state, per rank process.
_FAKE_SYMM_MEM: dict[str, Any] = {"backend": "CUDA", "capturing": False}


def _fake_symm_mem_module() -> Any:
    def set_backend(name: str) -> None:
        _FAKE_SYMM_MEM["backend"] = name

    def get_backend(device: Any) -> str:
        # Names the backend and what the rank saw of the multicast switch, for the test to read.
        off = os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")
        return f"{_FAKE_SYMM_MEM['backend']}, TORCH_SYMM_MEM_DISABLE_MULTICAST={off}"

    return types.SimpleNamespace(
        empty=lambda n, dtype, device: torch.zeros(n, dtype=dtype),
        rendezvous=lambda t, group_name: _FakeHandle(t),
        set_backend=set_backend,
        get_backend=get_backend,
    )


def _fake_symm_op(name: str) -> Any:
    """The ops over gloo: one-shot exact on the default backend and wrong on NCCL's (so that
    the exactness check fires); two-shot missing, as in a torch without it."""

    def one_shot_out(inp: Any, op: str, group_name: str, out: Any) -> Any:
        out.copy_(inp)
        if _FAKE_SYMM_MEM["backend"] != "NCCL":
            dist.all_reduce(out)
        return out

    if name == "one_shot_all_reduce_out":
        return one_shot_out
    raise AttributeError(f"'_OpNamespace' 'symm_mem' object has no attribute '{name}'")


@contextlib.contextmanager
def _graph_stand_in(graph: Any, **kwargs: Any) -> Any:
    _FAKE_SYMM_MEM["capturing"] = True
    try:
        yield
    finally:
        _FAKE_SYMM_MEM["capturing"] = False


def _stand_ins(cfg: config.BenchConfig) -> None:
    """CUDA, NCCL, the symmetric pool and torch's symmetric memory replaced by stand-ins."""
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
    cuda.update(graph=_graph_stand_in, MemPool=_Anything)
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
    launch.init_nccl, torch_symm.Rank = _init_gloo, _CpuRank
    # The ctypes path needs a real libnccl; on gloo it is torch.distributed under another name.
    comm_calls.ctypes_collective = lambda op, small, big, comm: sections.collective(
        op, small, big, dist.group.WORLD
    )
    torch_symm.symm_mem_module, torch_symm.symm_op = _fake_symm_mem_module, _fake_symm_op


def _dry_rank(rank: int, world: int, cfg: config.BenchConfig) -> dict[str, Any]:
    """``sections.bench_rank`` on stand-ins."""
    _stand_ins(cfg)
    return sections.bench_rank(rank, world, cfg)


def _dry_torch_nccl_rank(rank: int, world: int, cfg: config.BenchConfig) -> dict[str, Any]:
    """``torch_symm.torch_nccl_rank`` (the torch_nccl section's processes) on stand-ins."""
    _stand_ins(cfg)
    return torch_symm.torch_nccl_rank(rank, world, cfg)


_DRY = {"bench_rank": _dry_rank, "torch_nccl_rank": _dry_torch_nccl_rank}


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
        bench, "run_ranks", lambda fn, world, **kw: run_ranks(_DRY[fn.__name__], world, **kw)
    )
    # Multicast stays off in the ranks: absent here, the bench sets it for them.
    for name in launch.MULTICAST_OFF:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
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
    assert {k: result["env"][k] for k in launch.MULTICAST_OFF} == launch.MULTICAST_OFF
    rows = [r for r in s["collectives"]["rows"] if r["buffers"] in config.BUFFERS]
    assert len(rows) == 2 * 3 * 2 * 2 and all(
        r["latency_us"] and len(r["per_rank_us"]) == 2 for r in rows
    )
    # PyTorch's symmetric memory beside them, at the same sizes: one-shot checked and timed,
    # two-shot missing in this torch, the copy all-gather eager only (not capturable here).
    torch_rows = {
        (r["op"], r["bytes"], r["mode"], r["buffers"]): r
        for r in s["collectives"]["rows"]
        if r["buffers"] not in config.BUFFERS
    }
    assert len(torch_rows) == 2 * 3 * 2
    for nbytes in (2 * KiB, MiB):
        for mode in config.MODES:
            one = torch_rows[("all_reduce", nbytes, mode, "torch_one_shot")]
            assert one["latency_us"] and len(one["per_rank_us"]) == 2, one
            two = torch_rows[("all_reduce", nbytes, mode, "torch_two_shot")]
            assert "two_shot_all_reduce_" in two["unavailable"] and "latency_us" not in two
        assert torch_rows[("all_gather", nbytes, "eager", "torch_copy")]["latency_us"]
        graph = torch_rows[("all_gather", nbytes, "graph", "torch_copy")]
        assert graph["unavailable"].startswith("not captured: RuntimeError: stand-in barrier")
    torch_info = s["collectives"]["torch_symm"]
    assert torch_info["backend"] == "CUDA, TORCH_SYMM_MEM_DISABLE_MULTICAST=1"
    assert "unavailable" in torch_info["series"]["all_reduce/torch_two_shot"]
    assert "unavailable" not in torch_info["series"]["all_reduce/torch_one_shot"]
    assert "unavailable" not in torch_info["series"]["all_gather/torch_copy"]
    # Its NCCL backend, in processes of its own: one-shot fails the exactness check there.
    nccl = s["torch_nccl"]
    assert nccl["backend"] == "NCCL, TORCH_SYMM_MEM_DISABLE_MULTICAST=1"
    nccl_rows = {(r["op"], r["bytes"], r["mode"], r["buffers"]): r for r in nccl["rows"]}
    assert len(nccl_rows) == 2 * (4 + 2) * 2
    for key, row in nccl_rows.items():
        if key[3] in ("plain", "torch_nccl"):
            assert row["latency_us"] and len(row["per_rank_us"]) == 2, row
        elif key[3] == "torch_nccl_one_shot":
            assert row["unavailable"].startswith("AssertionError: not exact"), row
        else:
            assert "two_shot_all_reduce_" in row["unavailable"], row
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
    assert "| bytes | AR plain | AR symm | AR torch 1-shot | AR torch 2-shot |" in out
    assert "- torch_nccl all_reduce/torch_nccl_one_shot: AssertionError: not exact" in out
    # Where the results went, last and with absolute paths.
    assert out.rstrip().splitlines()[-2:] == [
        f"results (JSON): {tmp_path / 'bench_2gpu_dry.json'}",
        "plot: not drawn (--no-plot)",
    ]


def test_dry_run_without_the_torch_baselines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    meta = {"machine": {"gpu": "Stand-in GPU"}, "versions": {"torch": torch.__version__}}
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(bench, "run_info", lambda world: meta)
    monkeypatch.setattr(
        bench, "run_ranks", lambda fn, world, **kw: run_ranks(_DRY[fn.__name__], world, **kw)
    )
    for name in launch.MULTICAST_OFF:  # set here already: kept as they are
        monkeypatch.setenv(name, "kept")
    argv = ["bench", "--out", str(tmp_path), "--sizes", "2K", "--quick", "--no-plot"]
    assert cli.main([*argv, "--sections", "collectives", "--no-torch"]) == 0
    assert {k: os.environ[k] for k in launch.MULTICAST_OFF} == dict.fromkeys(
        launch.MULTICAST_OFF, "kept"
    )
    result = json.loads((tmp_path / "bench_2gpu.json").read_text())
    rows = result["sections"]["collectives"]["rows"]
    torch_rows = [r for r in rows if r["buffers"] not in config.BUFFERS]
    assert len(rows) == 3 * 2 * 2 + 3 * 2 and len(torch_rows) == 3 * 2
    assert all(r["unavailable"] == "skipped (--no-torch)" for r in torch_rows)
    assert set(result["sections"]) == {"collectives"}
    assert "- collectives all_gather/torch_copy: skipped (--no-torch)" in capsys.readouterr().out


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


# -- decode step: the torch symmetric-memory paths ----------------------------------------------


def test_decode_step_torch_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    import decode_step

    from symm_rs.groups import kind_of, peers

    ops = {
        "one_shot_all_reduce": lambda inp, op, g: inp * 2,
        "one_shot_all_reduce_out": lambda inp, op, g, out: out.copy_(inp * 2),
        "two_shot_all_reduce_": lambda buf, op, g: buf.mul_(2),
    }

    def symm_op(name: str) -> Any:
        if name not in ops:
            raise AttributeError(name)
        return ops[name]

    monkeypatch.setattr(torch_symm, "symm_op", symm_op)
    gathered: list[Any] = []
    comm = types.SimpleNamespace(device=torch.device("cpu"), rank=0, size=2)
    comm.all_gather_into_tensor = lambda out, inp, stream=None: gathered.append(stream)
    buf = torch.zeros(16)
    for path in decode_step.TORCH_PATHS:
        proxy = decode_step.TorchSymmAllReduce(comm, buf, "0", path)
        y = torch.arange(6.0).view(2, 3)
        assert proxy.all_reduce(y) is y and y.flatten().tolist() == [0, 2, 4, 6, 8, 10]
        # symm_rs's CP gather sees a group that only gathers, through the real communicator.
        assert kind_of(proxy) is None and not hasattr(proxy, "comm")
        group = peers(proxy)
        assert (group.comm, group.rank, group.size) == (0, 0, 2)
        group.all_gather_into_tensor(torch.zeros(2), torch.zeros(1), "side")
    assert gathered == ["side", "side"]
    del ops["two_shot_all_reduce_"]
    with pytest.raises(AttributeError, match="two_shot_all_reduce_"):
        decode_step.TorchSymmAllReduce(comm, buf, "0", "torch_two_shot")

    def rank(scale: float, torch_paths: bool) -> dict[str, Any]:
        row = {"batch_size": 1, "plain_us": 100.0 * scale, "symm_us": 90.0 * scale}
        if torch_paths:
            row.update(torch_one_shot_us=80.0 * scale, torch_two_shot_us=85.0 * scale)
        return {"rows": [row]}

    merged = decode_step.merge_rows([rank(1.0, True), rank(1.1, True)])
    assert merged == [
        {
            "batch_size": 1,
            "plain_us": 110.0,
            "symm_us": 99.0,
            "symm_vs_plain": -0.1,
            "torch_one_shot_us": 88.0,
            "torch_two_shot_us": 93.5,
        }
    ]
    # A path one rank did not time is left out; the symm_rs vs plain columns are as before.
    merged = decode_step.merge_rows([rank(1.0, True), rank(1.0, False)])
    assert set(merged[0]) == {"batch_size", "plain_us", "symm_us", "symm_vs_plain"}


def test_run_gpu_benches_script_steps(tmp_path: Path) -> None:
    """The script with a stand-in python3 that reports 4 GPUs and logs each command line
    with the environment the ranks would see."""
    fake = tmp_path / "bin" / "python3"
    fake.parent.mkdir()
    log = tmp_path / "log"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = -c ]; then echo 4; exit 0; fi\n'
        f'echo "$CUDA_VISIBLE_DEVICES|$NCCL_NVLS_ENABLE$TORCH_SYMM_MEM_DISABLE_MULTICAST'
        f'$NVSHMEM_DISABLE_NVLS|$*" >> {log}\n'
    )
    fake.chmod(0o755)
    script = RESULTS.parent / "run_gpu_benches.sh"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "BENCH_TAG": "_h200"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for name in launch.MULTICAST_OFF:
        env.pop(name, None)
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "out"), "baselines", "decode"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all(line.split("|")[1] == "011" for line in lines)
    assert lines[0].startswith("0,1|011|-m symm_rs bench --world-size 2 ")
    assert lines[1].startswith("0,1,2,3|011|-m symm_rs bench --world-size 4 ")
    for line in lines[:2]:
        assert "--tag _h200_baselines --sizes 1K,8K,64K,512K,4M,32M,64M" in line
        assert line.endswith("--sections collectives torch_nccl")
    assert lines[2].split("|")[2].endswith(f"decode_step.py --world-sizes 2 4 --out {tmp_path}/out")
    bad = subprocess.run(["bash", str(script), str(tmp_path), "nope"], env=env, timeout=60)
    assert bad.returncode == 2
