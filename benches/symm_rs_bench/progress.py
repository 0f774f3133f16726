"""What rank 0 shows while the bench runs: a line per measured point, numbered within its
section (``[collectives 3/84] ...``), and, with the optional ``tqdm`` installed
(``pip install 'symm-rs[progress]'``) and a terminal to draw on, a bar per section under them."""

from __future__ import annotations

import sys
from typing import Any, Optional, TextIO


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class Progress:
    """Progress of one run, section by section."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self._tqdm = _tqdm_class() if isatty is not None and isatty() else None
        self._bar: Any = None
        self.section, self.total, self.done = "", None, 0

    @property
    def bars(self) -> bool:
        """Whether bars are drawn (tqdm and a terminal), or plain lines only."""
        return self._tqdm is not None

    def start(self, section: str, total: Optional[int] = None) -> None:
        """A new section of ``total`` points (unknown: ``None``)."""
        self.close()
        self.section, self.total, self.done = section, total, 0
        if self._tqdm is not None:
            self._bar = self._tqdm(
                total=total, desc=section, unit="point", file=self.stream, dynamic_ncols=True
            )

    def step(self, message: str) -> None:
        """One point measured: its line, numbered, above the bar."""
        self.done += 1
        of = f"/{self.total}" if self.total else ""
        line = f"[{self.section} {self.done}{of}] {message}"
        if self._bar is None:
            print(line, file=sys.stdout, flush=True)
            return
        self._tqdm.write(line, file=sys.stdout)
        self._bar.update(1)

    def note(self, message: str) -> None:
        """A line that is no point (set-up, a section's start and end)."""
        if self._bar is None:
            print(message, file=sys.stdout, flush=True)
        else:
            self._tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
