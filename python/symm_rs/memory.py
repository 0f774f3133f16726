"""Deprecated: ``symm_rs.memory`` was split into ``symm_rs.context`` (the context manager,
registration, reservation), ``symm_rs.pool`` (pools, stats), ``symm_rs.agreement`` (cross-rank
checks) and ``symm_rs.env`` (``parse_bytes``). Its names still resolve here, with a warning;
import them from ``symm_rs`` instead."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = {
    "use_symmetric_memory": "context",
    "register": "context",
    "reserve": "context",
    "is_symmetric": "context",
    "release": "groups",
    "shared_pool": "pool",
    "destroy_pool": "pool",
    "pool_usage": "pool",
    "stats": "pool",
    "verify_pending": "agreement",
    "check_layout": "agreement",
    "parse_bytes": "env",
}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'symm_rs.memory' has no attribute {name!r}")
    warnings.warn(
        f"symm_rs.memory.{name} moved to symm_rs.{module}.{name} (and symm_rs.{name} where it "
        "is public); symm_rs.memory will go away",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"symm_rs.{module}"), name)
