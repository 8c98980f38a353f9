"""A parquet archive under real interruptions, with test_interrupt.py's harness (the real CLI in a subprocess with its
own local Ray, SIGKILLed with its process group): killed after its first commit, then killed while a commit is half
way through writing an output parquet (held at ``commit.mid_output``, between row groups); the rerun skips what was
committed, untouched, and every output ends byte-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from tests.jobs.test_interrupt import (  # noqa: F401 - runner is the harness's fixture, used here as it is
    FAST_BATCHES,
    SLOW_BATCHES,
    Runner,
    kill_run,
    runner,
    units_line,
    wait_for,
)
from tests.pipeline.parquet_files import img2dataset_table, photos, write_parquet_archive

pytestmark = pytest.mark.slow

TIMEOUT_S = 600.0


def build(root: Path) -> list[str]:
    """The three shapes plus a small face-less img2dataset file (committed first); returns the relative names."""
    p = photos()
    tables = write_parquet_archive(root, p)
    import pyarrow.parquet as pq

    plain = img2dataset_table(p).slice(1, 2)  # the face-less photo and the failed download
    pq.write_table(plain, root / "img2dataset" / "00001.parquet", row_group_size=1)
    return sorted([*tables, "img2dataset/00001.parquet"])


def markers(dst: Path) -> list[Path]:
    return sorted(m for m in dst.rglob("*.stats.json") if "_dr2" not in m.parts)


def check_committed(dst: Path, seen: dict[str, tuple[int, int]]) -> None:
    """Every committed output is whole (the size and sha256 its marker records) and never rewritten once committed."""
    for marker in markers(dst):
        out = marker.with_name(marker.name.replace(".stats.json", ".parquet"))
        stats = json.loads(marker.read_text())
        data = out.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (stats["bytes"], stats["sha256"]), out
        st = out.stat()
        assert seen.setdefault(str(out), (st.st_ino, st.st_mtime_ns)) == (st.st_ino, st.st_mtime_ns), out


def test_killed_twice_then_resumed_matches_a_clean_run(runner: Runner, tmp_path: Path) -> None:  # noqa: F811
    names = build(tmp_path / "in")
    src = str(tmp_path / "in" / "**" / "*.parquet")
    clean = tmp_path / "clean"
    assert units_line(runner.run("pq-clean", src, clean, *FAST_BATCHES, timeout=TIMEOUT_S)) == (4, 0, 4)

    dst = tmp_path / "out"
    seen: dict[str, tuple[int, int]] = {}
    proc = runner.start("pq-run0", src, dst, *SLOW_BATCHES)
    wait_for("a first commit", lambda: bool(markers(dst)), proc, runner, "pq-run0")
    kill_run(proc, str(runner.ray_tmp))
    assert proc.returncode == -signal.SIGKILL
    check_committed(dst, seen)
    assert 0 < len(seen) < len(names), sorted(seen)

    point = "commit.mid_output"  # between two row groups of an output parquet
    proc = runner.start("pq-run1", src, dst, *SLOW_BATCHES, failpoints=f"{point}=hang@1")
    wait_for(point, (runner.failpoint_dir("pq-run1") / f"{point}.hung").exists, proc, runner, "pq-run1")
    kill_run(proc, str(runner.ray_tmp))
    check_committed(dst, seen)

    done = len(seen)
    out = runner.run("pq-last", src, dst, *FAST_BATCHES, timeout=TIMEOUT_S)
    assert units_line(out) == (4, done, 4 - done), out[-3000:]
    check_committed(dst, seen)
    for name in names:
        assert (dst / name).read_bytes() == (clean / name).read_bytes(), name
    assert not list(dst.glob("_dr2_staging/**/*.part")) and not list(dst.rglob("*.tmp*"))
