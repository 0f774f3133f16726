"""Reads an engine's own source and checks it against a shim: what the contract tests run.

Nothing here is listed by hand. ``find_uses`` parses every file of the engine that mentions its
allocator module and collects

* each name imported from it (``from ... import a as b``, relative imports included),
* each call of such a name: directly, through the module (``import ... as m; m.a(...)``), or
  through an alias the file assigns (``self.a = a`` and later ``obj.a(...)``, as SGLang's
  ``GroupCoordinator`` does).

``check`` then asks of the shim: does every imported name exist, and does every call bind to
the shim's signature (``inspect.Signature.bind``) with the engine's positional and keyword
arguments? Every problem names the file, line and source of the call site.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional


@dataclass(frozen=True)
class Import:
    path: str  # relative to the engine's source root
    line: int
    name: str  # the name in the allocator module


@dataclass(frozen=True)
class CallSite:
    path: str
    line: int
    name: str
    text: str  # the call's source, as ast.unparse writes it
    positional: int  # positional arguments before any *args
    keywords: tuple[str, ...]
    open_ended: bool  # *args or **kwargs: only what is spelled out can be checked

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Uses:
    imports: list[Import]
    calls: list[CallSite]

    def names(self) -> set[str]:
        return {i.name for i in self.imports} | {c.name for c in self.calls}


def _module_of(root: Path, path: Path) -> tuple[str, bool]:
    """Dotted module name of ``path`` and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> Optional[str]:
    if node.level == 0:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package):
        return None
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _file_uses(root: Path, path: Path, allocator: str) -> Uses:
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    module, is_package = _module_of(root, path)
    parent, _, leaf = allocator.rpartition(".")
    imports: list[Import] = []
    names: dict[str, str] = {}  # local name -> allocator name
    modules: set[str] = set()  # local dotted names bound to the allocator module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, is_package)
            for alias in node.names:
                if source == allocator:
                    imports.append(Import(rel, node.lineno, alias.name))
                    names[alias.asname or alias.name] = alias.name
                elif source == parent and alias.name == leaf:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == allocator:
                    modules.add(alias.asname or alias.name)
    # Aliases the file makes of an imported function: ``f = name`` or ``obj.f = name``.
    attributes: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            target_name = names.get(node.value.id)
            if target_name is None:
                continue
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = target_name
                elif isinstance(target, ast.Attribute):
                    attributes[target.attr] = target_name
    calls: list[CallSite] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node.value) in modules:
            # m.name, called or not: the name must exist in the shim.
            imports.append(Import(rel, node.lineno, node.attr))
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name: Optional[str] = None
        if isinstance(func, ast.Name):
            name = names.get(func.id)
        elif isinstance(func, ast.Attribute):
            if _dotted(func.value) in modules:
                name = func.attr
            else:
                name = attributes.get(func.attr)
        if name is None:
            continue
        positional = 0
        open_ended = False
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                open_ended = True
                break
            positional += 1
        keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
        open_ended = open_ended or any(k.arg is None for k in node.keywords)
        calls.append(
            CallSite(rel, node.lineno, name, ast.unparse(node), positional, keywords, open_ended)
        )
    return Uses(imports, calls)


def find_uses(root: Path, allocator: str) -> Uses:
    """Every import from and call into ``allocator`` in the sources under ``root``, in file
    order (the allocator module itself excluded)."""
    leaf = allocator.rpartition(".")[2]
    own = root.joinpath(*allocator.split(".")).with_suffix(".py")
    uses = Uses([], [])
    for path in sorted(root.rglob("*.py")):
        if path == own:
            continue
        # Only a file that spells the module's name can import it (dynamic imports included).
        if leaf not in path.read_text(encoding="utf-8", errors="replace"):
            continue
        found = _file_uses(root, path, allocator)
        uses.imports.extend(found.imports)
        uses.calls.extend(found.calls)
    return uses


_ARG = object()


def bind_problem(target: Any, site: CallSite) -> Optional[str]:
    """Why ``site``'s arguments do not bind to ``target``'s signature, or ``None``."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError) as e:
        return f"{site.where}: {site.text}: the shim's {site.name} has no signature ({e})"
    args = [_ARG] * site.positional
    kwargs = dict.fromkeys(site.keywords, _ARG)
    try:
        if site.open_ended:
            signature.bind_partial(*args, **kwargs)
        else:
            signature.bind(*args, **kwargs)
    except TypeError as e:
        return f"{site.where}: {site.text}: does not bind to the shim's {site.name}{signature}: {e}"
    return None


def check(uses: Uses, shim: ModuleType) -> list[str]:
    """Every way ``uses`` does not fit ``shim``, each naming its call site."""
    problems: list[str] = []
    for imported in uses.imports:
        if imported.name != "*" and not hasattr(shim, imported.name):
            problems.append(
                f"{imported.path}:{imported.line}: uses {imported.name!r} from the allocator "
                f"module, and {shim.__name__} has no such name"
            )
    for site in uses.calls:
        target = getattr(shim, site.name, None)
        if target is None:
            problems.append(
                f"{site.where}: {site.text}: calls {site.name!r}, and {shim.__name__} has no "
                "such name"
            )
            continue
        problem = bind_problem(target, site)
        if problem is not None:
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class Definition:
    name: str
    line: int
    calls: tuple[tuple[int, tuple[str, ...]], ...]  # (positional count, keyword names) variants


def public_definitions(path: Path) -> list[Definition]:
    """The public functions and classes the engine's allocator module defines, each with the
    calls its own signature allows: every parameter by position where it may be (keyword-only
    ones by name), and every parameter by name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[Definition] = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        function: Optional[ast.FunctionDef] = node if isinstance(node, ast.FunctionDef) else None
        drop_self = isinstance(node, ast.ClassDef)
        if isinstance(node, ast.ClassDef):
            inits = [
                n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"
            ]
            if not inits:
                found.append(Definition(node.name, node.lineno, ((0, ()),)))
                continue
            function = inits[0]
        assert function is not None
        a = function.args
        params = [p.arg for p in [*a.posonlyargs, *a.args]]
        only = len(a.posonlyargs)
        if drop_self:
            params, only = params[1:], max(0, only - 1)
        keyword_only = tuple(p.arg for p in a.kwonlyargs)
        variants = ((len(params), keyword_only), (only, (*params[only:], *keyword_only)))
        found.append(Definition(node.name, node.lineno, variants))
    return found


def check_definitions(path: Path, rel: str, shim: ModuleType) -> list[str]:
    """Every public definition of the engine's allocator module is in ``shim`` and accepts every
    argument the engine's own signature accepts."""
    problems: list[str] = []
    for definition in public_definitions(path):
        target = getattr(shim, definition.name, None)
        if target is None:
            problems.append(
                f"{rel}:{definition.line}: the engine's module defines {definition.name!r}, "
                f"and {shim.__name__} has no such name"
            )
            continue
        for positional, keywords in definition.calls:
            site = CallSite(
                rel,
                definition.line,
                definition.name,
                f"{definition.name}(<{positional} positional>, {', '.join(keywords)})",
                positional,
                keywords,
                False,
            )
            problem = bind_problem(target, site)
            if problem is not None:
                problems.append(problem)
    return problems
