"""Image folders: plain image files under a folder or S3 prefix, in stable chunks
(:func:`pipeline.formats.units.image_chunks`).

Each image is written to ``DST/<its relative path>`` as soon as its block is done (atomic, idempotent); a chunk's
part is its rows' manifest lines (the ``dr2.json`` fields plus unit and index), staged AFTER the images, so that a
committed manifest ``DST/_dr2/manifests/<chunk>.jsonl`` only names written files. The number of chunks is fixed the
first time DST sees the source (``DST/_dr2/layout.json``), so a growing folder keeps every image in its chunk.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline import schema as S
from pipeline.formats.base import Format, OutputSink, PartRows, ReadResult, ReadRow, copy_parts
from pipeline.formats.files import inside
from pipeline.formats.units import MANIFEST_DIR, MARKER_SUFFIX, Unit, UnitKind, image_chunks
from pipeline.store import storage
from pipeline.store.sources import IMAGE_SUFFIXES, list_image_inputs
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.formats.wds import MemberNote

LAYOUT_FILE = "_dr2/layout.json"


def image_layout(cfg: PipelineConfig, n_images: int) -> dict[str, int]:
    """How many chunks plain images are hashed into: fixed the first time DST sees this source (recorded in
    ``DST/_dr2/layout.json`` by the run), so that a growing folder keeps every image in its chunk."""
    try:
        layout: dict[str, int] = json.loads(storage.read_bytes(storage.join(cfg.dst, LAYOUT_FILE),
                                                               options=cfg.storage_options()))
        return layout
    except FileNotFoundError:
        return {"chunks": max(1, -(-n_images // max(1, cfg.images_per_chunk)))}


class FolderFormat(Format):
    kind = UnitKind.IMAGES

    def list_units(self, cfg: PipelineConfig) -> list[Unit]:
        if inside(cfg.dst, cfg.src):
            raise ValueError(f"DST {cfg.dst} lies inside SRC {cfg.src}: outputs would be read back as inputs")
        images, refused = list_image_inputs(cfg.src, IMAGE_SUFFIXES, options=cfg.storage_options())
        if not images and not refused:
            return []
        return image_chunks(cfg.src, images, image_layout(cfg, len(images))["chunks"], refused)

    def prepare_dst(self, cfg: PipelineConfig, units: Sequence[Unit]) -> None:
        options = cfg.storage_options()
        if units and not storage.exists(storage.join(cfg.dst, LAYOUT_FILE), options=options):
            chunks = image_layout(cfg, sum(len(u.images) for u in units))
            storage.write_json_atomic(storage.join(cfg.dst, LAYOUT_FILE), chunks, options=options)

    def output_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, MANIFEST_DIR, unit.name + ".jsonl")

    def marker_uri(self, unit: Unit, dst: str) -> str:
        return storage.join(dst, MANIFEST_DIR, unit.name + MARKER_SUFFIX)

    def size_hint(self, unit: Unit) -> tuple[int | None, int | None]:
        """A chunk's image count (plus its end row); the images' bytes are not kept at planning."""
        return None, len(unit.images) + 1

    def marker_fields(self, unit: Unit) -> dict[str, Any]:
        return {"images": list(unit.images), "refused": [{"name": n, "reason": r} for n, r in unit.refused]}

    def read(self, unit: Unit, cfg: PipelineConfig, unit_notes: list[MemberNote]) -> ReadResult:
        """The chunk's images; the key is the relative path."""
        options = cfg.storage_options()
        for rel in unit.images:
            data = storage.read_bytes(storage.join(unit.source, rel), options=options)
            yield ReadRow(key=rel, image_member=rel.rsplit(".", 1)[-1].lower(), image=data,
                          status=S.Status.PENDING.value)
        return ""

    def encode_part(self, unit: Unit, dst: str, rows: PartRows, options: StorageOptions) -> bytes:
        """Write each image of the run to ``DST/<relative path>`` (atomic, idempotent); return the run's manifest
        lines, to be staged AFTER the images."""
        image_col = rows.table.column(S.IMAGE)
        index = rows.table.column(S.INDEX)
        lines = []
        for r, meta in zip(rows.run, rows.metas, strict=True):
            data = rows.output[r] if rows.output[r] is not None else image_col[r].as_py()
            if data is not None and meta["status"] not in rows.skip:
                storage.write_bytes_atomic(storage.join(dst, meta["key"]), data, options=options)
            line = {**meta, S.UNIT: unit.name, S.INDEX: index[r].as_py()}
            lines.append(json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n")
        return "".join(lines).encode()

    def assemble(self, unit: Unit, parts: Sequence[str], expected: int, out: OutputSink,
                 options: StorageOptions | None) -> None:
        copy_parts(parts, out, options)

    def count_output(self, uri: str, options: StorageOptions | None) -> int:
        return len(storage.read_bytes(uri, options=options).splitlines())
