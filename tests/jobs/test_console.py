"""A run's console holds our lines only (issue 19): ``dr2 demo`` and a run that fails inside Ray print our progress
line, warnings, summary and one-line error, and none of the lines Ray and native libraries print on their own (Ray's
token-auth notice, its C++ ``logging.cc``/``core_worker.cc`` lines, the raylet's worker-died messages, libpng's
``libpng error``): those land in the Ray session's log folder (``dr2-driver-stderr.log``).

The runs are the real CLI in subprocesses, each with its own local Ray in its own ``RAY_TMPDIR`` (as in
test_interrupt.py), so that what reaches their stdout and stderr is exactly what a person would see.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.demo import build_demo_archive
from pipeline.runner.console import ConsoleHandler, setup_logging
from tests.jobs.test_interrupt import kill_run

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600.0  # a cold Python + Ray + two actors takes 30-70 s on 2 cores, minutes when loaded

# what Ray and native libraries print on their own; none of it may reach the console
NOT_OURS = ("logging.cc", "core_worker.cc", "Token authentication", "libpng", "*** ", "PC: @", "(raylet", "(MapWorker",
            "Traceback", "WARNING", " E ")
# our stderr lines: a log record (``dr2: ...``), the progress line (``dr2 [###...]``), a command's error
OUR_STDERR_LINE = re.compile(r"dr2(: | \[| [a-z-]+: )")


def assert_only_ours(out: str, err: str) -> None:
    for text in (out, err):
        for line in text.splitlines():
            assert not line.startswith(("[20", "(raylet", "(MapWorker", "\x1b")), line
            assert not any(s in line for s in NOT_OURS), line
    for line in err.splitlines():
        assert OUR_STDERR_LINE.match(line), line


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    # Ray's unix socket paths must stay short (about 107 bytes): a short temp dir, not pytest's tmp_path
    path = Path(tempfile.mkdtemp(prefix="dr2con-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_cli(ray_tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m jobs.cli ARGS`` with its own local Ray; (exit status, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    full.update({"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                 "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        kill_run(proc, str(ray_tmp))  # a finished run leaves nothing behind; this makes sure
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def ray_console_logs(ray_tmp: Path) -> str:
    """What the runs' drivers did not print: the diverted console output, in each Ray session's log folder."""
    files = sorted(ray_tmp.rglob("logs/dr2-driver-stderr.log"))
    assert files, f"no dr2-driver-stderr.log under {ray_tmp}"
    return "\n".join(f.read_text(errors="replace") for f in files)


@pytest.mark.slow
def test_the_demo_prints_only_our_lines(ray_tmp: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(ray_tmp, "demo", "--out", str(tmp_path / "demo"), "--quiet")
    assert code == 0, err[-3000:]
    assert_only_ours(out, err)
    assert "2 written" in out and "preview:" in out  # the summary is on stdout
    assert err == "", err  # --quiet: no progress line, no notices, and nothing went wrong
    # Ray's lines are not lost: they are in the session's log folder (the demo's truncated PNG is decoded in the
    # driver for the previews, by Pillow now, so it prints nothing anywhere)
    logs = ray_console_logs(ray_tmp)
    assert "Token authentication" in logs and "core_worker.cc" in logs, logs[-3000:]
    assert "libpng" not in logs, logs[-3000:]


@pytest.mark.slow
def test_a_run_that_fails_inside_ray_ends_with_our_one_line(ray_tmp: Path, tmp_path: Path) -> None:
    """The restore actor exits on every batch: Ray prints a worker-died message per death and the driver's core
    worker its own lines; the console shows the start notice, the progress line and our one-line error."""
    archive = build_demo_archive(tmp_path / "archive")
    fp = tmp_path / "failpoints"
    fp.mkdir()
    code, out, err = run_cli(ray_tmp, "restore", str(archive / "shard-000.tar"), str(tmp_path / "out"),
                             "--restorer", "tiny", "--N", "4", "--tau", "2", "--progress", "plain",
                             env={"DR2_FAILPOINTS": "restore.batch=exit", "DR2_FAILPOINTS_DIR": str(fp)})
    assert code == 2, err[-3000:]
    assert_only_ours(out, err)
    lines = err.splitlines()
    assert lines[0].startswith("dr2: starting a local Ray with"), err
    errors = [line for line in lines if line.startswith("dr2 restore: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "the restore stage's actor died" in errors[0] and "--ray-logs" in errors[0], errors[0]
    assert "(raylet)" in ray_console_logs(ray_tmp)  # the worker-died messages went to the log, not to stdout


def test_our_log_records_are_one_line_each_and_other_libraries_only_warn(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    level = root.level
    setup_logging()
    try:
        try:
            raise ValueError("bad bytes\nat offset 3")
        except ValueError:
            logging.getLogger("pipeline.graph.stages").warning("row %d:\n  skipped", 4, exc_info=True)
        logging.getLogger("pipeline.graph.build").info("starting a local Ray with %d CPUs", 2)
        logging.getLogger("botocore.credentials").info("Found credentials in environment variables.")
        logging.getLogger("pipeline.graph.build").debug("not shown without -v")
        logging.getLogger("urllib3.connectionpool").warning("a library's warning")
    finally:
        for h in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
            root.removeHandler(h)
        root.setLevel(level)
    assert capsys.readouterr().err.splitlines() == [
        "dr2: warning: row 4: skipped (ValueError: bad bytes at offset 3)",
        "dr2: starting a local Ray with 2 CPUs",
        "dr2: warning: a library's warning",
    ]
