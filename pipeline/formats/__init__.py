"""Archive formats and the unit of work: ``units.py`` (the Unit, read groups), ``shards.py`` (staging, exactly-once
commit and resume for any unit), ``wds.py`` (the tar codec), and the formats behind one unit contract
(:class:`pipeline.formats.base.Format`): WebDataset tars, image folders and parquet files. :data:`FORMATS` maps each
:class:`~pipeline.formats.units.UnitKind` to its format; :data:`AUTO_ORDER` is the order in which
``--input-format auto`` asks them whether SRC holds their units."""

from __future__ import annotations

from pipeline.formats.base import Format
from pipeline.formats.folder import FolderFormat
from pipeline.formats.parquet import ParquetFormat
from pipeline.formats.tar import TarFormat
from pipeline.formats.units import UnitKind

FORMATS: dict[UnitKind, Format] = {f.kind: f for f in (TarFormat(), ParquetFormat(), FolderFormat())}
AUTO_ORDER: tuple[UnitKind, ...] = (UnitKind.SHARD, UnitKind.PARQUET, UnitKind.IMAGES)
"""Tars first, then parquet files, then plain images: a source of shards that also holds a preview image is read as
its shards, as before parquet existed."""


def format_of(kind: UnitKind) -> Format:
    return FORMATS[kind]


__all__ = ["AUTO_ORDER", "FORMATS", "Format", "format_of"]
