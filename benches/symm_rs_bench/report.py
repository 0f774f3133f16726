"""A result document (``bench_<N>gpu*.json``, the committed ones too) for a reader: the README's
Markdown table and the latency plot."""

from __future__ import annotations

from typing import Any, Optional

from symm_rs_bench.config import BUFFERS, MODES, OPS, format_bytes

ABBREV = {"all_gather": "AG", "all_reduce": "AR", "reduce_scatter": "RS"}
# The baselines table: (op, section, buffers, column) for every series that section times.
BASELINE_COLUMNS = (
    ("all_reduce", "collectives", "plain", "AR plain"),
    ("all_reduce", "collectives", "symm", "AR symm"),
    ("all_reduce", "collectives", "torch_one_shot", "AR torch 1-shot"),
    ("all_reduce", "collectives", "torch_two_shot", "AR torch 2-shot"),
    ("all_reduce", "torch_nccl", "torch_nccl", "AR torch NCCL"),
    ("all_reduce", "torch_nccl", "torch_nccl_one_shot", "AR torch NCCL 1-shot"),
    ("all_reduce", "torch_nccl", "torch_nccl_two_shot", "AR torch NCCL 2-shot"),
    ("all_gather", "collectives", "plain", "AG plain"),
    ("all_gather", "collectives", "symm", "AG symm"),
    ("all_gather", "collectives", "torch_copy", "AG torch copies"),
    ("all_gather", "torch_nccl", "torch_nccl", "AG torch NCCL"),
)
# Plot colours per series (``buffers``); the torch_nccl section's own plain run is not drawn.
COLORS = {
    "plain": "tab:gray",
    "symm": "tab:blue",
    "torch_one_shot": "tab:orange",
    "torch_two_shot": "tab:green",
    "torch_copy": "tab:orange",
    "torch_nccl": "tab:red",
    "torch_nccl_one_shot": "tab:purple",
    "torch_nccl_two_shot": "tab:brown",
}
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


def _cell(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return "n/a"
    if row.get("latency_us") is None and "unavailable" in row:
        return "unavail."
    return _us(row.get("latency_us"))


def unavailable_series(result: dict[str, Any]) -> list[str]:
    """``"<section> <op>/<series>: <reason>"`` for every baseline series not measured."""
    sections = result.get("sections") or {}
    found = []
    for section, holder in (("collectives", "torch_symm"), ("torch_nccl", None)):
        data = sections.get(section) or {}
        series = ((data.get(holder) or {}) if holder else data).get("series") or {}
        found += [
            f"{section} {name}: {entry['unavailable']}"
            for name, entry in series.items()
            if isinstance(entry, dict) and "unavailable" in entry
        ]
        if holder is None and data.get("unavailable") and not series:
            found.append(f"{section}: {data['unavailable']}")
    return found


def render_baselines(result: dict[str, Any], mode: str = "graph") -> str:
    """The side-by-side table of what a user would pick instead: plain NCCL, symm_rs's
    windows, and PyTorch's symmetric memory (one-shot, two-shot, copies into peers' buffers,
    its NCCL backend), latency in µs in ``mode``; ``unavail.`` where a series was recorded
    unavailable, and why below. ``""`` when the result has no torch series."""
    cells: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for section in ("collectives", "torch_nccl"):
        for x in _rows(result, section):
            if x.get("mode") == mode:
                cells[(x["op"], section, x["buffers"], x["bytes"])] = x
    torch_series = {c[2] for c in BASELINE_COLUMNS if c[2].startswith("torch")}
    if not any(key[2] in torch_series for key in cells):
        return ""
    how = "CUDA-graph replay" if mode == "graph" else "eager"
    lines = [
        f"Baselines, latency in µs, bf16, {how}, {title(result)} (bytes per rank; torch = "
        "torch.distributed._symmetric_memory; max over ranks of the median)",
        "",
        "| bytes | " + " | ".join(c[3] for c in BASELINE_COLUMNS) + " |",
        "| --- |" + " --- |" * len(BASELINE_COLUMNS),
    ]
    sizes = sorted({key[3] for key in cells if key[2] in torch_series})
    # A section unavailable as a whole (its set-up failed before any row): every cell of it.
    whole = {
        name: {"unavailable": "section"}
        for name in ("collectives", "torch_nccl")
        if ((result.get("sections") or {}).get(name) or {}).get("unavailable")
    }
    for nbytes in sizes:
        row = [
            _cell(cells.get((op, sec, kind, nbytes), whole.get(sec)))
            for op, sec, kind, _ in BASELINE_COLUMNS
        ]
        lines.append(f"| {format_bytes(nbytes)} | " + " | ".join(row) + " |")
    missing = unavailable_series(result)
    if missing:
        lines += ["", "Unavailable:"] + [f"- {m}" for m in missing]
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
    rows += [
        x
        for x in _rows(result, "torch_nccl")
        if x.get("latency_us") is not None and x.get("buffers") != "plain"
    ]
    if not rows:
        return "no collective was measured: no plot"
    fig, axes = plt.subplots(1, len(OPS), figsize=(6 * len(OPS), 4.8))
    kinds = list(BUFFERS) + [k for k in COLORS if k not in BUFFERS]
    for ax, op in zip(axes, OPS):
        for kind in kinds:
            for mode in MODES:
                points = sorted(
                    (x["bytes"], x["latency_us"])
                    for x in rows
                    if (x["op"], x["buffers"], x["mode"]) == (op, kind, mode)
                )
                if points:
                    color = COLORS.get(kind, "black")
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
