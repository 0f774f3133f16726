"""CPU tests of the Rust CP all-gather's surface: its plan (the one slot rule both paths use),
and bad arguments refused before any NCCL or CUDA call (the gather itself runs in
tests/gpu/suite_cp.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from symm_rs import _native, cp, env

COUNTS = ([1], [0, 1], [3, 3], [5, 3, 0, 7], [4, 4, 4, 3], [4, 0, 4, 1], [9, 0, 0, 3], [2, 2])
ROW_BYTES = (0, 1, 2, 4, 6, 8, 16, 18, 256, 1152, 2048)


def _compaction_in_python(counts: list[int], slot: int) -> list[tuple[int, int, int]]:
    """The copies the Python path's ``torch.cat`` makes, merged where rows are contiguous."""
    copies: list[tuple[int, int, int]] = []
    dst = 0
    for r, n in enumerate(counts):
        src = r * slot
        if n and copies and copies[-1][0] + copies[-1][2] == src:
            copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + n)
        elif n:
            copies.append((src, dst, n))
        dst += n
    return copies


@pytest.mark.parametrize("counts", COUNTS, ids=str)
def test_the_plan_pads_slots_to_16_bytes_and_compacts_what_torch_cat_would(
    counts: list[int],
) -> None:
    for row_bytes, rank in itertools.product(ROW_BYTES, range(len(counts))):
        slot, copies = _native.cp_plan(rank, counts, row_bytes)
        assert slot >= max(counts) and (slot * row_bytes) % 16 == 0, (counts, row_bytes)
        # The smallest such slot: one row fewer would break the alignment or the longest count.
        smaller = slot - 1
        assert smaller < max(counts) or (smaller * row_bytes) % 16, (counts, row_bytes)
        compact = slot != max(counts) or len(set(counts)) > 1
        assert copies == (_compaction_in_python(counts, slot) if compact else [])


def test_plan_errors() -> None:
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        _native.cp_plan(2, [1, 1], 2)
    with pytest.raises(ValueError, match=r"counts\[1\] is -1"):
        _native.cp_plan(0, [1, -1], 2)
    with pytest.raises(ValueError, match="overflows"):
        _native.cp_plan(0, [2**62, 1], 16)


def _call(gathered, input, output, counts=(3, 2), rank=1):  # type: ignore[no-untyped-def]
    _native.cp_all_gather(0, rank, gathered, input, output, list(counts), (0, 0))


def test_bad_arguments_are_refused_before_nccl() -> None:
    # counts [3, 2] of bf16 rows of 4: 8-byte rows, so 4-row slots and 5 rows out.
    g, i, o = (torch.zeros(n, 4, dtype=torch.bfloat16) for n in (8, 2, 5))
    with pytest.raises(ValueError, match="input is not a CUDA tensor"):
        _call(g, i, o)
    with pytest.raises(ValueError, match=r"counts\[0\] is -3"):
        _call(g, i, o, counts=(-3, 2))
    with pytest.raises(ValueError, match="rank 2 is out of range"):
        _call(g, i, o, rank=2)
    with pytest.raises(ValueError, match="output is needed"):
        _call(g, i, None)
    with pytest.raises(ValueError, match="output must be None"):
        _call(g, torch.zeros(4, 4, dtype=torch.bfloat16), o, counts=(4, 4))
    with pytest.raises(ValueError, match="trailing dimensions must be input's"):
        _call(torch.zeros(8, 2, 2, dtype=torch.bfloat16), i, o)
    with pytest.raises(ValueError, match="0-d tensor"):
        _call(g, torch.zeros((), dtype=torch.bfloat16), o)
    with pytest.raises(TypeError, match=r"gathered must be a torch\.Tensor"):
        _call([0] * 8, i, o)
    with pytest.raises(TypeError, match="NCCL has no type for bool"):
        _call(g, torch.zeros(2, 4, dtype=torch.bool), o)


def test_the_copy_mode_is_checked_first(monkeypatch: pytest.MonkeyPatch) -> None:
    g, i, o = (torch.zeros(n, 4, dtype=torch.bfloat16) for n in (8, 2, 5))
    with pytest.raises(ValueError, match="copy must be one of kernel, driver; got 'memcpy'"):
        _native.cp_all_gather(0, 1, g, i, o, [3, 2], (0, 0), copy="memcpy")
    for copy in ("kernel", "driver", " Driver "):  # then the tensors are checked, as ever
        with pytest.raises(ValueError, match="input is not a CUDA tensor"):
            _native.cp_all_gather(0, 1, g, i, o, [3, 2], (0, 0), copy=copy)
    # The choices are the Rust core's; SYMM_RS_CP_COPY is read by symm_rs.env at each call.
    assert env.CP_COPY_CHOICES == _native.CP_COPY_MODES == ("kernel", "driver")
    monkeypatch.setenv("SYMM_RS_CP_COPY", "fast")
    with pytest.raises(ValueError, match="SYMM_RS_CP_COPY: must be one of kernel, driver; got"):
        env.read_cp_copy()
    monkeypatch.setenv("SYMM_RS_CP_COPY", " Driver")
    assert env.read_cp_copy() == "driver"


def test_the_helper_takes_the_rust_path_with_the_environments_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[object] = []
    monkeypatch.setattr(cp, "_gather", lambda *args, **kwargs: seen.append(kwargs))
    x = torch.zeros(3, 2)
    cp.cp_all_gather_reorganized_into_tensor_kv_cache(x, "group", [3, 1])
    assert seen == [{"stream": None, "disabled": False}]


def test_python_path_is_kept_for_disabled_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the Rust path was taken for CPU tensors")

    monkeypatch.setattr(_native, "cp_all_gather", refuse)

    class Gatherer:
        rank, size = 0, 2

        def all_gather_into_tensor(self, out, inp, stream=None):  # type: ignore[no-untyped-def]
            out.view(2, -1)[0].copy_(inp.flatten())
            out.view(2, -1)[1].fill_(7)

    x = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out = cp.cp_all_gather_reorganized_into_tensor_kv_cache(x, Gatherer(), [3, 1], disabled=True)
    assert out.tolist() == [[0, 1], [2, 3], [4, 5], [7, 7]]
    ref = cp._gather(x, Gatherer(), [3, 1], disabled=True, native=False)
    assert torch.equal(out, ref)


def test_the_native_path_takes_the_dtypes_the_rust_table_names() -> None:
    assert "bfloat16" in _native.NCCL_DTYPE_NAMES and "bool" not in _native.NCCL_DTYPE_NAMES
    assert torch.bfloat16 in cp._NCCL_DTYPES and torch.float8_e5m2 in cp._NCCL_DTYPES
    assert torch.bool not in cp._NCCL_DTYPES and torch.complex64 not in cp._NCCL_DTYPES
