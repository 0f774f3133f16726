"""CPU tests of ``python -m symm_rs bench``: its pure functions, its output, its command line, and
the machinery that keeps ranks in step (the failure agreement over gloo, the fail-fast launcher,
the cold-start runner), driven by stand-in rank bodies. No GPU and no NCCL needed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import pytest

import symm_rs

SOURCE = Path(__file__).resolve().parents[1] / "python" / "symm_rs"


def _import_from_source() -> tuple[ModuleType, ModuleType]:
    """The source tree's bench.py and cli.py, on top of the installed native core: the installed
    copies may be older, or missing. Pure Python, so they run as they are."""
    installed = Path(symm_rs.__file__).resolve().parent
    if installed == SOURCE.resolve() or not (SOURCE / "bench.py").is_file():
        return importlib.import_module("symm_rs.bench"), importlib.import_module("symm_rs.cli")
    for name in ("symm_rs.bench", "symm_rs.cli"):
        module = sys.modules.get(name)
        if module is not None and Path(module.__file__ or "").resolve().parent != SOURCE:
            del sys.modules[name]
    symm_rs.__path__.insert(0, str(SOURCE))
    try:
        return importlib.import_module("symm_rs.bench"), importlib.import_module("symm_rs.cli")
    finally:
        symm_rs.__path__.remove(str(SOURCE))


bench, cli = _import_from_source()

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# -- sizes, sections, options ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("1K", KiB),
        ("1k", KiB),
        ("1 KiB", KiB),
        ("512KiB", 512 * KiB),
        ("8kb", 8 * KiB),
        ("4M", 4 * MiB),
        ("256MiB", 256 * MiB),
        ("1G", GiB),
        ("2b", 2),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert bench.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "K", "1.5M", "-4", "4T", "four", "1 K B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        bench.parse_size(text)


def test_default_sizes_are_factor_8_and_hold_design_rows() -> None:
    sizes = bench.size_list()
    assert sizes == [KiB, 8 * KiB, 64 * KiB, 512 * KiB, 4 * MiB, 32 * MiB, 256 * MiB]
    assert set(bench.DESIGN_ROWS) <= set(sizes)
    assert bench.size_list(KiB, 8 * KiB, 2) == [KiB, 2 * KiB, 4 * KiB, 8 * KiB]
    assert bench.size_list(KiB, 5 * KiB, 2) == [KiB, 2 * KiB, 4 * KiB, 5 * KiB]
    assert bench.size_list(4 * MiB, 4 * MiB) == [4 * MiB]


@pytest.mark.parametrize(
    ("lo", "hi", "factor", "message"),
    [
        (1, 1024, 8, "multiples of 4"),
        (1024, 1022, 8, "multiples of 4"),
        (2, 1024, 8, "multiples of 4"),
        (2048, 1024, 8, "below"),
        (1024, 4096, 1, "factor"),
    ],
)
def test_size_list_rejects(lo: int, hi: int, factor: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench.size_list(lo, hi, factor)


def test_parse_size_list() -> None:
    assert bench.parse_size_list("4M,1K, 512K,1K") == [KiB, 512 * KiB, 4 * MiB]
    with pytest.raises(ValueError):
        bench.parse_size_list(" , ")
    for bad in ("3", "6"):
        with pytest.raises(ValueError, match="multiples of 4"):
            bench.parse_size_list(bad)


def test_communicator_and_registration_sizes() -> None:
    assert bench.communicator_sizes(bench.size_list()) == [
        KiB,
        8 * KiB,
        64 * KiB,
        512 * KiB,
        MiB,
    ]
    assert bench.communicator_sizes([4 * MiB, 32 * MiB]) == []
    assert bench.communicator_sizes([KiB, MiB]) == [KiB, MiB]
    sizes = bench.registration_sizes(16)
    assert len(sizes) == 16
    # >= 10 MiB and a multiple of 2 MiB: the caching allocator gives each one its own segment.
    assert all(s >= 10 * MiB and s % (2 * MiB) == 0 for s in sizes)
    assert max(sizes) == 64 * MiB


def test_parse_sections() -> None:
    assert bench.parse_sections(None) == list(bench.SECTIONS)
    assert bench.parse_sections(["all"]) == list(bench.SECTIONS)
    assert bench.parse_sections(["registration", "collectives,context"]) == [
        "collectives",
        "context",
        "registration",
    ]
    with pytest.raises(ValueError, match="unknown section 'collective'"):
        bench.parse_sections(["collective"])
    with pytest.raises(ValueError, match="selects nothing"):
        bench.parse_sections([","])


def test_parse_env() -> None:
    assert bench.parse_env(None) == {}
    assert bench.parse_env(["NCCL_SYM_CTAS=16", "NCCL_DEBUG=INFO", "X="]) == {
        "NCCL_SYM_CTAS": "16",
        "NCCL_DEBUG": "INFO",
        "X": "",
    }
    assert bench.parse_env(["A=b=c"]) == {"A": "b=c"}
    for bad in ("NCCL_SYM_CTAS", "=3", "1A=2", "A B=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            bench.parse_env([bad])


def test_output_stem_and_format_bytes() -> None:
    assert bench.output_stem(4) == "bench_4gpu"
    assert bench.output_stem(2, "ctas16") == "bench_2gpu_ctas16"
    assert bench.output_stem(2, "_ctas16") == "bench_2gpu_ctas16"
    assert bench.output_stem(2, "-x.1") == "bench_2gpu-x.1"
    with pytest.raises(ValueError):
        bench.output_stem(2, "a/b")
    assert bench.format_bytes(KiB) == "1 KiB"
    assert bench.format_bytes(512 * KiB) == "512 KiB"
    assert bench.format_bytes(256 * MiB) == "256 MiB"
    assert bench.format_bytes(GiB) == "1 GiB"
    assert bench.format_bytes(1536) == "1536 B"
    assert bench.format_bytes(2) == "2 B"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_defaults_quick_and_overrides() -> None:
    cfg = bench.config_from_args(_args())
    assert cfg.sizes == bench.size_list()
    assert cfg.sections == list(bench.SECTIONS)
    assert (cfg.warmup, cfg.reps, cfg.target_s, cfg.min_iters, cfg.max_iters) == (
        5,
        5,
        0.05,
        5,
        200,
    )
    assert cfg.iters is None
    quick = bench.config_from_args(_args("--quick"))
    assert quick.quick and quick.reps < cfg.reps and quick.target_s < cfg.target_s
    assert quick.max_iters < cfg.max_iters and quick.context_iters < cfg.context_iters
    custom = bench.config_from_args(
        _args("--quick", "--reps", "7", "--iters", "11", "--sizes", "1K,4M", "--target-ms", "20")
    )
    assert (custom.reps, custom.iters, custom.sizes, custom.target_s) == (
        7,
        11,
        [KiB, 4 * MiB],
        0.02,
    )
    ranged = bench.config_from_args(
        _args("--min-bytes", "4K", "--max-bytes", "1M", "--factor", "4")
    )
    assert ranged.sizes == [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB]
    with pytest.raises(ValueError):
        bench.config_from_args(_args("--reps", "0"))
    with pytest.raises(ValueError):
        bench.config_from_args(_args("--sections", "nope"))
    # Every field travels to the rank processes and into the JSON.
    json.dumps(bench.asdict(cfg))


# -- formulas -------------------------------------------------------------------------------


def test_bus_bandwidth_matches_nccl_tests() -> None:
    # all_gather, 1 MiB per rank, 4 ranks, 100 us: size = 4 MiB, busbw = algbw * 3/4.
    algbw, busbw = bench.bandwidth_gbs("all_gather", MiB, 4, 100e-6)
    assert algbw == pytest.approx(41.94304)
    assert busbw == pytest.approx(31.45728)
    # reduce_scatter: the same convention (input of world * bytes).
    assert bench.bandwidth_gbs("reduce_scatter", MiB, 4, 100e-6) == pytest.approx(
        (41.94304, 31.45728)
    )
    # all_reduce: size = bytes, busbw = algbw * 2 * 3/4.
    algbw, busbw = bench.bandwidth_gbs("all_reduce", MiB, 4, 100e-6)
    assert algbw == pytest.approx(10.48576)
    assert busbw == pytest.approx(15.72864)
    # 2 ranks: factors 1/2 and 1.
    assert bench.bandwidth_gbs("all_gather", 1000, 2, 1e-6) == pytest.approx((2.0, 1.0))
    assert bench.bandwidth_gbs("all_reduce", 1000, 2, 1e-6) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError):
        bench.bandwidth_gbs("broadcast", MiB, 4, 1e-3)
    with pytest.raises(ValueError):
        bench.bandwidth_gbs("all_reduce", MiB, 4, 0.0)


def test_iteration_budget() -> None:
    # 50 ms over 5 repetitions at 1.5 ms per call (256 MiB all-reduce): 6 calls.
    assert bench.iterations_for(1.5e-3, 0.05, 5) == 6
    # Slower than the budget: the minimum; tiny calls: the maximum.
    assert bench.iterations_for(0.1, 0.05, 5) == 5
    assert bench.iterations_for(15e-6, 0.05, 5) == 200
    assert bench.iterations_for(None, 0.05, 5) == 200
    assert bench.iterations_for(0.0, 0.05, 5) == 200
    assert bench.iterations_for(float("nan"), 0.05, 5, 3, 50) == 50
    assert bench.iterations_for(1e-4, 0.05, 5, 5, 200) == 100


def test_graph_plan() -> None:
    # Small calls: 10 per graph, replays capped so a repetition holds at most 200 calls.
    assert bench.graph_plan(15e-6, 0.05, 5) == (10, 20)
    # 1.5 ms calls: at most ~5 ms of work per graph, about 10 ms per repetition.
    assert bench.graph_plan(1.5e-3, 0.05, 5) == (3, 3)
    # Calls longer than the graph budget: one per graph.
    assert bench.graph_plan(20e-3, 0.05, 5) == (1, 1)
    assert bench.graph_plan(None, 0.05, 5) == (10, 20)
    assert bench.graph_plan(1e-5, 0.015, 3, 10, 50) == (10, 5)
    assert bench.fixed_graph_plan(11) == (10, 2)
    assert bench.fixed_graph_plan(4) == (4, 1)
    for est in (1e-6, 3e-5, 4e-4, 2.4e-3, 0.5):
        calls, replays = bench.graph_plan(est, 0.05, 5)
        assert 1 <= calls <= 10 and 1 <= replays and calls * replays <= 200


# -- merging and rendering ------------------------------------------------------------------


def _collective_rows(scale: float, broken: bool) -> list[dict[str, Any]]:
    rows = []
    for nbytes in (KiB, 4 * MiB):
        for op in bench.OPS:
            for mode in bench.MODES:
                for kind in bench.BUFFERS:
                    row: dict[str, Any] = {"op": op, "bytes": nbytes, "mode": mode, "buffers": kind}
                    if broken and (op, nbytes, mode, kind) == (
                        "reduce_scatter",
                        4 * MiB,
                        "graph",
                        "symm",
                    ):
                        row["error"] = "RuntimeError: capture failed"
                    else:
                        median = (20.0 if kind == "plain" else 10.0) * (1 if nbytes == KiB else 5)
                        median *= scale
                        row.update(median_us=median, samples_us=[median] * 3)
                        row.update({"iters": 100} if mode == "eager" else {"calls_per_graph": 10})
                    rows.append(row)
    return rows


def _communicator_rows(scale: float) -> list[dict[str, Any]]:
    rows = []
    for nbytes in (KiB, MiB):
        for op in bench.COMMUNICATOR_OPS:
            for path in bench.COMMUNICATOR_PATHS:
                base = 15.0 if path == "symm_rs" else 30.0
                rows.append(
                    {
                        "op": op,
                        "bytes": nbytes,
                        "path": path,
                        "event_us": base * scale,
                        "issue_us": 5.0 * scale,
                        "wall_us": base * 1.2 * scale,
                        "iters": 200,
                    }
                )
    return rows


def _synthetic_result() -> dict[str, Any]:
    sections = {
        "collectives": {
            0: {"rows": _collective_rows(1.0, True), "elapsed_s": 3.0},
            1: {"rows": _collective_rows(1.1, True), "elapsed_s": 3.0},
        },
        "communicator": {
            0: {"rows": _communicator_rows(1.0), "close_error": None},
            1: {"rows": _communicator_rows(0.9), "close_error": None},
        },
        "context": {
            0: {"symm_rs.use_symmetric_memory": {"mean_us": 2.0, "median_batch_us": 1.9}},
            1: {"symm_rs.use_symmetric_memory": {"mean_us": 2.5, "median_batch_us": 2.4}},
        },
        "registration": {
            0: {
                "first": {"register_ms": 22.0, "windows_registered": 1},
                "reserve": {"skipped": "x"},
            },
            1: {
                "first": {"register_ms": 23.0, "windows_registered": 1},
                "reserve": {"skipped": "x"},
            },
        },
        "coldstart": {
            0: {"rank": 0, "import_torch_ms": 3000.0, "symm_rs_total_ms": 150.0},
            1: {"rank": 1, "import_torch_ms": 3100.0, "symm_rs_total_ms": 140.0},
        },
    }
    meta = {
        "machine": {"gpu": "NVIDIA H100 80GB HBM3", "gpu_count": 4, "gpus_used": 2},
        "versions": {"torch": "2.11.0", "cuda": "13.0", "nccl": "2.28.9", "symm_rs": "0.1.0"},
        "env": {"NCCL_SYM_CTAS": "16"},
        "other_env": {},
    }
    return bench.merge_results(
        world_size=2,
        config={"sizes": [KiB, 4 * MiB]},
        meta=meta,
        sections=sections,
        rank_errors={},
        env_set={"NCCL_SYM_CTAS": "16"},
        elapsed_s=12.3456,
        timestamp="2026-01-01T00:00:00+00:00",
    )


def test_merge_results_schema() -> None:
    result = _synthetic_result()
    assert tuple(result) == bench.RESULT_KEYS
    assert result["schema"] == bench.SCHEMA
    assert result["world_size"] == 2
    assert result["machine"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert result["versions"]["nccl"] == "2.28.9"
    assert result["env"] == {"NCCL_SYM_CTAS": "16"}
    assert result["env_set"] == {"NCCL_SYM_CTAS": "16"}
    assert "max over ranks" in result["aggregation"].replace("maximum", "max")
    assert {"bytes", "bandwidth", "eager", "graph", "speedup"} <= set(result["method"])
    assert set(result["sections"]) == set(bench.SECTIONS)
    assert result["elapsed_s"] == 12.346
    # The document is plain JSON.
    assert json.loads(json.dumps(result)) == result


def test_merge_collectives_takes_max_over_ranks() -> None:
    coll = _synthetic_result()["sections"]["collectives"]
    assert coll["dtype"] == "bfloat16"
    assert len(coll["rows"]) == 2 * 3 * 2 * 2
    row = next(
        x
        for x in coll["rows"]
        if (x["op"], x["bytes"], x["mode"], x["buffers"]) == ("all_gather", KiB, "graph", "plain")
    )
    assert row["latency_us"] == 22.0  # rank 1's median, the larger
    assert row["rank0_us"] == 20.0
    assert row["per_rank_us"] == [20.0, 22.0]
    assert row["calls_per_graph"] == 10
    algbw, busbw = bench.bandwidth_gbs("all_gather", KiB, 2, 22e-6)
    assert row["algbw_gbs"] == round(algbw, 3) and row["busbw_gbs"] == round(busbw, 3)
    broken = next(
        x
        for x in coll["rows"]
        if (x["op"], x["bytes"], x["mode"], x["buffers"])
        == ("reduce_scatter", 4 * MiB, "graph", "symm")
    )
    assert broken["latency_us"] is None and "capture failed" in broken["error"]
    table = {(e["op"], e["bytes"], e["mode"]): e for e in coll["table"]}
    assert len(table) == 2 * 3 * 2
    assert table[("all_reduce", 4 * MiB, "eager")]["speedup"] == 2.0
    assert table[("all_reduce", 4 * MiB, "eager")]["plain_us"] == 110.0
    assert table[("reduce_scatter", 4 * MiB, "graph")]["speedup"] is None


def test_merge_other_sections_and_errors() -> None:
    result = _synthetic_result()
    sections = result["sections"]
    comm = {(e["op"], e["bytes"]): e for e in sections["communicator"]["table"]}
    entry = comm[("all_gather", KiB)]
    assert entry["symm_rs_event_us"] == 15.0 and entry["torch_event_us"] == 30.0
    assert entry["wall_speedup"] == 2.0
    context = sections["context"]
    assert context["rank0"]["symm_rs.use_symmetric_memory"]["median_batch_us"] == 1.9
    assert context["max_over_ranks"]["symm_rs.use_symmetric_memory"]["median_batch_us"] == 2.4
    assert len(context["per_rank"]) == 2
    cold = sections["coldstart"]
    assert cold["max_over_ranks"]["import_torch_ms"] == 3100.0
    assert cold["max_over_ranks"]["symm_rs_total_ms"] == 150.0
    assert cold["reference"]["runtime_compiled_allocator_cold_build_s"] == 19.4
    assert sections["registration"]["max_over_ranks"]["first"]["register_ms"] == 23.0
    # The failed row is listed once, with the ranks it failed on.
    assert len(result["errors"]) == 1
    assert "reduce_scatter 4 MiB graph symm" in result["errors"][0]
    assert "capture failed" in result["errors"][0] and "ranks 0, 1" in result["errors"][0]


def test_merge_with_a_missing_rank_and_no_meta() -> None:
    result = bench.merge_results(
        world_size=2,
        config={},
        meta=None,
        sections={"collectives": {0: {"rows": _collective_rows(1.0, False)}}},
        rank_errors={1: "rank 1 exited with code -6 before reporting"},
        env_set={},
        elapsed_s=1.0,
    )
    assert tuple(result) == bench.RESULT_KEYS
    rows = result["sections"]["collectives"]["rows"]
    assert all(r["latency_us"] is None and r["error"] for r in rows)
    assert result["errors"][0].startswith("rank 1: rank 1 exited")
    assert result["versions"]["symm_rs"] == symm_rs.__version__
    json.dumps(result)


def test_render_markdown() -> None:
    text = bench.render_markdown(_synthetic_result())
    lines = text.splitlines()
    assert "CUDA-graph replay" in lines[0] and "NVIDIA H100" in lines[0]
    assert "NCCL_SYM_CTAS=16" in lines[0]
    assert lines[2] == "| bytes | AG plain | AG symm | AR plain | AR symm | RS plain | RS symm |"
    assert lines[3] == "| --- | --- | --- | --- | --- | --- | --- |"
    assert lines[4] == "| 1 KiB | 22.0 | 11.0 | 22.0 | 11.0 | 22.0 | 11.0 |"
    assert lines[5] == "| 4 MiB | 110 | 55.0 | 110 | 55.0 | 110 | n/a |"
    assert len(lines) == 6
    eager = bench.render_markdown(_synthetic_result(), mode="eager").splitlines()
    assert "eager" in eager[0] and eager[5] == "| 4 MiB | 110 | 55.0 | 110 | 55.0 | 110 | 55.0 |"
    empty = bench.render_markdown({"sections": {}})
    assert "no collectives measured" in empty


def test_plot(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    why = bench.plot_results(_synthetic_result(), str(path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert why is not None and "matplotlib" in why
        assert not path.exists()
        return
    assert why is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.plot_results({"sections": {}}, str(tmp_path / "none.png")) is not None


# -- command line ---------------------------------------------------------------------------


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m symm_rs ARGV`` with the source tree's cli.py and bench.py."""
    shim = (
        "import runpy, sys, symm_rs; "
        f"symm_rs.__path__.insert(0, {str(SOURCE)!r}); "
        "sys.argv[0] = 'symm_rs'; "
        "runpy.run_module('symm_rs', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", shim, *argv]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def test_cli_bench_help() -> None:
    done = _cli("bench", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--world-size", "--out", "--tag", "--min-bytes", "--max-bytes", "--iters"):
        assert option in done.stdout
    for option in ("--warmup", "--quick", "--sections", "--no-plot", "--env"):
        assert option in done.stdout
    top = _cli("--help")
    assert top.returncode == 0 and "doctor" in top.stdout and "bench" in top.stdout


def test_cli_bench_without_gpus_exits_2(tmp_path: Path) -> None:
    done = _cli("bench", "--out", str(tmp_path / "out"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert "bench needs at least 2 GPUs; this machine has 0" in done.stderr
    assert not (tmp_path / "out").exists()


def test_main_checks_gpu_count_and_options(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 1)
    assert cli.main(["bench"]) == 2
    assert "bench needs at least 2 GPUs; this machine has 1" in capsys.readouterr().err
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 2)
    assert cli.main(["bench", "--world-size", "4"]) == 2
    assert "needs 4 GPUs; this machine has 2" in capsys.readouterr().err
    assert cli.main(["bench", "--world-size", "1"]) == 2
    assert ">= 2" in capsys.readouterr().err
    assert cli.main(["bench", "--sizes", "6"]) == 2
    assert "multiples of 4" in capsys.readouterr().err
    assert cli.main(["bench", "--env", "NOVALUE"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["bench", "--tag", "a/b"]) == 2
    assert "--tag" in capsys.readouterr().err


# -- keeping ranks in step (gloo stand-ins for the GPU rank bodies) -------------------------


def _target(rank: int, world: int, port: int, cfg: Any, results: Any, body: Any) -> None:
    bench._child_main(rank, world, port, cfg, results, body)


def _raise(message: str) -> None:
    raise RuntimeError(message)


def _fail_on_rank_1(rank: int) -> int:
    if rank == 1:
        raise ValueError("only rank 1 broke")
    return rank


def _body_agreement(rank: int, world: int, cfg: Any, emit: Callable[[str, Any], None]) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    r = bench._Rank(rank, world, cfg, dist.group.WORLD, dist.group.WORLD, emit)
    value, error = r.unit("fine", lambda: rank * 10)
    emit("section", ("fine", {"value": value, "error": error}))
    value, error = r.unit("uniform", _raise, "every rank fails here")
    emit("section", ("uniform", {"value": value, "error": error}))
    emit("section", ("agree", {"max": r.agree_max(float(rank + 1))}))
    r.unit("non-uniform", _fail_on_rank_1, rank)
    emit("section", ("unreachable", {}))


def _body_fail_fast(rank: int, world: int, cfg: Any, emit: Callable[[str, Any], None]) -> None:
    emit("section", ("started", {"rank": rank}))
    if rank == 0:
        raise RuntimeError("rank 0 broke")
    time.sleep(120)  # as a rank stuck in a collective would


def test_unit_agreement_records_uniform_and_aborts_on_partial_failure() -> None:
    cfg = bench.BenchConfig(sizes=[KiB], sections=["collectives"])
    started = time.monotonic()
    out = bench._launch(cfg, 2, timeout_s=120, grace_s=20, target=_target, body=_body_agreement)
    assert time.monotonic() - started < 100
    assert out.sections["fine"] == {0: {"value": 0, "error": None}, 1: {"value": 10, "error": None}}
    for rank in (0, 1):
        uniform = out.sections["uniform"][rank]
        assert uniform["value"] is None
        assert uniform["error"] == "RuntimeError: every rank fails here"
        assert out.sections["agree"][rank] == {"max": 2.0}
    assert "unreachable" not in out.sections
    assert set(out.errors) == {0, 1}
    for text in out.errors.values():
        assert text.startswith("BenchAbort: non-uniform failed on 1 of 2 ranks")
    assert "this rank succeeded" in out.errors[0]
    assert "only rank 1 broke" in out.errors[1]


def test_launch_fails_fast_when_one_rank_breaks() -> None:
    cfg = bench.BenchConfig(sizes=[KiB], sections=["collectives"])
    started = time.monotonic()
    out = bench._launch(cfg, 2, timeout_s=110, grace_s=2, target=_target, body=_body_fail_fast)
    assert time.monotonic() - started < 60
    assert "rank 0 broke" in out.errors[0]
    assert "killed after another rank failed" in out.errors[1]
    assert out.sections["started"] == {0: {"rank": 0}, 1: {"rank": 1}}


_COLD_OK = """
import json, os
rank = int(os.environ["RANK"])
print("noise")
print("SYMM_RS_BENCH_COLD " + json.dumps({"rank": rank, "import_torch_ms": 1.0 + rank}), flush=True)
"""

_COLD_BROKEN = """
import os, sys, time
if os.environ["RANK"] == "1":
    print("rank 1 cannot start", flush=True)
    sys.exit(3)
time.sleep(120)
"""


_COLD_SLOW_EXIT = (
    _COLD_OK
    + """
import time
time.sleep(120)  # as a teardown that hangs
"""
)


def test_coldstart_runner_parses_and_fails_fast() -> None:
    out = bench._run_coldstart(2, 60, script=_COLD_OK)
    assert out == {0: {"rank": 0, "import_torch_ms": 1.0}, 1: {"rank": 1, "import_torch_ms": 2.0}}
    started = time.monotonic()
    out = bench._run_coldstart(2, 100, grace_s=1, script=_COLD_SLOW_EXIT)
    assert time.monotonic() - started < 30
    assert out == {0: {"rank": 0, "import_torch_ms": 1.0}, 1: {"rank": 1, "import_torch_ms": 2.0}}
    started = time.monotonic()
    out = bench._run_coldstart(2, 100, grace_s=1, script=_COLD_BROKEN)
    assert time.monotonic() - started < 30
    assert "exit code 3" in out[1]["error"] and "rank 1 cannot start" in out[1]["error"]
    assert "no result" in out[0]["error"]


# -- a whole run on CPU: the GPU rank code driven through gloo with stand-ins for CUDA --------


class _FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self, stream: Any = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: _FakeEvent) -> float:
        return max(1e-6, (other.t - self.t) * 1e3)


class _FakeStream:
    cuda_stream = 0

    def wait_stream(self, other: Any) -> None:
        pass


class _FakeGraph:
    replays = 0

    def replay(self) -> None:
        _FakeGraph.replays += 1

    def reset(self) -> None:
        pass


class _FakePool:
    id = (0, 1)


_FAKE_STATS: dict[str, Any] = {}


class _FakeSymmetric:
    """``use_symmetric_memory`` for CPU tensors: counts a segment per allocation it is told of."""

    def __init__(self, group: Any, disabled: bool = False) -> None:
        self.group = group

    def __enter__(self) -> _FakeSymmetric:
        return self

    def __exit__(self, *exc: Any) -> None:
        _FAKE_STATS["windows_registered"] += 1


class _FakeCommunicator:
    def __init__(self, group: Any) -> None:
        self.group = group
        self.closed = False

    def all_gather_into_tensor(self, out: Any, inp: Any, stream: Any = None) -> None:
        import torch.distributed as dist

        dist.all_gather_into_tensor(out, inp, group=self.group)

    def all_reduce(self, tensor: Any, op: str = "sum", out: Any = None, stream: Any = None) -> Any:
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def reduce_scatter_tensor(
        self, out: Any, inp: Any, op: str = "sum", stream: Any = None
    ) -> None:
        import torch.distributed as dist

        dist.reduce_scatter_tensor(out, inp, group=self.group)

    def close(self) -> None:
        self.closed = True


def _fake_stats() -> dict[str, Any]:
    return dict(_FAKE_STATS, communicators={})


def _dry_body(rank: int, world: int, cfg: Any, emit: Callable[[str, Any], None]) -> None:
    """``bench._bench_rank`` with CUDA, NCCL and the symmetric pool replaced by CPU stand-ins."""
    import contextlib
    import types

    import torch
    import torch.distributed as dist

    import symm_rs.launch

    def init_gloo(rank: int, world: int, timeout_s: float = 60.0) -> Any:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
        return dist.group.WORLD

    class CpuRank(bench._Rank):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            self.device = torch.device("cpu")

    def destroy_pool() -> int:
        _FAKE_STATS["windows_deregistered"] += _FAKE_STATS["windows_registered"]
        return 3

    _FAKE_STATS.update(
        segments=0, bytes=0, windows_registered=0, windows_deregistered=0, segments_freed=0
    )
    cuda = torch.cuda
    fakes = {
        "synchronize": lambda device=None: None,
        "Event": _FakeEvent,
        "Stream": _FakeStream,
        "stream": lambda s: contextlib.nullcontext(),
        "current_stream": lambda device=None: _FakeStream(),
        "CUDAGraph": _FakeGraph,
        "graph": lambda g, **kw: contextlib.nullcontext(),
        "MemPool": _FakePool,
        "use_mem_pool": lambda pool, device=None: contextlib.nullcontext(),
        "current_device": lambda: 0,
        "device_count": lambda: world,
        "get_device_name": lambda device=None: "Fake GPU",
        "get_device_properties": lambda d: types.SimpleNamespace(
            major=9, minor=0, total_memory=80 * GiB
        ),
    }
    for name, value in fakes.items():
        setattr(cuda, name, value)
    for name in (
        "_cuda_beginAllocateCurrentThreadToPool",
        "_cuda_endAllocateToPool",
        "_cuda_releasePool",
    ):
        setattr(torch._C, name, lambda device, pool: None)
    symm_rs.launch.init_nccl = init_gloo
    symm_rs.use_symmetric_memory = _FakeSymmetric
    symm_rs.is_symmetric = lambda tensor, group: True
    symm_rs.stats = _fake_stats
    symm_rs.register = lambda group: 0
    symm_rs.release = lambda group: 0
    symm_rs.resolve_comm = lambda group: 1234
    symm_rs.destroy_pool = destroy_pool
    symm_rs.reserve = lambda nbytes, group: 1
    bench._Rank = CpuRank
    bench._make_communicator = lambda r: _FakeCommunicator(r.group)
    bench._bench_rank(rank, world, cfg, emit)


_COLD_FAKE = """
import json, os
rank = int(os.environ["RANK"])
out = {"rank": rank, "import_torch_ms": 3000.0, "import_symm_rs_ms": 40.0,
       "first_alloc_ms": 60.0, "first_registration_ms": 25.0, "symm_rs_total_ms": 125.0}
print("SYMM_RS_BENCH_COLD " + json.dumps(out))
"""


def test_dry_run_whole_bench_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    launch, coldstart = bench._launch, bench._run_coldstart
    # bench sets --env variables in its own process (for the ranks): undone after the test.
    monkeypatch.setenv("NCCL_SYM_CTAS", "unset")
    monkeypatch.setattr(bench, "visible_gpu_count", lambda: 2)
    monkeypatch.setattr(
        bench,
        "_launch",
        lambda cfg, world, timeout: launch(cfg, world, timeout, 15.0, _target, _dry_body),
    )
    monkeypatch.setattr(
        bench, "_run_coldstart", lambda world, timeout: coldstart(world, timeout, script=_COLD_FAKE)
    )
    argv = ["bench", "--out", str(tmp_path), "--tag", "dry", "--sizes", "2K,1M"]
    argv += ["--iters", "3", "--reps", "2", "--warmup", "1", "--quick", "--no-plot"]
    argv += ["--env", "NCCL_SYM_CTAS=16", "--timeout", "240"]
    code = cli.main(argv)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "bench_2gpu_dry.json").read_text())
    assert tuple(result) == bench.RESULT_KEYS
    assert result["errors"] == []
    assert result["env_set"] == {"NCCL_SYM_CTAS": "16"}
    assert result["env"]["NCCL_SYM_CTAS"] == "16"  # the ranks saw it
    assert result["machine"]["gpu"] == "Fake GPU"
    sections = result["sections"]
    assert set(sections) == set(bench.SECTIONS)
    rows = sections["collectives"]["rows"]
    assert len(rows) == 2 * 3 * 2 * 2
    assert all(r["latency_us"] is not None and r["busbw_gbs"] is not None for r in rows)
    assert all(r["iters"] == 3 for r in rows if r["mode"] == "eager")
    assert all((r["calls_per_graph"], r["replays"]) == (3, 1) for r in rows if r["mode"] == "graph")
    assert len(sections["collectives"]["table"]) == 2 * 3 * 2
    comm = sections["communicator"]
    assert comm["close_error"] is None
    assert [(e["op"], e["bytes"]) for e in comm["table"]] == [
        ("all_gather", 2 * KiB),
        ("all_reduce", 2 * KiB),
        ("all_gather", MiB),
        ("all_reduce", MiB),
    ]
    assert all(r["event_us"] and r["wall_us"] and r["issue_us"] for r in comm["rows"])
    context = sections["context"]["rank0"]
    for name in (
        "symm_rs.use_symmetric_memory",
        "torch.cuda.use_mem_pool",
        "raw begin/end/release",
    ):
        assert context[name]["median_batch_us"] > 0
    registration = sections["registration"]["rank0"]
    assert registration["first"]["windows_registered"] == 1
    assert registration["batch"]["segments_requested"] == 8
    assert "note" in registration["batch"]  # the stand-in pool does not grow
    assert registration["reserve"]["returned"] == 1
    assert registration["destroy_pool"]["segments_freed"] == 3
    cold = sections["coldstart"]["max_over_ranks"]
    assert cold["symm_rs_total_ms"] == 125.0
    assert (
        "| bytes | AG plain | AG symm | AR plain | AR symm | RS plain | RS symm |" in captured.out
    )
    assert "| 2 KiB |" in captured.out and "| 1 MiB |" in captured.out
    assert "[collectives] all_gather 1 MiB symm graph" in captured.out
    assert sections["collectives"]["backend"] == "torch"

    # The same collectives through a (stand-in) symm_rs.Communicator.
    argv += ["--backend", "symm_rs", "--sections", "collectives", "--tag", "dry_comm"]
    code = cli.main(argv)
    captured = capfd.readouterr()
    assert code == 0, captured.err
    result = json.loads((tmp_path / "bench_2gpu_dry_comm.json").read_text())
    assert result["errors"] == []
    assert set(result["sections"]) == {"collectives"}
    collectives = result["sections"]["collectives"]
    assert collectives["backend"] == "symm_rs" and collectives["close_error"] is None
    assert all(r["latency_us"] is not None for r in collectives["rows"])
    assert len(collectives["rows"]) == 2 * 3 * 2 * 2


def _body_hang_in_collectives(
    rank: int, world: int, cfg: Any, emit: Callable[[str, Any], None]
) -> None:
    """The dry run, except that rank 1's GPU never finishes the 1 MiB graph replays."""
    original = _FakeEvent.query

    def query(self: _FakeEvent) -> bool:
        stack = "".join(traceback.format_stack(limit=6))
        return not (rank == 1 and "_measure_graph" in stack and _FakeGraph.replays > 20)

    _FakeEvent.query = query  # type: ignore[method-assign]
    try:
        _dry_body(rank, world, cfg, emit)
    finally:
        _FakeEvent.query = original  # type: ignore[method-assign]


def test_a_hang_fails_fast_and_keeps_finished_rows() -> None:
    cfg = bench.BenchConfig(
        sizes=[2 * KiB, MiB], sections=["collectives"], iters=3, reps=2, warmup=1
    )
    cfg.gpu_timeout_s = 2.0
    started = time.monotonic()
    out = bench._launch(cfg, 2, 120, 3.0, _target, _body_hang_in_collectives)
    assert time.monotonic() - started < 60
    assert "BenchHang" in out.errors[1] and "graph replays" in out.errors[1]
    # Rank 0 waits in the next agreement: killed after the grace period, or it hangs too.
    assert 0 in out.errors
    rows = out.sections["collectives"][1]["rows"]
    assert out.sections["collectives"][1]["error"].startswith("incomplete")
    assert rows and all("median_us" in row for row in rows)
    result = bench.merge_results(
        world_size=2,
        config={},
        meta=None,
        sections=out.sections,
        rank_errors=out.errors,
        env_set={},
        elapsed_s=1.0,
    )
    assert any("incomplete" in e for e in result["errors"])
    measured = [r for r in result["sections"]["collectives"]["rows"] if r["latency_us"]]
    assert measured
