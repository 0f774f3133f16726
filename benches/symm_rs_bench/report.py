"""A result document (``bench_<N>gpu*.json``, the committed ones too) for a reader: the README's
Markdown table and the latency plot."""

from __future__ import annotations

from typing import Any, Optional

from symm_rs_bench.config import BUFFERS, MODES, OPS, format_bytes

ABBREV = {"all_gather": "AG", "all_reduce": "AR", "reduce_scatter": "RS"}
TITLE_VERSIONS = {"torch": "torch", "nccl": "NCCL", "symm_rs": "symm_rs"}


def _us(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _rows(result: dict[str, Any], section: str) -> list[dict[str, Any]]:
    return ((result.get("sections") or {}).get(section) or {}).get("rows") or []


def title(result: dict[str, Any]) -> str:
    """``4 x NVIDIA H100 80GB HBM3, torch 2.11.0, NCCL 2.28.9, symm_rs 0.1.0, NCCL_SYM_CTAS=16``"""
    versions = result.get("versions") or {}
    parts = [f"{result.get('world_size')} x {(result.get('machine') or {}).get('gpu') or 'GPU'}"]
    parts += [f"{name} {versions[k]}" for k, name in TITLE_VERSIONS.items() if versions.get(k)]
    parts += [f"{k}={v}" for k, v in sorted((result.get("env_set") or {}).items())]
    return ", ".join(parts)


def render_markdown(result: dict[str, Any], mode: str = "graph") -> str:
    """The README table: a row per size (bytes per rank), plain and symm latency (µs) of
    all-gather, all-reduce and reduce-scatter in ``mode`` (CUDA-graph replay by default)."""
    cells = {
        (x["op"], x["bytes"], x["buffers"]): x.get("latency_us")
        for x in _rows(result, "collectives")
        if x["mode"] == mode
    }
    how = "CUDA-graph replay" if mode == "graph" else "eager"
    lines = [
        f"Latency in µs, bf16, {how}, {title(result)} (bytes per rank; `plain` = "
        "caching-allocator buffers, `symm` = symmetric window; max over ranks of the median)",
        "",
        "| bytes | " + " | ".join(f"{ABBREV[op]} {k}" for op in OPS for k in BUFFERS) + " |",
        "| --- |" + " --- |" * (len(OPS) * len(BUFFERS)),
    ]
    for nbytes in sorted({nbytes for _, nbytes, _ in cells}):
        row = [_us(cells.get((op, nbytes, k))) for op in OPS for k in BUFFERS]
        lines.append(f"| {format_bytes(nbytes)} | " + " | ".join(row) + " |")
    if not cells:
        lines.append("| (no collectives measured) |" + " |" * (len(OPS) * len(BUFFERS)))
    return "\n".join(lines)


def plot_results(result: dict[str, Any], path: str) -> Optional[str]:
    """Writes the latency plot (a panel per op) to ``path``; returns why not, or ``None``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    rows = [x for x in _rows(result, "collectives") if x.get("latency_us") is not None]
    if not rows:
        return "no collective was measured: no plot"
    fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 4.8))
    for ax, op in zip(axes, OPS):
        for kind in BUFFERS:
            for mode in MODES:
                points = sorted(
                    (x["bytes"], x["latency_us"])
                    for x in rows
                    if (x["op"], x["buffers"], x["mode"]) == (op, kind, mode)
                )
                if points:
                    color = "tab:gray" if kind == "plain" else "tab:blue"
                    style = "-" if mode == "graph" else "--"
                    ax.plot(
                        *zip(*points), color=color, ls=style, marker="o", label=f"{kind} {mode}"
                    )
        ticks = sorted({x["bytes"] for x in rows if x["op"] == op})
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", title=op, xlabel="bytes per rank", ylabel="latency (µs)")
        ax.set_xticks(ticks, [format_bytes(t) for t in ticks], rotation=45, ha="right")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title(result))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
