"""The SHA-256 by which the carrying scripts check what they fetch and carry
(``extract_engines.py``: the engines' wheels; ``carry_nccl.py``: libnccl and its parts)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``, read in 1 MiB chunks (libnccl is 250 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
