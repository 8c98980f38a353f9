"""pipeline/formats/parquet.py without Ray: the three shapes of parquet archive (img2dataset, LAION-like, Hugging Face)
read, detected, restored (passthrough: faces re-encoded), staged and committed through the real stages and commit,
on a local disk and the test S3 server; the outputs read back by pyarrow and by Hugging Face ``datasets`` (which also
loads our output tars)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from dr2.restorer import PassthroughRestorer
from jobs.check import check_output
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats import format_of, shards
from pipeline.formats.parquet import DR2_COLUMN, image_column
from pipeline.formats.units import Unit, UnitKind
from pipeline.graph import stages
from pipeline.graph.models import build_detector
from pipeline.store import storage
from tests.pipeline.parquet_files import EXPECTED, HF_IMAGE, assert_contract, photos, read_output, write_parquet_archive

HASH = "p" * 64



def cfg_for(src: str, dst: str, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {"src": src, "dst": dst, "restorer": RestorerKind.PASSTHROUGH, "detect_batch_size": 2,
                            "restore_batch_size": 2, "input_format": "parquet"}
    return PipelineConfig(**{**base, **kw})


def restore_unit(unit: Unit, cfg: PipelineConfig, detector: Any | None) -> dict[str, Any]:
    """The stages in order, as the Ray graph runs them, then the commit; without a detector every image passes."""
    expected = None
    for block in stages.read_unit(unit, cfg):
        if detector is not None:
            block = pa.concat_tables([stages.restore_block(b, PassthroughRestorer(), cfg)
                                      for b in stages.detect_block(block, detector, cfg)])
        for s in stages.write_block(block, cfg, {"restorer": "test"}, HASH, unit.kind).to_pylist():
            if s["first"] == -1:
                expected = s["unit_size"]
                assert not s["error"], s["error"]
    assert expected is not None
    return shards.commit(unit, cfg.dst, HASH, expected, {"format": unit.kind.value}, options=cfg.storage_options())


def restore_archive(src: str, dst: str, detector: Any | None, **kw: Any) -> list[Unit]:
    cfg = cfg_for(src, dst, **kw)
    units = format_of(UnitKind.PARQUET).list_units(cfg)
    assert sorted(u.name for u in units) == sorted(EXPECTED)
    for u in units:
        restore_unit(u, cfg, detector)
    return units


@pytest.fixture(scope="module")
def detector() -> Any:
    return build_detector(PipelineConfig(), torch.device("cpu"))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, pa.Table]]:
    root = tmp_path_factory.mktemp("parquet-in")
    return root, write_parquet_archive(root, photos())


@pytest.fixture(scope="module")
def restored(archive: tuple[Path, dict[str, pa.Table]], detector: Any,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    src, _ = archive
    dst = tmp_path_factory.mktemp("parquet-out") / "out"
    restore_archive(str(src / "**" / "*.parquet"), str(dst), detector)
    return dst


def test_image_column_rules() -> None:
    binary = pa.field("x", pa.binary())
    assert image_column(pa.schema([("key", pa.string()), ("txt", pa.string()), ("jpg", pa.binary()),
                                   ("png", pa.binary())])) == "jpg"
    assert image_column(pa.schema([("PNG", pa.large_binary()), ("webp", pa.binary())])) == "PNG"
    assert image_column(pa.schema([("label", pa.int64()), ("picture", HF_IMAGE)])) == "picture"
    assert image_column(pa.schema([("URL", pa.string()), ("image_data", pa.large_binary())])) == "image_data"
    with pytest.raises(ValueError, match="--image-column"):
        image_column(pa.schema([binary, ("y", pa.binary())]))
    with pytest.raises(ValueError, match="no image column"):
        image_column(pa.schema([("text", pa.string())]))
    assert image_column(pa.schema([binary, ("y", pa.binary())]), "y") == "y"
    with pytest.raises(ValueError, match="no such column"):
        image_column(pa.schema([binary]), "z")
    with pytest.raises(ValueError, match="type string"):
        image_column(pa.schema([("z", pa.string())]), "z")


def test_the_three_shapes_round_trip_locally(archive: tuple[Path, dict[str, pa.Table]], restored: Path) -> None:
    _, tables = archive
    for name, want in tables.items():
        got, meta = read_output(str(restored), name)
        assert_contract(name, got, meta, want)
    checks = check_output(str(restored))
    assert [(c.unit, c.samples, c.ok) for c in checks] == [(n, tables[n].num_rows, True) for n in sorted(tables)]
    marker = json.loads((restored / "hf" / "train.stats.json").read_text())
    assert marker["count"] == 5 and marker["format"] == "parquet"
    assert not list(restored.glob("_dr2_staging/**/*"))


def test_on_s3_the_same_bytes_and_blocks_cut_anywhere_change_nothing(
        archive: tuple[Path, dict[str, pa.Table]], restored: Path, s3_bucket: str, detector: Any) -> None:
    """On S3 (read by ranged GETs, committed by multipart-capable uploads) and with one row per block (a part per
    row), the outputs are byte-identical to the local run's."""
    src, tables = archive
    s3 = f"s3://{s3_bucket}"
    for name in tables:
        storage.write_bytes_atomic(f"{s3}/in/{name}", (src / name).read_bytes())
    restore_archive(f"{s3}/in/", f"{s3}/out", detector, rows_per_block=1)
    for name in tables:
        assert storage.read_bytes(f"{s3}/out/{name}") == (restored / name).read_bytes(), name
    assert all(c.ok for c in check_output(f"{s3}/out"))
    assert storage.list_prefix(f"{s3}/out/_dr2_staging/") == []


def test_check_output_sees_a_damaged_parquet(archive: tuple[Path, dict[str, pa.Table]], tmp_path: Path) -> None:
    src, _ = archive
    dst = tmp_path / "out"
    restore_archive(str(src), str(dst), None)
    out = dst / "laion" / "part-0.parquet"
    data = out.read_bytes()
    out.write_bytes(data[:-9] + b"X" * 9)  # the footer's tail: same size, not parquet
    (dst / "stray.parquet").write_bytes(data)
    problems = {c.unit: c.problem for c in check_output(str(dst)) if not c.ok}
    assert set(problems) == {"laion/part-0.parquet", "stray.parquet"}, problems
    assert "sha256" in problems["laion/part-0.parquet"] and "no marker" in problems["stray.parquet"]


def test_an_unusable_file_is_a_unit_error_not_a_crash(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": ["no images here"]}), src / "t.parquet")
    (src / "junk.parquet").write_bytes(b"not parquet at all")
    cfg = cfg_for(str(src), str(tmp_path / "out"))
    for unit in format_of(UnitKind.PARQUET).list_units(cfg):
        end = pa.concat_tables(stages.read_unit(unit, cfg)).to_pylist()[-1]
        assert end["unit_size"] == -1, unit.name
        assert ("no image column" if unit.name == "t.parquet" else "Parquet") in end["error"], end["error"]


def test_huggingface_datasets_and_pyarrow_read_our_outputs(
        archive: tuple[Path, dict[str, pa.Table]], restored: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets.load_dataset("parquet")`` on each output parquet and ``load_dataset("webdataset")`` on an output
    tar made by the same stages: every sample, with its dr2 metadata."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    _, tables = archive
    for name, want in tables.items():
        ds = datasets.load_dataset("parquet", data_files={"train": [str(restored / name)]}, split="train",
                                   cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == want.num_rows and DR2_COLUMN in ds.column_names, name
        assert [json.loads(t)["status"] for t in ds[DR2_COLUMN]] == EXPECTED[name], name
        assert pq.read_table(restored / name).num_rows == want.num_rows
    hf = datasets.load_dataset("parquet", data_files=str(restored / "hf" / "train.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert isinstance(hf.features["image"], datasets.Image)  # the huggingface metadata is kept: still an Image
    assert np.asarray(hf[0]["image"]).shape == (512, 512, 3)

    # a tar through the same stages and commit, read by datasets' webdataset loader
    p = photos()
    tar_src = tmp_path / "tars" / "s.tar"
    tar_src.parent.mkdir()
    with wds.TarWriter(str(tar_src)) as sink:
        for i, k in enumerate(("plain", "plain2", "bad")):
            sink.write({"__key__": f"k{i}", "jpg": p[k], "txt": f"caption {i}".encode()})
    cfg = cfg_for(str(tar_src), str(tmp_path / "tar-out"), input_format="webdataset")
    (unit,) = format_of(UnitKind.SHARD).list_units(cfg)
    restore_unit(unit, cfg, None)
    ds = datasets.load_dataset("webdataset", data_files={"train": [str(tmp_path / "tar-out" / "s.tar")]},
                               split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.num_rows == 3 and ds["__key__"] == ["k0", "k1", "k2"]
    assert [m["status"] for m in ds["dr2.json"]] == ["no_face", "no_face", "no_face"]  # parsed to dicts
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_image_column_enters_the_config_hash_only_when_set() -> None:
    """Left at its default, the new field leaves every config hash as it was: DSTs made before it keep resuming."""
    from pipeline.config import config_hash
    from pipeline.imaging.degradation import ESTIMATOR_VERSION

    base = PipelineConfig()
    before = {k: v for k, v in base.to_dict().items() if k not in base.EXECUTION_FIELDS and k != "image_column"}
    assert base.output_hash({}) == config_hash({"config": before, "models": {}, "estimator": ESTIMATOR_VERSION})
    assert PipelineConfig(image_column="jpg").output_hash({}) != base.output_hash({})


def measure_peak(root: str, groups: int) -> None:
    """(run in a fresh process) Write a parquet file of ``groups`` row groups of 10 MB, then read, stage and commit
    it; print the peak RSS growth of the read and commit in MiB."""
    import resource

    rng = np.random.default_rng(0)
    schema = pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string())])
    os.makedirs(f"{root}/in", exist_ok=True)
    with pq.ParquetWriter(f"{root}/in/big.parquet", schema) as w:
        for g in range(groups):
            images = pa.array([rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for _ in range(100)])
            w.write_table(pa.table({"key": [f"{g}-{i}" for i in range(100)], "jpg": images, "txt": ["t"] * 100},
                                   schema=schema))
            del images
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = cfg_for(f"{root}/in", f"{root}/out")
    (unit,) = format_of(UnitKind.PARQUET).list_units(cfg)
    restore_unit(unit, cfg, None)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)


@pytest.mark.slow
def test_a_large_file_is_read_and_committed_in_bounded_memory(tmp_path: Path) -> None:
    """A 380 MiB file (40 row groups) costs about one block and a row group of memory, not the file (reading it with
    one ``iter_batches`` over the file held ~520 MiB more)."""
    import subprocess
    import sys

    code = f"from tests.pipeline.test_parquet import measure_peak; measure_peak({str(tmp_path)!r}, 40)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONPATH": str(
                             Path(__file__).resolve().parents[2])})
    growth = int(out.stdout.strip().splitlines()[-1])
    assert growth < 250, f"peak RSS grew by {growth} MiB for a 380 MiB file"
    assert pq.ParquetFile(tmp_path / "out" / "big.parquet").metadata.num_row_groups == 40
