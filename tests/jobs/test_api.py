"""The Python API (pipeline/api.py) against the command line: the same photos, the same config, the same bytes.

``dr2 restore`` runs (in-process, through ``jobs.cli.main``) on a shard of real photos (the astronaut, Grace Hopper,
an image without a face, a corrupt JPEG); the one-image :class:`~pipeline.api.Restorer`, given each sample's key and
shard name, must return the very output image and ``dr2.json`` bytes the shard holds, and :func:`pipeline.api.run`
must write the very same shard. :func:`~pipeline.api.restore_dataset` on a parquet of the same photos must give each
row what the one-image call gives it, keep every other column, and drop no row.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import webdataset as wds
from PIL import Image

from jobs.cli import main
from pipeline import Restorer, RestorerKind, Status, restore_dataset, run
from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, degrade, grace_hopper_bytes

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

# the tiny restorer, few DR2 steps: quick on two cores; every value also given to the CLI below
OPTIONS = {"restorer": RestorerKind.TINY, "N": 4, "tau": 2, "omega": 4, "restore_batch_size": 4}
CLI_OPTIONS = ["--restorer", "tiny", "--N", "4", "--tau", "2", "--omega", "4", "--restore-batch-size", "4"]


def photos() -> list[tuple[str, str, bytes, str]]:
    """(key, member suffix, bytes, expected status): real photos, one without a face, one corrupt."""
    astro_png = encode(astronaut(), "PNG")
    return [
        ("astronaut", "png", astro_png, "ok"),
        ("grace_hopper", "jpg", grace_hopper_bytes(), "ok"),
        ("astronaut_x4", "jpg", encode(degrade(astronaut(), 4, seed=1), quality=90), "ok"),
        ("gradient", "png", encode(no_face_image(), "PNG"), "no_face"),
        ("corrupt", "jpg", grace_hopper_bytes()[:2000], "decode_error"),
    ]


def read_tar(path: Path) -> dict[str, dict[str, Any]]:
    return {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    src = tmp_path_factory.mktemp("api-src")
    with wds.TarWriter(str(src / "photos.tar")) as sink:
        for key, suffix, data, _ in photos():
            sink.write({"__key__": key, suffix: data})
    dst = tmp_path_factory.mktemp("api-cli") / "out"
    assert main(["restore", str(src / "photos.tar"), str(dst), *CLI_OPTIONS, "--quiet"]) == 0
    return src, dst


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return Restorer(**OPTIONS)


def test_one_image_api_is_byte_identical_to_the_cli(cli_run, restorer) -> None:
    _, dst = cli_run
    out = read_tar(dst / "photos.tar")
    statuses = []
    for key, suffix, data, want in photos():
        sample = out[key]
        result = restorer(data, key=key, unit="photos.tar", image_member=suffix)
        assert result.status.value == want, (key, result.error)
        assert result.output == sample[suffix], key  # the image the CLI wrote, byte for byte
        assert result.metadata_json == sample["dr2.json"], key  # and its dr2.json
        meta = json.loads(sample["dr2.json"])
        assert [list(f.box) for f in result.faces] == [f["box"] for f in meta["faces"]]
        for face, entry in zip(result.faces, meta["faces"], strict=True):
            assert [list(p) for p in face.landmarks] == entry["landmarks"]
            assert [list(row) for row in face.affine] == entry["affine"]
            assert face.quality is not None and face.quality.to_dict() == {
                k: v for k, v in entry["quality"].items() if k != "flags"}
            assert list(face.flags) == entry["quality"]["flags"]
            assert face.degradation is not None and face.degradation.verdict.value == entry["degradation"]["verdict"]
            assert face.crop is not None and face.restored_face is not None and face.crop.shape == (512, 512, 3)
        statuses.append(result.status)
    assert statuses.count(Status.OK) == 3  # the comparison covered restored faces, not only pass-throughs
    # the key and unit name the faces' noise: the content-hash default gives other bytes than this sample's
    key, suffix, data, _ = photos()[0]
    assert restorer(data).output != out[key][suffix]


def test_array_input_says_its_channel_order(restorer) -> None:
    rgb = astronaut()
    from_rgb = restorer(rgb, channels="rgb")
    from_bgr = restorer(np.ascontiguousarray(rgb[:, :, ::-1]), channels="bgr")
    assert from_rgb.ok and from_rgb.output == from_bgr.output  # the same photo either way
    assert from_rgb.rgb is not None and from_rgb.rgb.shape == rgb.shape
    assert np.array_equal(from_rgb.bgr, from_rgb.rgb[:, :, ::-1])
    assert np.abs(from_rgb.rgb.astype(int) - rgb).mean() > 0.1  # the tiny model changed the face
    with pytest.raises(ValueError, match="channels"):
        restorer(rgb)


def test_run_writes_what_the_cli_writes(cli_run, tmp_path) -> None:
    src, dst = cli_run
    summary = run(src=str(src / "photos.tar"), dst=str(tmp_path / "out"), progress="quiet", **OPTIONS)
    assert summary.units_done == 1 and summary.samples == 5 and not summary.failed
    assert dict(summary.statuses) == {"ok": 3, "no_face": 1, "decode_error": 1}
    assert (tmp_path / "out" / "photos.tar").read_bytes() == (dst / "photos.tar").read_bytes()


def _parquet(path: Path, hf: bool) -> Path:
    rows = photos()
    images: Any = [d for _, _, d, _ in rows]
    if hf:  # the Hugging Face image feature: a {bytes, path} struct
        images = pa.array([{"bytes": d, "path": f"{k}.{s}"} for k, s, d, _ in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"id": list(range(len(rows))), "caption": [f"photo {k}" for k, *_ in rows],
                      "image": images})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("hf", [False, True], ids=["bytes", "hf-struct"])
def test_restore_dataset_matches_the_one_image_api(restorer, tmp_path, hf) -> None:
    ds = restore_dataset(ray.data.read_parquet(str(_parquet(tmp_path / "in.parquet", hf))), **OPTIONS)
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(rows) == len(photos())  # no row dropped, the corrupt one included
    for row, (key, suffix, data, want) in zip(rows, photos(), strict=True):
        assert row["caption"] == f"photo {key}"  # other columns pass through
        image, restored = row["image"], row["restored_image"]
        if hf:
            assert image["path"] == restored["path"] == f"{key}.{suffix}"
            image, restored = image["bytes"], restored["bytes"]
        assert image == data  # the input column is unchanged
        assert row["dr2_status"] == want
        one = restorer(data)  # default key: the content hash, as restore_dataset uses
        assert restored == one.output, key
        assert row["dr2"].encode() == one.metadata_json, key
        if want != "ok":
            assert restored == data  # passed through unchanged, as the CLI does
        else:
            assert np.asarray(Image.open(io.BytesIO(restored))).shape == np.asarray(Image.open(io.BytesIO(data))).shape


def test_restore_dataset_refuses_clashing_columns(tmp_path) -> None:
    ds = ray.data.read_parquet(str(_parquet(tmp_path / "in.parquet", False)))
    with pytest.raises(ValueError, match="already has column"):
        restore_dataset(ds, metadata_column="caption", **OPTIONS)
    with pytest.raises(ValueError, match="no column"):
        restore_dataset(ds, image_column="jpg", **OPTIONS)
    with pytest.raises(ValueError, match="never drops rows"):
        restore_dataset(ds, skip_status="decode_error", **OPTIONS)
