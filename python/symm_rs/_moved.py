"""Names that moved, still reachable from where they were for one release, with a
``DeprecationWarning`` that says where they live now (listed in CHANGELOG.md)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(owner: str, name: str, homes: dict[str, str], public: bool = False) -> Any:
    """``name`` looked up on module ``owner``, which no longer has it: its value from
    ``symm_rs.<homes[name]>``, with a warning pointing there.

    Raises:
        AttributeError: ``name`` is not one that moved.
    """
    home = homes.get(name)
    if home is None:
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")
    where = f"symm_rs.{home}.{name}"
    hint = "" if public else " (it left the public face)"
    warnings.warn(
        f"{owner}.{name} is deprecated{hint} and goes in the next release; use {where}",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(f"symm_rs.{home}"), name)
