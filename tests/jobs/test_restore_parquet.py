"""``dr2 restore`` on parquet archives, end to end on a local Ray: the three shapes (img2dataset, LAION-like,
Hugging Face) restored by the tiny DR2, on a local disk and on the test S3 server, under the shards' contract: one
output per input file at the same relative name, markers, resume (a committed file is skipped untouched, a missing one
redone byte-identical), the same bytes on S3, and outputs that Ray Data reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner.loop import run_restore
from pipeline.store import storage
from tests.pipeline.parquet_files import EXPECTED, assert_contract, read_output, write_parquet_archive

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def config(src: str, dst: str, **kw: Any) -> PipelineConfig:
    base = {"restorer": RestorerKind.TINY, "N": 4, "tau": 2, "detect_batch_size": 4, "restore_batch_size": 4}
    return PipelineConfig(src=src, dst=dst, **{**base, **kw})


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pa.Table]]:
    root = tmp_path_factory.mktemp("pq-archive")
    return root, write_parquet_archive(root)


@pytest.fixture(scope="module")
def first_run(archive: tuple[Path, dict[str, pa.Table]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, _ = archive
    dst = tmp_path_factory.mktemp("pq-out") / "out"
    summary = run_restore(config(str(src / "**" / "*.parquet"), str(dst)))
    assert summary.units_done == 3 and summary.samples == 13 and not summary.failed, summary.table()
    return dst


def test_restore_keeps_the_parquet_contract(archive: tuple[Path, dict[str, pa.Table]], first_run: Path) -> None:
    _, tables = archive
    for name, want in tables.items():
        got, meta = read_output(str(first_run), name)
        assert_contract(name, got, meta, want)
        stats = json.loads((first_run / name.replace(".parquet", ".stats.json")).read_text())
        assert stats["samples"] == want.num_rows and stats["format"] == "parquet", stats
        assert sum(stats["statuses"].values()) == want.num_rows
    ds = ray.data.read_parquet([str(first_run / n) for n in sorted(tables)][:1])  # Ray Data reads them back
    rows = ds.take_all()
    assert [json.loads(r["dr2"])["status"] for r in rows] == EXPECTED["hf/train.parquet"]


def test_rerun_skips_and_a_lost_file_is_redone_byte_identical(archive: tuple[Path, Any], first_run: Path) -> None:
    src, tables = archive
    cfg = config(str(src / "**" / "*.parquet"), str(first_run))
    before = {n: (first_run / n).stat().st_mtime_ns for n in tables}
    again = run_restore(cfg)
    assert (again.units_skipped, again.units_done) == (3, 0)
    lost = "laion/part-0.parquet"
    data = (first_run / lost).read_bytes()
    (first_run / lost).unlink()
    (first_run / lost.replace(".parquet", ".stats.json")).unlink()
    resumed = run_restore(cfg)
    assert (resumed.units_skipped, resumed.units_done) == (2, 1)
    assert (first_run / lost).read_bytes() == data
    assert {n: (first_run / n).stat().st_mtime_ns for n in tables if n != lost} == {
        n: t for n, t in before.items() if n != lost}


def test_on_s3_the_same_outputs(archive: tuple[Path, dict[str, pa.Table]], first_run: Path, s3_bucket: str) -> None:
    src, tables = archive
    s3 = f"s3://{s3_bucket}"
    for name in tables:
        storage.write_bytes_atomic(f"{s3}/data/{name}", (src / name).read_bytes())
    summary = run_restore(config(f"{s3}/data/**/*.parquet", f"{s3}/restored", rows_per_block=2))
    assert summary.units_done == 3 and not summary.failed, summary.table()
    for name in tables:
        assert storage.read_bytes(f"{s3}/restored/{name}") == (first_run / name).read_bytes(), name
    assert storage.list_prefix(f"{s3}/restored/_dr2_staging/") == []
    assert run_restore(config(f"{s3}/data/**/*.parquet", f"{s3}/restored")).units_skipped == 3
