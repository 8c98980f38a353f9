"""An image column in both shapes users keep (pipeline/formats/image_column.py): encoded bytes, and Hugging Face's
``{bytes, path}`` struct, read and rebuilt in the input's own type with its paths and nulls, as the parquet format
and restore_dataset both use them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.formats.image_column import as_image_column, image_bytes, is_image_struct

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_column() -> pa.Array:
    return pa.array([{"bytes": b"a", "path": "x.png"}, None, {"bytes": None, "path": "y.jpg"}], HF_IMAGE)


def test_image_bytes_of_both_shapes_and_a_null_struct_is_a_null_image() -> None:
    data, paths = image_bytes(hf_column())
    assert data.to_pylist() == [b"a", None, None]
    assert paths is not None and paths.to_pylist() == ["x.png", None, "y.jpg"]
    chunks = [pa.array([b"p"], pa.large_binary()), pa.array([None], pa.large_binary())]
    data, paths = image_bytes(pa.chunked_array(chunks))
    assert data.to_pylist() == [b"p", None] and paths is None
    assert is_image_struct(HF_IMAGE) and not is_image_struct(pa.struct([("bytes", pa.string())]))


@pytest.mark.parametrize("bad", [pa.array(["a.png"]), pa.array([{"path": "a.png"}]), pa.array([1])])
def test_what_is_not_an_image_column_says_what_one_is(bad: pa.Array) -> None:
    with pytest.raises(ValueError, match="encoded image bytes"):
        image_bytes(bad)


def test_rebuilt_in_the_input_type_with_its_paths_and_nulls() -> None:
    col = hf_column()
    new = pa.array([b"A", None, b"C"], pa.large_binary())
    out = as_image_column(col.type, new, col)  # restore_dataset: the input column itself around the new bytes
    assert out.type == HF_IMAGE
    assert out.to_pylist() == [{"bytes": b"A", "path": "x.png"}, None, {"bytes": b"C", "path": "y.jpg"}]
    # the parquet format: the struct's other fields as a reader gives them without the bytes
    paths_only = pa.array([{"path": "x.png"}, None, {"path": "y.jpg"}], pa.struct([("path", pa.string())]))
    assert as_image_column(HF_IMAGE, pa.chunked_array([new]), paths_only).to_pylist() == out.to_pylist()
    assert as_image_column(pa.binary(), new).type == pa.binary()
    only_bytes = pa.struct([("bytes", pa.large_binary())])
    assert as_image_column(only_bytes, new).to_pylist() == [{"bytes": b"A"}, None, {"bytes": b"C"}]
    with pytest.raises(ValueError, match="'path' is needed"):
        as_image_column(HF_IMAGE, new)
