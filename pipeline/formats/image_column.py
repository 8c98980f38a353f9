"""An Arrow column of images, in the two shapes users keep them: encoded bytes (``binary``, ``large_binary``) or
Hugging Face's ``Image`` feature, a ``{bytes, path}`` struct. One reading and one rebuilding of both, for the parquet
format (pipeline/formats/parquet.py) and for a user's Ray dataset (pipeline/graph/dataset.py): the restored column
comes back in the input column's own type, its other struct fields (``path``) and its nulls kept."""

from __future__ import annotations

import pyarrow as pa


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def is_image_struct(t: pa.DataType) -> bool:
    """Hugging Face's ``Image`` feature: a struct with a binary ``bytes`` field (and usually ``path``)."""
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and is_binary(t.field("bytes").type)


def _array(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column


def image_bytes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """(the encoded images, the paths or None) of an image column; a null struct gives a null image. Raises
    ValueError saying what an image column must be for any other type."""
    arr = _array(column)
    if is_image_struct(arr.type):
        flat = arr.flatten()  # children with the struct's own nulls applied
        at = arr.type.get_field_index("path")
        return flat[arr.type.get_field_index("bytes")], (flat[at] if at >= 0 else None)
    if not is_binary(arr.type):
        raise ValueError(f"an image column holds encoded image bytes (binary) or a {{bytes, path}} struct (Hugging "
                         f"Face's image feature), not {arr.type}")
    return arr, None


def as_image_column(t: pa.DataType, data: pa.ChunkedArray | pa.Array,
                    other: pa.ChunkedArray | pa.Array | None = None) -> pa.Array:
    """``data`` (encoded images) as a column of type ``t``, an image column's type. For a struct, its fields other
    than ``bytes`` and its nulls come from ``other``: a struct array holding at least those fields (the input column
    itself, or those fields alone as a parquet reader reads them without the bytes); without ``other``, a struct of
    ``bytes`` alone, null where ``data`` is."""
    data = _array(data)
    if not pa.types.is_struct(t):
        return data.cast(t)
    rest = _array(other) if other is not None else None
    children = []
    for field in t:
        if field.name == "bytes":
            children.append(data.cast(field.type))
        elif rest is None:
            raise ValueError(f"the image struct's field {field.name!r} is needed to rebuild a column of type {t}")
        else:
            children.append(rest.field(field.name))
    mask = rest.is_null() if rest is not None else data.is_null()
    return pa.StructArray.from_arrays(children, fields=list(t), mask=mask)
