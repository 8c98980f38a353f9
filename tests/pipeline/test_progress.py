"""Progress output in each mode, driven as the driver drives it, with a clock the test steps."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from pipeline.runner.progress import Progress, ProgressMode, ProgressState, eta_seconds, format_duration


class SteppedClock:
    """Monotonic seconds the test advances by hand, so ETAs and intervals are exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eta_math() -> None:
    assert eta_seconds(10.0, 1, 5) == pytest.approx(40.0)  # 10 s a unit, 4 left
    assert eta_seconds(30.0, 750, 1000) == pytest.approx(10.0)
    assert eta_seconds(5.0, 0, 10) is None  # nothing done yet: no rate to extrapolate
    assert eta_seconds(5.0, 10, 10) == 0.0 and eta_seconds(5.0, 12, 10) == 0.0
    assert eta_seconds(0.0, 0, 0) == 0.0  # an empty run is done
    assert [format_duration(s) for s in (None, 0, 59.6, 61, 3600, 3725.2)] == ["?", "0:00", "1:00", "1:01",
                                                                                "1:00:00", "1:02:05"]


def test_eta_uses_rows_when_their_total_is_known() -> None:
    s = ProgressState(total_units=4, total_rows=1000, units=1, rows=100, elapsed=20.0)
    assert s.eta == pytest.approx(180.0) and s.fraction == pytest.approx(0.1)  # by rows, not 1/4 units
    s = ProgressState(total_units=4, units=1, rows=100, elapsed=20.0)
    assert s.eta == pytest.approx(60.0) and s.fraction == pytest.approx(0.25)


def test_bar_redraws_one_line_and_ends_with_a_newline() -> None:
    out, clock = TTY(), SteppedClock()
    p = Progress(10, 5000, stream=out, clock=clock)  # auto on a terminal: bar
    assert p.mode is ProgressMode.BAR
    clock.now += 60
    p.update(units=3, rows=1234, faces=567, statuses={"ok": 1200, "no_face": 30, "decode_error": 4})
    clock.now += 0.05
    p.update(rows=1)  # within 0.2 s of the last draw: not drawn
    clock.now += 1
    p.update(rows=1)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    first = text.split("\r")[1].removesuffix("\x1b[K")
    assert first == ("dr2 [####................]  3/10 units  1,234/5,000 rows  567 faces  9.4 faces/s  "
                     "34 not ok  ETA 3:03")  # 1234 rows in 60 s, 3766 left: 183 s


def test_plain_prints_a_line_per_interval_and_a_last_one() -> None:
    out, clock = io.StringIO(), SteppedClock()
    p = Progress(4, mode="plain", stream=out, clock=clock, interval=30)
    for _ in range(8):  # a unit every 10 s
        clock.now += 10
        p.update(units=1 if p.state.units < 4 else 0, rows=50, faces=20, statuses={"ok": 50})
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4  # at 10 s (first), 40 s, 70 s, and close at 80 s
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0] == "dr2 [#####...............]  1/4 units  50 rows  20 faces  2.0 faces/s  ETA 0:30"
    assert lines[-1].startswith("dr2 [####################]  4/4 units  400 rows  160 faces")
    assert lines[-1].endswith("ETA 0:00")
    assert "not ok" not in lines[-1]


def test_json_is_one_parseable_object_per_update() -> None:
    out, clock = io.StringIO(), SteppedClock()
    with Progress(2, 100, mode=ProgressMode.JSON, stream=out, clock=clock) as p:
        clock.now += 4
        p.update(rows=25, faces=8, statuses={"ok": 20, "no_face": 5})
        clock.now += 4
        p.update(units=1, rows=25, faces=8, statuses={"ok": 25})
    objs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [o["event"] for o in objs] == ["progress", "progress", "done"]
    assert objs[0]["eta_seconds"] == 12.0 and objs[0]["faces_per_second"] == 2.0
    assert objs[1] == {"event": "progress", "units": 1, "total_units": 2, "rows": 50, "total_rows": 100,
                       "faces": 16, "statuses": {"no_face": 5, "ok": 45}, "elapsed_seconds": 8.0,
                       "faces_per_second": 2.0, "fraction": 0.5, "eta_seconds": 8.0}
    assert objs[2]["units"] == 1 and objs[2]["eta_seconds"] == 8.0


def test_quiet_writes_nothing_and_close_is_idempotent() -> None:
    out = io.StringIO()
    p = Progress(3, mode="quiet", stream=out)
    p.update(units=3, rows=9, faces=2)
    p.close()
    p.close()
    assert out.getvalue() == "" and p.state.units == 3
    with pytest.raises(ValueError):
        Progress(3, mode="fancy", stream=out)


def test_real_clock_plain_mode_defaults_when_not_a_terminal() -> None:
    out = io.StringIO()
    t0 = time.monotonic()
    p = Progress(2, stream=out)
    assert p.mode is ProgressMode.PLAIN and p.interval == 30.0
    time.sleep(0.05)
    p.update(units=1, rows=10, faces=4)
    p.close()
    elapsed = time.monotonic() - t0
    first, last = out.getvalue().splitlines()
    m = re.search(r"([\d.]+) faces/s .*ETA (\d+):(\d\d)$", first)
    # half the units took `elapsed` on the real clock, so the rest should too (a loaded machine stretches both)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) * 60 + int(m.group(3)) <= elapsed + 1
    assert last.startswith("dr2 [##########..........]  1/2 units  10 rows  4 faces")
