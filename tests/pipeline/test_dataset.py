"""A user's batch in and out of the record (pipeline/graph/dataset.py), without Ray: the real detector, rows that hold
nothing to restore (no face, corrupt, no image at all), the user's columns and types given back unchanged."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph.dataset import content_key, finish_batch, image_suffix, rows_from_batch
from pipeline.graph.models import build_detector, pick_device
from pipeline.graph.stages import detect_block
from tests.jobs.archive import encode, no_face_image

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_image_suffix_and_content_key() -> None:
    assert image_suffix(encode(no_face_image(), "PNG")) == "png"
    assert image_suffix(encode(no_face_image())) == "jpg"
    assert image_suffix(b"GIF89a...") is None and image_suffix(None) is None
    assert content_key(b"abc") == content_key(b"abc") != content_key(b"abd")


@pytest.mark.parametrize("hf", [False, True], ids=["bytes", "hf-struct"])
def test_rows_go_out_as_they_came_in_with_status_and_metadata(hf: bool) -> None:
    gradient, corrupt = encode(no_face_image(), "PNG"), encode(no_face_image())[:700]
    raw = [gradient, corrupt, None]
    image = (pa.array([{"bytes": d, "path": f"p{i}.img"} if d is not None else None for i, d in enumerate(raw)],
                      HF_IMAGE) if hf else pa.array(raw, pa.binary()))
    batch = pa.table({"caption": ["a", "b", "c"], "image": image, "n": pa.array([1, 2, 3], pa.int16())})
    cfg = PipelineConfig(restorer=RestorerKind.PASSTHROUGH, report=False)
    rows = rows_from_batch(batch, image_column="image", key_column="caption")
    assert rows.num_rows == 3 and rows.column("key").to_pylist() == ["a", "b", "c"]
    detected = pa.concat_tables(list(detect_block(rows, build_detector(cfg, pick_device("cpu")), cfg)))
    out = finish_batch(detected, cfg=cfg, model_info={"restorer": "passthrough"}, image_column="image",
                       output_column="restored_image", metadata_column="dr2")
    assert out.column_names == ["caption", "image", "n", "restored_image", "dr2", "dr2_status"]
    assert out.column("image").equals(batch.column("image"))  # the input column given back, bytes and type
    assert out.column("n").type == pa.int16() and out.column("caption").to_pylist() == ["a", "b", "c"]
    assert out.column("restored_image").type == image.type
    assert out.column("restored_image").to_pylist() == image.to_pylist()  # nothing restored: the input's bytes
    assert out.column("dr2_status").to_pylist() == ["no_face", "decode_error", "no_image"]
    metas = [json.loads(m) for m in out.column("dr2").to_pylist()]
    assert [m["key"] for m in metas] == ["a", "b", "c"] and metas[1]["error"]
    assert metas[0]["image_member"] == ("img" if hf else "png")  # the path's suffix, else the bytes' format


def test_replacing_the_image_column_and_clashes() -> None:
    batch = pa.table({"image": pa.array([None], pa.binary()), "dr2": ["mine"]})
    rows = rows_from_batch(batch, image_column="image", key_column=None)
    cfg = PipelineConfig(restorer=RestorerKind.PASSTHROUGH, report=False)
    with pytest.raises(ValueError, match="already has column"):
        finish_batch(rows, cfg=cfg, model_info={}, image_column="image", output_column="out", metadata_column="dr2")
    out = finish_batch(rows, cfg=cfg, model_info={}, image_column="image", output_column="image",
                       metadata_column="meta")
    assert out.column_names == ["image", "dr2", "meta", "meta_status"]
    assert out.column("meta_status").to_pylist() == ["no_image"]
