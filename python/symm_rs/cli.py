"""Command line: ``python -m symm_rs doctor [--json]`` and ``python -m symm_rs bench [...]``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m symm_rs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor = commands.add_parser(
        "doctor", help="check torch, NCCL, GPUs and a symmetric all-gather"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--no-check", action="store_true", help="skip the multi-GPU all-gather")
    from symm_rs import bench as bench_module

    bench = commands.add_parser(
        "bench",
        help="benchmark plain vs symmetric buffers on 2+ GPUs (JSON, PNG, Markdown table)",
        description=bench_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_module.add_arguments(bench)
    args = parser.parse_args(argv)

    if args.command == "doctor":
        from symm_rs.doctor import diagnose, render

        report = diagnose(run_check=not args.no_check)
        print(json.dumps(report, indent=2) if args.json else render(report))
        failed = "FAILED" in str(report.get("check", ""))
        return 1 if failed else 0
    if args.command == "bench":
        return bench_module.run(args)
    parser.print_help(sys.stderr)
    return 2
