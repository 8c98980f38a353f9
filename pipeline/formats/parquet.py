"""Parquet archives: one input ``.parquet`` file is one unit and one output parquet file of the same relative name.

The shapes this reads: img2dataset's shards (``key``, the image under ``jpg``/``png``/``webp``, ``txt``, ``url``,
``width``, ...), LAION/DataComp metadata joined with image bytes (``URL``/``TEXT``/``uid`` + a bytes column), and
Hugging Face datasets, whose ``Image`` feature is a struct ``{bytes: binary, path: string}`` column.

The output contract:

* rows in input order, one output row per input row (``--skip-status`` alone leaves rows out, as it does for tars);
* every column but the image column Arrow-equal to the input's, and the schema's metadata (Hugging Face's
  ``huggingface`` features, pandas') kept; the image column keeps its type (binary, large_binary, or the struct,
  whose ``path`` and other fields are kept) and holds the restored image where faces were restored, else the input's
  bytes (a null image stays null: status ``no_image``, never a dropped row);
* a ``dr2`` string column appended last (replacing one of an earlier run): per row, the JSON document a tar sample's
  ``dr2.json`` holds (:func:`pipeline.graph.stages.sample_metadata`). A string, not a struct: the document is nested and
  open-ended (keys appear by config: ``timings``, ``simulated``, ``skipped_members``; per face ``degradation`` and
  ``quality`` records), and a struct's type would follow the rows and the code version; one ``string`` type keeps
  every output file's schema the same, which Hugging Face ``datasets`` needs to load several files as one split and
  Ray Data to read them as one dataset without unifying schemas; it reads in every tool (``json.loads``, DuckDB's
  and Spark's ``from_json``) and is byte for byte a tar sample's ``dr2.json`` (:func:`pipeline.schema.dr2_json`);
* the input's row groups: output row group ``g`` holds input row group ``g``'s rows, so the layout (and the memory a
  reader needs) follows the input, whatever blocks the run cut.

How, in bounded memory: the reader reads only the image column (and ``key``), row group by row group
(``ParquetFile.read_row_group``, through :func:`pipeline.store.storage.open_read`, seekable on S3). A part is an Arrow
IPC stream of the block's output rows: ``index``, the image bytes and the ``dr2`` text. The commit reads the input again
row group by row group WITHOUT its image bytes (the other columns, and the struct's other fields), takes the parts'
rows of that row group from a cursor over the parts, and writes one output row group: one input row group and its
outputs in memory at a time, never the file. The writer's options are fixed (:data:`WRITER_OPTIONS`) and parquet
holds no timestamps, so the same rows give the same bytes, on a rerun and after a kill and resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline import failpoints
from pipeline import schema as S
from pipeline.formats.base import Format, OutputSink, PartRows, ReadResult, ReadRow
from pipeline.formats.files import list_files
from pipeline.formats.image_column import as_image_column, image_bytes, is_binary, is_image_struct
from pipeline.formats.units import MARKER_SUFFIX, Unit, UnitKind, shard_unit
from pipeline.formats.wds import IMAGE_EXTENSIONS
from pipeline.store import storage
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from pipeline.config import PipelineConfig
    from pipeline.formats.wds import MemberNote

log = logging.getLogger(__name__)

SUFFIX = ".parquet"
DR2_COLUMN = "dr2"
KEY_COLUMN = "key"
IMAGE_COLUMN_NAMES = (*IMAGE_EXTENSIONS, "image", "img", "image_bytes", "img_bytes", "bytes")
"""Column names taken for the image column, in order of preference (matched case-insensitively)."""
PART_SCHEMA = pa.schema([(S.INDEX, pa.int64()), (S.IMAGE, pa.large_binary()), (DR2_COLUMN, pa.string())])
READ_BATCH_ROWS = 256
WRITER_OPTIONS: dict[str, Any] = {"compression": "zstd", "compression_level": 3, "version": "2.6",
                                  "data_page_version": "1.0", "write_page_index": False}
"""Fixed writer options: the output's bytes depend on its rows only (and the pyarrow version in ``created_by``)."""


class InputChangedError(RuntimeError):
    """The input file is not the one the unit was read from: a commit now would pair rows of two versions."""


def image_column(schema: pa.Schema, wanted: str = "") -> str:
    """The column holding the images: ``wanted`` (``--image-column``) if given, else the first binary column named like
    an image (:data:`IMAGE_COLUMN_NAMES`, in that order), else the first ``{bytes, path}`` struct, else the only
    binary column. Raises ValueError naming the candidates when none is found: the unit is then recorded as
    unreadable with that reason, and the others go on."""
    usable = [f for f in schema if is_binary(f.type) or is_image_struct(f.type)]
    if wanted:
        field = next((f for f in schema if f.name == wanted), None)
        if field is None:
            raise ValueError(f"--image-column {wanted!r}: no such column (columns: {', '.join(schema.names)})")
        if field not in usable:
            raise ValueError(f"--image-column {wanted!r} is of type {field.type}: images need a binary column or a "
                             "struct with a binary 'bytes' field")
        return wanted
    by_name = {f.name.lower(): f.name for f in usable if is_binary(f.type)}
    for name in IMAGE_COLUMN_NAMES:
        if name in by_name:
            return by_name[name]
    structs = [f.name for f in usable if is_image_struct(f.type)]
    if structs:
        return structs[0]
    if len(usable) == 1:
        return usable[0].name
    found = ", ".join(f"{f.name} ({f.type})" for f in usable) or "none"
    raise ValueError(f"no image column found (binary columns: {found}): name it with --image-column")


def output_schema(schema: pa.Schema) -> pa.Schema:
    """The input's schema (fields, types, metadata) with a ``dr2`` string column last (an earlier run's replaced)."""
    fields = [f for f in schema if f.name != DR2_COLUMN] + [pa.field(DR2_COLUMN, pa.string())]
    return pa.schema(fields, metadata=schema.metadata)


def _open(uri: str, options: StorageOptions | None) -> tuple[Any, pq.ParquetFile]:
    import pyarrow.parquet as pq

    f = storage.open_read(uri, options=options)
    try:
        return f, pq.ParquetFile(f)
    except BaseException:
        f.close()
        raise


class ParquetFormat(Format):
    kind = UnitKind.PARQUET
    output_suffixes = (SUFFIX,)

    def list_units(self, cfg: PipelineConfig) -> list[Unit]:
        return [shard_unit(rel, o, kind=UnitKind.PARQUET, column=cfg.image_column)
                for rel, o in list_files(cfg.src, cfg.dst, SUFFIX, cfg.storage_options())]

    def output_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, unit.name)

    def marker_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, unit.name.removesuffix(SUFFIX) + MARKER_SUFFIX)

    def marker_fields(self, unit: Unit) -> dict[str, Any]:
        return {"image_column": unit.column or "auto"}

    def read(self, unit: Unit, cfg: PipelineConfig, unit_notes: list[MemberNote]) -> ReadResult:
        """The rows' images (and keys: the ``key`` column where there is one, else the row number), row group by row
        group, without reading any other column."""
        f, pf = _open(unit.source, cfg.storage_options())
        with f:
            schema = pf.schema_arrow
            col = image_column(schema, unit.column)
            has_key = KEY_COLUMN in schema.names and KEY_COLUMN != col and (
                pa.types.is_string(schema.field(KEY_COLUMN).type) or pa.types.is_large_string(
                    schema.field(KEY_COLUMN).type) or pa.types.is_integer(schema.field(KEY_COLUMN).type))
            columns = [col, KEY_COLUMN] if has_key else [col]
            n = 0
            pending, no_image = S.Status.PENDING.value, S.Status.NO_IMAGE.value
            # One row group at a time: ``iter_batches`` over the whole file holds what it has read until its reader is
            # done (measured: ~1 GB of RSS for a 760 MB file with 80 row groups, 208 MB this way).
            for g in range(pf.num_row_groups):
                group = pf.read_row_group(g, columns=columns, use_threads=False)
                for batch in group.to_batches(max_chunksize=READ_BATCH_ROWS):
                    images = image_bytes(batch.column(0))[0].to_pylist()
                    keys = batch.column(1).to_pylist() if has_key else [None] * batch.num_rows
                    for image, key in zip(images, keys, strict=True):
                        yield ReadRow(key=str(n) if key is None else str(key), image_member=col, image=image,
                                      status=pending if image is not None else no_image,
                                      error="" if image is not None else f"the row's {col!r} is null")
                        n += 1
                del group
        return ""

    def encode_part(self, unit: Unit, dst: str, rows: PartRows, options: StorageOptions) -> bytes:
        """An Arrow IPC stream of the kept rows: ``index``, the output image (the input's when not restored), the
        ``dr2`` JSON text."""
        index, image_col = rows.table.column(S.INDEX), rows.table.column(S.IMAGE)
        kept = rows.kept()
        table = pa.table({
            S.INDEX: pa.array([index[r].as_py() for r, _ in kept], pa.int64()),
            S.IMAGE: pa.array([rows.output[r] if rows.output[r] is not None else image_col[r].as_py()
                               for r, _ in kept], pa.large_binary()),
            DR2_COLUMN: pa.array([S.dr2_json(m).decode() for _, m in kept], pa.string()),
        }, schema=PART_SCHEMA)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, PART_SCHEMA) as w:
            w.write_table(table)
        return bytes(sink.getvalue().to_pybytes())

    def assemble(self, unit: Unit, parts: Sequence[str], expected: int, out: OutputSink,
                 options: StorageOptions | None) -> None:
        import pyarrow.parquet as pq

        if unit.input:
            now = storage.stat(unit.source, options=options)
            if now is None or f"{now.size}:{now.version}" != unit.input:
                raise InputChangedError(f"{unit.source} changed since it was listed ({unit.input}); rerun to redo it")
        f, pf = _open(unit.source, options)
        with f:
            if pf.metadata.num_rows != expected:
                raise InputChangedError(f"{unit.source} holds {pf.metadata.num_rows} rows, {expected} were read")
            schema = pf.schema_arrow
            col = image_column(schema, unit.column)
            image_field = schema.field(col)
            others = [n for n in schema.names if n not in (col, DR2_COLUMN)]
            struct = pa.types.is_struct(image_field.type)
            sub = [c.name for c in image_field.type if c.name != "bytes"] if struct else []
            cursor = _PartCursor(parts, options)
            target = output_schema(schema)
            unstated = [n for n in target.names if n not in (col, DR2_COLUMN)]
            with pq.ParquetWriter(out, target, use_dictionary=unstated, write_statistics=unstated,
                                  **WRITER_OPTIONS) as writer:
                offset = 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    got = cursor.below(offset + n)
                    local = pa.array(got.column(S.INDEX).to_numpy() - offset)
                    input_rows = pf.read_row_group(g, columns=others + [f"{col}.{s}" for s in sub], use_threads=False)
                    taken = input_rows.take(local)
                    image = as_image_column(image_field.type, got.column(S.IMAGE), taken.column(col) if sub else None)
                    columns = [image if name == col else got.column(DR2_COLUMN) if name == DR2_COLUMN
                               else taken.column(name) for name in target.names]
                    if got.num_rows:
                        writer.write_table(pa.Table.from_arrays(columns, schema=target),
                                           row_group_size=got.num_rows)
                    offset += n
                    failpoints.hit("commit.mid_output")
            cursor.finish()

    def count_output(self, uri: str, options: StorageOptions | None) -> int:
        f, pf = _open(uri, options)
        with f:
            return int(pf.metadata.num_rows)


class _PartCursor:
    """The parts' rows in index order, handed out a row group at a time: one IPC batch is read ahead at most."""

    def __init__(self, parts: Sequence[str], options: StorageOptions | None) -> None:
        self._batches = self._read(parts, options)
        self._ahead: pa.RecordBatch | None = None

    @staticmethod
    def _read(parts: Sequence[str], options: StorageOptions | None) -> Iterator[pa.RecordBatch]:
        for uri in parts:
            with storage.open_read(uri, options=options) as f, pa.ipc.open_stream(f) as reader:
                yield from reader

    def below(self, stop: int) -> pa.Table:
        """The rows whose index is below ``stop`` not handed out yet."""
        got: list[pa.RecordBatch] = []
        while True:
            batch = self._ahead if self._ahead is not None else next(self._batches, None)
            self._ahead = None
            if batch is None:
                break
            k = int(np.searchsorted(batch.column(0).to_numpy(), stop))
            if k < batch.num_rows:
                got.append(batch.slice(0, k))
                self._ahead = batch.slice(k)
                break
            got.append(batch)
        return pa.Table.from_batches(got, schema=PART_SCHEMA)

    def finish(self) -> None:
        rest = self.below(2**62)
        if rest.num_rows:
            raise InputChangedError(f"{rest.num_rows} staged rows lie beyond the input's rows")
