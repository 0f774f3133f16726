"""The ``SYMM_RS_*`` environment variables: the one place that parses and validates them.

Nothing here imports torch or the native module, so ``doctor`` and the command line can check
the environment before anything heavy is loaded.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

PREFIX = "SYMM_RS_"

NCCL_LIBRARY = "SYMM_RS_NCCL_LIBRARY"
RESERVE = "SYMM_RS_RESERVE"
VERIFY = "SYMM_RS_VERIFY"
DEBUG = "SYMM_RS_DEBUG"
STRICT = "SYMM_RS_STRICT"
TIMEOUT = "SYMM_RS_TIMEOUT"
REGISTER = "SYMM_RS_REGISTER"
REGISTER_CHOICES = ("auto", "always")
POLICY_TABLE = "SYMM_RS_POLICY_TABLE"
CP_COPY = "SYMM_RS_CP_COPY"
CP_COPY_CHOICES = ("kernel", "driver")
SEAL = "SYMM_RS_SEAL"
ON_FAILURE = "SYMM_RS_ON_FAILURE"
ON_FAILURE_CHOICES = ("log", "abort")

# What each variable a user may set holds (README.md, "Environment variables").
VARIABLES: dict[str, str] = {
    NCCL_LIBRARY: "path of an existing libnccl file",
    RESERVE: "byte size, e.g. 4GiB, 512M or 1048576",
    VERIFY: "boolean (default on): 1/0, true/false, yes/no, on/off",
    DEBUG: "boolean: 1/0, true/false, yes/no, on/off",
    STRICT: "boolean: 1/0, true/false, yes/no, on/off",
    TIMEOUT: "seconds (> 0), e.g. 30 or 2.5",
    REGISTER: "auto (skip registration where NCCL cannot run symmetric kernels) or always",
    POLICY_TABLE: "size-policy table, e.g. all_reduce:32K-2M,128M-;reduce_scatter:32K-, or none "
    "(an empty table)",
    CP_COPY: "kernel (the CP all-gather's copies in one copy kernel launch per step) or driver",
    SEAL: "boolean: 1/0, true/false, yes/no, on/off (seal the pool SYMM_RS_RESERVE grew)",
    ON_FAILURE: "log (default) or abort (abort a group a peer failed in, through its owner)",
}
# Set by symm_rs itself for its own child processes, or by its test-suite; never a typo.
INTERNAL_VARIABLES = frozenset(
    {"SYMM_RS_TEST_NATIVE", "SYMM_RS_ENGINE_LOG_DIR", "SYMM_RS_TRANSPORT_LOG_DIR"}
)

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


def _environ(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def read_flag(
    name: str, default: bool = False, environ: Optional[Mapping[str, str]] = None
) -> bool:
    """The boolean variable ``name``, ``default`` when it is unset.

    Raises:
        ValueError: it is set to something that is not a boolean (the message names it).
    """
    value = _environ(environ).get(name)
    if value is None or not value.strip():  # set but empty reads as unset
        return default
    try:
        return parse_flag(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def read_bytes(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The byte-size variable ``name``, ``None`` when it is unset or empty.

    Raises:
        ValueError: it is set to something that is not a size (the message names it).
    """
    value = _environ(environ).get(name, "").strip()
    if not value:
        return None
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


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


def read_seconds(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """The seconds variable ``name``, ``None`` when it is unset or empty.

    Raises:
        ValueError: it is set to something that is not a positive number (the message names it).
    """
    value = _environ(environ).get(name, "").strip()
    if not value:
        return None
    try:
        return parse_seconds(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def read_choice(
    name: str, choices: tuple[str, ...], environ: Optional[Mapping[str, str]] = None
) -> str:
    """The variable ``name`` as one of ``choices`` (case-insensitive), the first when unset.

    Raises:
        ValueError: it holds something else (the message names it and the choices).
    """
    value = _environ(environ).get(name, "").strip().lower()
    if not value:
        return choices[0]
    if value not in choices:
        raise ValueError(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
    return value


def read_policy_table(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``SYMM_RS_POLICY_TABLE`` checked (``symm_rs.policy.PolicyTable.parse``), or ``None``
    when unset or empty.

    Raises:
        ValueError: it is not a table (the message names the variable).
    """
    value = _environ(environ).get(POLICY_TABLE, "").strip()
    if not value:
        return None
    from symm_rs.policy import PolicyTable  # no torch, no native module

    try:
        PolicyTable.parse(value)
    except ValueError as e:
        raise ValueError(f"{POLICY_TABLE}: {e}; or none for an empty table") from None
    return value


@dataclass(frozen=True)
class EnvIssue:
    """One finding about a ``SYMM_RS_*`` variable. ``fatal`` is ``False`` for a name symm_rs
    does not know (probably a typo: a warning), ``True`` for a value it cannot use."""

    name: str
    value: str
    message: str
    fatal: bool


def environment_issues(environ: Optional[Mapping[str, str]] = None) -> list[EnvIssue]:
    """Every ``SYMM_RS_*`` variable that is set, checked against what it must hold."""
    env = _environ(environ)
    issues: list[EnvIssue] = []
    for name in sorted(k for k in env if k.startswith(PREFIX)):
        value = env[name]
        if name == NCCL_LIBRARY:
            if value and not os.path.isfile(value):
                issues.append(EnvIssue(name, value, f"{name}={value}: no such file", fatal=True))
        elif name == RESERVE:
            try:
                read_bytes(name, env)
            except ValueError as e:
                issues.append(EnvIssue(name, value, str(e), fatal=True))
        elif name in (VERIFY, DEBUG, STRICT, SEAL):
            try:
                read_flag(name, environ=env)
            except ValueError as e:
                issues.append(EnvIssue(name, value, str(e), fatal=True))
        elif name == TIMEOUT:
            try:
                read_seconds(name, env)
            except ValueError as e:
                issues.append(EnvIssue(name, value, str(e), fatal=True))
        elif name in (REGISTER, CP_COPY, ON_FAILURE):
            choices = {REGISTER: REGISTER_CHOICES, CP_COPY: CP_COPY_CHOICES}.get(
                name, ON_FAILURE_CHOICES
            )
            try:
                read_choice(name, choices, env)
            except ValueError as e:
                issues.append(EnvIssue(name, value, str(e), fatal=True))
        elif name == POLICY_TABLE:
            try:
                read_policy_table(env)
            except ValueError as e:
                issues.append(EnvIssue(name, value, str(e), fatal=True))
        elif name not in INTERNAL_VARIABLES:
            known = ", ".join(VARIABLES)
            issues.append(
                EnvIssue(
                    name,
                    value,
                    f"{name} is not a symm_rs variable and is ignored (known: {known})",
                    fatal=False,
                )
            )
    return issues


def validate_environment(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """One message per ``SYMM_RS_*`` variable that is wrong: a value symm_rs cannot use, or a
    name it does not know. Empty when everything set is valid."""
    return [issue.message for issue in environment_issues(environ)]


class SettingWarning(UserWarning):
    """A ``SYMM_RS_*`` variable whose value symm_rs cannot use, or whose name it does not know:
    issued once, at ``import symm_rs``."""


class SettingError(ValueError):
    """A ``SYMM_RS_*`` value symm_rs cannot use, under ``SYMM_RS_STRICT=1``: raised by
    ``import symm_rs``."""


def _strict(env: Mapping[str, str]) -> bool:
    try:
        return read_flag(STRICT, environ=env)
    except ValueError:
        return False  # reported as a bad value of its own


def _running_command_line() -> bool:
    """Whether this process is ``python -m symm_rs`` or the ``symm-rs`` script, whose ``doctor``
    reports bad values itself and so must not be stopped by them at import."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("symm_rs", "symm_rs.cli"):
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "symm-rs"


def check_on_import(environ: Optional[Mapping[str, str]] = None) -> list[EnvIssue]:
    """What ``import symm_rs`` does with the environment: one ``SettingWarning`` per variable
    that is wrong (a value it cannot use, or an unknown name), each naming the variable and what
    it takes. Returns the issues found.

    Raises:
        SettingError: ``SYMM_RS_STRICT=1`` and some value cannot be used (every one is named),
            except in symm_rs's own command line, which reports them (``doctor``).
    """
    env = _environ(environ)
    issues = environment_issues(env)
    fatal = [issue for issue in issues if issue.fatal]
    if fatal and _strict(env) and not _running_command_line():
        raise SettingError(
            "; ".join(issue.message for issue in fatal)
            + f" ({STRICT}=1 makes this an error; unset it to get a warning instead)"
        )
    for issue in issues:
        warnings.warn(issue.message, SettingWarning, stacklevel=3)
    return issues
