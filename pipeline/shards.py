"""Shard I/O with exactly-once outputs: read WebDataset tars, stage parts, commit, resume.

The input shard is the unit of work, stats and resume (STYLE rule 8). Its life:

1. :func:`iter_tar_samples` streams the input tar and groups members into samples by the
   WebDataset rules (key = member path up to the first dot of its basename, directory included;
   members of one sample are consecutive).
2. Workers write their finished rows as *parts* (:func:`write_shard_rows` / :func:`write_shard_part`):
   tar bytes without the end-of-archive blocks, each written atomically to
   ``{dst}/_dr2_staging/{shard_stem}/{first:09d}-{last:09d}.part``. The name is derived from the sample
   indexes only and the bytes are deterministic (:func:`encode_tar_part`), so a retried task
   overwrites the same name with the same bytes.
3. The driver calls :func:`commit_shard` once the parts cover every index: it streams the parts in
   index order into ``{dst}/{shard_name}`` (atomically, never holding the shard in memory), then
   writes ``{dst}/{shard_stem}.stats.json`` LAST (the commit marker), then deletes the parts.
4. :func:`shard_state` reads the marker: ``done`` (same config hash), ``conflict`` (written by a
   different config) or ``todo``. A crash anywhere before the marker leaves the shard ``todo``; a
   crash after it leaves only staging litter, which :func:`clear_staging` removes.

Plain-image inputs (a folder or prefix of images) use the same scheme with *chunks* of images as
the unit: outputs mirror the input's relative paths (:func:`write_image_outputs`), and per chunk a
JSONL manifest ``{dst}/_dr2/manifests/chunk-{n:06d}.jsonl`` is staged, committed by
:func:`commit_chunk`, and marked done by ``chunk-{n:06d}.stats.json`` (:func:`chunk_state`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self

from pipeline import schema, storage
from pipeline.storage import AtomicWriter, StorageOptions

log = logging.getLogger(__name__)

STAGING_DIR = "_dr2_staging"
MANIFEST_DIR = "_dr2/manifests"
MARKER_SUFFIX = ".stats.json"
PART_RE = re.compile(r"(\d{9})-(\d{9})\.part")
TAR_FORMAT: Final = tarfile.PAX_FORMAT
"""Output tars are POSIX.1-2001 (pax): long and non-ASCII member names need no GNU extensions."""
END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jp2", "ppm", "pgm", "pbm", "gif")
"""Member suffixes that hold an image, in order of preference."""

UnitState = Literal["todo", "done", "conflict"]


class ShardReadError(Exception):
    """An input tar is truncated or corrupt.

    ``samples_read`` samples were yielded before the cut; ``partial`` is the sample that was being
    read when it happened (possibly missing members; never yielded), or None. The caller decides:
    fail the job, or keep what was read and record the shard as damaged.
    """

    def __init__(self, uri: str, reason: str, *, samples_read: int, partial: Sample | None) -> None:
        super().__init__(f"{uri}: {reason} (after {samples_read} complete samples)")
        self.uri = uri
        self.reason = reason
        self.samples_read = samples_read
        self.partial = partial


class ShardCommitError(RuntimeError):
    """The staged parts do not cover the shard's indexes: a commit now would lose or repeat samples."""


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample: its key and its members ``(suffix, bytes)`` in input order.

    ``suffix`` is the member name after the key's dot: ``jpg``, ``json``, ``seg.png``.
    """

    key: str
    members: list[tuple[str, bytes]] = field(default_factory=list)


@dataclass(frozen=True)
class PartInfo:
    """A staged part: which unit (shard or chunk) it belongs to and the indexes it covers."""

    unit: str
    first: int
    last: int
    uri: str


# --- reading ---------------------------------------------------------------------------------------


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` -> ``("dir/abc", "seg.png")``; None for names that are not sample members.

    Same rule as webdataset's ``base_plus_ext``: the basename needs a non-empty stem and a dot.
    """
    head, sep, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:
        return None
    return head + sep + base[:dot], base[dot + 1 :]


def iter_tar_samples(
    uri: str, *, options: StorageOptions | None = None, require_end_marker: bool = True
) -> Iterator[Sample]:
    """Stream the samples of one tar shard (local or S3), in order, without loading the shard.

    Members are grouped into samples by WebDataset's rule (consecutive members with the same key).
    Directories are skipped; other non-file members and names with no suffix (which webdataset also
    ignores) are skipped with a warning.

    Truncated or corrupt input: every sample known to be complete (a later member began) is yielded,
    then :class:`ShardReadError` is raised with the interrupted sample in ``partial``. A tar that
    simply stops at a member boundary without the end-of-archive blocks counts as truncated (its
    last sample may be missing members) unless ``require_end_marker=False``. Storage failures
    (credentials, network) raise :class:`~pipeline.storage.StorageError` instead.
    """
    ending: dict[str, str] = {}

    class _EndAwareTarInfo(tarfile.TarInfo):
        # tarfile's stream reader treats a missing, short or invalid header after the first member
        # as a normal end; record why the headers stopped so that a cut is not mistaken for the end.
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> Self:
            try:
                return super().fromtarfile(tar)
            except Exception as e:
                ending["reason"] = type(e).__name__
                raise

    count = 0
    current: Sample | None = None
    skipped = 0
    with storage.open_read(uri, options=options) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndAwareTarInfo) as tf:
                for info in tf:
                    if info.isdir():
                        continue
                    parts = split_member_name(info.name)
                    meta = "/" not in info.name and info.name.startswith("__") and info.name.endswith("__")
                    if not info.isreg() or parts is None or meta:
                        skipped += 1
                        log.warning("%s: skipping member %r (not a sample file)", uri, info.name)
                        continue
                    f = tf.extractfile(info)
                    assert f is not None  # a regular file always has a reader
                    data = f.read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} cut at {len(data)} of {info.size} bytes")
                    key, suffix = parts
                    if current is None or current.key != key:
                        if current is not None:
                            yield current
                            count += 1
                        current = Sample(key=key, members=[])
                    current.members.append((suffix, data))
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ShardReadError(uri, f"corrupt or truncated tar: {e}", samples_read=count, partial=current) from e
    reason = ending.get("reason")
    if reason != "EOFHeaderError" and require_end_marker:
        raise ShardReadError(
            uri,
            f"no end-of-archive marker ({reason}): the tar is truncated or corrupt",
            samples_read=count,
            partial=current,
        )
    if current is not None:
        yield current


def pick_image_member(members: Sequence[tuple[str, bytes]] | Sequence[str]) -> str | None:
    """The suffix of the member that holds the sample's image, or None.

    An exact image suffix wins (``jpg`` over ``seg.png``), in :data:`IMAGE_EXTENSIONS` order; else the
    first member (input order) whose last extension is an image one (``left.png``).
    """
    names = [m if isinstance(m, str) else m[0] for m in members]
    lowered = [n.lower() for n in names]
    for ext in IMAGE_EXTENSIONS:
        if ext in lowered:
            return names[lowered.index(ext)]
    for name, low in zip(names, lowered, strict=True):
        if low.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return name
    return None


# --- writing parts ---------------------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(TAR_FORMAT, "utf-8", "surrogateescape")


def encode_tar_part(samples: Iterable[Sample]) -> bytes:
    """Deterministic tar bytes for ``samples``, members in the given order, WITHOUT end-of-archive blocks.

    Each member ``{key}.{suffix}`` gets mtime 0, uid/gid 0, empty owner names, mode 0o444, pax
    format. Without the end blocks, parts concatenate into one valid tar; :func:`commit_shard`
    appends the end blocks once.
    """
    out = bytearray()
    for sample in samples:
        for suffix, data in sample.members:
            out += _tar_header(f"{sample.key}.{suffix}", len(data))
            out += data
            out += b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


def _tar_trailer(body_size: int) -> bytes:
    # Two zero blocks, then zero padding to a full 10 KiB record, as tarfile and GNU tar write it.
    total = body_size + len(END_OF_ARCHIVE)
    return END_OF_ARCHIVE + b"\0" * (-total % tarfile.RECORDSIZE)


def shard_stem(shard_name: str) -> str:
    """``train/000001.tar`` -> ``train/000001``."""
    return shard_name.removesuffix(".tar")


def staging_dir(dst: str, shard_name: str) -> str:
    return storage.join(dst, STAGING_DIR, shard_stem(shard_name))


def part_uri(dst: str, shard_name: str, first_index: int, last_index: int) -> str:
    return storage.join(staging_dir(dst, shard_name), f"{first_index:09d}-{last_index:09d}.part")


def shard_marker_uri(dst: str, shard_name: str) -> str:
    return storage.join(dst, shard_stem(shard_name) + MARKER_SUFFIX)


def write_shard_part(
    dst: str, shard_name: str, first_index: int, samples: Sequence[Sample], *, options: StorageOptions | None = None
) -> PartInfo:
    """Stage ``samples`` (indexes ``first_index..first_index+len-1`` of the shard) as one part, atomically."""
    if not samples:
        raise ValueError("a part needs at least one sample")
    last = first_index + len(samples) - 1
    uri = part_uri(dst, shard_name, first_index, last)
    storage.write_bytes_atomic(uri, encode_tar_part(samples), options=options)
    return PartInfo(unit=shard_name, first=first_index, last=last, uri=uri)


def sample_from_row(row: Mapping[str, Any]) -> Sample:
    """The output sample of a finished row, members in input order, byte for byte.

    ``extra_names``/``extra_data`` hold every member in input order; the image member's slot there is
    filled with ``output`` (else the input ``image``), since its bytes travel once, in those columns. A row
    whose extras do not name the image member gets it first. A row without an image member has only extras.
    """
    names = [str(n) for n in (row.get(schema.EXTRA_NAMES) or [])]
    datas = [bytes(d) for d in (row.get(schema.EXTRA_DATA) or [])]
    if len(names) != len(datas):
        raise ValueError(f"row {row.get(schema.KEY)!r}: {len(names)} member names for {len(datas)} members")
    members = list(zip(names, datas, strict=True))
    image_member = row.get(schema.IMAGE_MEMBER)
    if image_member:
        data = row.get(schema.OUTPUT)
        if data is None:
            data = row.get(schema.IMAGE)
        if data is None:
            raise ValueError(f"row {row.get(schema.KEY)!r} names image member {image_member!r} but carries no bytes")
        if image_member in names:
            members[names.index(image_member)] = (str(image_member), bytes(data))
        else:
            members.insert(0, (str(image_member), bytes(data)))
    return Sample(key=str(row[schema.KEY]), members=members)


def _runs(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, list[Mapping[str, Any]]]]:
    """Group rows by unit (``shard`` column) and split into runs of consecutive ``index``: (unit, first, rows)."""
    by_unit: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_unit.setdefault(str(row[schema.SHARD]), []).append(row)
    out: list[tuple[str, int, list[Mapping[str, Any]]]] = []
    for unit in sorted(by_unit):
        unit_rows = sorted(by_unit[unit], key=lambda r: int(r[schema.INDEX]))
        run: list[Mapping[str, Any]] = []
        for row in unit_rows:
            idx = int(row[schema.INDEX])
            if run and idx == int(run[-1][schema.INDEX]):
                raise ValueError(f"{unit}: index {idx} appears twice in one batch")
            if run and idx != int(run[-1][schema.INDEX]) + 1:
                out.append((unit, int(run[0][schema.INDEX]), run))
                run = []
            run.append(row)
        if run:
            out.append((unit, int(run[0][schema.INDEX]), run))
    return out


def write_shard_rows(
    dst: str, rows: Iterable[Mapping[str, Any]], *, options: StorageOptions | None = None
) -> list[PartInfo]:
    """Stage finished rows (any mix of shards and indexes) as parts: one per run of consecutive indexes."""
    return [
        write_shard_part(dst, unit, first, [sample_from_row(r) for r in run], options=options)
        for unit, first, run in _runs(rows)
    ]


# --- commit and resume (shared by shards and chunks) -----------------------------------------------


def _list_parts(staging: str, options: StorageOptions | None) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(first, last, uri) of the part files under ``staging``, and every file there (for cleanup)."""
    every = storage.list_prefix(staging.rstrip("/") + "/", options=options)
    parts = []
    for uri in every:
        m = PART_RE.fullmatch(uri.rsplit("/", 1)[-1])
        if m:
            parts.append((int(m.group(1)), int(m.group(2)), uri))
    return sorted(parts), every


def _cover(parts: list[tuple[int, int, str]], expected_count: int, unit: str) -> list[str]:
    """A chain of parts covering ``0..expected_count-1`` exactly once, in order.

    Parts from retries with the same batch boundaries share a name (identical bytes); retries with
    other boundaries may overlap: any exact cover is correct, since every part holds the same
    deterministic rows. Raises :class:`ShardCommitError` naming the missing indexes when none exists.
    """
    starts: dict[int, list[tuple[int, int, str]]] = {}
    for p in parts:
        if p[0] <= p[1] < expected_count:
            starts.setdefault(p[0], []).append(p)
    prev: dict[int, tuple[int, int, str]] = {}
    frontier, seen = [0], {0}
    while frontier:
        pos = frontier.pop(0)
        for p in starts.get(pos, []):
            nxt = p[1] + 1
            if nxt not in seen:
                seen.add(nxt)
                prev[nxt] = p
                frontier.append(nxt)
    if expected_count in seen:
        chain: list[str] = []
        pos = expected_count
        while pos > 0:
            p = prev[pos]
            chain.append(p[2])
            pos = p[0]
        return chain[::-1]
    covered = [False] * expected_count
    for first, last, _ in parts:
        for i in range(first, min(last, expected_count - 1) + 1):
            covered[i] = True
    missing = [i for i, c in enumerate(covered) if not c]
    beyond = [f"{a}-{b}" for a, b, _ in parts if b >= expected_count]
    raise ShardCommitError(
        f"{unit}: staged parts do not cover indexes 0..{expected_count - 1}"
        + (f"; missing {_ranges(missing)}" if missing else "; parts overlap without an exact cover")
        + (f"; parts beyond the expected count: {beyond}" if beyond else "")
    )


def _ranges(indexes: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (first 20 runs)."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(text[:20]) + (" ..." if len(text) > 20 else "")


def _commit(
    *,
    unit: str,
    staging: str,
    final_uri: str,
    marker_uri: str,
    expected_count: int,
    stats: Mapping[str, Any],
    config_hash: str | None,
    trailer: Literal["tar", "none"],
    options: StorageOptions | None,
) -> dict[str, Any]:
    parts, every = _list_parts(staging, options)
    chain = _cover(parts, expected_count, unit)
    digest = hashlib.sha256()
    size = 0
    with AtomicWriter(final_uri, options=options) as out:
        for uri in chain:
            with storage.open_read(uri, options=options) as f:
                while chunk := f.read(8 * storage.MiB):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        if trailer == "tar":
            tail = _tar_trailer(size)
            out.write(tail)
            digest.update(tail)
            size += len(tail)
    marker = dict(stats)
    marker.update(
        {
            "unit": unit,
            "output": final_uri,
            "count": expected_count,
            "bytes": size,
            "sha256": digest.hexdigest(),
            "parts": len(chain),
            "config_hash": config_hash if config_hash is not None else stats.get("config_hash"),
        }
    )
    storage.write_json_atomic(marker_uri, marker, options=options)  # the commit point
    storage.delete_many(every, options=options)
    _prune_local_dirs(staging)
    return marker


def _prune_local_dirs(staging: str) -> None:
    """Remove the now-empty local staging directories up to ``_dr2_staging`` (S3 has no directories)."""
    if storage.is_s3(staging):
        return
    path = storage.local_path(staging)
    while path.name and path.is_dir():
        try:
            path.rmdir()
        except OSError:  # not empty (other shards' parts) or gone
            return
        if path.name == STAGING_DIR:
            return
        path = path.parent


def _state(marker_uri: str, final_uri: str, config_hash: str, options: StorageOptions | None) -> UnitState:
    try:
        marker = json.loads(storage.read_bytes(marker_uri, options=options))
    except FileNotFoundError:
        return "todo"
    if marker.get("config_hash") != config_hash:
        return "conflict"
    if not storage.exists(final_uri, options=options):
        log.warning("%s: marker present but %s is gone; redoing it", marker_uri, final_uri)
        return "todo"
    return "done"


def commit_shard(
    dst: str,
    shard_name: str,
    expected_count: int,
    stats: Mapping[str, Any],
    *,
    config_hash: str | None = None,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Assemble the staged parts of ``shard_name`` into ``{dst}/{shard_name}``, mark it done, drop the parts.

    Checks that the parts cover indexes ``0..expected_count-1`` exactly once (overlapping retries
    are fine when an exact cover exists; else :class:`ShardCommitError`), streams them in order
    into an :class:`~pipeline.storage.AtomicWriter` followed by the end-of-archive blocks, then writes
    the marker ``{dst}/{shard_stem}.stats.json`` = ``stats`` + ``count``, ``bytes``, ``sha256``,
    ``parts``, ``config_hash`` (the argument, else ``stats["config_hash"]``), and only then deletes
    the parts. Returns the marker. Memory: one 8 MiB chunk (plus an S3 part buffer).
    """
    return _commit(
        unit=shard_name,
        staging=staging_dir(dst, shard_name),
        final_uri=storage.join(dst, shard_name),
        marker_uri=shard_marker_uri(dst, shard_name),
        expected_count=expected_count,
        stats=stats,
        config_hash=config_hash,
        trailer="tar",
        options=options,
    )


def shard_state(dst: str, shard_name: str, config_hash: str, *, options: StorageOptions | None = None) -> UnitState:
    """``done``: committed by this config; ``conflict``: committed by another config; ``todo``: not committed."""
    return _state(shard_marker_uri(dst, shard_name), storage.join(dst, shard_name), config_hash, options)


def clear_staging(dst: str, shard_name: str, *, options: StorageOptions | None = None) -> None:
    """Delete the staged parts of a shard: call before (re)processing a ``todo`` shard, so that parts left
    by an interrupted earlier run never mix into this one, and after a crash between marker and cleanup."""
    storage.remove_tree(staging_dir(dst, shard_name), options=options)


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace, UTF-8) of a JSON-able config mapping."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# --- plain images: outputs mirror inputs, manifests per chunk --------------------------------------

_BINARY_COLUMNS = {schema.IMAGE, schema.OUTPUT, schema.CROPS, schema.RESTORED, schema.EXTRA_DATA}
_JSON_COLUMNS = {schema.FACES, schema.TIMINGS}


def chunk_name(n: int) -> str:
    return f"chunk-{n:06d}"


def chunk_staging_dir(dst: str, n: int) -> str:
    return storage.join(dst, STAGING_DIR, "manifests", chunk_name(n))


def chunk_manifest_uri(dst: str, n: int) -> str:
    return storage.join(dst, MANIFEST_DIR, chunk_name(n) + ".jsonl")


def chunk_marker_uri(dst: str, n: int) -> str:
    return storage.join(dst, MANIFEST_DIR, chunk_name(n) + MARKER_SUFFIX)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        value = value.tolist()
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError("binary value")
    return value


def manifest_line(row: Mapping[str, Any]) -> bytes:
    """One JSONL line with a row's metadata (every non-binary column; ``faces``/``timings`` parsed)."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k in _BINARY_COLUMNS:
            continue
        v = _jsonable(v)
        if k in _JSON_COLUMNS and isinstance(v, str) and v:
            v = json.loads(v)
        out[k] = v
    return (json.dumps(out, sort_keys=True, ensure_ascii=False) + "\n").encode()


def write_image_outputs(
    dst: str, rows: Iterable[Mapping[str, Any]], *, options: StorageOptions | None = None
) -> list[PartInfo]:
    """Write each row's image to ``{dst}/{key}`` (the input's relative path), then stage manifest parts.

    Rows carry ``shard`` = :func:`chunk_name` of their chunk and ``index`` = position in it. The
    image written is ``output``, else the input ``image`` (a row passed through); a row with neither
    only gets its manifest line. Every write is atomic and idempotent; a part is staged per run of
    consecutive indexes, after that run's images, so a committed manifest only names written files.
    """
    parts: list[PartInfo] = []
    for unit, first, run in _runs(rows):
        m = re.fullmatch(r"chunk-(\d{6,})", unit)
        if not m:
            raise ValueError(f"plain-image rows need shard = chunk_name(n), got {unit!r}")
        for row in run:
            data = row.get(schema.OUTPUT)
            if data is None:
                data = row.get(schema.IMAGE)
            if data is not None:
                storage.write_bytes_atomic(storage.join(dst, str(row[schema.KEY])), bytes(data), options=options)
        last = first + len(run) - 1
        uri = storage.join(chunk_staging_dir(dst, int(m.group(1))), f"{first:09d}-{last:09d}.part")
        storage.write_bytes_atomic(uri, b"".join(manifest_line(r) for r in run), options=options)
        parts.append(PartInfo(unit=unit, first=first, last=last, uri=uri))
    return parts


def commit_chunk(
    dst: str,
    n: int,
    expected_count: int,
    stats: Mapping[str, Any],
    *,
    config_hash: str | None = None,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Like :func:`commit_shard` for chunk ``n``: manifest parts -> ``chunk-{n:06d}.jsonl``, then the marker."""
    return _commit(
        unit=chunk_name(n),
        staging=chunk_staging_dir(dst, n),
        final_uri=chunk_manifest_uri(dst, n),
        marker_uri=chunk_marker_uri(dst, n),
        expected_count=expected_count,
        stats=stats,
        config_hash=config_hash,
        trailer="none",
        options=options,
    )


def chunk_state(dst: str, n: int, config_hash: str, *, options: StorageOptions | None = None) -> UnitState:
    """``done`` / ``conflict`` / ``todo`` for chunk ``n``, from its marker (as :func:`shard_state`)."""
    return _state(chunk_marker_uri(dst, n), chunk_manifest_uri(dst, n), config_hash, options)


def clear_chunk_staging(dst: str, n: int, *, options: StorageOptions | None = None) -> None:
    """Delete the staged manifest parts of chunk ``n`` (see :func:`clear_staging`)."""
    storage.remove_tree(chunk_staging_dir(dst, n), options=options)
