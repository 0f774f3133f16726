"""The ``_native.pyi`` stub and the compiled module name the same things."""

from __future__ import annotations

import ast
import pathlib

import symm_rs
from symm_rs import _native

STUB = pathlib.Path(symm_rs.__file__).with_name("_native.pyi")
if not STUB.exists():  # running from a checkout whose package is installed elsewhere
    STUB = pathlib.Path(__file__).parents[1] / "python" / "symm_rs" / "_native.pyi"


def _stub_names() -> set[str]:
    tree = ast.parse(STUB.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _module_names() -> set[str]:
    return {n for n in dir(_native) if not n.startswith("_") or n == "__version__"}


def test_every_stub_name_exists_in_the_module() -> None:
    assert _stub_names() - _module_names() == set()


def test_every_module_name_is_in_the_stub() -> None:
    assert _module_names() - _stub_names() == set()


def test_every_public_name_is_exported() -> None:
    missing = [name for name in symm_rs.__all__ if not hasattr(symm_rs, name)]
    assert missing == []
