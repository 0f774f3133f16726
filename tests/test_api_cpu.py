"""Group resolution, argument errors and the disabled path, on a machine without a GPU."""

from __future__ import annotations

import ctypes
import types

import pytest
import torch
import torch.distributed as dist

import symm_rs
from symm_rs.groups import Group, resolve_comm

NO_GPU = not torch.cuda.is_available()


def _readable_address() -> tuple[int, object]:
    """An address of real memory that is not an NCCL communicator."""
    buffer = ctypes.create_string_buffer(64)
    return ctypes.addressof(buffer), buffer


def test_raw_int_is_accepted_as_an_address() -> None:
    assert resolve_comm(0x1234) == 0x1234


@pytest.mark.parametrize("bad", [0, -5])
def test_null_or_negative_raw_int_is_a_value_error(bad: int) -> None:
    with pytest.raises(ValueError, match="not a live ncclComm_t"):
        resolve_comm(bad)


def test_object_with_comm_accepts_ctypes_void_p_and_int() -> None:
    assert resolve_comm(types.SimpleNamespace(comm=ctypes.c_void_p(0x5000))) == 0x5000
    assert resolve_comm(types.SimpleNamespace(comm=0x6000)) == 0x6000


def test_sglang_style_group_coordinator_uses_pynccl_comm() -> None:
    coordinator = types.SimpleNamespace(
        pynccl_comm=types.SimpleNamespace(comm=ctypes.c_void_p(0x7000))
    )
    assert resolve_comm(coordinator) == 0x7000


def test_group_coordinator_without_pynccl_says_so() -> None:
    with pytest.raises(ValueError, match="pynccl_comm is None"):
        resolve_comm(types.SimpleNamespace(pynccl_comm=None))


def test_comm_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"\.comm must be a ctypes.c_void_p or an int"):
        resolve_comm(types.SimpleNamespace(comm="0x1234"))


@pytest.mark.parametrize("bad", [object(), "group", 1.5, True, None])
def test_anything_else_is_a_type_error_naming_what_is_accepted(bad: object) -> None:
    with pytest.raises(TypeError, match="ProcessGroup with an NCCL backend") as info:
        with symm_rs.use_symmetric_memory(bad):
            pass
    assert "pynccl_comm.comm" in str(info.value) and "raw int" in str(info.value)


def test_disabled_context_works_without_a_gpu_and_allocates_normally() -> None:
    with symm_rs.use_symmetric_memory(object(), disabled=True) as ctx:
        t = torch.empty(16)
    assert ctx.disabled and t.numel() == 16
    assert symm_rs.stats().segments == 0


def test_address_that_is_not_readable_memory_is_refused_not_a_crash() -> None:
    with pytest.raises(ValueError, match="not readable memory"):
        with symm_rs.use_symmetric_memory(0x3039):
            pass


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU error")
def test_enabled_context_without_gpu_raises_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A readable address; the stand-in answer for its size comes from a patched resolver so
    # the check under test is the GPU one, not NCCL's.
    monkeypatch.setattr(
        symm_rs.context,
        "resolve",
        lambda group: Group(comm=1, size=2, rank=0, device=0, name="fake"),
    )
    with pytest.raises(symm_rs.SymmetricMemoryError, match=r"needs a CUDA GPU.*disabled=True"):
        with symm_rs.use_symmetric_memory(object()):
            pass


def test_one_rank_group_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(symm_rs.context, "resolve", lambda group: None)
    with symm_rs.use_symmetric_memory(object()) as ctx:
        t = torch.empty(4)
    assert ctx._resolved is None and t.numel() == 4
    assert not symm_rs.is_symmetric(t, object())


def test_gloo_backend_object_is_a_type_error(tmp_path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    backend = dist.ProcessGroupGloo(store, 0, 1)
    with pytest.raises(TypeError, match=r"NCCL backend.*ProcessGroupGloo"):
        resolve_comm(backend)


def test_is_symmetric_needs_a_tensor() -> None:
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        symm_rs.is_symmetric([1, 2], 0x1234)


def test_reserve_rejects_negative_sizes() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        symm_rs.reserve(-1, object())


def test_library_is_torchs_when_torch_is_loaded() -> None:
    info = symm_rs.library_info()
    assert isinstance(info, symm_rs.LibraryInfo)
    assert info.origin == "already loaded in this process"
    if hasattr(torch.cuda, "nccl"):
        version = torch.cuda.nccl.version()
        assert info.version[:2] == tuple(version[:2])


def test_window_check_modes() -> None:
    previous = symm_rs.comm.set_window_check("warn")
    try:
        with pytest.raises(ValueError, match="mode must be one of"):
            symm_rs.comm.set_window_check("loud")
    finally:
        symm_rs.comm.set_window_check(previous)


def test_names_that_left_the_face_still_resolve_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"symm_rs.nccl_version is deprecated.*library"):
        assert symm_rs.nccl_version() == symm_rs.library_info().version
    with pytest.warns(DeprecationWarning, match="use symm_rs.errors.NotSymmetricWarning"):
        assert symm_rs.NotSymmetricWarning is symm_rs.errors.NotSymmetricWarning
    with pytest.warns(DeprecationWarning, match=r"library_info\(\)\["):
        assert symm_rs.library_info()["path"] == symm_rs.library_info().path
    with pytest.warns(DeprecationWarning, match=r"stats\(\)\["):
        assert symm_rs.stats()["segments"] == symm_rs.stats().segments
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        symm_rs.no_such_name  # noqa: B018
    assert len(symm_rs.__all__) <= 26 and not set(symm_rs.__all__) & set(symm_rs._MOVED)


def test_communicator_argument_errors_before_nccl() -> None:
    with pytest.raises(TypeError, match="unique_id must be bytes"):
        symm_rs.Communicator("id", 0, 2, device=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device must be >= 0"):
        symm_rs.Communicator(b"x" * 128, 0, 2, device=-1)
    with pytest.raises(ValueError, match="unique_id must be 128 bytes"):
        symm_rs.Communicator(b"short", 0, 2, device=0)
    with pytest.raises(ValueError, match="rank must be in"):
        symm_rs.Communicator(b"x" * 128, 3, 2, device=0)


def test_the_old_memory_module_still_resolves_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="use symm_rs.context.use_symmetric_memory"):
        from symm_rs.memory import use_symmetric_memory
    assert use_symmetric_memory is symm_rs.use_symmetric_memory
    with pytest.warns(DeprecationWarning, match="symm_rs.env.parse_bytes"):
        assert symm_rs.memory.parse_bytes("4GiB") == 4 << 30


@pytest.mark.parametrize("plain", [False, True])
def test_window_check_says_why_no_buffer_can_be_a_window(
    plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a communicator NCCL answered with NULL windows (plain), advice to allocate inside the
    # context would be futile: the error names NCCL's refusal instead (seen on a GPU, 2.30.7).
    from symm_rs import comm as comm_module

    monkeypatch.setattr(symm_rs.Communicator, "comm", property(lambda self: 0x10))
    monkeypatch.setattr(comm_module._native, "is_registered", lambda *args: False)
    monkeypatch.setattr(comm_module._native, "is_plain", lambda comm: plain)
    communicator = object.__new__(symm_rs.Communicator)
    previous = comm_module.set_window_check("raise")
    try:
        with pytest.raises(symm_rs.RegistrationError) as caught:
            communicator._check_windows(torch.ones(4), torch.ones(4))
    finally:
        comm_module.set_window_check(previous)
    message = str(caught.value)
    assert message.startswith("2 buffer(s)")
    if plain:
        assert "NCCL refused symmetric windows" in message and "use_symmetric_memory" not in message
    else:
        assert "allocate them inside symm_rs.use_symmetric_memory" in message
