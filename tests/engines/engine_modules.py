"""Imports parts of an engine's own source (unpacked from its pinned wheel) as the engine's
modules, with small stand-ins for the rest of the engine and for third-party packages.

The contract tests load the engines' configuration code this way on a CPU (SGLang's
``runtime_context`` and ``environ``, vLLM's ``envs``), and tests/gpu/suite_engines_own.py loads
the engines' own ``PyNcclCommunicator``. Everything is undone by ``Engine.close``::

    with Engine("vllm", root) as engine:
        engine.standins(vllm_standins())
        engine.install_shim(symm_rs.compat.vllm)
        pynccl = engine.load("vllm.distributed.device_communicators.pynccl")

Packages on the way to a loaded module are empty stand-ins whose ``__path__`` is the unpacked
folder, so that importing ``sglang.srt.runtime_context`` runs that file and not
``sglang/__init__.py`` (which imports most of SGLang).
"""

from __future__ import annotations

import ast
import importlib
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

import extract_engines  # noqa: E402  (scripts/ is not a package)

ALLOCATOR = extract_engines.ALLOCATOR


def carried_root(name: str) -> Optional[Path]:
    """The engine's files that ``extract_engines.py --carry`` copied into ``.engines/``, if
    they are there (a GPU machine has no network)."""
    version = extract_engines.pins()[name]
    root = extract_engines.CARRY_DIR / f"{name}-{version}"
    return root if (root / "SOURCE.json").exists() else None


class Engine:
    """Modules of one engine (``sglang`` or ``vllm``) in ``sys.modules``, until ``close``."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, Path(root)
        self._saved: dict[str, Optional[types.ModuleType]] = {}
        self._real: set[str] = set()
        self._prefixes = (name, "msgspec")
        for key in [k for k in sys.modules if self._ours(k)]:
            self._saved[key] = sys.modules.pop(key)

    def _ours(self, key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in self._prefixes)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for key in [k for k in sys.modules if self._ours(k)]:
            del sys.modules[key]
        sys.modules.update({k: v for k, v in self._saved.items() if v is not None})

    def _package(self, name: str) -> types.ModuleType:
        found = sys.modules.get(name)
        if found is not None:
            return found
        package = types.ModuleType(name)
        package.__path__ = [str(self.root.joinpath(*name.split(".")))]
        package.__package__ = name
        sys.modules[name] = package
        parent, _, leaf = name.rpartition(".")
        if parent:
            setattr(self._package(parent), leaf, package)
        return package

    def _parents(self, name: str) -> None:
        """Every package above ``name`` in ``sys.modules``: loaded ones for real, the rest as
        empty stand-ins over the engine's folders."""
        parts = name.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix in sys.modules:
                continue
            if prefix in self._real:
                importlib.import_module(prefix)
            else:
                self._package(prefix)

    def standins(self, modules: dict[str, dict[str, Any]]) -> None:
        """Puts a stand-in module with the given attributes at each name."""
        for name, attributes in modules.items():
            self._parents(name)
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
            parent, _, leaf = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], leaf, module)

    def install_shim(self, shim: types.ModuleType) -> None:
        """``shim`` in place of the engine's allocator module, as an engine switched to it."""
        name = ALLOCATOR[self.name]
        self._parents(name)
        sys.modules[name] = shim
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, shim)

    def load(self, *names: str) -> types.ModuleType:
        """Imports each of ``names`` from the engine's own files, in order; returns the last.
        Packages above them that are not among them are empty stand-ins, so a module they
        import from a package not stood in for runs that package's ``__init__`` for real."""
        self._real |= set(names)
        for name in names:
            self._parents(name)
        module: Optional[types.ModuleType] = None
        for name in names:
            module = importlib.import_module(name)
        assert module is not None
        return module


def compile_function(path: Path, name: str, namespace: Optional[dict[str, Any]] = None) -> Any:
    """Function ``name`` of the source file ``path``, compiled alone from the engine's own
    text (for a module that cannot be imported without most of the engine)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            code = compile(
                ast.Module(body=[node], type_ignores=[]),
                str(path),
                "exec",
                flags=importlib.import_module("__future__").annotations.compiler_flag,
                dont_inherit=True,
            )
            scope: dict[str, Any] = dict(namespace or {})
            exec(code, scope)
            return scope[name]
    raise LookupError(f"{path} defines no function {name!r}")


# -- third-party stand-ins --------------------------------------------------------------------


class _Field:
    def __init__(self, default: Any = None, default_factory: Optional[Callable[[], Any]] = None):
        self.default, self.default_factory = default, default_factory


class _Struct:
    """msgspec.Struct as SGLang's runtime context uses it: annotated fields with defaults,
    ``__struct_fields__``, keyword construction."""

    __struct_fields__: tuple[str, ...] = ()

    def __init_subclass__(cls, **options: Any) -> None:
        super().__init_subclass__()
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for field_name in vars(klass).get("__annotations__", {}):
                if field_name not in names and not field_name.startswith("_"):
                    names.append(field_name)
        cls.__struct_fields__ = tuple(names)
        cls._defaults = {n: cls.__dict__.get(n, getattr(cls, n, None)) for n in names}

    def __init__(self, **values: Any) -> None:
        for field_name in self.__struct_fields__:
            if field_name in values:
                value = values[field_name]
            else:
                default = self._defaults[field_name]
                if isinstance(default, _Field):
                    factory = default.default_factory
                    value = factory() if factory is not None else default.default
                else:
                    value = default
            object.__setattr__(self, field_name, value)


class _Derived:
    """Stands in for ``arg_utils.Derived`` (declarations of derived configuration)."""


class _Parallel:
    """Stands in for ``fields.parallel.Parallel``: declares no derived field."""


def sglang_config_standins(force: bool = False) -> dict[str, dict[str, Any]]:
    """What SGLang's ``runtime_context`` needs beyond its own package's light modules: nothing
    where ``msgspec`` is installed (its declarations in ``arg_groups`` then load for real), else
    a ``msgspec`` stand-in and stand-ins for the two declaration modules that need the real one
    (``force``: the stand-ins even where msgspec is installed, for a machine that has only the
    carried files)."""
    if not force:
        try:
            import msgspec  # noqa: F401
        except ImportError:
            pass
        else:
            return {}
    return {
        "msgspec": {"Struct": _Struct, "field": _Field},
        "sglang.srt.arg_groups.arg_utils": {"Derived": _Derived},
        "sglang.srt.arg_groups.fields.parallel": {"Parallel": _Parallel},
    }


# The SGLang modules whose own code decides whether symmetric memory is on.
SGLANG_CONFIG = (
    "sglang.srt.arg_groups.prefill_buffer_ceiling",
    "sglang.srt.environ",
    "sglang.srt.runtime_context",
)

# vLLM's own modules that its PyNcclCommunicator needs, in the order they load.
VLLM_PYNCCL = (
    "vllm.envs",
    "vllm.logging_utils",
    "vllm.logger",
    "vllm.utils.nccl",
    "vllm.distributed.device_communicators.pynccl_wrapper",
    "vllm.distributed.device_communicators.pynccl",
)


# -- engine stand-ins ---------------------------------------------------------------------------


class StatelessProcessGroup:
    """Stands in for the engines' ``StatelessProcessGroup`` (never used here: the communicators
    are built on a torch ``ProcessGroup``)."""

    rank: int = 0
    world_size: int = 1


def _current_stream() -> Any:
    import torch

    return torch.cuda.current_stream()


def publish_exec_comm(runtime_context: Any, **leaves: Any) -> None:
    """Publishes SGLang's ``exec`` namespace with an ``exec.comm`` bag holding ``leaves``, built
    with SGLang's own ``_ConfigBag`` as its ``publish`` leaves them (publishing a whole
    ``ServerArgs`` needs most of SGLang)."""
    rc = runtime_context
    bag, comm = rc._ConfigBag("exec"), rc._ConfigBag("exec.comm")
    for name, value in leaves.items():
        comm._set(name, value)
    bag._set_sub("comm", comm)
    rc.get_context()._config_bags = {"exec": bag}


def unpublish(runtime_context: Any) -> None:
    """SGLang's state before ``publish``: every namespace read raises ``ValueError``."""
    runtime_context.get_context()._config_bags = None


def sglang_standins(tp_group: Any = None) -> dict[str, dict[str, Any]]:
    """What SGLang's ``pynccl`` and the shim import from the rest of SGLang. ``tp_group`` is
    what ``parallel_state.get_tp_group()`` returns."""
    import torch

    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return {
        "sglang.srt.utils.common": {
            "get_current_device_stream_fast": _current_stream,
            "torch_release": release,
        },
        "sglang.srt.distributed.utils": {"StatelessProcessGroup": StatelessProcessGroup},
        "sglang.srt.distributed.parallel_state": {
            "get_tp_group": lambda: tp_group,
            "GroupCoordinator": object,
        },
        # SGLang's rule with DP attention off: every rank allocates the same sizes.
        "sglang.srt.layers.dp_attention": {"is_allocation_symmetric": lambda: True},
    }


def retired_server_args(root: Path) -> dict[str, dict[str, Any]]:
    """``sglang.srt.server_args`` with only its ``get_global_server_args``, compiled from
    SGLang's own file (the module imports most of SGLang)."""
    path = extract_engines.module_file(root, "sglang.srt.server_args")
    retired = compile_function(path, "get_global_server_args")
    return {"sglang.srt.server_args": {"get_global_server_args": retired}}


class Platform:
    """vLLM's ``current_platform``, reduced to what the loaded modules ask."""

    dispatch_key = "CUDA"

    def __init__(self, cuda: bool = True) -> None:
        self.cuda = cuda

    def is_cuda(self) -> bool:
        return self.cuda

    def is_rocm(self) -> bool:
        return False

    def is_cuda_alike(self) -> bool:
        return self.cuda

    def is_xpu(self) -> bool:
        return False

    def graph_pool_handle(self) -> Any:
        import torch

        return torch.cuda.graph_pool_handle()

    def fp8_dtype(self) -> Any:
        """vLLM's CUDA answer (``Platform.fp8_dtype``); its NCCL dtype table asks it."""
        import torch

        return torch.float8_e4m3fn

    def log_warnings(self) -> None:
        pass


_vllm_library: list[Any] = []
_vllm_library_lock = threading.Lock()


def _direct_register_custom_op(
    op_name: str,
    op_func: Callable[..., Any],
    mutates_args: Optional[list[str]] = None,
    fake_impl: Optional[Callable[..., Any]] = None,
    target_lib: Any = None,
    dispatch_key: Optional[str] = None,
    tags: tuple[Any, ...] = (),
) -> None:
    """``torch.ops.vllm.<op_name>`` dispatching to ``op_func`` on CUDA, as vLLM registers its
    custom ops."""
    import torch

    with _vllm_library_lock:
        if not _vllm_library:
            _vllm_library.append(torch.library.Library("vllm", "FRAGMENT"))
    library = target_lib or _vllm_library[0]
    schema = torch.library.infer_schema(op_func, mutates_args=mutates_args or [])
    library.define(op_name + schema, tags=tags)
    library.impl(op_name, op_func, dispatch_key=dispatch_key or "CUDA")
    if fake_impl is not None:
        library._register_fake(op_name, fake_impl)


def _is_torch_equal_or_newer(target: str) -> bool:
    """vLLM's answer: the running torch's version against ``target``, pre-releases included."""
    import torch
    from packaging import version

    return version.parse(str(torch.__version__)) >= version.parse(target)


def vllm_standins(platform: Optional[Platform] = None) -> dict[str, dict[str, Any]]:
    """What vLLM's ``pynccl``, ``pynccl_wrapper``, ``cudagraph_pool`` and ``envs`` import from
    the rest of vLLM."""

    def no_cumem_allocator() -> Any:
        raise RuntimeError("stand-in: vLLM's cuMem allocator (sleep mode) is not loaded")

    return {
        "vllm.platforms": {"current_platform": platform or Platform()},
        "vllm.distributed.utils": {"StatelessProcessGroup": StatelessProcessGroup},
        "vllm.utils.torch_utils": {
            "current_stream": _current_stream,
            "is_torch_equal_or_newer": _is_torch_equal_or_newer,
            "direct_register_custom_op": _direct_register_custom_op,
        },
        "vllm.config": {"VllmConfig": object},
        "vllm.device_allocator": {"get_mem_allocator_instance": no_cumem_allocator},
        # vLLM's logger asks it, lazily, when a message is logged once per node (seen on a GPU
        # with NCCL 2.30.7, where vLLM's PyNcclCommunicator logs its NCCL version that way).
        "vllm.distributed.parallel_state": {
            "is_global_first_rank": lambda: True,
            "is_local_first_rank": lambda: True,
        },
    }
