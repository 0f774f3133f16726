"""The size policy: send each Communicator collective to the faster of NCCL's symmetric kernels
and its regular algorithms.

NCCL picks a symmetric kernel whenever both buffers are windows of the communicator, even at
sizes and for collectives where its regular (ring/tree/NVLS) algorithms are faster; on NCCL
2.28 a large all-reduce or reduce-scatter is up to 1.5x slower on windows (benches/results).
A communicator has no windows of its own buffers unless they were registered with it, so a
*twin* over the same ranks (``ncclCommSplit``), on which nothing is ever registered, runs the
regular algorithms on the very same buffers. A ``PolicyTable`` says, per collective, which byte
ranges (bytes per rank) go to the twin; everything else stays on the communicator itself.

The table is text and data here; the collectives it names and the lookup a call makes come from
the Rust core (``_native.COLLECTIVES``, ``_native.RouteTable``), the one place both live.
Nothing here imports torch, so ``env`` can validate ``SYMM_RS_POLICY_TABLE`` without it;
``symm_rs.calibration`` measures a table on this machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from symm_rs import _moved, _native
from symm_rs._units import format_bytes, parse_bytes

OPS: tuple[str, ...] = _native.COLLECTIVES
# A call goes to the twin only when the regular algorithms are faster by more than this: the
# benchmark's tolerance (policy <= min(plain, symm) * 1.03), so a near tie stays symmetric.
MARGIN = 0.03

Range = tuple[int, Optional[int]]  # [low, high) bytes per rank; None is unbounded

# Derived by ``table_from_timings`` from the CUDA-graph rows (bf16) of the committed
# benches/results/bench_<N>gpu.json: H100 80GB HBM3 over NVLink, NCCL 2.28.9, torch 2.11.
# tests/test_policy_cpu.py derives them again from those files.
DEFAULT_TABLES: dict[int, str] = {
    2: "all_gather:128M-;all_reduce:32K-2M,128M-;reduce_scatter:32K-",
    4: "all_reduce:256K-2M,16M-;reduce_scatter:32K-256K,2M-",
}


@dataclass(frozen=True)
class PolicyTable:
    """Per collective, the ``[low, high)`` byte ranges (bytes per rank; ``high`` None for
    unbounded) whose calls go to the window-less twin. Sorted, non-overlapping."""

    ranges: Mapping[str, tuple[Range, ...]] = field(default_factory=dict)
    # The Rust core's lookup over the same rows: the one a Communicator routes by.
    _lookup: Any = field(init=False, compare=False, repr=False, default=None)

    def __post_init__(self) -> None:
        clean: dict[str, tuple[Range, ...]] = {}
        for op, spans in self.ranges.items():
            if op not in OPS:
                raise ValueError(f"policy table: unknown collective {op!r} (one of {OPS})")
            checked = []
            for span in spans:
                low, high = span
                if isinstance(low, bool) or not isinstance(low, int) or low < 0:
                    raise ValueError(f"policy table: {op} low bound must be an int >= 0: {span}")
                if high is not None and (
                    isinstance(high, bool) or not isinstance(high, int) or high <= low
                ):
                    raise ValueError(f"policy table: {op} range {span} is empty or not ints")
                checked.append((low, high))
            checked.sort(key=lambda s: s[0])
            for (_, high), (low, _) in zip(checked, checked[1:]):
                if high is None or high > low:
                    raise ValueError(f"policy table: {op} ranges overlap: {checked}")
            if checked:
                clean[op] = tuple(checked)
        object.__setattr__(self, "ranges", clean)
        object.__setattr__(self, "_lookup", _native.RouteTable(self.entries()))

    @classmethod
    def parse(cls, text: str) -> PolicyTable:
        """From ``"all_reduce:32K-2M,128M-;reduce_scatter:32K-"`` (``low-high`` in bytes per
        rank, sizes as ``SYMM_RS_RESERVE`` takes them; ``low-`` is unbounded). ``""`` or
        ``"none"``: an empty table (nothing goes to the twin).

        Raises:
            ValueError: the text is not a table (the message says which part).
        """
        ranges: dict[str, list[Range]] = {}
        if text.strip().lower() in ("", "none"):
            return cls()
        for part in text.split(";"):
            if not part.strip():
                continue
            op, sep, spans = part.partition(":")
            op = op.strip()
            if not sep or op not in OPS:
                raise ValueError(
                    f"policy table: {part.strip()!r} must be <collective>:<low>-<high>,... "
                    f"with the collective one of {', '.join(OPS)}"
                )
            for span in spans.split(","):
                low, dash, high = span.partition("-")
                if not dash or not low.strip():
                    raise ValueError(f"policy table: {op} range {span.strip()!r} must be low-high")
                bound = parse_bytes(high) if high.strip() else None
                ranges.setdefault(op, []).append((parse_bytes(low), bound))
        return cls({op: tuple(spans) for op, spans in ranges.items()})

    @classmethod
    def everything(cls) -> PolicyTable:
        """Every call to the twin (calibration's regular-algorithm side)."""
        return cls({op: ((0, None),) for op in OPS})

    def to_text(self) -> str:
        """The form ``parse`` and ``SYMM_RS_POLICY_TABLE`` take."""
        parts = []
        for op in OPS:
            spans = self.ranges.get(op, ())
            if spans:
                text = ",".join(
                    f"{format_bytes(lo)}-{'' if hi is None else format_bytes(hi)}"
                    for lo, hi in spans
                )
                parts.append(f"{op}:{text}")
        return ";".join(parts) or "none"

    def use_twin(self, op: str, nbytes: int) -> bool:
        """Whether an ``op`` call of ``nbytes`` per rank goes to the twin (the Rust core's
        lookup, as a Communicator's call makes it)."""
        return bool(self._lookup.to_twin(op, nbytes))

    @property
    def route_table(self) -> Any:
        """The table as the native communicator takes it (``_native.RouteTable``)."""
        return self._lookup

    def entries(self) -> list[tuple[str, int, Optional[int]]]:
        """``(collective, low, high)`` rows, as the native communicator takes them."""
        return [(op, lo, hi) for op, spans in self.ranges.items() for lo, hi in spans]


def default_table(world_size: int) -> PolicyTable:
    """The measured table for ``world_size`` ranks; for a size not measured, the nearest one
    that was (the smaller on a tie)."""
    nearest = min(DEFAULT_TABLES, key=lambda w: (abs(w - world_size), w))
    return PolicyTable.parse(DEFAULT_TABLES[nearest])


def _boundary(below: int, above: int) -> int:
    """A power of two between two measured sizes, at their geometric mean (rounded up)."""
    return 1 << math.ceil((math.log2(below) + math.log2(above)) / 2)


def table_from_timings(
    timings: Mapping[tuple[str, int], tuple[float, float]], margin: float = MARGIN
) -> PolicyTable:
    """The table that measurements ask for: ``timings[(op, bytes)] = (regular_us, symm_us)``.
    A measured size goes to the twin when the regular time is lower than the symmetric one by
    more than ``margin``; neighbouring such sizes form one range, bounded halfway (in log scale)
    to the nearest size that stays symmetric, and open at the ends of what was measured."""
    ranges: dict[str, list[Range]] = {}
    for op in OPS:
        sizes = sorted(n for o, n in timings if o == op)
        loses = [timings[(op, n)][0] * (1 + margin) < timings[(op, n)][1] for n in sizes]
        for i, size in enumerate(sizes):
            if not loses[i] or (i > 0 and loses[i - 1]):
                continue
            j = i
            while j + 1 < len(sizes) and loses[j + 1]:
                j += 1
            low = 0 if i == 0 else _boundary(sizes[i - 1], size)
            high = None if j + 1 == len(sizes) else _boundary(sizes[j], sizes[j + 1])
            ranges.setdefault(op, []).append((low, high))
    return PolicyTable({op: tuple(spans) for op, spans in ranges.items()})


def table_from_bench(result: Mapping[str, Any], mode: str = "graph") -> PolicyTable:
    """``table_from_timings`` of a bench result document's ``collectives`` rows (plain buffers
    on torch's communicator stand for the regular algorithms)."""
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for row in result["sections"]["collectives"]["rows"]:
        if row["mode"] == mode and row.get("latency_us") is not None:
            cells.setdefault((row["op"], row["bytes"]), {})[row["buffers"]] = row["latency_us"]
    # Other series (the bench's torch baselines) sit beside these two and do not count.
    timings = {k: (v["plain"], v["symm"]) for k, v in cells.items() if "plain" in v and "symm" in v}
    return table_from_timings(timings)


@dataclass(frozen=True)
class Policy:
    """What a Communicator's policy does: its table, the mechanism (``"twin"``: a window-less
    ``ncclCommSplit`` twin), the twin's ``ncclComm_t``, and whether this NCCL offers per-call
    algorithm selection (``per_call_selection``) and why symm_rs does not use it."""

    table: PolicyTable
    mechanism: str
    twin_comm: int
    per_call_selection: bool
    note: str


# Names that moved out in this release (CHANGELOG.md), reachable here for one more release.
_MOVED = {
    "calibrate": "calibration",
    "per_call_selection": "library",
}


def __getattr__(name: str) -> Any:
    return _moved.moved("symm_rs.policy", name, _MOVED, public=True)
