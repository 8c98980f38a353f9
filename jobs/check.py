"""``dr2 check-output DST``: verify a finished destination against its commit markers.

For every ``.stats.json`` marker under DST (shards and parquet files beside their outputs, image chunks under
``_dr2/manifests``): the output exists, has the size and sha256 the marker records, and holds the recorded number of
samples, counted by the unit's format (tar samples read back with the project's reader, parquet rows, manifest
lines). Also reported: ``.tar`` and ``.parquet`` outputs without a marker (never committed, or not ours) and any
staging left under ``_dr2_staging``. Nothing is modified.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.formats import FORMATS, Format
from pipeline.formats.units import MANIFEST_DIR, MARKER_SUFFIX, STAGING_DIR, Unit, UnitKind
from pipeline.formats.wds import ShardReadError
from pipeline.store import storage
from pipeline.store.storage import StorageOptions

OUTPUT_SUFFIXES = tuple(s for f in FORMATS.values() for s in f.output_suffixes)


@dataclass(frozen=True)
class Check:
    unit: str
    samples: int | None
    bytes: int | None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def check_output(dst: str, *, options: StorageOptions | None = None) -> list[Check]:
    listing = {o.uri: o for o in storage.list_objects(dst.rstrip("/") + "/", options=options)}
    root = dst.rstrip("/") + "/"
    if not storage.is_s3(dst):
        root = str(storage.local_path(dst).resolve()) + "/"
        listing = {str(storage.local_path(u).resolve()): o for u, o in listing.items()}
    checks: list[Check] = []
    covered: set[str] = set()
    for uri in sorted(listing):
        rel = uri[len(root):]
        if not rel.endswith(MARKER_SUFFIX) or rel.startswith(STAGING_DIR + "/"):
            continue
        covered.add(uri)
        try:
            marker = json.loads(storage.read_bytes(uri, options=options))
        except ValueError as e:
            checks.append(Check(rel, None, None, f"marker is not JSON: {e}"))
            continue
        name = str(marker.get("unit") or marker.get("shard") or rel)
        fmt = FORMATS[_kind(marker, rel, name)]
        out_uri = fmt.output_uri(Unit(name=name, kind=fmt.kind, source=""), root.rstrip("/"))
        covered.add(out_uri)
        checks.append(_check_unit(name, out_uri, listing.get(out_uri), marker, fmt, options))
    for uri in sorted(listing):
        rel = uri[len(root):]
        if rel.startswith(STAGING_DIR + "/"):
            checks.append(Check(rel, None, listing[uri].size, "staging left behind (a run was interrupted: rerun it)"))
        elif rel.endswith(OUTPUT_SUFFIXES) and uri not in covered:
            checks.append(Check(rel, None, listing[uri].size, "no marker: never committed (or not written by dr2)"))
    return checks


def _kind(marker: dict[str, object], rel: str, name: str) -> UnitKind:
    """The marker's unit kind: recorded in it (``format``), else (markers written before parquet) by where it lies."""
    if marker.get("format") in {k.value for k in UnitKind}:
        return UnitKind(str(marker["format"]))
    return UnitKind.IMAGES if rel.startswith(MANIFEST_DIR + "/") else UnitKind.SHARD


def _check_unit(name: str, out_uri: str, listed: storage.ObjectInfo | None, marker: dict[str, object], fmt: Format,
                options: StorageOptions | None) -> Check:
    # samples left out by --skip-status are counted in the stats but not written
    want_count = marker.get("written", marker.get("count", marker.get("samples")))
    if listed is None:
        return Check(name, None, None, "output missing")
    if marker.get("bytes") is not None and listed.size != marker["bytes"]:
        return Check(name, None, listed.size, f"size {listed.size} != marker's {marker['bytes']}")
    if marker.get("sha256") and storage.sha256_of(out_uri, options=options) != marker["sha256"]:
        return Check(name, None, listed.size, "sha256 differs from the marker's")
    try:
        count = fmt.count_output(out_uri, options)
    except ShardReadError as e:
        return Check(name, None, listed.size, f"unreadable: {e.reason}")
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: not a parquet file
        return Check(name, None, listed.size, f"unreadable: {e}")
    if want_count is not None and count != want_count:
        return Check(name, count, listed.size, f"{count} samples, marker says {want_count}")
    return Check(name, count, listed.size)


def format_checks(checks: Sequence[Check]) -> str:
    if not checks:
        return "no markers found: not a dr2 output, or nothing was committed yet"
    width = max(len(c.unit) for c in checks)
    lines = [f"{'unit':<{width}}  {'samples':>8}  {'bytes':>12}  result"]
    for c in checks:
        samples = "" if c.samples is None else str(c.samples)
        size = "" if c.bytes is None else str(c.bytes)
        lines.append(f"{c.unit:<{width}}  {samples:>8}  {size:>12}  {'ok' if c.ok else 'MISMATCH: ' + c.problem}")
    bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks)} checked, {bad} mismatch(es)" if bad else f"{len(checks)} checked, all match")
    return "\n".join(lines)
