"""Deprecated: ``symm_rs.memory`` was split into ``symm_rs.context`` (the context manager,
registration, reservation), ``symm_rs.pool`` (pools, stats), ``symm_rs.checks`` (cross-rank
checks) and ``symm_rs.env`` (``parse_bytes``). Its names still resolve here, with a warning;
import them from ``symm_rs`` instead."""

from __future__ import annotations

from typing import Any

from symm_rs._moved import moved

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
    "verify_pending": "checks",
    "check_layout": "checks",
    "parse_bytes": "env",
}


def __getattr__(name: str) -> Any:
    return moved("symm_rs.memory", name, _MOVED, public=True)
