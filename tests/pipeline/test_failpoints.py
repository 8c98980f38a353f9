"""Failpoints: armed only by the environment, counted over processes, and the three actions."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import failpoints
from pipeline import schema as S


def test_unarmed_points_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.hit("restore.batch")
    monkeypatch.setenv(failpoints.ENV, "commit.begin=raise")
    failpoints.hit("restore.batch")  # another point
    with pytest.raises(failpoints.FailpointError, match="commit.begin"):
        failpoints.hit("commit.begin")


def test_counts_pick_the_nth_arrival_and_after(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "a=raise@3;b=raise@2+")
    fired = []
    for i in range(1, 6):
        for point in ("a", "b"):
            try:
                failpoints.hit(point)
            except failpoints.FailpointError:
                fired.append((point, i))
    assert fired == [("b", 2), ("a", 3), ("b", 3), ("b", 4), ("b", 5)]


def _arrive(point: str) -> None:
    try:
        failpoints.hit(point)
    except failpoints.FailpointError:
        os._exit(7)
    os._exit(0)


def test_counts_are_shared_by_processes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "p=raise@4")
    ctx = multiprocessing.get_context("fork")
    codes = []
    for _ in range(6):
        proc = ctx.Process(target=_arrive, args=("p",))
        proc.start()
        proc.join()
        codes.append(proc.exitcode)
    assert codes == [0, 0, 0, 7, 0, 0]


def test_exit_and_hang_end_or_stop_the_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "x=exit;h=hang")
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_arrive, args=("x",))
    proc.start()
    proc.join()
    assert proc.exitcode == 1
    proc = ctx.Process(target=_arrive, args=("h",))
    proc.start()
    hung = tmp_path / "h.hung"
    try:
        # wait for the event (the hang's file), not a fixed time: a loaded machine may take seconds to get there
        deadline = time.monotonic() + 60
        while not (hung.exists() and hung.read_text()):
            assert proc.is_alive(), f"the process ended (exit code {proc.exitcode}) instead of hanging"
            assert time.monotonic() < deadline, "the process never reached the hang"
            time.sleep(0.02)
        assert hung.read_text() == str(proc.pid)
        proc.join(timeout=0.5)  # hanging: still there after the file is written
        assert proc.is_alive()
    finally:
        proc.kill()
        proc.join()


def test_sleep_marks_the_point_then_goes_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import time

    monkeypatch.setenv(failpoints.DIR_ENV, str(tmp_path))
    monkeypatch.setenv(failpoints.ENV, "s=sleep:0.3@1")
    t = time.monotonic()
    failpoints.hit("s")
    assert time.monotonic() - t >= 0.3 and (tmp_path / "s.hung").read_text() == str(os.getpid())
    t = time.monotonic()
    failpoints.hit("s")  # the second arrival: not armed
    assert time.monotonic() - t < 0.3


@pytest.mark.parametrize("spec", ["x=explode", "=exit", "x=exit@two", "x=sleep", "x=hang:3", "x=sleep:soon"])
def test_bad_specs_are_refused(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(failpoints.ENV, spec)
    with pytest.raises(ValueError):
        failpoints.hit("x")


def test_block_label_names_units_and_rows() -> None:
    from pipeline.graph.build import block_label

    table = pa.table({S.UNIT: ["a.tar", "a.tar", "a.tar", "b.tar", "b.tar"], S.INDEX: [4, 2, 7, -1, 0]})
    assert block_label(table) == "a.tar rows 2-7, b.tar rows 0-0"
    assert block_label(pa.table({S.UNIT: ["a.tar"], S.INDEX: [-1]})) == "an end-of-unit block"
