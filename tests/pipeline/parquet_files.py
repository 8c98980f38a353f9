"""Parquet inputs in the three shapes users hold, written with pyarrow as their tools write them:

* img2dataset's shards: ``key``, the image under ``jpg``, ``txt``, ``url``, ``width``/``height``, ``status``,
  ``error_message``; a failed download has a null ``jpg``;
* LAION/DataComp metadata joined with bytes: ``URL``, ``TEXT``, ``uid``, ``similarity`` and a ``large_binary`` column
  of image bytes whose name says nothing (``image_data``);
* Hugging Face datasets: ``image`` as the ``Image`` feature's struct ``{bytes, path}`` and a ``label``, with the
  ``huggingface`` schema metadata that ``datasets`` writes; a null image and a struct whose bytes are null.

Each holds a real (degraded) face photo, a photo without a face, a corrupt JPEG, and several row groups.
:func:`assert_contract` checks an output against its input: the contract of ``pipeline/formats/parquet.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.formats.parquet import DR2_COLUMN, image_column
from pipeline.imaging.decode import decode_image
from pipeline.store import storage
from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, degrade, grace_hopper

EXPECTED = {  # the dr2 status of each row, in order
    "img2dataset/00000.parquet": ["ok", "no_face", "no_image", "decode_error", "no_face"],
    "laion/part-0.parquet": ["ok", "no_face", "decode_error"],
    "hf/train.parquet": ["ok", "no_image", "no_image", "decode_error", "no_face"],
}

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"}, "label": {"dtype": "int64", "_type": "Value"}}}}).encode()}


def photos() -> dict[str, bytes]:
    return {
        "astro": encode(degrade(astronaut(), 4, seed=1), quality=90),
        "hopper": encode(degrade(grace_hopper(), 8, seed=2), quality=90),
        "plain": encode(no_face_image(), "PNG"),
        "plain2": encode(no_face_image(3), quality=90),
        "bad": encode(no_face_image(1))[:900],  # a JPEG cut short: decode_error
    }


def img2dataset_table(p: dict[str, bytes]) -> pa.Table:
    images = [p["astro"], p["plain"], None, p["bad"], p["plain2"]]
    n = len(images)
    return pa.table({
        "key": [f"{i:09d}" for i in range(n)],
        "jpg": pa.array(images, pa.binary()),
        "txt": [f"caption {i}" for i in range(n)],
        "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "width": pa.array([512, 320, None, 320, 320], pa.int64()),
        "height": pa.array([512, 240, None, 240, 240], pa.int64()),
        "status": ["success", "success", "failed_to_download", "success", "success"],
        "error_message": [None, None, "HTTP 404", None, None],
    }).replace_schema_metadata({b"img2dataset": b'{"version": "1.45"}'})


def laion_table(p: dict[str, bytes]) -> pa.Table:
    return pa.table({
        "URL": ["https://a.example/1.jpg", "https://a.example/2.png", "https://a.example/3.jpg"],
        "TEXT": ["a woman", "a gradient", None],
        "uid": ["u1", "u2", "u3"],
        "similarity": [0.31, 0.28, 0.3],
        "image_data": pa.array([p["hopper"], p["plain"], p["bad"]], pa.large_binary()),
    })


def hf_table(p: dict[str, bytes]) -> pa.Table:
    images = [{"bytes": p["astro"], "path": "astro.jpg"}, None, {"bytes": None, "path": "missing.jpg"},
              {"bytes": p["bad"], "path": "bad.jpg"}, {"bytes": p["plain"], "path": None}]
    return pa.table({"image": pa.array(images, HF_IMAGE), "label": [0, 1, 2, 3, 4]}).replace_schema_metadata(
        HF_METADATA)


def write_parquet_archive(root: Path, p: dict[str, bytes] | None = None) -> dict[str, pa.Table]:
    """The three files under ``root`` (``img2dataset/00000.parquet``, ``laion/part-0.parquet``, ``hf/train.parquet``),
    two rows per row group; returns {relative name: the table written}."""
    p = p or photos()
    tables = {"img2dataset/00000.parquet": img2dataset_table(p), "laion/part-0.parquet": laion_table(p),
              "hf/train.parquet": hf_table(p)}
    for name, table in tables.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / name, row_group_size=2)
    return tables


def read_output(dst: str, name: str) -> tuple[pa.Table, pq.FileMetaData]:
    with storage.open_read(storage.join(dst, name)) as f:
        pf = pq.ParquetFile(f)
        return pf.read(), pf.metadata


def assert_contract(name: str, got: pa.Table, meta: pq.FileMetaData, want: pa.Table) -> None:
    """The output contract of pipeline/formats/parquet.py, row by row and column by column."""
    col = image_column(want.schema)
    assert got.schema.names == [*want.schema.names, DR2_COLUMN], name
    assert got.schema.remove(got.schema.get_field_index(DR2_COLUMN)).equals(want.schema, check_metadata=True), name
    assert got.schema.field(DR2_COLUMN).type == pa.string()
    for other in want.schema.names:
        if other != col:
            assert got.column(other).combine_chunks().equals(want.column(other).combine_chunks()), (name, other)
    assert meta.num_row_groups == 3 if want.num_rows == 5 else 2  # the input's row groups (two rows each)
    docs = [json.loads(t) for t in got.column(DR2_COLUMN).to_pylist()]
    assert [d["status"] for d in docs] == EXPECTED[name], (name, [(d["status"], d["error"]) for d in docs])
    assert all(d["image_member"] == col for d in docs)
    before, after = want.column(col).to_pylist(), got.column(col).to_pylist()
    for i, (d, a, b) in enumerate(zip(docs, after, before, strict=True)):
        if isinstance(b, dict) or isinstance(a, dict):  # the HF struct: path and nulls kept, bytes replaced
            assert (a is None) == (b is None), (name, i)
            if a is None:
                continue
            assert a["path"] == b["path"], (name, i)
            a, b = a["bytes"], b["bytes"]
        if d["status"] == "ok":
            assert d["faces"] and a != b, (name, i)
            assert decode_image(a, max_pixels=10**8).rgb.shape == decode_image(b, max_pixels=10**8).rgb.shape
        else:
            assert a == b, (name, i, d["status"])  # passed through byte for byte (null stays null)
