"""The README's first command: ``dr2 demo`` builds its archive, restores it and writes a preview; and the
detection preview (boxes, landmarks, aligned crops, pasted-back output) of a real passthrough run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from jobs.cli import main
from jobs.demo import BOX_COLOUR, DEMO_STRENGTHS, build_demo_archive, write_detection_preview
from pipeline.imaging.faces import align_faces
from pipeline.imaging.mtcnn import load_mtcnn

EXPECTED_STATUSES = {
    "astronaut_x2": "ok", "hopper_x4": "ok", "astronaut_x8": "ok", "coffee": "no_face", "corrupt": "decode_error",
    "hopper_x2": "ok", "astronaut_x4": "ok", "hopper_x8": "ok", "truncated_png": "decode_error",
    "caption_only": "no_image",
}


def _statuses(dst: Path) -> dict[str, str]:
    out = {}
    for shard in ("shard-000.tar", "shard-001.tar"):
        for sample in wds.WebDataset(str(dst / shard), shardshuffle=False):
            out[sample["__key__"]] = json.loads(sample["dr2.json"])["status"]
    return out


def _box_green(bgr: np.ndarray) -> int:
    """Pixels of the box colour, allowing for the downscale's blending."""
    b, g, r = (bgr[..., i].astype(int) for i in range(3))
    assert BOX_COLOUR == (0, 255, 0)
    return int(((g > 170) & (r < 100) & (b < 100)).sum())


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_demo_archive_holds_three_strengths_a_non_face_and_broken_samples(tmp_path: Path) -> None:
    archive = build_demo_archive(tmp_path)
    samples = {s["__key__"]: s for shard in ("shard-000.tar", "shard-001.tar")
               for s in wds.WebDataset(str(archive / shard), shardshuffle=False)}
    assert set(samples) == set(EXPECTED_STATUSES)
    for photo in ("astronaut", "hopper"):
        sharpness = [cv2.Laplacian(cv2.cvtColor(_rgb(samples[f"{photo}_x{f}"]["jpg"]), cv2.COLOR_RGB2GRAY),
                                   cv2.CV_64F).var() for f in DEMO_STRENGTHS]
        assert sharpness == sorted(sharpness, reverse=True), (photo, sharpness)  # x2 sharpest, x8 blurriest
    for key, member in (("corrupt", "jpg"), ("truncated_png", "png")):
        with pytest.raises(OSError):
            _rgb(samples[key][member])
    assert not ({"jpg", "png"} & set(samples["caption_only"]))


@pytest.mark.usefixtures("ray_local")
def test_detection_preview_of_a_passthrough_run(tmp_path: Path) -> None:
    archive = build_demo_archive(tmp_path / "archive")
    dst = tmp_path / "restored"
    assert main(["restore", str(archive / "shard-{000..001}.tar"), str(dst), "--restorer", "passthrough"]) == 0
    assert _statuses(dst) == EXPECTED_STATUSES

    tile = 200
    png = write_detection_preview(archive, dst, tmp_path / "detections.png", tile=tile)
    pic = cv2.imread(str(png))
    assert pic is not None
    # 7 photo rows (input | output | one aligned face), 3 caption rows (2 undecodable, 1 without image)
    assert pic.shape == (7 * tile + 3 * 24, 3 * tile, 3)

    row = pic[:tile]  # astronaut_x2
    inp_tile, out_tile, crop_tile = row[:, :tile], row[:, tile : 2 * tile], row[:, 2 * tile :]
    assert _box_green(inp_tile) > 100  # the box is drawn
    coffee = pic[3 * tile : 4 * tile, :tile]
    assert _box_green(coffee) == 0  # no face, no box
    assert not pic[3 * tile : 4 * tile, 2 * tile :].any()  # and no crop

    # the output column is the passthrough result: the input with its face pasted back (nearly unchanged)
    src = {s["__key__"]: s for s in wds.WebDataset(str(archive / "shard-000.tar"), shardshuffle=False)}
    photo = _rgb(src["astronaut_x2"]["jpg"])
    expect = cv2.resize(photo, (tile, tile), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(out_tile[22:].astype(int) - expect[22:]).mean() < 4

    # the crop column is the face as the aligner cuts it from the input (dots and rings drawn over it)
    (detection,) = load_mtcnn().detect([photo])
    crop = cv2.resize(align_faces(photo, detection)[0].crop, (tile, tile), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.median(np.abs(crop_tile[22:].astype(int) - crop[22:])) < 8  # shifted 10%: 34; another face: 57


@pytest.mark.usefixtures("ray_local")
def test_demo_restores_its_archive_and_writes_a_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "passthrough" in out and "dr2 weights import" in out and "preview" in out  # says what ran, and the way on
    assert _statuses(tmp_path / "restored") == EXPECTED_STATUSES
    preview = cv2.imread(str(tmp_path / "preview.png"))
    # banner + one row per sample with an image member (all but caption_only)
    assert preview is not None and preview.shape[1] == 512 and preview.shape[0] == 32 + 9 * 256
    assert cv2.imread(str(tmp_path / "detections.png")) is not None
    report = json.loads((tmp_path / "restored" / "_dr2" / "report" / "report.json").read_text())
    assert report["counts"]["samples"] == {"ok": 6, "no_face": 1, "decode_error": 2, "no_image": 1}
    assert report["counts"]["faces_restored"] == 6 and len(report["faces"]) >= 1
    face = report["faces"][0]
    assert set(face["images"]) == {"input", "dr2", "enhanced", "pasted"}
    for rel in face["images"].values():
        assert (tmp_path / "restored" / "_dr2" / "report" / rel).is_file()
    assert "report" in out and "index.html" in out
