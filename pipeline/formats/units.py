"""The unit of work, stats and resume: an input shard or parquet file, or a chunk of plain images (STYLE rule 8).

A :class:`Unit` is what travels (to Ray tasks, into markers); its ``kind`` names its format
(:mod:`pipeline.formats`), which owns how it is read, staged and committed. Through it a unit knows where its data
lives, so no other module builds these names:

* ``output_uri``: the final object (``DST/<shard name>``, ``DST/<parquet name>``, or the chunk's JSONL manifest under
  ``DST/_dr2/manifests/``);
* ``marker_uri``: the ``.stats.json`` written LAST, the commit marker a rerun checks;
* ``staging_uri``: where its parts wait for the commit, ``DST/_dr2_staging/<id>-<config hash>/``. The id is
  flat (a readable slug plus a hash of the unit's kind and name), so two units never share or nest a staging
  tree (``a.tar`` and ``a/b.tar`` stage apart), and the config hash keeps parts of runs with different
  configs apart.

Small units travel together: :func:`read_groups` puts consecutive small units into one read task, so that an
archive of thousands of tiny shards costs a few Ray tasks and blocks, not several per shard. Each unit keeps its
own rows, end row, parts, commit and marker.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from pipeline.formats.wds import escape_name
from pipeline.store import storage

if TYPE_CHECKING:
    from pipeline.formats.base import Format

STAGING_DIR = "_dr2_staging"
MANIFEST_DIR = "_dr2/manifests"
MARKER_SUFFIX = ".stats.json"
CHUNK_PREFIX = "chunk-"


class UnitKind(StrEnum):
    SHARD = "shard"  # one input .tar -> one output .tar of the same name
    IMAGES = "images"  # a chunk of plain images -> the images at their relative paths + a JSONL manifest
    PARQUET = "parquet"  # one input .parquet -> one output .parquet of the same name, a dr2 column added


_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Unit:
    """One unit of work. ``name`` is the shard's path relative to the source root (``train/000.tar``), or the
    chunk's name (``chunk-000003``); ``source`` the shard URI, or the image root; ``images`` (chunks only)
    the relative paths of its images, in output order."""

    name: str
    kind: UnitKind
    source: str
    images: tuple[str, ...] = ()
    input: str = ""
    """The identity of the unit's input as listed at planning: ``size:version`` of a shard (S3 ETag or local
    mtime), or a hash over its images' paths, sizes and versions. Recorded in the marker; a rerun that lists a
    different identity redoes the unit (the input changed, or images were added to or removed from a chunk)."""
    refused: tuple[tuple[str, str], ...] = ()
    """(chunks only) Image paths of this chunk that are not inputs, each escaped as valid UTF-8 with its reason
    (:func:`pipeline.store.sources.list_image_inputs`): recorded in the chunk's marker, so nothing is dropped unsaid."""
    column: str = ""
    """(parquet only) The image column named by ``--image-column``; empty: found in each file's schema by
    :func:`pipeline.formats.parquet.image_column`, the same rule when reading and when committing."""

    @property
    def format(self) -> Format:
        """The format that reads, stages and commits this unit."""
        from pipeline.formats import format_of

        return format_of(self.kind)

    @property
    def id(self) -> str:
        """A flat, unique, filesystem- and S3-safe name: never contains ``/``, never a prefix of another id."""
        digest = hashlib.sha256(f"{self.kind.value}:{self.name}".encode()).hexdigest()[:16]
        slug = _SLUG.sub("_", self.name)[-48:].strip("._") or "unit"
        return f"{slug}.{digest}"

    @property
    def stem(self) -> str:
        return self.name.removesuffix(".tar")

    def output_uri(self, dst: str) -> str:
        return self.format.output_uri(self, dst)

    def marker_uri(self, dst: str) -> str:
        return self.format.marker_uri(self, dst)

    def staging_uri(self, dst: str, config_hash: str) -> str:
        """The unit's staging folder for one config, with a trailing ``/`` (so listing it matches nothing else)."""
        return storage.join(dst, STAGING_DIR, f"{self.id}-{config_hash[:16]}") + "/"

    @property
    def size_hint(self) -> tuple[int | None, int | None]:
        """(input bytes, rows) as far as planning knows them: a file's listed size (its rows are unknown until
        read), a chunk's image count (plus its end row; the images' bytes are not kept). None where unknown."""
        return self.format.size_hint(self)

    def to_item(self) -> dict[str, Any]:
        """A plain dict for Ray's ``from_items`` (one row per unit)."""
        return {"name": self.name, "kind": self.kind.value, "source": self.source, "images": list(self.images),
                "input": self.input, "refused": [list(r) for r in self.refused], "column": self.column}

    @staticmethod
    def from_item(item: dict[str, Any]) -> Unit:
        return Unit(name=str(item["name"]), kind=UnitKind(item["kind"]), source=str(item["source"]),
                    images=tuple(str(x) for x in (item.get("images") or ())), input=str(item.get("input") or ""),
                    refused=tuple((str(n), str(r)) for n, r in (item.get("refused") or ())),
                    column=str(item.get("column") or ""))


MIN_READ_GROUPS = 16
"""Small units are grouped only as far as this many groups remain: reads stay spread over the cluster, and the first
units of an archive are committed early instead of waiting for a block shared with many others. An archive of a
few small shards is read, and committed, shard by shard as before; one of thousands, a few hundred a group."""


def read_groups(units: Sequence[Unit], *, max_rows: int, max_bytes: int,
                min_groups: int = MIN_READ_GROUPS) -> list[list[Unit]]:
    """Consecutive units, in order, grouped so that one read task takes a group: a unit joins the group before it
    while the group stays within ``max_rows`` rows (chunks; every unit counts at least its end row), ``max_bytes``
    input bytes (shards) and ``len(units) // min_groups`` units. A unit whose size planning does not know, or which
    alone reaches a limit, keeps a read task of its own, as before grouping."""
    max_units = max(1, len(units) // max(1, min_groups))
    groups: list[list[Unit]] = []
    rows = size = 0
    open_group = False
    for u in units:
        nbytes, nrows = u.size_hint
        if nbytes is None and nrows is None:  # unknown: alone
            groups.append([u])
            open_group = False
            continue
        r, b = nrows or 1, nbytes or 0
        if open_group and len(groups[-1]) < max_units and rows + r <= max_rows and size + b <= max_bytes:
            groups[-1].append(u)
            rows, size = rows + r, size + b
            continue
        groups.append([u])
        rows, size = r, b
        open_group = r < max_rows and b < max_bytes  # a unit that fills a block alone takes no company
    return groups


def chunk_name(n: int) -> str:
    return f"{CHUNK_PREFIX}{n:06d}"


def shard_unit(name: str, info: storage.ObjectInfo, *, kind: UnitKind = UnitKind.SHARD, column: str = "") -> Unit:
    """The unit of one input file (a shard, a parquet file); ``name`` its path relative to the source root, refused
    when it would leave DST (absolute, or ``..`` after normalising: an S3 key may hold ``a/../../x.tar``)."""
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in norm or "\0" in norm:
        raise ValueError(f"{kind.value} {info.uri!r} would be written outside DST as {name!r}: rename it")
    return Unit(name=norm, kind=kind, source=info.uri, input=f"{info.size}:{info.version}", column=column)


def chunk_of(rel: str, chunks: int) -> int:
    """The chunk a plain image belongs to: a stable hash of its relative path, so that adding or removing images
    never moves another image to another chunk (membership by position in a listing would)."""
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()[:8], "big") % chunks


def image_chunks(root: str, images: list[tuple[str, storage.ObjectInfo]], chunks: int,
                 refused: Sequence[tuple[str, str]] = ()) -> list[Unit]:
    """Plain images grouped into ``chunks`` stable chunks (empty ones left out), each sorted by path; a refused path
    (``(relative path, reason)``) goes to the chunk its path hashes to, like an image, and is part of its identity."""
    groups: dict[int, list[tuple[str, storage.ObjectInfo]]] = {}
    refusals: dict[int, list[tuple[str, str]]] = {}
    for rel, info in images:
        groups.setdefault(chunk_of(rel, chunks), []).append((rel, info))
    for rel, reason in refused:
        refusals.setdefault(chunk_of(rel, chunks), []).append((escape_name(rel), reason))
    units = []
    for n in sorted(set(groups) | set(refusals)):
        members = sorted(groups.get(n, []), key=lambda x: x[0])
        refs = tuple(sorted(refusals.get(n, [])))
        identity = hashlib.sha256("".join(
            [f"{r}\t{o.size}\t{o.version}\n" for r, o in members] + [f"refused\t{r}\t{why}\n" for r, why in refs]
        ).encode("utf-8", "surrogateescape")).hexdigest()
        units.append(Unit(name=chunk_name(n), kind=UnitKind.IMAGES, source=root,
                          images=tuple(r for r, _ in members), input=identity, refused=refs))
    return units
