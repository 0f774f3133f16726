"""The ``symm-rs`` / ``python -m symm_rs`` command line: ``doctor`` and ``bench``.

``bench`` runs the repository's benchmark harness (``benches/symm_rs_bench``), which is not part
of the installed package: from a checkout it is found there; elsewhere the command says how to
get it. Answering ``--help`` or ``--version`` imports neither torch nor the native module: they
are imported only by the command that runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shutil
import sys
import textwrap
from types import ModuleType
from typing import Any, Optional

DESCRIPTION = "NCCL symmetric memory for PyTorch, with a prebuilt Rust core."
EXAMPLES = (
    ("doctor", "check this machine; exit status 1 if a problem was found"),
    ("doctor --json", "the same report as JSON"),
    ("bench --quick", "plain against symmetric buffers on every GPU (2 or more)"),
)
DOCTOR_DESCRIPTION = """\
Checks what symm_rs relies on and reports each problem with advice: torch and its features, the
libnccl in use (path, version, known NCCL defects, wheels that overwrite each other's libnccl),
the SYMM_RS_* and NCCL_* variables, and the GPUs with their peer access. With 2 or more GPUs it
runs a symmetric all-gather across them and confirms, from NCCL's own tuning log, that NCCL ran
a symmetric kernel.

Findings are problems or warnings. A problem stops symm_rs from working or gives wrong results
that symm_rs cannot steer around: a value it cannot use, NCCL too old for windows, a known NCCL
defect it has no way around (NCCL 2.28.0 to 2.30.6: the launch race of its symmetric kernels),
two libnccl in one process, a failed or non-symmetric all-gather. A warning is something to know
that symm_rs copes with: a known NCCL defect it steers around in its own calls (NCCL 2.27.0 to
2.30.2: odd 16-bit counts), an unknown SYMM_RS_* name, no GPU. NCCL is judged by the library
loaded in this process, not by the version torch was built with.

Exit status: 0 when no problem was found, warnings or not (also on a machine without GPUs,
unless --require-gpu); 1 when one was."""

BENCH_ELSEWHERE = """\
The benchmark harness is not part of the installed package: it lives in the symm_rs repository,
beside the package, in benches/symm_rs_bench. Run this command inside a checkout (git clone the
repository, pip install it, cd into it), or put its benches/ folder on PYTHONPATH."""

_LITERAL = re.compile(r"``([^`]+)``")
_ROLE = re.compile(r":[a-z]+:`([^`]+)`")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain_text(doc: Optional[str]) -> str:
    """A docstring written in reStructuredText, as plain text for ``--help``: inline literals,
    roles and interpreted text lose their backquotes, ``*`` bullets become ``-`` and a
    paragraph's closing ``::`` becomes ``:``."""
    if not doc:
        return ""
    text = _LITERAL.sub(r"\1", doc)
    text = _ROLE.sub(r"\1", text)
    text = _INTERPRETED.sub(r"\1", text)
    lines = []
    for line in text.strip("\n").splitlines():
        stripped = line.lstrip()
        if stripped.startswith("* "):
            line = line[: len(line) - len(stripped)] + "- " + stripped[2:]
        if line.endswith("::"):
            line = line[:-1]
        lines.append(line)
    return "\n".join(lines)


HELP_WIDTH = 100  # the widest help, for terminals wider than that


def help_width(columns: Optional[int] = None) -> int:
    """The one width every help text is wrapped to: the terminal's (``$COLUMNS``), less 2, at
    most ``HELP_WIDTH``."""
    if columns is None:
        columns = shutil.get_terminal_size().columns
    return max(40, min(columns - 2, HELP_WIDTH))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter with descriptions re-wrapped to the width its option help uses (the
    raw formatter prints them as written, the plain one joins their lists into one paragraph).
    Paragraphs are kept, ``- `` bullets keep a hanging indent, and an indented paragraph (an
    example) is printed as written."""

    def __init__(self, prog: str, width: Optional[int] = None, **kwargs: Any) -> None:
        # kwargs: what newer argparse passes along (3.14: color).
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, width=width or help_width(), **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            _fill_paragraph(paragraph, width, indent) for paragraph in text.split("\n\n")
        )


def _fill_paragraph(paragraph: str, width: int, indent: str) -> str:
    # Items: ("bullet" | "text" | "verbatim", lines). An indented line continues a bullet, or
    # else is verbatim (an example command); an unindented one continues plain text.
    items: list[tuple[str, list[str]]] = []
    for line in paragraph.strip("\n").splitlines():
        kind = items[-1][0] if items else ""
        if line.startswith("- "):
            items.append(("bullet", [line[2:].strip()]))
        elif line.startswith(" ") and kind == "bullet":
            items[-1][1].append(line.strip())
        elif line.startswith(" "):
            items.append(("verbatim", [line]))
        elif kind == "text":
            items[-1][1].append(line.strip())
        else:
            items.append(("text", [line.strip()]))
    out = []
    for kind, lines in items:
        if kind == "verbatim":
            out.append(indent + lines[0])
            continue
        first, rest = ("- ", "  ") if kind == "bullet" else ("", "")
        out.append(
            textwrap.fill(
                " ".join(lines),
                width,
                initial_indent=indent + first,
                subsequent_indent=indent + rest,
                break_on_hyphens=False,
            )
        )
    return "\n".join(out)


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"symm_rs {_version()} (Python {sys.version.split()[0]})")
        parser.exit()


def _version() -> str:
    """The installed distribution's version, read without loading the native module; a source
    tree run in place has no distribution: then the module's own."""
    from importlib import metadata

    try:
        return metadata.version("symm-rs")
    except metadata.PackageNotFoundError:
        from symm_rs._native import __version__

        return __version__


def _examples(prog: str) -> str:
    width = max(len(command) for command, _ in EXAMPLES) + len(prog) + 1
    lines = [f"  {prog + ' ' + command:<{width}}  {what}" for command, what in EXAMPLES]
    if max(map(len, lines)) > help_width():  # each command on a line of its own, then what
        lines = [f"  {prog} {command}\n      {what}" for command, what in EXAMPLES]
    return "examples:\n" + "\n".join(lines)


def _default_prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not name or name in ("__main__.py", "-c", "-m"):
        return "symm-rs"
    return name


def _command(argv: list[str]) -> Optional[str]:
    """The sub-command named in ``argv`` (the first word that is not an option)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _checkout_benches(start: str) -> Optional[str]:
    """The ``benches`` folder of the symm_rs checkout ``start`` lies in, if it does."""
    here = os.path.abspath(start)
    while True:
        candidate = os.path.join(here, "benches")
        if os.path.isfile(os.path.join(candidate, "symm_rs_bench", "__init__.py")):
            return candidate
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def bench_module() -> Optional[ModuleType]:
    """The repository's benchmark harness: importable already (``benches`` on ``PYTHONPATH``),
    or found in the checkout the working directory lies in; ``None`` elsewhere."""
    if importlib.util.find_spec("symm_rs_bench") is None:
        folder = _checkout_benches(os.getcwd())
        if folder is None:
            return None
        sys.path.insert(0, folder)
    return importlib.import_module("symm_rs_bench")


def build_parser(prog: str, with_bench_options: bool = False) -> argparse.ArgumentParser:
    """The parser. The benchmark's own options are added only when ``bench`` runs, so that
    ``--help`` does not import the benchmark module."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=DESCRIPTION,
        epilog=_examples(prog),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    doctor = commands.add_parser(
        "doctor",
        help="check torch, NCCL, the environment and the GPUs; with 2+ GPUs run a symmetric "
        "all-gather",
        description=DOCTOR_DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--no-check", action="store_true", help="skip the multi-GPU all-gather")
    doctor.add_argument(
        "--require-gpu",
        action="store_true",
        help="count a machine without a visible GPU as a problem (exit status 1)",
    )
    bench_help = (
        "benchmark plain against symmetric buffers on 2+ GPUs (JSON, PNG, Markdown); from a "
        "checkout of the repository"
    )
    harness = bench_module() if with_bench_options else None
    if harness is not None:
        bench = commands.add_parser(
            "bench",
            help=bench_help,
            description=plain_text(harness.__doc__),
            formatter_class=HelpFormatter,
        )
        harness.add_arguments(bench)
    elif with_bench_options:
        commands.add_parser(
            "bench", help=bench_help, description=BENCH_ELSEWHERE, formatter_class=HelpFormatter
        )
    else:
        commands.add_parser("bench", help=bench_help, add_help=False)
    return parser


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    """Runs the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = _command(args_list)
    parser = build_parser(prog or _default_prog(), with_bench_options=command == "bench")
    args = parser.parse_args(args_list)

    # Each command's module is imported only when it runs: --help loads neither torch nor the
    # native module.
    if args.command == "doctor":
        import json

        from symm_rs.doctor import diagnose, render

        report = diagnose(run_check=not args.no_check, require_gpu=args.require_gpu)
        print(json.dumps(report, indent=2) if args.json else render(report))
        return 1 if report["problems"] else 0
    if args.command == "bench":
        harness = bench_module()
        if harness is None:
            print(f"bench: {BENCH_ELSEWHERE}", file=sys.stderr)
            return 2
        return int(harness.run(args))
    parser.print_help(sys.stderr)
    return 2
