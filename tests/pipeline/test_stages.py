"""pipeline/graph/stages.py without Ray (STYLE rule 6): each stage function on real blocks, real photos, the real
MTCNN detector and real restorers; the restore fall-back that retries a failed batch one face at a time."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
import webdataset as wds
from PIL import Image

from dr2.restorer import PassthroughRestorer
from pipeline import schema as S
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats import shards
from pipeline.formats.units import Unit, UnitKind
from pipeline.formats.wds import iter_tar_samples
from pipeline.graph import stages
from pipeline.graph.models import build_detector
from pipeline.imaging.decode import decode_image, encode_image
from pipeline.imaging.faces import paste_faces
from pipeline.runner import report
from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, degrade, grace_hopper


def cfg_for(tmp_path: Path, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {"src": str(tmp_path / "in"), "dst": str(tmp_path / "out"),
                            "restorer": RestorerKind.PASSTHROUGH, "detect_batch_size": 2, "restore_batch_size": 2}
    return PipelineConfig(**{**base, **kw})


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Unit:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})
    return Unit(name=path.name, kind=UnitKind.SHARD, source=str(path))


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {
        "astro": encode(degrade(astronaut(), 4, seed=1), quality=90),
        "hopper": encode(degrade(grace_hopper(), 4, seed=2), quality=90),
        "plain": encode(no_face_image(), "PNG"),
        "bad": b"\xff\xd8 not a jpeg",
    }


@pytest.fixture(scope="module")
def detector() -> Any:
    return build_detector(PipelineConfig(), torch.device("cpu"))


def blocks_of(unit: Unit, cfg: PipelineConfig) -> list[pa.Table]:
    return list(stages.read_unit(unit, cfg))


def test_read_unit_makes_blocks_by_rows_and_bytes(tmp_path: Path) -> None:
    samples = [(f"k{i:02d}", {"jpg": bytes([i]) * 1000, "json": b"{}"}) for i in range(8)] + [("t", {"txt": b"x"})]
    unit = write_shard(tmp_path / "in" / "s.tar", samples)
    blocks = blocks_of(unit, cfg_for(tmp_path, rows_per_block=3))
    assert [b.num_rows for b in blocks] == [3, 3, 3, 1]  # the end row closes the last block
    table = pa.concat_tables(blocks)
    assert table.schema == S.ROW_SCHEMA
    assert table.column(S.INDEX).to_pylist() == [*range(9), S.END_INDEX]
    assert table.column(S.UNIT_SIZE).to_pylist()[-1] == 9
    assert table.column(S.STATUS).to_pylist()[-2] == S.Status.NO_IMAGE.value
    assert table.column(S.IMAGE).to_pylist()[3] == bytes([3]) * 1000
    assert table.column(S.MEMBER_NAMES).to_pylist()[3] == ["jpg", "json"]
    assert table.column(S.MEMBER_DATA).to_pylist()[3] == [b"", b"{}"]  # the image travels once
    by_bytes = blocks_of(unit, cfg_for(tmp_path, block_mb=1, rows_per_block=1000))
    assert len(by_bytes) == 1  # 9 KB is under 1 MiB
    big = [(f"b{i}", {"jpg": bytes(700_000)}) for i in range(4)]
    unit_big = write_shard(tmp_path / "in" / "big.tar", big)
    assert [b.num_rows for b in blocks_of(unit_big, cfg_for(tmp_path, block_mb=1))] == [2, 2, 1]


def test_read_unit_keeps_what_a_truncated_shard_holds(tmp_path: Path) -> None:
    samples = [(f"k{i}", {"jpg": bytes([i]) * 3000, "json": b"{}"}) for i in range(4)]
    unit = write_shard(tmp_path / "in" / "s.tar", samples)
    data = Path(unit.source).read_bytes()
    Path(unit.source).write_bytes(data[: 512 * 16])
    table = pa.concat_tables(blocks_of(unit, cfg_for(tmp_path)))
    statuses = table.column(S.STATUS).to_pylist()
    assert statuses[-2] == S.Status.TRUNCATED.value and "truncated" in table.column(S.ERROR).to_pylist()[-1]
    assert table.column(S.UNIT_SIZE).to_pylist()[-1] == table.num_rows - 1


def _block(tmp_path: Path, photos: dict[str, bytes], names: list[str], cfg: PipelineConfig) -> pa.Table:
    unit = write_shard(tmp_path / "in" / "p.tar", [(n, {"jpg": photos[n], "cls": n.encode()}) for n in names])
    return pa.concat_tables(blocks_of(unit, cfg))


def test_detect_block_decodes_detects_aligns_and_reblocks_by_faces(tmp_path: Path, photos: dict[str, bytes],
                                                                   detector: Any) -> None:
    cfg = cfg_for(tmp_path, faces_per_block=1)
    table = _block(tmp_path, photos, ["astro", "plain", "bad", "hopper"], cfg)
    out = list(stages.detect_block(table, detector, cfg))
    assert len(out) >= 2  # faces_block=1: a new block after each image with a face
    got = pa.concat_tables(out)
    assert got.num_rows == table.num_rows and got.column(S.KEY).to_pylist() == table.column(S.KEY).to_pylist()
    status = dict(zip(got.column(S.KEY).to_pylist(), got.column(S.STATUS).to_pylist(), strict=True))
    assert status["plain"] == "no_face" and status["bad"] == "decode_error" and status["astro"] == "pending"
    faces = dict(zip(got.column(S.KEY).to_pylist(), got.column(S.FACES).to_pylist(), strict=True))
    assert len(faces["astro"]) == 1 and len(faces["hopper"]) == 1
    assert len(faces["astro"][0]["landmarks"]) == 10 and len(faces["astro"][0]["affine"]) == 6
    crops = got.column(S.CROPS).to_pylist()[0]
    assert len(crops) == 1 and len(crops[0]) == 512 * 512 * 3
    # no decoded photo travels on: the block grew by its two faces' crops and the records, not by any photo's pixels
    assert got.nbytes - table.nbytes < 2 * 512 * 512 * 3 + 64 * 1024 < 512 * 600 * 3 * 2
    assert got.column(S.TIMINGS).to_pylist()[0]["detect"] > 0


class FailsOnDarkFaces(PassthroughRestorer):
    """A restorer that refuses any batch holding an all-black face, as a GPU kernel might fail on one input."""

    def restore(self, faces: np.ndarray, keys: Any, *, N: int, tau: int) -> np.ndarray:
        if any(f.max() == 0 for f in faces):
            raise RuntimeError("cannot restore a black face")
        return 255 - faces

    def restore_stages(self, faces: np.ndarray, keys: Any, *, N: int, tau: int) -> dict[str, np.ndarray]:
        out = self.restore(faces, keys, N=N, tau=tau)
        return {"dr2": out, "enhanced": out}


def test_restore_block_retries_a_failed_batch_face_by_face(tmp_path: Path, photos: dict[str, bytes],
                                                           detector: Any) -> None:
    cfg = cfg_for(tmp_path, faces_per_block=100)
    table = pa.concat_tables(list(stages.detect_block(_block(tmp_path, photos, ["astro", "hopper", "plain"], cfg),
                                                      detector, cfg)))
    crops = table.column(S.CROPS).to_pylist()
    crops[1] = [bytes(512 * 512 * 3)]  # hopper's face: black
    table = stages._replace(table, {S.CROPS: crops})
    out = stages.restore_block(table, FailsOnDarkFaces(), cfg)
    status = out.column(S.STATUS).to_pylist()
    assert status[:3] == ["pending", "restore_error", "no_face"]
    assert "cannot restore a black face" in out.column(S.ERROR).to_pylist()[1]
    restored = out.column(S.RESTORED).to_pylist()
    first = np.frombuffer(restored[0][0], np.uint8)
    assert np.array_equal(first, 255 - np.frombuffer(crops[0][0], np.uint8))  # restored alone, by the fall-back
    assert restored[1] is None


def test_write_block_decodes_again_composes_and_stages_one_part(tmp_path: Path, photos: dict[str, bytes],
                                                                detector: Any) -> None:
    cfg = cfg_for(tmp_path)
    table = _block(tmp_path, photos, ["astro", "plain", "bad"], cfg)
    table = pa.concat_tables([stages.restore_block(b, FailsOnDarkFaces(), cfg)
                              for b in stages.detect_block(table, detector, cfg)])
    summary = stages.write_block(table, cfg, {"restorer": "test"}, "c" * 64, UnitKind.SHARD).to_pylist()
    assert [(s["first"], s["last"]) for s in summary] == [(0, 2), (-1, -1)]
    assert dict(summary[0]["statuses"]) == {"ok": 1, "no_face": 1, "decode_error": 1}
    assert summary[0]["faces"] == 1 and summary[1][S.UNIT_SIZE] == 3
    unit = Unit(name="p.tar", kind=UnitKind.SHARD, source="")
    parts = shards._list_parts(unit.staging_uri(cfg.dst, "c" * 64), None)[0]
    assert [(a, b) for a, b, _ in parts] == [(0, 2)]
    samples = list(iter_tar_samples(parts[0][2], require_end_marker=False))
    assert [s.key for s in samples] == ["astro", "plain", "bad"]
    inputs = list(iter_tar_samples(str(tmp_path / "in" / "p.tar")))
    assert [n for n, _ in samples[0].members] == [n for n, _ in inputs[0].members] + ["dr2.json"]  # input order
    meta = json.loads(dict(samples[0].members)["dr2.json"])
    assert meta["status"] == "ok" and len(meta["faces"]) == 1 and len(meta["faces"][0]["landmarks"]) == 5
    assert dict(samples[1].members)["jpg"] == photos["plain"] and dict(samples[2].members)["jpg"] == photos["bad"]
    # the output equals a paste-back onto a fresh decode of the input bytes
    img = decode_image(photos["astro"], max_pixels=cfg.max_pixels)
    crop = np.frombuffer(table.column(S.RESTORED).to_pylist()[0][0], np.uint8).reshape(512, 512, 3)
    affine = np.array(meta["faces"][0]["affine"], np.float64)
    want = encode_image(img, paste_faces(img.rgb, [affine], [crop]), jpeg_quality=cfg.jpeg_quality)
    assert dict(samples[0].members)["jpg"] == want


def test_compose_keeps_only_the_faces_regions_of_the_composed_photo(tmp_path: Path, photos: dict[str, bytes],
                                                                     detector: Any) -> None:
    cfg = cfg_for(tmp_path)
    table = pa.concat_tables([stages.restore_block(b, FailsOnDarkFaces(), cfg) for b in stages.detect_block(
        _block(tmp_path, photos, ["astro", "plain", "hopper"], cfg), detector, cfg)])
    composed = stages.compose_block(table, cfg)
    assert composed.status[:3] == ["ok", "no_face", "ok"] and sorted(composed.pasted) == [0, 2]
    for r, name in ((0, "astro"), (2, "hopper")):
        img = decode_image(photos[name], max_pixels=cfg.max_pixels)  # a fresh decode, a whole-photo paste
        faces = table.column(S.FACES)[r].as_py()
        crops = [np.frombuffer(c, np.uint8).reshape(512, 512, 3) for c in table.column(S.RESTORED)[r].as_py()]
        whole = paste_faces(img.rgb, [np.array(f["affine"], np.float64).reshape(2, 3) for f in faces], crops)
        assert composed.output[r] == encode_image(img, whole, jpeg_quality=cfg.jpeg_quality)
        for region, face in zip(composed.pasted[r], faces, strict=True):
            np.testing.assert_array_equal(region, report.pasted_region(whole, tuple(face["box"])))
            assert region.base is not None and region.base.size < whole.size  # the faces' part, not the photo
    assert stages.compose_block(table, cfg_for(tmp_path, report=False)).pasted == {}


@pytest.mark.parametrize("kind", ["jpeg", "rgba_png", "png16", "gray", "exif_rotated"])
def test_compose_decodes_each_format_again_as_detection_did(tmp_path: Path, kind: str) -> None:
    """The paste-back decodes the row's image bytes itself (no pixels travel from detection): for every kind of
    decoded image (alpha, 16-bit, gray, EXIF-rotated), its output is a paste onto ``decode_image`` of those bytes."""
    rgb = degrade(astronaut(), 2, seed=0)[:300, :260]
    buf = io.BytesIO()
    if kind in ("jpeg", "exif_rotated"):
        exif = Image.Exif()
        exif[0x0112] = 6 if kind == "exif_rotated" else 1
        Image.fromarray(rgb).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "rgba_png":
        Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)])).save(buf, "PNG")
    elif kind == "png16":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    else:
        Image.fromarray(rgb[..., 1]).save(buf, "PNG")
    data = buf.getvalue()
    d = decode_image(data, max_pixels=10**8)
    affine = np.array([[2.0, 0.1, -40.0], [-0.1, 2.0, -30.0]])  # photo -> crop: a face region inside the photo
    face = np.full((512, 512, 3), 200, np.uint8)
    record = {"box": [20.0, 15.0, 200.0, 240.0], "score": 1.0, "landmarks": [0.0] * 10,
              "affine": [float(v) for v in affine.ravel()]}
    table = stages.block_table({S.IMAGE: [data], S.INDEX: [0], S.STATUS: ["pending"], S.ERROR: [""],
                                S.FACES: [[record]], S.RESTORED: [[face.tobytes()]]}, 1)
    composed = stages.compose_block(table, cfg_for(tmp_path))
    assert composed.status == ["ok"], composed.error
    want = encode_image(d, paste_faces(d.rgb, [affine], [face]))
    assert composed.output[0] == want and want != data


def test_skip_status_leaves_samples_out_of_the_output_but_in_the_counts(tmp_path: Path, photos: dict[str, bytes],
                                                                       detector: Any) -> None:
    cfg = cfg_for(tmp_path, skip_status="decode_error, no_image")
    table = pa.concat_tables([stages.restore_block(b, FailsOnDarkFaces(), cfg) for b in stages.detect_block(
        _block(tmp_path, photos, ["astro", "bad", "plain"], cfg), detector, cfg)])
    summary = stages.write_block(table, cfg, {}, "c" * 64, UnitKind.SHARD).to_pylist()
    assert dict(summary[0]["statuses"]) == {"ok": 1, "decode_error": 1, "no_face": 1} and summary[0]["written"] == 2
    unit = Unit(name="p.tar", kind=UnitKind.SHARD, source="")
    part = shards._list_parts(unit.staging_uri(cfg.dst, "c" * 64), None)[0][0]
    assert (part[0], part[1]) == (0, 2)  # the part still covers every index: the unit commits as usual
    assert [s.key for s in iter_tar_samples(part[2], require_end_marker=False)] == ["astro", "plain"]
    with pytest.raises(ValueError, match="unknown status"):
        cfg_for(tmp_path, skip_status="broken")
