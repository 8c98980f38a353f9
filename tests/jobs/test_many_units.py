"""Archives of many tiny shards (issue 16): small units share read tasks and blocks, and their commits are batched,
yet every shard still comes out whole, exactly once, byte-identical to a run that reads each shard alone; a rerun
skips them all without touching them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.wds import iter_tar_samples
from pipeline.runner.loop import run_restore
from tests.jobs.archive import encode, no_face_image

pytestmark = pytest.mark.usefixtures("ray_local")

SHARDS = 32  # grouped 2 a read task (pipeline.formats.units.MIN_READ_GROUPS)


def build(root: Path) -> dict[str, list[str]]:
    """``SHARDS`` shards of 0 to 3 face-less samples each (one empty); {shard: keys in order}."""
    root.mkdir(parents=True, exist_ok=True)
    png = encode(no_face_image()[:80, :96], "PNG")
    keys: dict[str, list[str]] = {}
    for s in range(SHARDS):
        name = f"tiny-{s:03d}.tar"
        keys[name] = [f"s{s:03d}_{i}" for i in range(s % 4)]
        with wds.TarWriter(str(root / name)) as sink:
            for key in keys[name]:
                sink.write({"__key__": key, "png": png, "json": json.dumps({"s": s}).encode()})
    return keys


def config(src: Path, dst: Path, **kw: object) -> PipelineConfig:
    return PipelineConfig(src=str(src / f"tiny-{{000..{SHARDS - 1:03d}}}.tar"), dst=str(dst),
                          restorer=RestorerKind.PASSTHROUGH, progress="quiet", report=False, **kw)  # type: ignore[arg-type]


def test_many_tiny_shards_are_each_committed_once_and_a_rerun_skips_them(tmp_path: Path) -> None:
    keys = build(tmp_path / "in")
    dst = tmp_path / "out"
    # blocks of 4 rows: shards share blocks, and several span two blocks (two parts, one commit)
    summary = run_restore(config(tmp_path / "in", dst, rows_per_block=4))
    assert summary.failed == {} and summary.units_done == SHARDS and summary.samples == sum(map(len, keys.values()))
    assert summary.first_commit_seconds is not None
    spanning = 0
    for name, want in keys.items():
        got = list(iter_tar_samples(str(dst / name)))
        assert [s.key for s in got] == want, name  # every sample once, in order, nothing of another shard
        marker = json.loads((dst / name.replace(".tar", ".stats.json")).read_text())
        assert marker["count"] == marker["samples"] == len(want) and marker["statuses"] == (
            {"no_face": len(want)} if want else {})
        spanning += marker["parts"] > 1
    assert spanning > 0  # the run did split shards across blocks
    assert not list(dst.glob("_dr2_staging/**/*"))

    # the same archive in other blocks (a group's rows in one block) gives the same bytes
    alone = run_restore(config(tmp_path / "in", tmp_path / "alone"))
    assert alone.units_done == SHARDS
    for name in keys:
        assert (dst / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.iterdir() if p.is_file()}
    again = run_restore(config(tmp_path / "in", dst, rows_per_block=4))
    assert (again.units_skipped, again.units_done, again.failed) == (SHARDS, 0, {})
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dst.iterdir() if p.is_file()} == before
