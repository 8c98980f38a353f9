"""WebDataset tar shards: one input ``.tar`` is one unit and one output ``.tar`` of the same relative name.

Reading and writing go through the tar codec (:mod:`pipeline.formats.wds`): samples are read as members grouped by key,
every member travels byte for byte, the image member's slot holds the composed image, and ``dr2.json`` is appended
last. Parts are tar bytes without the end-of-archive blocks, so that the commit concatenates them and closes the
archive once (:func:`pipeline.formats.wds.tar_trailer`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline import schema as S
from pipeline.formats.base import Format, OutputSink, PartRows, ReadResult, ReadRow, copy_parts
from pipeline.formats.files import list_files
from pipeline.formats.units import MARKER_SUFFIX, Unit, UnitKind, shard_unit
from pipeline.formats.wds import (
    MemberNote,
    Sample,
    ShardReadError,
    encode_tar_part,
    iter_tar_samples,
    pick_image_member,
    tar_trailer,
)
from pipeline.store import storage
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

METADATA_MEMBER = "dr2.json"


def _sample_row(sample: Sample, status: str | None = None, error: str = "") -> ReadRow:
    """The row of a sample: the image member's bytes travel once, in ``image``; its slot in ``members`` is empty."""
    member = pick_image_member(sample.members)
    image = next((d for name, d in sample.members if name == member), None) if member else None
    members = [(name, b"" if name == member else d) for name, d in sample.members]
    if status is None:
        status = S.Status.PENDING.value if image is not None else S.Status.NO_IMAGE.value
        error = "" if image is not None else "sample has no image member"
    return ReadRow(key=sample.key, image_member=member, image=image, members=members, status=status, error=error,
                   notes=sample.notes)


def output_samples(table: pa.Table, run: list[int], output: list[bytes | None],
                   metas: list[dict[str, Any]]) -> list[Sample]:
    """The output samples of finished rows: members in input order, byte for byte, the image member's slot
    holding the output (else the input image), any earlier ``dr2.json`` replaced by this run's, appended last."""
    names_col, data_col = table.column(S.MEMBER_NAMES), table.column(S.MEMBER_DATA)
    image_col, member_col, key_col = table.column(S.IMAGE), table.column(S.IMAGE_MEMBER), table.column(S.KEY)
    samples = []
    for r, meta in zip(run, metas, strict=True):
        names = names_col[r].as_py() or []
        datas = data_col[r].as_py() or []
        image_member = member_col[r].as_py()
        members: list[tuple[str, bytes]] = []
        for name, data in zip(names, datas, strict=True):
            if name == METADATA_MEMBER:  # a reprocessed output: this run's metadata replaces it
                continue
            if image_member and name == image_member:
                data = output[r] if output[r] is not None else image_col[r].as_py()
            members.append((name, data))
        if image_member and image_member not in names:
            image: Any = output[r] if output[r] is not None else image_col[r].as_py()
            members.insert(0, (str(image_member), bytes(image)))
        members.append((METADATA_MEMBER, S.dr2_json(meta)))
        samples.append(Sample(key=key_col[r].as_py(), members=members))
    return samples


class TarFormat(Format):
    kind = UnitKind.SHARD
    output_suffixes = (".tar",)

    def list_units(self, cfg: PipelineConfig) -> list[Unit]:
        return [shard_unit(rel, o) for rel, o in list_files(cfg.src, cfg.dst, ".tar", cfg.storage_options())]

    def output_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, unit.name)

    def marker_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, unit.stem + MARKER_SUFFIX)

    def read(self, unit: Unit, cfg: PipelineConfig, unit_notes: list[MemberNote]) -> ReadResult:
        """A shard that breaks off (truncated or corrupt tar) yields the samples before the cut, then the interrupted
        sample (status ``truncated``, with the members that were read), and returns what happened."""
        try:
            for sample in iter_tar_samples(unit.source, options=cfg.storage_options(), on_note=unit_notes.append):
                yield _sample_row(sample)
        except ShardReadError as e:
            log.warning("shard %s: %s", unit.source, e)
            if e.partial is not None:
                yield _sample_row(e.partial, S.Status.TRUNCATED.value,
                                  f"sample cut off by a damaged shard: {e.reason}")
            return str(e)
        return ""

    def encode_part(self, unit: Unit, dst: str, rows: PartRows, options: StorageOptions) -> bytes:
        kept = rows.kept()
        return encode_tar_part(output_samples(rows.table, [r for r, _ in kept], rows.output, [m for _, m in kept]))

    def assemble(self, unit: Unit, parts: Sequence[str], expected: int, out: OutputSink,
                 options: StorageOptions | None) -> None:
        copy_parts(parts, out, options)
        out.write(tar_trailer(out.size))

    def count_output(self, uri: str, options: StorageOptions | None) -> int:
        return sum(1 for _ in iter_tar_samples(uri, options=options))
