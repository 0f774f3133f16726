"""The ``SYMM_RS_*`` environment variables: the one place that reads, parses and validates them
(the Rust core reads none; what it needs is passed to it).

Nothing here imports torch, and the native module only when a variable whose values are a Rust
table is set (``SYMM_RS_POLICY_TABLE``, ``SYMM_RS_CP_COPY``), so ``doctor`` and the command line
can check the environment before anything heavy is loaded.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from symm_rs._units import parse_bytes, parse_flag, parse_seconds
from symm_rs.errors import SettingError, SettingWarning

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
SEAL = "SYMM_RS_SEAL"
ON_FAILURE = "SYMM_RS_ON_FAILURE"
ON_FAILURE_CHOICES = ("log", "abort")
# What SYMM_RS_TIMEOUT stands for when unset: every cross-rank wait and the native side's own.
DEFAULT_TIMEOUT_S = 30.0

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


def read_timeout(environ: Optional[Mapping[str, str]] = None) -> float:
    """``SYMM_RS_TIMEOUT`` in seconds, ``DEFAULT_TIMEOUT_S`` when unset.

    Raises:
        ValueError: it is not a positive number of seconds (the message names it).
    """
    value = read_seconds(TIMEOUT, environ)
    return DEFAULT_TIMEOUT_S if value is None else value


def read_verify(environ: Optional[Mapping[str, str]] = None) -> bool:
    """``SYMM_RS_VERIFY``: whether ranks agree before they register (on unless set off).

    Raises:
        ValueError: it is not a boolean (the message names it).
    """
    return read_flag(VERIFY, default=True, environ=environ)


def read_nccl_library(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``SYMM_RS_NCCL_LIBRARY``, the libnccl to prefer, or ``None`` when unset or empty."""
    return _environ(environ).get(NCCL_LIBRARY, "").strip() or None


def read_cp_copy(environ: Optional[Mapping[str, str]] = None) -> str:
    """``SYMM_RS_CP_COPY``: how the CP all-gather issues its copies (``"kernel"`` when unset).
    Read at every gather.

    Raises:
        ValueError: it is not one of the Rust core's copy modes (the message names it).
    """
    return read_choice(CP_COPY, __getattr__("CP_COPY_CHOICES"), environ)


def __getattr__(name: str) -> Any:
    # The Rust core's table, loaded only when asked for: ``import symm_rs`` loads no native
    # module unless a variable needs it.
    if name == "CP_COPY_CHOICES":
        from symm_rs._native import CP_COPY_MODES

        return CP_COPY_MODES
    raise AttributeError(f"module 'symm_rs.env' has no attribute {name!r}")


def read_policy_table(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """``SYMM_RS_POLICY_TABLE`` checked (``symm_rs.policy.PolicyTable.parse``), or ``None``
    when unset or empty.

    Raises:
        ValueError: it is not a table (the message names the variable).
    """
    value = _environ(environ).get(POLICY_TABLE, "").strip()
    if not value:
        return None
    # The table names the Rust core's collectives, so it loads the native module: imported
    # here, so that ``import symm_rs`` loads it only when this variable is set.
    from symm_rs.policy import PolicyTable

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
            try:
                if name == CP_COPY:
                    read_cp_copy(env)
                else:
                    read_choice(
                        name, REGISTER_CHOICES if name == REGISTER else ON_FAILURE_CHOICES, env
                    )
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
