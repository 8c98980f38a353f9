"""Progress a person can read during a long run: units done of total, rows, faces, faces/s and an ETA.

The driver owns one :class:`Progress` and feeds it increments as results stream back (a unit committed, a batch
of rows written); nothing here touches Ray or storage. Four modes (:class:`ProgressMode`):

* ``bar`` -- one line on stderr, redrawn in place (``\\r`` + clear-to-end-of-line), at most every 0.2 s; the
  default when the stream is a terminal::

      dr2 [#######.............]  3/10 units  1,234/5,000 rows  567 faces  1.9 faces/s  12 not ok  ETA 0:04:12

* ``plain`` -- the same line as text, once at the first update and then at most every 30 s (``interval``), plus
  a last one at :meth:`Progress.close`; the default when the stream is not a terminal (a log file, CI);
* ``json`` -- one JSON object per update, one per line, for log pipelines (``"event": "progress"``; the last
  one has ``"event": "done"``); fields as :meth:`ProgressState.to_dict`;
* ``quiet`` -- nothing.

The ETA extrapolates the average rate so far: ``elapsed * (total - done) / done``, measured in rows when the
total number of rows is known (finer), else in units. It is ``None`` (shown as ``ETA ?``) until something is
done, and assumes the rest runs at the same rate (a first unit that includes model loading makes it pessimistic
at first; units of very different sizes make the unit-based ETA jumpy).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

BAR_WIDTH = 20
DEFAULT_INTERVAL = {"bar": 0.2, "plain": 30.0, "json": 0.0, "quiet": 0.0}  # seconds between two outputs
OK_STATUS = "ok"


class ProgressMode(StrEnum):
    AUTO = "auto"  # bar on a terminal, plain otherwise
    BAR = "bar"
    PLAIN = "plain"
    JSON = "json"
    QUIET = "quiet"


def eta_seconds(elapsed: float, done: float, total: float) -> float | None:
    """Seconds left if the rest goes at the average rate so far; None before anything is done, 0 when done."""
    if total <= 0 or done >= total:
        return 0.0
    if done <= 0 or elapsed <= 0:
        return None
    return elapsed * (total - done) / done


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` for None."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class ProgressState:
    """Totals so far. ``statuses`` counts samples by row status (``pipeline.schema.Status`` values)."""

    total_units: int
    total_rows: int | None = None
    units: int = 0
    rows: int = 0
    faces: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def faces_per_second(self) -> float:
        return self.faces / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def not_ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != OK_STATUS)

    @property
    def fraction(self) -> float:
        """Share done in [0, 1]: by rows when their total is known, else by units."""
        if self.total_rows:
            return min(1.0, self.rows / self.total_rows)
        return min(1.0, self.units / self.total_units) if self.total_units > 0 else 1.0

    @property
    def eta(self) -> float | None:
        if self.total_rows:
            return eta_seconds(self.elapsed, self.rows, self.total_rows)
        return eta_seconds(self.elapsed, self.units, self.total_units)

    def line(self, label: str = "dr2") -> str:
        filled = int(self.fraction * BAR_WIDTH)
        rows = f"{self.rows:,}/{self.total_rows:,} rows" if self.total_rows else f"{self.rows:,} rows"
        parts = [
            f"{label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]",
            f"{self.units}/{self.total_units} units",
            rows,
            f"{self.faces:,} faces",
            f"{self.faces_per_second:.1f} faces/s",
        ]
        if self.not_ok:
            parts.append(f"{self.not_ok:,} not ok")
        parts.append(f"ETA {format_duration(self.eta)}")
        return "  ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        eta = self.eta
        return {
            "units": self.units,
            "total_units": self.total_units,
            "rows": self.rows,
            "total_rows": self.total_rows,
            "faces": self.faces,
            "statuses": dict(sorted(self.statuses.items())),
            "elapsed_seconds": round(self.elapsed, 3),
            "faces_per_second": round(self.faces_per_second, 4),
            "fraction": round(self.fraction, 6),
            "eta_seconds": None if eta is None else round(eta, 1),
        }


class Progress:
    """Driver-side progress: ``update`` with increments as work completes, ``close`` at the end (or use ``with``).

    ``stream`` defaults to stderr (stdout stays for results); ``interval`` overrides the mode's minimum seconds
    between two outputs; ``clock`` is the time source (monotonic seconds).
    """

    def __init__(
        self,
        total_units: int,
        total_rows: int | None = None,
        *,
        mode: ProgressMode | str = ProgressMode.AUTO,
        stream: TextIO | None = None,
        interval: float | None = None,
        label: str = "dr2",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        mode = ProgressMode(mode)
        if mode is ProgressMode.AUTO:
            isatty = getattr(self.stream, "isatty", None)
            mode = ProgressMode.BAR if isatty is not None and isatty() else ProgressMode.PLAIN
        self.mode = mode
        self.interval = DEFAULT_INTERVAL[mode.value] if interval is None else interval
        self.label = label
        self._clock = clock
        self._start = clock()
        self._last_emit: float | None = None
        self._closed = False
        self.state = ProgressState(total_units=total_units, total_rows=total_rows)

    def update(
        self, *, units: int = 0, rows: int = 0, faces: int = 0, statuses: Mapping[str, int] | None = None
    ) -> None:
        """Add what completed since the last call (increments, not totals)."""
        s = self.state
        s.units += units
        s.rows += rows
        s.faces += faces
        for status, n in (statuses or {}).items():
            s.statuses[str(status)] = s.statuses.get(str(status), 0) + int(n)
        now = self._clock()
        s.elapsed = now - self._start
        if self._last_emit is None or now - self._last_emit >= self.interval:
            self._emit(final=False)
            self._last_emit = now

    def close(self) -> None:
        """Write the final state (a newline after the bar). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.state.elapsed = self._clock() - self._start
        self._emit(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, *, final: bool) -> None:
        if self.mode is ProgressMode.QUIET:
            return
        if self.mode is ProgressMode.JSON:
            obj = {"event": "done" if final else "progress", **self.state.to_dict()}
            self.stream.write(json.dumps(obj) + "\n")
        elif self.mode is ProgressMode.BAR:
            line = self.state.line(self.label)
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(self.state.line(self.label) + "\n")
        self.stream.flush()
