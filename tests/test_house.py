"""The house rules of the code itself (issue 22), checked so that they keep holding: rooms of one
job (file sizes, the split PyO3 surface, tooling outside the package), one crossing between the
languages on a group's first use, one source per table, no import loops, and a small typed face.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import symm_rs
from symm_rs import _native
from symm_rs import context as ctx
from symm_rs.groups import Group

ROOT = Path(__file__).resolve().parents[1]
RUST = ROOT / "rust" / "src"
PACKAGE = ROOT / "python" / "symm_rs"
MAX_LINES = 500


def _rust_files() -> list[Path]:
    return sorted(RUST.rglob("*.rs"))


def _python_files() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")])


def _product_rust(path: Path) -> str:
    """A Rust file without its tests: a test module file, or the part after ``#[cfg(test)]``."""
    if path.name == "tests.rs" or "tests" in path.relative_to(RUST).parts[:-1]:
        return ""
    return path.read_text().split("#[cfg(test)]", 1)[0]


# --- rooms of one job ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*_rust_files(), *_python_files()], ids=lambda p: p.name)
def test_no_file_is_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


def test_the_pyo3_surface_is_split_by_concern() -> None:
    python = RUST / "python"
    for concern in ("errors", "stats", "tensors", "communicator", "tables", "groups", "rules"):
        assert (python / f"{concern}.rs").is_file(), concern
    # The group cache is its own room, not the context's.
    assert "static GROUPS" in (python / "groups.rs").read_text()
    assert "static GROUPS" not in (python / "context.rs").read_text()


def test_the_boundary_passes_typed_handles_not_bare_integers() -> None:
    python = RUST / "python"
    assert "impl<'a, 'py> FromPyObject<'a, 'py> for CommPtr" in (python / "handles.rs").read_text()
    for path in sorted(python.glob("*.rs")):
        text = _product_rust(path)
        assert not re.search(r"\bcomm: usize\b", text), f"{path.name}: a bare usize communicator"


def test_tooling_lives_outside_the_package() -> None:
    assert not (PACKAGE / "bench").exists()
    assert not (PACKAGE / "launch.py").exists()
    assert (ROOT / "benches" / "symm_rs_bench" / "__init__.py").is_file()
    assert (ROOT / "benches" / "symm_rs_bench" / "launch.py").is_file()
    # The package imports nothing of the harness (the CLI finds it at run time, if present).
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or "", *(a.name for a in node.names)]
                assert not any(n.startswith("symm_rs_bench") for n in names), path.name


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str) -> Iterator[str]:
    """The symm_rs modules an import statement names (``from symm_rs import x`` names
    ``symm_rs.x`` when that is a module)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names if a.name.startswith("symm_rs"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("symm_rs"):
        yield node.module
        for alias in node.names:
            candidate = f"{node.module}.{alias.name}"
            if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").is_file():
                yield candidate


def _import_graph(with_local: bool) -> dict[str, set[str]]:
    """Each package module's imports of other package modules: at module level (not under
    ``TYPE_CHECKING``), plus those inside functions when ``with_local``."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        checking: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                checking |= {id(n) for n in ast.walk(node)}
        top = {id(n) for n in tree.body} | {
            id(n)
            for stmt in tree.body
            if isinstance(stmt, (ast.If, ast.Try))
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in checking or not (with_local or id(node) in top):
                continue
            edges |= {m for m in _imported(node, module) if m != module}
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # The package itself is imported by everything and imports nothing eagerly (PEP 562).
            if nxt == "symm_rs" or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_package_has_no_import_loop() -> None:
    assert _cycle(_import_graph(with_local=False)) == []


def test_no_import_inside_a_function_dodges_a_loop() -> None:
    # Were every import inside a function moved to the top, there would still be no loop: the
    # ones that stay inside functions are there to keep ``import symm_rs`` cheap, nothing else.
    assert _cycle(_import_graph(with_local=True)) == []


# --- one crossing -------------------------------------------------------------------------------


def test_rust_looks_up_no_python_function_by_name() -> None:
    imports: dict[str, set[str]] = {}
    for path in sorted((RUST / "python").glob("*.rs")):
        for name in re.findall(r'py\.import\("(symm_rs[\w.]*)"\)', _product_rust(path)):
            imports.setdefault(name, set()).add(path.name)
    # The exception classes (errors.rs); the context module, imported (not looked into) when a
    # caller reached the native class without it, so that it hands its rules over.
    assert imports == {"symm_rs.errors": {"errors.rs"}, "symm_rs.context": {"rules.rs"}}
    rules = (RUST / "python" / "rules.rs").read_text()
    assert "getattr" not in rules
    # Two functions on the first-use path, both handed over at import.
    context_rs = _product_rust(RUST / "python" / "context.rs")
    assert sorted(re.findall(r"\.(enter|exit)\b", context_rs.replace("rules(py)?\n", ""))) == [
        "enter",
        "exit",
    ]
    tree = ast.parse((PACKAGE / "context.py").read_text())
    handed = [
        ast.unparse(stmt)
        for stmt in tree.body
        if isinstance(stmt, ast.Expr) and "set_context_rules" in ast.unparse(stmt)
    ]
    assert handed == ["_native.set_context_rules(_enter, _exit, _verify_default)"]


class _End:
    def end(self) -> None:
        pass


def test_a_groups_first_use_crosses_into_symm_rs_python_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = 0x40C5E22
    group = Group(comm=comm, size=2, rank=0, device=0, name="house", peer_set=comm)
    monkeypatch.setattr(ctx, "resolve", lambda g: group)
    monkeypatch.setattr(ctx, "_enter_slow", lambda g, pool, nested=False: (_End(), None, 1))
    monkeypatch.setattr(ctx, "_exit_register", lambda g, lane, verify, timeout: None)
    crossings: list[str] = []
    package = str(PACKAGE.resolve().parent)
    installed = str(Path(symm_rs.__file__).resolve().parent.parent)
    here = sys._getframe()

    def profile(frame: Any, event: str, arg: Any) -> None:
        # A Python frame whose caller is this test's frame, entered while the test sits on a
        # ``with`` line: it was called by the native context.
        if event == "call" and frame.f_back is here:
            filename = str(Path(frame.f_code.co_filename).resolve())
            if filename.startswith((package, installed)):
                crossings.append(frame.f_code.co_name)

    use_symmetric_memory = symm_rs.use_symmetric_memory  # the lazy loader runs here, not below
    _native.forget_group(comm)
    try:
        sys.setprofile(profile)
        with use_symmetric_memory(comm):
            pass
        sys.setprofile(None)
    finally:
        sys.setprofile(None)
        _native.forget_group(comm)
    assert crossings == ["_enter", "_exit"]


# --- one source per table -----------------------------------------------------------------------

COLLECTIVE_NAMES = set(_native.COLLECTIVES)
REDUCE_NAMES = set(_native.REDUCE_OPS)
COPY_MODES = set(_native.CP_COPY_MODES)


def test_no_collective_name_maps_to_the_enum_outside_collective_rs() -> None:
    names = "|".join(sorted(COLLECTIVE_NAMES))
    arm = re.compile(rf'"({names})"\s*(=>|,\s*CollectiveKind)')
    for path in _rust_files():
        if path.name == "collective.rs":
            continue
        text = _product_rust(path)
        assert not arm.search(text), f"{path.relative_to(ROOT)} maps a collective name"
        quoted = set(re.findall(r'"(\w+)"', text))
        assert len(quoted & COLLECTIVE_NAMES) <= 1, f"{path.relative_to(ROOT)} lists collectives"
        assert len(quoted & REDUCE_NAMES) <= 1, f"{path.relative_to(ROOT)} lists reductions"


def _literal_strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Dict):
        items = [k for k in node.keys if k is not None]
    elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = node.elts
    else:
        return set()
    return {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_table_of_rust_names_in_python(path: Path) -> None:
    tree = ast.parse(path.read_text())
    exported = {  # a module's ``__all__`` lists its names, not a table
        id(n)
        for stmt in tree.body
        if isinstance(stmt, ast.Assign) and "__all__" in ast.unparse(stmt.targets[0])
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in exported:
            continue
        strings = _literal_strings(node)
        for table, names in (
            ("collectives", COLLECTIVE_NAMES),
            ("reductions", REDUCE_NAMES),
            ("CP copy modes", COPY_MODES),
        ):
            assert len(strings & names) <= 1, f"{path.name}:{node.lineno} lists {table}"  # type: ignore[attr-defined]


def test_every_environment_variable_is_read_in_env_py() -> None:
    read = re.compile(r"(os\.environ|getenv)[^\n]*SYMM_RS_")
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "env.py":
            assert not read.search(path.read_text()), f"{path.name} reads a SYMM_RS_ variable"
    for path in _rust_files():
        text = _product_rust(path)
        assert "env::var" not in text, f"{path.relative_to(ROOT)} reads the environment"


def test_the_tables_python_uses_come_from_rust() -> None:
    from symm_rs import calibration, cp, env, policy

    assert policy.OPS == _native.COLLECTIVES
    assert env.CP_COPY_CHOICES == _native.CP_COPY_MODES
    assert "_native.cp_plan(" in Path(cp.__file__).read_text()
    assert "_native.RouteTable(" in Path(policy.__file__).read_text()
    assert calibration.OPS is policy.OPS


# --- a small typed face -------------------------------------------------------------------------


def test_the_face_is_small_and_written_once() -> None:
    assert 20 <= len(symm_rs.__all__) <= 26
    assert symm_rs.__all__ == sorted(n for names in symm_rs._PUBLIC.values() for n in names)
    text = (PACKAGE / "__init__.py").read_text()
    for name in symm_rs.__all__:
        if name != "__version__":
            assert text.count(f'"{name}"') == 1, f"{name} is written more than once"


def test_every_exception_and_warning_is_defined_in_errors() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b) for b in node.bases]
                assert not any(b.endswith(("Error", "Warning", "Exception")) for b in bases), (
                    f"{path.name} defines {node.name}"
                )


def test_no_dict_access_to_typed_results() -> None:
    pattern = re.compile(r"(stats|library_info)\(\)\[")
    roots = [PACKAGE, ROOT / "benches", ROOT / "examples", ROOT / "scripts", ROOT / "tests" / "gpu"]
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            assert not pattern.search(path.read_text()), f"{path.relative_to(ROOT)}"


def test_the_guides_api_summary_is_the_public_face() -> None:
    guide = (ROOT / "docs" / "guide.md").read_text()
    table = guide.split("## API summary", 1)[1].split("\n\n", 2)[2].split("\n\n", 1)[0]
    named: set[str] = set()
    for row in table.splitlines()[2:]:
        first = row.split(" | ", 1)[0]
        named |= {re.split(r"[(.]", n)[0] for n in re.findall(r"`([^`]+)`", first)}
    assert named == set(symm_rs.__all__)
