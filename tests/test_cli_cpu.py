"""The command line answers ``--help`` without importing torch, in plain text, under the name it
was invoked by; and the set-up README.md gives is the one CI runs."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from symm_rs import cli

ROOT = Path(__file__).resolve().parents[1]
# reStructuredText that must not reach a terminal: ``literals``, :roles:`x`, `interpreted`, and a
# paragraph's closing "::".
RST = re.compile(r"``|:[a-z]+:`|`[^`\s][^`]*`|::\s*$", re.MULTILINE)


def _run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def _imported(importtime_stderr: str) -> set[str]:
    """Module names in ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_help_imports_neither_torch_nor_the_benchmark() -> None:
    done = _run("-X", "importtime", "-m", "symm_rs", "--help")
    assert done.returncode == 0, done.stderr
    imported = _imported(done.stderr)
    assert "symm_rs.cli" in imported  # the parsing worked
    heavy = {n for n in imported if n.split(".")[0] in ("torch", "numpy")}
    assert heavy == set()
    assert not any(n.startswith("symm_rs.bench") for n in imported)
    assert not {"symm_rs.memory", "symm_rs.comm", "symm_rs.doctor"} & imported


def _commands() -> list[str]:
    """Every sub-command the parser has (so that a new one is covered without a test change)."""
    parser = cli.build_parser("symm-rs", with_bench_options=True)
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(commands.choices)


# Runs the command line as `python -m symm_rs ARGS` does, then prints which heavy modules it
# loaded: sys.modules is the record, whatever the machine's speed.
_LOADED = """\
import json, runpy, sys
sys.argv = ["symm-rs", *json.loads(sys.argv[1])]
try:
    runpy.run_module("symm_rs", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
heavy = sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "numpy") or m == "symm_rs._native"
)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], *([c, "--help"] for c in ("doctor", "bench"))],
    ids=lambda a: " ".join(a),
)
def test_help_and_version_load_neither_torch_nor_the_native_module(args: list[str]) -> None:
    done = _run("-c", _LOADED, json.dumps(args))
    outcome = json.loads(done.stderr.strip().splitlines()[-1])
    assert outcome == {"code": 0, "heavy": []}, done.stderr
    assert done.stdout.strip()


def test_every_command_is_covered_by_the_help_test() -> None:
    assert _commands() == ["bench", "doctor"]


def test_doctor_help_explains_the_exit_status() -> None:
    done = _run("-m", "symm_rs", "doctor", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "--require-gpu" in text
    assert "Exit status: 0 when no problem was found, warnings or not" in text
    assert "steers around" in text and "library loaded in this process" in text


def test_version_names_the_installed_release() -> None:
    import symm_rs

    done = _run("-m", "symm_rs", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"symm_rs {symm_rs.__version__} (Python ")


@pytest.mark.parametrize("columns", [80, 200])
@pytest.mark.parametrize("command", [[], ["doctor"], ["bench"]], ids=lambda c: " ".join(c))
def test_help_wraps_description_and_options_at_one_width(columns: int, command: list[str]) -> None:
    width = cli.help_width(columns)
    done = _run("-m", "symm_rs", *command, "--help", env=dict(os.environ, COLUMNS=str(columns)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, (width, too_long)
    if command:  # a description long enough to need wrapping: it fills the width, not less
        description = done.stdout.split("\n\n", 1)[1].split("\noptions:", 1)[0].splitlines()
        assert max(map(len, description)) > width - 15, (width, description)


def test_import_symm_rs_is_lazy() -> None:
    script = (
        "import sys, symm_rs\n"
        "assert 'torch' not in sys.modules, 'import symm_rs imported torch'\n"
        "assert symm_rs.__version__ and issubclass(symm_rs.NcclError, RuntimeError)\n"
        "assert 'torch' not in sys.modules\n"
        "assert set(symm_rs.__all__) <= set(dir(symm_rs))\n"
        "pool = symm_rs.use_symmetric_memory\n"  # a public name: its module, and torch, load now
        "assert 'torch' in sys.modules and 'symm_rs.context' in sys.modules\n"
        "assert symm_rs.cp.zigzag_layout is symm_rs.zigzag_layout\n"
        "assert all(hasattr(symm_rs, n) for n in symm_rs.__all__)\n"
        "try:\n"
        "    symm_rs.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
        "print('ok')\n"
    )
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("args", [["--help"], ["doctor", "--help"], ["bench", "--help"]])
def test_help_is_plain_text(args: list[str]) -> None:
    done = _run("-m", "symm_rs", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m symm_rs")
    assert RST.search(done.stdout) is None, RST.search(done.stdout)


def test_bench_help_still_lists_its_options() -> None:
    done = _run("-m", "symm_rs", "bench", "--help")
    for option in ("--world-size", "--quick", "--sections", "--env"):
        assert option in done.stdout


def _help_as(argv0: str) -> str:
    script = f"import sys\nsys.argv = [{argv0!r}, '--help']\nfrom symm_rs.cli import main\nmain()\n"
    done = _run("-c", script)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_console_script_uses_its_own_name() -> None:
    assert _help_as("/opt/venv/bin/symm-rs").startswith("usage: symm-rs ")
    assert "python -m" not in _help_as("/opt/venv/bin/symm-rs")
    assert _help_as("/x/symm_rs/__main__.py").startswith("usage: symm-rs ")
    script = Path(sys.executable).with_name("symm-rs")
    if script.exists():  # installed into this interpreter's environment
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: symm-rs ")


def test_plain_text_strips_restructuredtext() -> None:
    doc = """``python -m symm_rs bench``: see :func:`run` and `add_arguments`.

* ``collectives``: all-gather;
  more text
* ``context``: one enter+exit

Usage::
"""
    text = cli.plain_text(doc)
    assert text.splitlines() == [
        "python -m symm_rs bench: see run and add_arguments.",
        "",
        "- collectives: all-gather;",
        "  more text",
        "- context: one enter+exit",
        "",
        "Usage:",
    ]
    assert cli.plain_text(None) == ""


# --- set-up: README's two commands, pyproject and CI -----------------------------------------


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up: two commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_them() -> None:
    commands = _setup_commands()
    assert commands == [
        "pip install . && python -m symm_rs doctor",
        "pip install '.[dev]' && make test",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    steps = re.findall(r'^step "(.*)"$', ci, re.MULTILINE)
    # README's two commands first, as written; then the release artifacts, checked.
    assert steps == [*commands, "make dist dist-check"]
    assert '"$python" -m venv "$venv"' in ci and "scripts/python_for.sh oldest" in ci
    readme = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cu126" in readme


def test_readme_is_self_contained() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in readme
    assert "19.4 s" not in readme and "27.5 ms" not in readme
    assert "[cu12]" not in readme and "[cu13]" not in readme


def test_license_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150  # the full text, not a notice


def test_pyproject_extras_and_dependencies() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    names = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert "numpy" in names and "torch" in names
    extras = project["optional-dependencies"]
    # No extra may install an NVIDIA NCCL wheel: it would overwrite or delete torch's libnccl.
    assert not any("nccl" in d for deps in extras.values() for d in deps)
    assert "cu12" not in extras and "cu13" not in extras
    dev = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in extras["dev"]}
    assert {"pytest", "pytest-timeout", "ruff", "maturin"} <= dev
