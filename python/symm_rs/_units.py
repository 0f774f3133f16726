"""The text forms the ``SYMM_RS_*`` variables and the policy table use: byte sizes, booleans and
seconds. Nothing here imports anything of symm_rs, so every layer that reads such text can use
it (``symm_rs.env`` re-exports these)."""

from __future__ import annotations

import re

_SIZE_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def parse_bytes(text: str) -> int:
    """A byte count from ``"4GiB"``, ``"4g"``, ``"512M"``, ``"64 kb"`` or ``"1048576"``.

    Suffixes are binary (k = 1024) and case-insensitive; ``B``/``iB`` after them is optional.

    Raises:
        ValueError: the text is not a size.
    """
    match = _SIZE.fullmatch(text.lower())
    if match is None:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4GiB, 512MiB or 1048576)")
    return int(match.group(1)) * _SIZE_SUFFIX[match.group(2)]


def parse_flag(text: str) -> bool:
    """``True`` for 1/true/yes/on, ``False`` for 0/false/no/off or empty (case-insensitive).

    Raises:
        ValueError: anything else.
    """
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use 1 or 0, true or false, yes or no, on or off)")


def parse_seconds(text: str) -> float:
    """A positive number of seconds (``"30"``, ``"2.5"``).

    Raises:
        ValueError: not a number, or not > 0.
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"not a number of seconds: {text!r} (use e.g. 30 or 2.5)") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"seconds must be a finite number > 0; got {text!r}")
    return value


def format_bytes(nbytes: int) -> str:
    """The shortest exact form ``parse_bytes`` reads back: ``"32K"``, ``"2M"``, ``"1G"``, or
    the plain number."""
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if nbytes and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift}{unit}"
    return str(nbytes)
