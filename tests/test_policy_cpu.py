"""CPU tests of the size policy's table (``symm_rs.policy``): parsing, validation, lookups (the
Rust core's), the environment override, the defaults against the committed measurements, and
calibration's decision logic on synthetic timings. No GPU needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from symm_rs import env, library, policy
from symm_rs.comm import resolve_policy
from symm_rs.policy import PolicyTable

KiB, MiB = 1 << 10, 1 << 20
RESULTS = Path(__file__).resolve().parents[1] / "benches" / "results"


def test_parse_lookup_and_text_round_trip() -> None:
    table = PolicyTable.parse(" all_reduce:32K-2M, 128MiB- ; reduce_scatter:0-4096 ")
    assert table.ranges == {"all_reduce": ((32 * KiB, 2 * MiB), (128 * MiB, None)),
                            "reduce_scatter": ((0, 4096),)}  # fmt: skip
    assert table.to_text() == "all_reduce:32K-2M,128M-;reduce_scatter:0-4K"
    assert PolicyTable.parse(table.to_text()) == table
    assert not table.use_twin("all_reduce", 32 * KiB - 1)
    assert table.use_twin("all_reduce", 32 * KiB)
    assert not table.use_twin("all_reduce", 2 * MiB)  # half-open
    assert table.use_twin("all_reduce", 1 << 40)
    assert table.use_twin("reduce_scatter", 2) and not table.use_twin("all_gather", 2)
    assert sorted(table.entries()) == [
        ("all_reduce", 32 * KiB, 2 * MiB),
        ("all_reduce", 128 * MiB, None),
        ("reduce_scatter", 0, 4096),
    ]
    for empty in ("", "none", " NONE "):
        assert PolicyTable.parse(empty) == PolicyTable() and PolicyTable().to_text() == "none"
    everything = PolicyTable.everything()
    assert all(everything.use_twin(op, n) for op in policy.OPS for n in (0, 1, 1 << 40))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("broadcast:0-", "collective"),
        ("all_reduce", "collective"),
        ("all_reduce:-4K", "low-high"),
        ("all_reduce:4K", "low-high"),
        ("all_reduce:4K-4K", "empty"),
        ("all_reduce:8K-4K", "empty"),
        ("all_reduce:four-", "not a byte size"),
        ("all_reduce:0-8K,4K-", "overlap"),
        ("all_reduce:0-,4K-8K", "overlap"),
    ],
)
def test_bad_tables_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyTable.parse(text)


def test_mapping_validation() -> None:
    assert PolicyTable({"all_gather": [(0, None)]}).use_twin("all_gather", 5)
    for bad in ({"all_gather": [(-1, None)]}, {"all_gather": [(1.5, None)]}, {"x": []}):
        with pytest.raises(ValueError):
            PolicyTable(bad)


def test_resolve_and_the_environment_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(env.POLICY_TABLE, raising=False)
    for off in (None, False, "off"):
        assert resolve_policy(off, 2) is None
    assert resolve_policy(True, 2) == policy.default_table(2)
    assert resolve_policy("auto", 4) == PolicyTable.parse(policy.DEFAULT_TABLES[4])
    assert resolve_policy("all_gather:1M-", 2) == PolicyTable({"all_gather": [(MiB, None)]})
    assert resolve_policy({"all_reduce": [[0, 8]]}, 2).use_twin("all_reduce", 7)
    table = PolicyTable.everything()
    assert resolve_policy(table, 8) is table
    with pytest.raises(TypeError, match="policy must be"):
        resolve_policy(3, 2)
    monkeypatch.setenv(env.POLICY_TABLE, "reduce_scatter:1M-")
    assert resolve_policy(True, 2) == PolicyTable({"reduce_scatter": [(MiB, None)]})
    assert resolve_policy("none", 2) == PolicyTable()  # an explicit table wins
    monkeypatch.setenv(env.POLICY_TABLE, "reduce_scatter:1M")
    with pytest.raises(ValueError, match=env.POLICY_TABLE):
        resolve_policy(True, 2)
    assert any(env.POLICY_TABLE in m for m in env.validate_environment())
    monkeypatch.setenv(env.POLICY_TABLE, "")
    assert env.read_policy_table() is None and not env.validate_environment()


def test_default_tables_for_other_world_sizes() -> None:
    assert policy.default_table(3) == policy.default_table(2)  # the smaller on a tie
    assert policy.default_table(8) == policy.default_table(4)
    assert policy.default_table(1) == policy.default_table(2)


def test_calibration_decision_logic() -> None:
    sizes = [KiB * 8**k for k in range(6)]  # 1K .. 32M
    symm = dict(zip(sizes, [10.0, 10.0, 10.0, 10.0, 10.0, 10.0]))
    timings = {
        # regular faster at 64K and 512K, a tie within the margin at 8K, faster again at 32M
        ("all_reduce", n): (r, symm[n])
        for n, r in zip(sizes, [11.0, 9.8, 8.0, 8.0, 12.0, 5.0])
    }
    timings.update({("all_gather", n): (20.0, 10.0) for n in sizes})
    timings.update({("reduce_scatter", n): (1.0, 10.0) for n in sizes})
    table = policy.table_from_timings(timings)
    assert table.ranges == {
        "all_reduce": ((32 * KiB, 2 * MiB), (16 * MiB, None)),
        "reduce_scatter": ((0, None),),
    }
    # Every measured size routes where it was faster (or stays symmetric on a near tie).
    for (op, n), (regular, sym) in timings.items():
        assert table.use_twin(op, n) == (regular * (1 + policy.MARGIN) < sym), (op, n)
    assert policy.table_from_timings({}) == PolicyTable()
    # A wider margin keeps 64K and 512K (20% faster) symmetric, not 32M (50% faster).
    assert policy.table_from_timings(timings, margin=0.5).ranges["all_reduce"] == (
        (16 * MiB, None),
    )


@pytest.mark.parametrize("world", sorted(policy.DEFAULT_TABLES))
def test_default_tables_come_from_the_committed_measurements(world: int) -> None:
    result = json.loads((RESULTS / f"bench_{world}gpu.json").read_text())
    assert policy.table_from_bench(result).to_text() == policy.DEFAULT_TABLES[world]


def test_per_call_selection_is_reported_not_used(tmp_path: Path) -> None:
    available, note = library.per_call_selection(str(tmp_path / "missing.so"))
    assert not available and "could not inspect" in note
