"""A user's images in and out of the record: the plain functions the Python API (``pipeline/api.py``) puts around the
stages that ``dr2 restore`` runs.

``dr2 restore`` reads its rows from units (shards, image chunks); the API gets them from a caller: images in memory
(:class:`pipeline.api.Restorer`), or a Ray dataset with an image column (:func:`pipeline.api.restore_dataset`). Both
become the same record (:data:`pipeline.schema.ROW_SCHEMA`, built by :func:`record_block`), go through the same
``detect_block`` and ``restore_block``, and are composed and described by the same ``compose_block`` and
``rows_metadata`` as the run's writer, so a face gets the same bytes and numbers whichever way it came.

For a dataset, :func:`rows_from_batch` turns a batch into record rows and carries the batch's own columns along
under a prefix (they ride through the stages untouched: stages only replace their own columns); the image column's
bytes travel once, in ``image``. :func:`finish_batch` composes and gives the batch its columns back, with the output
image and the ``dr2.json`` metadata added. No row is dropped: an image that cannot be restored keeps its bytes and
gets its status.

What names a face's noise, as in the run (:func:`pipeline.graph.stages.face_key`): the seed, a unit name (here
:data:`UNIT`), the sample's key and the face's index. The key is the caller's (``key_column``), else the image's
content hash (:func:`content_key`): deterministic whatever the blocks, and the same for the one-image API.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from pipeline import schema as S
from pipeline.config import PipelineConfig
from pipeline.formats.image_column import as_image_column, image_bytes
from pipeline.graph.stages import block_table, compose_block, rows_metadata

USER_PREFIX = "__dr2_user__."
"""The batch's own columns travel under this prefix, so that none can collide with the record's."""
UNIT = ""
"""The unit name of rows that come from the API (it seeds faces' noise with the key; an empty name by default)."""
STATUS_SUFFIX = "_status"
"""The metadata column's sibling holding each row's status as a plain string: filters need no JSON parsing."""

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"), (b"\x89PNG\r\n\x1a\n", 0, "png"), (b"WEBP", 8, "webp"), (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"), (b"MM\x00*", 0, "tiff"),
)


def image_suffix(data: bytes | None) -> str | None:
    """The usual file suffix of encoded image bytes (``jpg``, ``png``, ``webp``, ``bmp``, ``tiff``) from their
    first bytes, or None: what ``dr2.json`` names as ``image_member`` when no file name says it."""
    if not data:
        return None
    for magic, at, suffix in _MAGIC:
        if data[at : at + len(magic)] == magic:
            return suffix
    return None


def content_key(data: bytes | None) -> str:
    """A sample key from the image's bytes (sha256, hex): stable whatever the blocks or the order of rows."""
    return hashlib.sha256(data).hexdigest() if data is not None else ""


def record_block(images: Sequence[bytes | None], keys: Sequence[str], members: Sequence[str | None],
                 unit: str = UNIT) -> pa.Table:
    """Record rows (:data:`~pipeline.schema.ROW_SCHEMA`) for images given by a caller, ready for ``detect_block``:
    pending, or ``no_image`` where there are no bytes. ``index`` is the row's position (never an end row)."""
    n = len(images)
    status = [S.Status.PENDING.value if d is not None else S.Status.NO_IMAGE.value for d in images]
    return block_table({S.KEY: list(keys), S.UNIT: [unit] * n, S.INDEX: list(range(n)), S.IMAGE_MEMBER: list(members),
                        S.IMAGE: list(images), S.STATUS: status,
                        S.ERROR: ["" if d is not None else "the row has no image" for d in images]}, n)


# --------------------------------------------------------------------------------------------- a Ray dataset's batches


def rows_from_batch(batch: pa.Table, *, image_column: str, key_column: str | None) -> pa.Table:
    """A user's batch -> record rows, the batch's columns carried under :data:`USER_PREFIX` (the image column with
    its bytes taken out: they travel once, in ``image``)."""
    if image_column not in batch.column_names:
        raise ValueError(f"the dataset has no column {image_column!r} (columns: {batch.column_names}); pass "
                         "image_column=")
    data, paths = image_bytes(batch.column(image_column))
    images: list[bytes | None] = data.to_pylist()
    if key_column is not None:
        keys = [str(k) if k is not None else content_key(d) for k, d in
                zip(batch.column(key_column).to_pylist(), images, strict=True)]
    else:
        keys = [content_key(d) for d in images]
    path_list = paths.to_pylist() if paths is not None else [None] * len(images)
    members = [p.rsplit(".", 1)[-1].lower() if p and "." in p.rsplit("/", 1)[-1] else image_suffix(d)
               for p, d in zip(path_list, images, strict=True)]
    table = record_block(images, keys, members)
    for name in batch.column_names:
        col: Any = batch.column(name)
        if name == image_column:
            col = as_image_column(col.type, pa.nulls(batch.num_rows, pa.large_binary()), col)
        table = table.append_column(USER_PREFIX + name, col)
    return table


def output_columns(image_column: str, output_column: str, metadata_column: str) -> tuple[str, ...]:
    """The columns :func:`finish_batch` adds (or, for ``output_column == image_column``, replaces)."""
    return output_column, metadata_column, metadata_column + STATUS_SUFFIX


def check_columns(names: Sequence[str], *, image_column: str, output_column: str, metadata_column: str) -> None:
    """Refuse output column names that would overwrite a column of the user's (other than the image column, which
    ``output_column=image_column`` replaces on purpose), or each other."""
    added = output_columns(image_column, output_column, metadata_column)
    if len(set(added)) != len(added):
        raise ValueError(f"output_column and metadata_column must differ: {added}")
    taken = [c for c in added if c in names and c != image_column]
    if taken:
        raise ValueError(f"the dataset already has column(s) {taken}: choose other output_column/metadata_column names")
    if metadata_column + STATUS_SUFFIX == image_column or metadata_column == image_column:
        raise ValueError("metadata_column must not be the image column")


def finish_batch(table: pa.Table, *, cfg: PipelineConfig, model_info: dict[str, Any], image_column: str,
                 output_column: str, metadata_column: str) -> pa.Table:
    """Record rows after restoration -> the user's columns, in their order, plus ``output_column`` (what ``dr2
    restore`` writes for the image: the restored image, or the input's bytes where nothing was restored; in the image
    column's own type), ``metadata_column`` (the ``dr2.json`` text, byte for byte as the run writes it) and
    ``metadata_column + "_status"``. Composed and described by the run's own functions."""
    composed = compose_block(table, cfg)
    rows = list(range(table.num_rows))
    metas, _, _ = rows_metadata(table, rows, composed, cfg, model_info)
    image = table.column(S.IMAGE)
    outputs = pa.array([composed.output[r] if composed.output[r] is not None else image[r].as_py() for r in rows],
                       pa.large_binary())
    user = {name[len(USER_PREFIX):]: table.column(name) for name in table.column_names if name.startswith(USER_PREFIX)}
    check_columns(list(user), image_column=image_column, output_column=output_column, metadata_column=metadata_column)
    cols: dict[str, Any] = dict(user)
    cols[image_column] = as_image_column(user[image_column].type, image, user[image_column])
    cols[output_column] = as_image_column(user[image_column].type, outputs, user[image_column])
    cols[metadata_column] = pa.array([S.dr2_json(m).decode() for m in metas], pa.string())
    cols[metadata_column + STATUS_SUFFIX] = pa.array(composed.status, pa.string())
    return pa.table(cols)
