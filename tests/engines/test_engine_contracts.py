"""The shims against the engines' own code (the releases pinned in versions.txt), on a CPU.

The wheels are fetched without dependencies into a cache outside the repository
(scripts/extract_engines.py); where that is impossible the tests that need them skip and say why,
except under CI (``CI`` set), where they fail. Three kinds of check:

* contract: every name the engine imports from its allocator module exists in the shim, and every
  call site, found by parsing the engine's source, binds to the shim's signature (a renamed name
  or keyword fails naming the call site: proven on patched copies of the source);
* configuration: the engine's own configuration code (SGLang's ``runtime_context`` and
  ``environ``, vLLM's ``envs``) is loaded, and the shim's enable/disable decision is compared
  with the engine's own allocator module's, including where that raises;
* the paths without the engines: the shim's own fallbacks follow the engines' parsing and
  defaults.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import inspect
import logging
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import engine_contract as contract
import engine_modules as em
import extract_engines
import pytest
import torch

import symm_rs
from symm_rs import _native, groups
from symm_rs.compat import _common
from symm_rs.compat import sglang as sg
from symm_rs.compat import vllm as vl

SHIMS = {"sglang": sg, "vllm": vl}


@pytest.fixture(scope="session")
def engine_roots() -> dict[str, Path]:
    try:
        return extract_engines.fetch_all()
    except extract_engines.FetchError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the shims against the engines, and: {e}")
        pytest.skip(f"the pinned engine wheels cannot be fetched here: {e}")


@pytest.fixture(scope="session")
def engine_uses(engine_roots: dict[str, Path]) -> dict[str, contract.Uses]:
    return {
        name: contract.find_uses(root, em.ALLOCATOR[name]) for name, root in engine_roots.items()
    }


@pytest.fixture(autouse=True)
def _fresh_shims(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the shims asking the engines again."""
    monkeypatch.setattr(sg, "_enabled", None)
    monkeypatch.setattr(sg, "_get_exec", None)
    monkeypatch.setattr(vl, "_failed_to_compile", False)
    for name in ("SGLANG_DEBUG_SYMM_MEM", "SGLANG_SYMM_MEM_PREALLOC_GB_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("VLLM_USE_NCCL_SYMM_MEM", raising=False)
    monkeypatch.delenv("SYMM_RS_STRICT", raising=False)


# -- the pins -------------------------------------------------------------------------------


def test_versions_are_pinned_in_one_place() -> None:
    assert extract_engines.pins() == {"sglang": "0.5.23", "vllm": "0.34.0"}


def test_a_malformed_pin_says_where(tmp_path: Path) -> None:
    pin_file = tmp_path / "versions.txt"
    pin_file.write_text("# engines\nsglang>=0.5\n")
    with pytest.raises(ValueError, match=r"versions.txt:2: expected name==version"):
        extract_engines.pins(pin_file)


# -- contract -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_name_the_engine_imports_is_in_the_shim(engine: str, engine_uses: dict) -> None:
    uses = engine_uses[engine]
    problems = [p for p in contract.check(uses, SHIMS[engine]) if "has no such name" in p]
    assert not problems, "\n".join(problems)
    assert {i.name for i in uses.imports} <= set(SHIMS[engine].__all__)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_call_site_binds_to_the_shim(engine: str, engine_uses: dict) -> None:
    problems = contract.check(engine_uses[engine], SHIMS[engine])
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_the_engines_own_module_api_is_in_the_shim(engine: str, engine_roots: dict) -> None:
    root = engine_roots[engine]
    path = extract_engines.module_file(root, em.ALLOCATOR[engine])
    definitions = contract.public_definitions(path)
    assert len(definitions) >= 5  # the parse found the module's API
    rel = path.relative_to(root).as_posix()
    problems = contract.check_definitions(path, rel, SHIMS[engine])
    assert not problems, "\n".join(problems)


def test_call_sites_are_found_by_parsing(engine_uses: dict) -> None:
    """The parse finds what reading the engines found: many SGLang call sites (direct, and
    through ``GroupCoordinator``'s ``self.`` aliases), and vLLM's in its communicators."""
    sglang, vllm = engine_uses["sglang"], engine_uses["vllm"]
    assert len(sglang.calls) >= 60
    by_path = {(c.path.rsplit("/", 1)[-1], c.name) for c in sglang.calls}
    assert ("parallel_state.py", "debug_check_symmetric_mempool") in by_path
    assert ("parallel_state.py", "use_symmetric_memory") in by_path
    prealloc = [c for c in sglang.calls if c.name == "prealloc_symmetric_memory_pool"]
    assert prealloc and set(prealloc[0].keywords) == {
        "is_draft_worker",
        "enable_symm_mem",
        "device",
        "forward_stream",
    }
    assert {"nccl_symm_mem_context", "is_symmetric_memory_tensor", "set_graph_pool_id"} <= {
        c.name for c in vllm.calls
    }


def _copy_importers(root: Path, engine: str, to: Path) -> Path:
    """The engine's files that mention its allocator module, copied under ``to``."""
    leaf = em.ALLOCATOR[engine].rpartition(".")[2]
    for path in root.rglob("*.py"):
        if leaf in path.read_text(encoding="utf-8", errors="replace"):
            target = to / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return to


def _patch(root: Path, rel: str, old: str, new: str) -> int:
    path = root / rel
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{rel} no longer contains {old!r}: update this test"
    line = text[: text.index(old)].count("\n") + 1
    path.write_text(text.replace(old, new), encoding="utf-8")
    return line


@pytest.mark.parametrize(
    ("engine", "rel", "old", "new", "expect"),
    [
        # a renamed name: its import and its call both fail
        (
            "sglang",
            "sglang/srt/mem_cache/page_interleave_pool.py",
            "allocate_symmetric_buffer",
            "allocate_symmetric_buffer_v2",
            "has no such name",
        ),
        # a renamed keyword at a call site
        (
            "sglang",
            "sglang/srt/model_executor/model_runner_components/cuda_graph_setup.py",
            "forward_stream=",
            "stream=",
            "does not bind",
        ),
        # an extra argument through GroupCoordinator's self.<alias>
        (
            "sglang",
            "sglang/srt/distributed/parallel_state.py",
            '{"input": input_}, "all_reduce")',
            '{"input": input_}, "all_reduce", True)',
            "does not bind",
        ),
        (
            "vllm",
            "vllm/distributed/device_communicators/pynccl.py",
            "nccl_symm_mem_context(pynccl_comm)",
            "nccl_symm_mem_context(pynccl_comm, stream=None)",
            "does not bind",
        ),
    ],
)
def test_a_renamed_name_fails_naming_the_call_site(
    engine: str, rel: str, old: str, new: str, expect: str, engine_roots: dict, tmp_path: Path
) -> None:
    copy = _copy_importers(engine_roots[engine], engine, tmp_path)
    assert contract.check(contract.find_uses(copy, em.ALLOCATOR[engine]), SHIMS[engine]) == []
    line = _patch(copy, rel, old, new)
    problems = contract.check(contract.find_uses(copy, em.ALLOCATOR[engine]), SHIMS[engine])
    assert problems, "the checker missed a change the shim does not fit"
    assert all(p.startswith(rel + ":") for p in problems), problems
    assert any(expect in p for p in problems), problems
    if expect == "does not bind":
        # The problem names the line the call starts on: the patched text is in that call.
        lines = [int(p.split(":")[1]) for p in problems]
        assert any(line - 10 <= at <= line for at in lines), (line, problems)


def test_a_name_missing_from_the_shim_fails_at_every_call_site(engine_uses: dict) -> None:
    shim = types.ModuleType("renamed_shim")
    shim.__dict__.update({k: v for k, v in vars(sg).items() if k != "set_graph_pool_id"})
    problems = contract.check(engine_uses["sglang"], shim)
    sites = [c for c in engine_uses["sglang"].calls if c.name == "set_graph_pool_id"]
    assert len(sites) >= 5
    for site in sites:
        assert any(p.startswith(site.where) and "set_graph_pool_id" in p for p in problems)


# -- SGLang's configuration, loaded from its own files -----------------------------------------


class TpGroup:
    """What the shim reads of a GroupCoordinator."""

    def __init__(self, world_size: int = 2, is_first_rank: bool = True) -> None:
        self.world_size, self.is_first_rank = world_size, is_first_rank


@pytest.fixture
def sglang_engine(engine_roots: dict) -> Any:
    """SGLang's ``runtime_context``, ``environ`` and retired ``get_global_server_args`` from its
    own files, the shim at its allocator module's name, and SGLang's own allocator module
    loaded beside it (``engine.own``) to compare decisions with."""
    root = engine_roots["sglang"]
    tp_group = TpGroup()
    with em.Engine("sglang", root) as engine:
        engine.standins(em.sglang_standins(tp_group=tp_group))
        engine.standins(em.sglang_config_standins())
        engine.standins(em.retired_server_args(root))
        rc = engine.load(*em.SGLANG_CONFIG)
        own = _load_own_allocator(root, "sglang")
        engine.install_shim(sg)
        yield types.SimpleNamespace(rc=rc, own=own, tp_group=tp_group, root=root)


def _load_own_allocator(root: Path, engine: str) -> types.ModuleType:
    """The engine's own allocator module, under a private name (its imports resolve to what
    ``sys.modules`` holds: the engine's loaded modules and stand-ins)."""
    path = extract_engines.module_file(root, em.ALLOCATOR[engine])
    spec = importlib.util.spec_from_file_location(f"_own_{engine}_allocator", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same_decision(own: Any, shim: Any) -> Any:
    """Both functions' answers, or both exception types."""
    results = []
    for fn in (own, shim):
        try:
            results.append(("value", bool(fn())))
        except Exception as e:
            results.append(("raises", type(e)))
    assert results[0] == results[1], f"engine {results[0]} vs shim {results[1]}"
    return results[0][1]


def test_sglang_default_is_off_in_its_own_declaration(engine_roots: dict) -> None:
    """The engine's declared default for ``enable_symm_mem`` (what the shim falls back to)."""
    import ast

    path = engine_roots["sglang"] / "sglang/srt/arg_groups/fields/exec_.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defaults = [
        node.value
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef) and cls.name == "ExecComm"
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "enable_symm_mem"
    ]
    assert len(defaults) == 1 and ast.literal_eval(defaults[0]) is False


def test_sglang_flag_follows_the_engines_runtime_context(sglang_engine: Any) -> None:
    own, rc = sglang_engine.own, sglang_engine.rc
    # Not published: SGLang's get_exec raises ValueError and the flag is off.
    with pytest.raises(ValueError):
        rc.get_exec()
    assert _same_decision(own.is_symmetric_memory_enabled, sg.is_symmetric_memory_enabled) is False
    assert isinstance(sg.use_symmetric_memory(TpGroup()), contextlib.nullcontext)
    em.publish_exec_comm(rc, enable_symm_mem=True)
    assert _same_decision(own.is_symmetric_memory_enabled, sg.is_symmetric_memory_enabled) is True
    assert isinstance(sg.use_symmetric_memory(TpGroup()), sg.SymmetricMemoryContext)
    assert isinstance(sg.use_symmetric_memory(TpGroup(), disabled=True), contextlib.nullcontext)
    assert isinstance(sg.use_symmetric_memory(TpGroup(world_size=1)), contextlib.nullcontext)
    em.publish_exec_comm(rc, enable_symm_mem=False)
    assert _same_decision(own.is_symmetric_memory_enabled, sg.is_symmetric_memory_enabled) is False


def test_sglang_flag_raises_where_the_engine_raises(sglang_engine: Any) -> None:
    """A published ``exec`` without ``comm``: SGLang's own read raises AttributeError, so must
    the shim's (and ``use_symmetric_memory`` asks it first, as SGLang's does)."""
    rc = sglang_engine.rc
    rc.get_context()._config_bags = {"exec": rc._ConfigBag("exec")}
    assert (
        _same_decision(
            sglang_engine.own.is_symmetric_memory_enabled, sg.is_symmetric_memory_enabled
        )
        is AttributeError
    )
    with pytest.raises(AttributeError):
        sg.use_symmetric_memory(TpGroup(), disabled=True)


def test_sglang_retired_accessor_is_never_asked(sglang_engine: Any) -> None:
    from sglang.srt.server_args import get_global_server_args  # type: ignore[import-not-found]

    with pytest.raises(RuntimeError, match="retired"):
        get_global_server_args()
    em.publish_exec_comm(sglang_engine.rc, enable_symm_mem=True)
    assert sg.is_symmetric_memory_enabled()


def test_sglang_import_chain_failure_is_the_engines_default(
    sglang_engine: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    em.publish_exec_comm(sglang_engine.rc, enable_symm_mem=True)
    monkeypatch.setattr(sg, "_import_failure_logged", False)
    # Not monkeypatch.setitem: its undo would run after the engine fixture removed the module.
    loaded = sys.modules["sglang.srt.runtime_context"]
    sys.modules["sglang.srt.runtime_context"] = None  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.INFO, logger=sg.__name__):
            assert not sg.is_symmetric_memory_enabled()
    finally:
        sys.modules["sglang.srt.runtime_context"] = loaded
    assert "runtime_context" in caplog.text
    sg.set_symmetric_memory_enabled(True)
    assert sg.is_symmetric_memory_enabled()


def test_sglang_environment_variables_through_the_engines_envs(
    sglang_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = sys.modules["sglang.srt.environ"].envs
    for raw, field, expect in [
        (None, "SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", -1),
        ("6", "SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", 6),
        (None, "SGLANG_DEBUG_SYMM_MEM", False),
        ("Y", "SGLANG_DEBUG_SYMM_MEM", True),
        ("no", "SGLANG_DEBUG_SYMM_MEM", False),
    ]:
        if raw is None:
            monkeypatch.delenv(field, raising=False)
        else:
            monkeypatch.setenv(field, raw)
        parse = sg._parse_int if "GB" in field else sg._parse_bool
        default = -1 if "GB" in field else False
        assert getattr(envs, field).get() == expect
        assert sg._env_value(field, default, parse) == expect


@pytest.mark.parametrize(
    ("raw", "expect"),
    [("1", True), ("yes", True), ("Y", True), ("0", False), ("n", False), ("maybe", "warn")],
)
def test_sglang_bool_parsing_without_the_engine_matches_its_envbool(
    raw: str, expect: Any, engine_roots: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    with em.Engine("sglang", engine_roots["sglang"]) as engine:
        envs = engine.load("sglang.srt.environ").envs
        monkeypatch.setenv("SGLANG_DEBUG_SYMM_MEM", raw)
        if expect == "warn":
            with pytest.warns(UserWarning, match="Invalid value"):
                engine_answer = envs.SGLANG_DEBUG_SYMM_MEM.get()
        else:
            engine_answer = envs.SGLANG_DEBUG_SYMM_MEM.get()
    monkeypatch.setitem(sys.modules, "sglang", None)  # SGLang not importable
    if expect == "warn":
        with pytest.warns(UserWarning, match="Invalid value for SGLANG_DEBUG_SYMM_MEM"):
            shim_answer = sg._env_value("SGLANG_DEBUG_SYMM_MEM", False, sg._parse_bool)
    else:
        shim_answer = sg._env_value("SGLANG_DEBUG_SYMM_MEM", False, sg._parse_bool)
    assert shim_answer == engine_answer


def test_sglang_describe_registration_matches_the_engines_none(sglang_engine: Any) -> None:
    assert sglang_engine.own.describe_registration_in_progress() is None
    assert sg.describe_registration_in_progress() is None


class Reserved:
    """Records ``symm_rs.reserve`` calls, and the stream current during each."""

    def __init__(self, seal: bool) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.seal = seal

    def function(self) -> Any:
        if self.seal:

            def reserve(nbytes: int, group: Any, small_bytes: int = 0, seal: bool = False) -> int:
                self.calls.append((nbytes, group, seal, torch.cpu.current_stream()))
                return 1

        else:

            def reserve(nbytes: int, group: Any, small_bytes: int = 0) -> int:  # type: ignore[misc]
                self.calls.append((nbytes, group, None, torch.cpu.current_stream()))
                return 1

        return reserve


@pytest.mark.parametrize(("can_seal", "sealed_mode"), [(True, True), (True, False), (False, True)])
def test_sglang_prealloc_reserves_the_tp_groups_pool(
    can_seal: bool, sealed_mode: bool, sglang_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    reserved = Reserved(can_seal)
    monkeypatch.setattr(symm_rs, "reserve", reserved.function())
    monkeypatch.setenv("SYMM_RS_SEAL", "1" if sealed_mode else "0")
    em.publish_exec_comm(sglang_engine.rc, enable_symm_mem=True)
    stream = torch.cpu.Stream()
    kwargs = dict(is_draft_worker=False, enable_symm_mem=True, device="cpu", forward_stream=stream)
    sg.prealloc_symmetric_memory_pool(**kwargs)  # SGLANG_SYMM_MEM_PREALLOC_GB_SIZE unset: -1
    monkeypatch.setenv("SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", "3")
    sg.prealloc_symmetric_memory_pool(**{**kwargs, "is_draft_worker": True})
    sg.prealloc_symmetric_memory_pool(**{**kwargs, "enable_symm_mem": False})
    assert reserved.calls == []
    sg.prealloc_symmetric_memory_pool(**kwargs)
    assert len(reserved.calls) == 1
    nbytes, group, sealed, current = reserved.calls[0]
    # Sealed only in sealed mode, and only where reserve() can seal.
    expect_seal = (True if sealed_mode else False) if can_seal else None
    assert (nbytes, group, sealed) == (3 << 30, sglang_engine.tp_group, expect_seal)
    assert current == stream  # blocks are cached on the stream the forward passes use
    # SGLang's own use_symmetric_memory makes plain memory of a one-rank TP group, and with the
    # flag off: nothing to reserve then.
    sglang_engine.tp_group.world_size = 1
    sg.prealloc_symmetric_memory_pool(**kwargs)
    sglang_engine.tp_group.world_size = 2
    em.publish_exec_comm(sglang_engine.rc, enable_symm_mem=False)
    sg.prealloc_symmetric_memory_pool(**kwargs)
    assert len(reserved.calls) == 1


def test_sglang_debug_check_warns_once_per_stack_on_the_first_rank(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sg.set_symmetric_memory_enabled(True)
    monkeypatch.setattr(sg, "_debug_seen", set())
    outside = {"input": torch.zeros(4)}  # a CPU tensor lies in no window
    with caplog.at_level(logging.WARNING, logger=sg.__name__):
        sg.debug_check_symmetric_mempool(TpGroup(), outside, "all_reduce")  # variable unset
        assert caplog.text == ""
        monkeypatch.setenv("SGLANG_DEBUG_SYMM_MEM", "1")
        sg.debug_check_symmetric_mempool(TpGroup(is_first_rank=False), outside, "all_reduce")
        assert caplog.text == ""
        for _ in range(2):  # the same call stack twice: one warning
            sg.debug_check_symmetric_mempool(TpGroup(), outside, "all_reduce")
    assert caplog.text.count("[SymmMem Debug] all_reduce: 1 tensor(s) are NOT") == 1
    assert "'input'" in caplog.text
    monkeypatch.setenv("SYMM_RS_STRICT", "1")
    with pytest.raises(symm_rs.SymmetricMemoryError, match="all_reduce"):
        sg.debug_check_symmetric_mempool(TpGroup(), outside, "all_reduce")


# -- vLLM's configuration, loaded from its own files -------------------------------------------


@pytest.fixture
def vllm_engine(engine_roots: dict) -> Any:
    """vLLM's ``envs`` (and the modules its allocator imports) from its own files, a stand-in
    platform, the shim at the allocator module's name, and vLLM's own allocator module beside
    it (``engine.own``)."""
    pytest.importorskip("packaging")  # vLLM's allocator module imports packaging.version
    root = engine_roots["vllm"]
    platform = em.Platform(cuda=True)
    with em.Engine("vllm", root) as engine:
        engine.standins(em.vllm_standins(platform))
        engine.load(*em.VLLM_PYNCCL)
        own = _load_own_allocator(root, "vllm")
        engine.install_shim(vl)
        yield types.SimpleNamespace(own=own, platform=platform, root=root)


@pytest.mark.parametrize("raw", [None, "0", "1", "true"])
def test_vllm_flag_follows_vllm_envs(raw: Any, vllm_engine: Any, monkeypatch: Any) -> None:
    if raw is not None:
        monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", raw)
    answer = _same_decision(
        vllm_engine.own.is_symmetric_memory_enabled, vl.is_symmetric_memory_enabled
    )
    assert answer == {None: False, "0": False, "1": True, "true": ValueError}[raw]


def test_vllm_flag_is_off_on_other_platforms(vllm_engine: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", "1")
    vllm_engine.platform.cuda = False
    assert not vl.is_symmetric_memory_enabled()  # at once (vLLM's: after its compile fails)
    assert vl.get_nccl_mem_pool() is None
    vllm_engine.own.compile_nccl_allocator()
    vl.compile_nccl_allocator()
    assert (
        _same_decision(vllm_engine.own.is_symmetric_memory_enabled, vl.is_symmetric_memory_enabled)
        is False
    )
    context = vl.nccl_symm_mem_context(TpGroup())
    assert context.disabled and context.pynccl_comm is None  # as vLLM's disabled context


def test_vllm_context_is_a_no_op_when_off_or_one_rank(vllm_engine: Any, monkeypatch: Any) -> None:
    assert vl.nccl_symm_mem_context(TpGroup()).disabled
    monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", "1")
    assert vl.nccl_symm_mem_context(TpGroup(world_size=1)).disabled
    with vl.nccl_symm_mem_context(TpGroup(), disabled=True) as context:
        assert context.disabled
    assert not vl.is_symmetric_memory_tensor(torch.zeros(2))


_DISABLED_VLLM_COMMUNICATOR = """
import sys, types
from pathlib import Path
sys.path[:0] = sys.argv[3:]
import engine_modules as em
import pytest
import symm_rs
from symm_rs.compat import vllm as vl

root, stand_in = Path(sys.argv[1]), sys.argv[2]
with em.Engine("vllm", root) as engine:
    engine.standins(em.vllm_standins(em.Platform(cuda=True)))
    engine.load(
        "vllm.envs", "vllm.logging_utils", "vllm.logger", "vllm.utils.nccl",
        "vllm.distributed.device_communicators.pynccl_wrapper",
        "vllm.distributed.device_communicators.pynccl",
    )
    engine.install_shim(vl)
    pynccl = sys.modules["vllm.distributed.device_communicators.pynccl"]
    group = em.StatelessProcessGroup()
    group.rank, group.world_size = 0, 2
    comm = pynccl.PyNcclCommunicator(group, device=0, library_path=stand_in)
    assert comm.available is False and not hasattr(comm, "comm")
    with pytest.raises(ValueError, match=r"is disabled .*2\\.29\\.7"):
        symm_rs.groups.resolve_comm(comm)
    with pytest.raises(ValueError, match="PyNcclCommunicator is disabled"):
        symm_rs.groups.resolve_comm(types.SimpleNamespace(pynccl_comm=comm))
print("DISABLED OK")
"""


def test_vllm_own_disabled_communicator_gets_a_reason(
    engine_roots: dict, stand_in_lib: Path
) -> None:
    """vLLM's own PyNcclCommunicator on an NCCL without ncclCommSuspend (the stand-in, 2.28.9)
    disables itself; symm_rs then says it is disabled and why, not that it is the wrong kind.
    In a process of its own: the stand-in libnccl it loads must not stay in this one (doctor's
    tests read the libraries this process has mapped)."""
    import subprocess

    pytest.importorskip("packaging")
    here = str(Path(__file__).resolve().parent)
    scripts = str(Path(__file__).resolve().parents[2] / "scripts")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _DISABLED_VLLM_COMMUNICATOR,
            str(engine_roots["vllm"]),
            str(stand_in_lib),
            here,
            scripts,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "DISABLED OK" in done.stdout, done.stdout + done.stderr


def test_a_disabled_one_rank_communicator_says_so() -> None:
    comm = types.SimpleNamespace(available=False, disabled=True, world_size=1)
    with pytest.raises(ValueError, match=r"disabled .*spans one rank"):
        groups.resolve(comm)
    with pytest.raises(TypeError, match="group must be"):
        groups.resolve(types.SimpleNamespace(world_size=2))  # not an engine communicator


# -- without the engines ----------------------------------------------------------------------


def test_sglang_not_installed_is_the_shim_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # No SGLang at all: the shim is used on its own (symm_rs's engine suite, the decode-step
    # bench), on unless set_symmetric_memory_enabled(False). SGLang installed with a broken
    # import chain is SGLang's default instead (off: the test above).
    monkeypatch.setitem(sys.modules, "sglang", None)
    assert sg.is_symmetric_memory_enabled()
    sg.set_symmetric_memory_enabled(False)
    try:
        assert isinstance(sg.use_symmetric_memory(TpGroup()), contextlib.nullcontext)
    finally:
        sg.set_symmetric_memory_enabled(None)
    assert sg.is_allocation_symmetric()
    assert sg._env_value("SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", -1, sg._parse_int) == -1
    monkeypatch.setenv("SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", "2")
    assert sg._env_value("SGLANG_SYMM_MEM_PREALLOC_GB_SIZE", -1, sg._parse_int) == 2
    with pytest.raises(ImportError):  # no group given, and no SGLang to ask for its TP group
        sg.prealloc_symmetric_memory_pool(
            is_draft_worker=False, enable_symm_mem=True, device="cpu", forward_stream=None
        )


@pytest.mark.parametrize(("raw", "expect"), [(None, False), ("0", False), ("1", True)])
def test_vllm_without_the_engine_parses_as_vllm(
    raw: Any, expect: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(vl, "_platform_is_cuda", lambda: True)
    if raw is not None:
        monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", raw)
    assert vl.is_symmetric_memory_enabled() is expect


def test_vllm_without_the_engine_rejects_what_vllm_rejects(monkeypatch: Any) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setenv("VLLM_USE_NCCL_SYMM_MEM", "true")
    with pytest.raises(ValueError):  # vLLM's own parse is int(): it raises on "true" too
        vl.is_symmetric_memory_enabled()


# -- exact checks -----------------------------------------------------------------------------


class Windows:
    """Stands in for the native segment table: which communicators hold a window on a range."""

    def __init__(self, windows: dict[int, set[int]], innermost: Any = None) -> None:
        self.windows, self.innermost = windows, innermost

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_native, "innermost_comm", lambda: self.innermost)
        monkeypatch.setattr(
            _native, "window_comms", lambda ptr, n: sorted(self.windows.get(ptr, ()))
        )
        monkeypatch.setattr(
            _native, "is_registered", lambda ptr, n, comm: comm in self.windows.get(ptr, ())
        )


def test_exact_check_asks_the_innermost_context_else_any(monkeypatch: Any) -> None:
    windows = Windows({0x1000: {0xA}, 0x2000: set()})
    windows.install(monkeypatch)
    assert _common.extent_in_window(0x1000, 64)  # no context: any communicator's window
    assert not _common.extent_in_window(0x2000, 64)  # a pool block nobody registered
    assert not _common.extent_in_window(0x1000, 0)
    windows.innermost = 0xB  # inside a context of another group: its windows only
    assert not _common.extent_in_window(0x1000, 64)
    windows.innermost = 0xA
    assert _common.extent_in_window(0x1000, 64)
    assert not _common.extent_in_window(0x1000, 64, comm=0xB)  # an explicit communicator
    assert not sg.is_tensor_in_symmetric_mempool(torch.zeros(4))  # host memory: never


def test_mem_pool_is_the_pool_the_contexts_allocate_from(monkeypatch: Any) -> None:
    made: list[tuple[Any, ...]] = []
    monkeypatch.setattr(
        _common.pool, "shared_pool", lambda device=None, peers=0: made.append((device, peers))
    )
    monkeypatch.setattr(
        _common.groups,
        "resolve",
        lambda g: None if g.world_size == 1 else groups.Group(1, g.world_size, 0, 3, "g", None, 7),
    )
    monkeypatch.setattr(_common._last, "group", None)
    sg.get_nccl_mem_pool()  # no context yet: the any-group pool of the current device
    _common.note_group(TpGroup())
    sg.get_nccl_mem_pool()  # the last context's group: its device and peer set
    _common.note_group(TpGroup(world_size=1))
    sg.get_nccl_mem_pool()
    assert made == [(None, 0), (3, 7), (None, 0)]


def test_vllm_set_graph_pool_registers_what_captures_postponed(monkeypatch: Any) -> None:
    """Outside a capture, each communicator the contexts used is asked to register what is
    pending, in first-use order (vLLM calls this on every rank before each capture)."""
    registered: list[Any] = []
    monkeypatch.setattr(vl.context, "register", registered.append)
    monkeypatch.setattr(vl.context, "set_graph_pool", lambda pool: None)
    monkeypatch.setattr(vl, "_comms", vl.weakref.WeakKeyDictionary())
    first, second = TpGroup(), TpGroup()
    for comm in (first, second, first):
        vl._comms.setdefault(comm)
    vl.set_graph_pool_id((0, 1))
    assert registered == [first, second]


# -- the GPU suite, dry-run ---------------------------------------------------------------------


@pytest.fixture
def gpu_suite() -> Any:
    gpu_dir = str(Path(__file__).resolve().parents[1] / "gpu")
    sys.path.insert(0, gpu_dir)
    try:
        import suite_engines_own

        yield suite_engines_own
    finally:
        sys.path.remove(gpu_dir)


def test_gpu_suite_carries_what_it_imports(gpu_suite: Any) -> None:
    carried = extract_engines.CARRY_MODULES
    assert set(gpu_suite.SGLANG_MODULES) <= set(carried["sglang"])
    assert set(gpu_suite.VLLM_MODULES) <= set(carried["vllm"])


def test_carry_copies_only_what_the_gpu_suite_imports(engine_roots: dict, tmp_path: Path) -> None:
    made = extract_engines.carry(dest=tmp_path)
    files = [p for p in tmp_path.rglob("*.py")]
    assert set(made) == {"sglang", "vllm"}
    assert len(files) == sum(len(m) for m in extract_engines.CARRY_MODULES.values())
    assert sum(p.stat().st_size for p in files) < 4 << 20  # well under a device call's 64 MiB


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_gpu_suite_loads_the_engines_own_communicator_with_the_shim(
    engine: str, engine_roots: dict, gpu_suite: Any
) -> None:
    loaded = gpu_suite.load_engine(engine, str(engine_roots[engine]))
    try:
        assert sys.modules[em.ALLOCATOR[engine]] is SHIMS[engine]
        assert loaded.pynccl.__file__.startswith(str(engine_roots[engine]))
        cls = loaded.pynccl.PyNcclCommunicator
        # The arguments the suite passes to the engine's own methods bind.
        x = torch.zeros(2)
        inspect.signature(cls).bind(group=None, device=0)
        inspect.signature(cls.all_gather).bind(None, x, x)
        inspect.signature(cls.reduce_scatter).bind(None, x, x)
        if engine == "vllm":
            inspect.signature(cls.all_reduce).bind(None, x, x)
            assert callable(loaded.pynccl.register_nccl_symmetric_ops)
            with loaded.cudagraph_pool.capture_pool(
                (0, 5), types.SimpleNamespace(use_cumem_cudagraph_pool=False)
            ) as pool:
                assert pool == (0, 5)
        else:
            inspect.signature(cls.all_reduce).bind(None, x)
            assert "change_state" in vars(cls)
            em.publish_exec_comm(loaded.runtime_context, enable_symm_mem=True)
            assert sg.is_symmetric_memory_enabled()
    finally:
        loaded.engine.close()
        vl.set_graph_pool_id(None)


def _asked_of_stand_ins(path: Path, standins: dict[str, dict[str, Any]]) -> list[str]:
    """``file:line module.name`` for each name ``path`` imports from a stand-in module, or asks
    of ``current_platform``, that the stand-in lacks (imports inside functions included)."""
    missing = []
    tree = ast.parse(path.read_text(), filename=str(path))
    platform = standins.get("vllm.platforms", {}).get("current_platform")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in standins:
            for alias in node.names:
                if alias.name != "*" and alias.name not in standins[node.module]:
                    missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
        elif (
            platform is not None
            and isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "current_platform"
            and not hasattr(platform, node.attr)
        ):
            missing.append(f"{path.name}:{node.lineno} current_platform.{node.attr}")
    return missing


# Names the carried files ask only on paths the suite never takes: SGLang's runtime_context
# projects ServerArgs into its configuration there, and the suite publishes its own ExecContext.
NEVER_ASKED_ON_THE_SUITES_PATH = {
    "sglang.srt.arg_groups.arg_utils.namespace_of",
    "sglang.srt.arg_groups.arg_utils._NO_DEFAULT",
}


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_stand_ins_answer_every_name_the_carried_code_asks(engine: str, engine_roots: dict) -> None:
    """The GPU suite runs the engines' own files on stand-ins for the rest of each engine, so a
    name a stand-in lacks fails only there, at run time (vLLM's NCCL dtype table asked
    ``current_platform.fp8_dtype()`` on a GPU with NCCL 2.30.7). Found here by parsing."""
    if engine == "sglang":
        standins = {**em.sglang_standins(), **em.sglang_config_standins(force=True)}
    else:
        standins = em.vllm_standins()
    missing = []
    for module in extract_engines.CARRY_MODULES[engine]:
        missing += _asked_of_stand_ins(
            extract_engines.module_file(engine_roots[engine], module), standins
        )
    missing = [m for m in missing if m.split()[1] not in NEVER_ASKED_ON_THE_SUITES_PATH]
    assert not missing, f"stand-ins lack what {engine}'s own files ask: {missing}"


def test_a_name_a_stand_in_lacks_is_found(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from vllm.x import a, b\n    return current_platform.nope()\n")
    standins = {"vllm.x": {"a": 1}, "vllm.platforms": {"current_platform": em.Platform()}}
    assert _asked_of_stand_ins(source, standins) == [
        "m.py:2 vllm.x.b",
        "m.py:3 current_platform.nope",
    ]


def test_vllm_dtype_table_answers_every_dtype_it_lists(vllm_engine: Any) -> None:
    """vLLM's own ``ncclDataTypeEnum.from_torch`` on the stand-in platform (its first
    all-reduce asks it)."""
    wrapper = sys.modules["vllm.distributed.device_communicators.pynccl_wrapper"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.float8_e4m3fn):
        assert isinstance(wrapper.ncclDataTypeEnum.from_torch(dtype), int)
