"""``symm_rs.env``: the one parser of the SYMM_RS_* variables, and their validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from symm_rs import env


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4GiB", 4 << 30),
        ("4g", 4 << 30),
        ("4 GB", 4 << 30),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("64 kb", 64 << 10),
        ("1T", 1 << 40),
        ("1048576", 1 << 20),
        (" 8 ", 8),
        ("0", 0),
    ],
)
def test_byte_sizes(text: str, value: int) -> None:
    assert env.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["four gigs", "4.5GiB", "-1", "4 GiBs", "", "GiB", "4P"])
def test_bad_byte_sizes_name_the_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a byte size") as caught:
        env.parse_bytes(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("text", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_flags(text: str) -> None:
    assert env.parse_flag(text) is True


@pytest.mark.parametrize("text", ["0", "false", "False", "no", "off", ""])
def test_false_flags(text: str) -> None:
    assert env.parse_flag(text) is False


@pytest.mark.parametrize("text", ["2", "maybe", "enabled", "y"])
def test_bad_flags(text: str) -> None:
    with pytest.raises(ValueError, match="not a boolean"):
        env.parse_flag(text)


def test_readers_use_defaults_and_name_the_variable() -> None:
    assert env.read_flag(env.VERIFY, environ={}) is False
    assert env.read_flag(env.VERIFY, default=True, environ={}) is True
    assert env.read_flag(env.VERIFY, environ={env.VERIFY: "yes"}) is True
    with pytest.raises(ValueError, match="SYMM_RS_VERIFY: not a boolean: 'maybe'"):
        env.read_flag(env.VERIFY, environ={env.VERIFY: "maybe"})
    assert env.read_bytes(env.RESERVE, environ={}) is None
    assert env.read_bytes(env.RESERVE, environ={env.RESERVE: " "}) is None
    assert env.read_bytes(env.RESERVE, environ={env.RESERVE: "4GiB"}) == 4 << 30
    with pytest.raises(ValueError, match="SYMM_RS_RESERVE: not a byte size: 'lots'"):
        env.read_bytes(env.RESERVE, environ={env.RESERVE: "lots"})


def test_valid_environment_has_no_issues(tmp_path: Path) -> None:
    library = tmp_path / "libnccl.so.2"
    library.write_bytes(b"")
    environ = {
        "SYMM_RS_NCCL_LIBRARY": str(library),
        "SYMM_RS_RESERVE": "4GiB",
        "SYMM_RS_VERIFY": "1",
        "SYMM_RS_DEBUG": "off",
        "SYMM_RS_STRICT": "",
        "SYMM_RS_ENGINE_LOG_DIR": "/tmp/x",  # internal: set by the GPU suites for their ranks
        "NCCL_DEBUG": "INFO",  # not ours
        "PATH": "/usr/bin",
    }
    assert env.environment_issues(environ) == []
    assert env.validate_environment(environ) == []
    assert env.validate_environment({}) == []
    assert env.validate_environment({"SYMM_RS_NCCL_LIBRARY": ""}) == []  # empty = unset


def test_every_bad_value_is_a_fatal_issue(tmp_path: Path) -> None:
    environ = {
        "SYMM_RS_NCCL_LIBRARY": "/nowhere/libnccl.so.2",
        "SYMM_RS_RESERVE": "4 gigs",
        "SYMM_RS_VERIFY": "maybe",
        "SYMM_RS_DEBUG": "2",
        "SYMM_RS_STRICT": "enabled",
    }
    issues = {issue.name: issue for issue in env.environment_issues(environ)}
    assert set(issues) == set(environ)
    assert all(issue.fatal for issue in issues.values())
    assert issues["SYMM_RS_NCCL_LIBRARY"].message == (
        "SYMM_RS_NCCL_LIBRARY=/nowhere/libnccl.so.2: no such file"
    )
    assert "not a byte size: '4 gigs'" in issues["SYMM_RS_RESERVE"].message
    for name in ("SYMM_RS_VERIFY", "SYMM_RS_DEBUG", "SYMM_RS_STRICT"):
        assert issues[name].message.startswith(f"{name}: not a boolean")
    # A directory is not a library file either.
    [issue] = env.environment_issues({"SYMM_RS_NCCL_LIBRARY": str(tmp_path)})
    assert issue.fatal and "no such file" in issue.message


def test_unknown_names_are_warnings_that_list_the_known_ones() -> None:
    [issue] = env.environment_issues({"SYMM_RS_VERIFFY": "1"})
    assert not issue.fatal
    assert issue.message.startswith("SYMM_RS_VERIFFY is not a symm_rs variable")
    for known in env.VARIABLES:
        assert known in issue.message
    assert env.validate_environment({"SYMM_RS_VERIFFY": "1"}) == [issue.message]


def test_validate_environment_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYMM_RS_RESERVE", "lots")
    assert any("SYMM_RS_RESERVE" in p for p in env.validate_environment())
    monkeypatch.setenv("SYMM_RS_RESERVE", "1g")
    assert not any("SYMM_RS_RESERVE" in p for p in env.validate_environment())


def test_timeout_and_register_values() -> None:
    assert env.read_seconds(env.TIMEOUT, {}) is None
    assert env.read_seconds(env.TIMEOUT, {env.TIMEOUT: "2.5"}) == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="SYMM_RS_TIMEOUT"):
            env.read_seconds(env.TIMEOUT, {env.TIMEOUT: bad})
    assert env.read_choice(env.REGISTER, env.REGISTER_CHOICES, {}) == "auto"
    assert env.read_choice(env.REGISTER, env.REGISTER_CHOICES, {env.REGISTER: "ALWAYS"}) == "always"
    with pytest.raises(ValueError, match="auto, always"):
        env.read_choice(env.REGISTER, env.REGISTER_CHOICES, {env.REGISTER: "never"})
    issues = env.validate_environment({env.TIMEOUT: "x", env.REGISTER: "sometimes"})
    assert len(issues) == 2 and all("SYMM_RS_" in i for i in issues)


def test_cp_copy_values() -> None:
    assert env.read_choice(env.CP_COPY, env.CP_COPY_CHOICES, {}) == "kernel"
    assert env.read_choice(env.CP_COPY, env.CP_COPY_CHOICES, {env.CP_COPY: " Driver"}) == "driver"
    assert env.validate_environment({env.CP_COPY: "kernel"}) == []
    [issue] = env.environment_issues({env.CP_COPY: "memcpy"})
    assert issue.fatal
    assert issue.message == "SYMM_RS_CP_COPY: must be one of kernel, driver; got 'memcpy'"


# --- checked once, at import ------------------------------------------------------------------

# One value each variable cannot take, and a word of what it does take that its message names.
BAD_VALUES = {
    env.NCCL_LIBRARY: ("/nowhere/libnccl.so.2", "no such file"),
    env.RESERVE: ("banana", "4GiB"),
    env.VERIFY: ("maybe", "true or false"),
    env.DEBUG: ("2", "on or off"),
    env.STRICT: ("very", "yes or no"),
    env.TIMEOUT: ("soon", "30"),
    env.REGISTER: ("never", "auto, always"),
    env.POLICY_TABLE: ("all_reduce", "none"),
    env.CP_COPY: ("memcpy", "kernel, driver"),
    env.SEAL: ("sealed", "on or off"),
    env.ON_FAILURE: ("panic", "log, abort"),
}


def test_every_variable_has_a_bad_value_case() -> None:
    assert set(BAD_VALUES) == set(env.VARIABLES)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_import_check_warns_naming_the_variable_and_what_it_takes(name: str) -> None:
    value, allowed = BAD_VALUES[name]
    with pytest.warns(env.SettingWarning) as caught:
        issues = env.check_on_import({name: value})
    [issue] = issues
    assert issue.fatal
    [warning] = caught
    message = str(warning.message)
    assert message.startswith(name) and allowed in message, message


def test_import_check_is_quiet_when_everything_is_valid() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env.check_on_import({env.RESERVE: "1g", env.POLICY_TABLE: "none", "PATH": "/"}) == []


def test_strict_mode_raises_naming_every_bad_value() -> None:
    environ = {env.STRICT: "1", env.RESERVE: "banana", env.TIMEOUT: "0", "SYMM_RS_VERIFFY": "1"}
    with pytest.raises(env.SettingError) as raised:
        env.check_on_import(environ)
    text = str(raised.value)
    assert "SYMM_RS_RESERVE" in text and "SYMM_RS_TIMEOUT" in text
    assert "SYMM_RS_STRICT=1 makes this an error" in text
    # An unknown name alone is a warning even in strict mode: it may belong to another release.
    with pytest.warns(env.SettingWarning, match="SYMM_RS_VERIFFY is not a symm_rs variable"):
        env.check_on_import({env.STRICT: "1", "SYMM_RS_VERIFFY": "1"})


def _import_symm_rs(**environ: str) -> subprocess.CompletedProcess[str]:
    script = (
        "import sys, symm_rs\n"
        "print(sorted(m for m in ('torch', 'symm_rs._native') if m in sys.modules))\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(env.PREFIX)}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **environ},
    )


def test_import_symm_rs_warns_once_without_loading_torch() -> None:
    done = _import_symm_rs(SYMM_RS_RESERVE="banana")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # neither torch nor the native module
    assert done.stderr.count("SettingWarning") == 1
    assert "SYMM_RS_RESERVE: not a byte size: 'banana'" in done.stderr
    assert done.stderr.startswith("<string>:1:")  # points at the importing line


def test_import_symm_rs_raises_in_strict_mode() -> None:
    done = _import_symm_rs(SYMM_RS_RESERVE="banana", SYMM_RS_STRICT="1")
    assert done.returncode == 1
    assert "symm_rs.errors.SettingError: SYMM_RS_RESERVE: not a byte size" in done.stderr


def test_the_command_line_still_reports_in_strict_mode() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(env.PREFIX)}
    done = subprocess.run(
        [sys.executable, "-m", "symm_rs", "doctor", "--json", "--no-check"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**clean, "SYMM_RS_RESERVE": "banana", "SYMM_RS_STRICT": "1"},
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert any("SYMM_RS_RESERVE" in p for p in report["problems"])
