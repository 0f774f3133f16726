"""NCCL's own tuning log: which kernel NCCL chose for each collective.

With ``NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=TUNING`` rank 0 of each communicator logs one line per
collective it plans, for example::

    host:123:456 [0] NCCL INFO AllGather [Symmetric]: 2097152 Bytes -> Kernel AllGather_LL nchannels 16 nthreads 512 nWorks 1
    host:123:456 [0] NCCL INFO AllGather: 2097152 Bytes -> Algo RING proto LL channel{Lo..Hi}={0..7}

``[Symmetric]`` marks NCCL's symmetric kernels (buffers in symmetric windows); the other form is
its regular ring/tree path. The variables must be in a process's environment before NCCL reads
them, that is before the process's first communicator is made: set them in the rank processes
(or before they start), not in a parent that has already initialised NCCL.
"""  # noqa: E501

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

LOG_FILE_PATTERN = "nccl.%h.%p"  # NCCL replaces %h with the host name and %p with the pid
_LINE = re.compile(
    r"(?P<collective>[A-Za-z]+)(?P<symmetric> \[Symmetric\])?: (?P<bytes>\d+) Bytes -> "
    r"(?:Kernel (?P<kernel>\S+)|Algo (?P<algo>\S+) proto (?P<proto>\S+))"
)


@dataclass(frozen=True)
class Record:
    """One tuning line: the collective, its bytes (per rank, as NCCL counts them), whether NCCL
    ran a symmetric kernel, the kernel (symmetric) or ``ALGO/PROTO`` (regular), and the line."""

    collective: str
    nbytes: int
    symmetric: bool
    kernel: str
    line: str


def tuning_log_env(directory: Union[str, os.PathLike[str]]) -> dict[str, str]:
    """The ``NCCL_DEBUG*`` variables that make NCCL write its tuning log to one file per process
    under ``directory``. Put them in each rank's environment before NCCL initialises."""
    return {
        "NCCL_DEBUG": "INFO",
        "NCCL_DEBUG_SUBSYS": "TUNING",
        "NCCL_DEBUG_FILE": os.path.join(os.fspath(directory), LOG_FILE_PATTERN),
    }


def parse_line(line: str) -> Optional[Record]:
    """The tuning record in one log line, or ``None`` for any other line."""
    if "Bytes ->" not in line:
        return None
    match = _LINE.search(line)
    if match is None:
        return None
    if match.group("kernel") is not None:
        kernel = match.group("kernel")
    else:
        kernel = f"{match.group('algo')}/{match.group('proto')}"
    return Record(
        collective=match.group("collective"),
        nbytes=int(match.group("bytes")),
        symmetric=match.group("symmetric") is not None,
        kernel=kernel,
        line=line.rstrip("\n"),
    )


def parse_tuning_log(text: str) -> list[Record]:
    """Every tuning record in ``text`` (the contents of one or more NCCL log files), in order."""
    records = []
    for line in text.splitlines():
        record = parse_line(line)
        if record is not None:
            records.append(record)
    return records


def read_tuning_log(directory: Union[str, os.PathLike[str]]) -> list[Record]:
    """Every tuning record in the NCCL log files under ``directory`` (those written with
    ``tuning_log_env``), file by file in name order. Unreadable files are skipped."""
    records: list[Record] = []
    root = Path(directory)
    if not root.is_dir():
        return records
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        records.extend(parse_tuning_log(text))
    return records


def symmetric_records(records: list[Record], collective: Optional[str] = None) -> list[Record]:
    """The records of symmetric kernels, of one collective (e.g. ``"AllGather"``) if named."""
    return [
        r for r in records if r.symmetric and (collective is None or r.collective == collective)
    ]
