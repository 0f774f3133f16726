"""The JSON document: every rank's numbers merged. A collective's latency is the maximum over
ranks of each rank's median (a collective finishes when its slowest rank does)."""

from __future__ import annotations

import math
from typing import Any

from symm_rs_bench.config import SECTIONS

SCHEMA = "symm_rs.bench/1"
ROW_KEYS = {
    "collectives": ("op", "bytes", "mode", "buffers"),
    "communicator": ("op", "bytes", "path"),
    "policy": ("op", "bytes", "path"),
    "cp": ("tokens", "shape", "mode", "path"),
    "torch_nccl": ("op", "bytes", "mode", "buffers"),
}
# A rank's timed field -> the merged row's fields: the maximum over ranks, every rank's value.
TIMED = {"median_us": ("latency_us", "per_rank_us")}
TIMED.update((f, (f, f"per_rank_{f}")) for f in ("event_us", "issue_us", "wall_us"))


def _round(value: Any, digits: int = 3) -> Any:
    """Floats rounded (non-finite ones become ``None``), in dicts and lists too."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def _tree_max(values: list[Any]) -> Any:
    """Element-wise maximum of equally shaped dicts of numbers (other leaves: the first)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return max(present)
    if present and isinstance(present[0], dict):
        return {
            k: _tree_max([v.get(k) for v in present if isinstance(v, dict)]) for k in present[0]
        }
    return present[0] if present else None


def merge_rows(per_rank: dict[int, Any], world: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """Rank 0's section data with its rows replaced by the rows matched across ranks by
    ``keys``; each timed field becomes the maximum over ranks (``None`` where a rank lacks it)
    and every rank's value (``TIMED``)."""
    index = [
        {tuple(row[k] for k in keys): row for row in (per_rank.get(r) or {}).get("rows", [])}
        for r in range(world)
    ]
    rows = []
    for key in dict.fromkeys(key for rank_rows in index for key in rank_rows):
        found = [rank_rows.get(key, {}) for rank_rows in index]
        first = next(f for f in found if f)
        row: dict[str, Any] = dict(zip(keys, key))
        for field, (largest, every) in TIMED.items():
            if field in first:
                values = [_round(f.get(field)) for f in found]
                row.update({largest: None if None in values else max(values), every: values})
        row.update((k, first[k]) for k in ("iters", "calls_per_graph", "replays") if k in first)
        # A baseline this torch lacks (or that raised): the ranks agreed on it, rank 0 says why.
        if "unavailable" in first:
            row["unavailable"] = first["unavailable"]
        rows.append(row)
    base: dict[str, Any] = per_rank.get(0) or next(iter(per_rank.values()), {})
    return {**base, "rows": rows} if "rows" in base else dict(base)


def merge_per_rank(per_rank: dict[int, Any], world: int) -> dict[str, Any]:
    """``rank0``, ``max_over_ranks`` (figure by figure) and ``per_rank``."""
    ordered = [_round(per_rank.get(r), 4) for r in range(world)]
    return {"rank0": ordered[0], "max_over_ranks": _tree_max(ordered), "per_rank": ordered}


def _errors_in(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return []
    found = [f"{where}: {value['error']}"] if value.get("error") else []
    return found + [e for k, v in value.items() for e in _errors_in(v, f"{where} {k}")]


def merge_results(
    *,
    world_size: int,
    sections: dict[str, dict[int, Any]],
    rank_errors: dict[int, str],
    **fields: Any,
) -> dict[str, Any]:
    """The JSON document: ``schema``, ``world_size``, the other ``fields`` as given (timestamp,
    machine, versions, env, config, ...), the merged ``sections`` and every error."""
    merged = {
        name: merge_rows(sections[name], world_size, ROW_KEYS[name])
        if name in ROW_KEYS
        else merge_per_rank(sections[name], world_size)
        for name in SECTIONS
        if name in sections
    }
    errors = [f"rank {r}: {text}" for r, text in sorted(rank_errors.items())]
    for name, per_rank in sections.items():
        errors += [
            f"{e} (rank {r})"
            for r, data in sorted(per_rank.items())
            for e in _errors_in(data, name)
        ]
    head = {"schema": SCHEMA, "world_size": world_size}
    return {**head, **fields, "sections": merged, "errors": errors}
