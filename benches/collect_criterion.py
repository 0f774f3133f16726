"""Collects the latest ``cargo bench --bench registration`` estimates from target/criterion into
one JSON (benches/results/criterion_registration.json) with the machine it ran on.

    cargo bench --bench registration && python3 benches/collect_criterion.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRITERION = os.path.join(ROOT, "target", "criterion")
OUT = os.path.join(ROOT, "benches", "results", "criterion_registration.json")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    rows = []
    for dirpath, _, files in os.walk(CRITERION):
        if "estimates.json" not in files or os.path.basename(dirpath) != "new":
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        rows.append(
            {
                "id": bench["full_id"],
                "group": bench["group_id"],
                "function": bench.get("function_id"),
                "parameter": bench.get("value_str"),
                "median_ns": round(est["median"]["point_estimate"], 2),
                "mean_ns": round(est["mean"]["point_estimate"], 2),
                "mean_ci_ns": [
                    round(est["mean"]["confidence_interval"]["lower_bound"], 2),
                    round(est["mean"]["confidence_interval"]["upper_bound"], 2),
                ],
            }
        )
    rows.sort(key=lambda r: r["id"])
    by_id = {r["id"]: r["median_ns"] for r in rows}
    table = by_id.get("exit_nothing_new/segment_table/1000")
    scan = by_id.get("exit_nothing_new/snapshot_scan/1000")
    summary = {
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "platform": platform.platform()},
        "rustc": subprocess.run(
            ["rustc", "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "headline": {
            "exit_nothing_new_1000_segments_ns": table,
            "snapshot_scan_1000_segments_ns": scan,
            "speedup_vs_snapshot_scan": round(scan / table, 1) if table and scan else None,
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary["headline"]))


if __name__ == "__main__":
    main()
