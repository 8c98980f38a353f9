"""The WebDataset tar codec: reading samples from a shard, and writing deterministic tar parts.

* :func:`iter_tar_samples` streams a tar (local or S3) and groups members into samples by WebDataset's
  rule: the key is the member path up to the first dot of its basename (directory included), and the
  members of one sample are consecutive.
* :func:`encode_tar_part` writes samples as tar bytes WITHOUT the end-of-archive blocks, byte for byte
  the same for the same samples (mtime 0, uid/gid 0, no owner names, mode 0o444, pax format), so that
  parts concatenate into one valid tar and :func:`tar_trailer` closes it once.
* :func:`pick_image_member` chooses the member that holds a sample's image, by the one list of image
  extensions (:data:`IMAGE_EXTENSIONS`), which plain-image sources use too.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Self

from pipeline import storage
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

TAR_FORMAT: Final = tarfile.PAX_FORMAT
"""Output tars are POSIX.1-2001 (pax): long and non-ASCII member names need no GNU extensions."""
END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jp2", "ppm", "pgm", "pbm", "gif")
"""Member suffixes that hold an image, in order of preference."""


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



@dataclass(frozen=True)
class Sample:
    """One WebDataset sample: its key and its members ``(suffix, bytes)`` in input order.

    ``suffix`` is the member name after the key's dot: ``jpg``, ``json``, ``seg.png``.
    """

    key: str
    members: list[tuple[str, bytes]] = field(default_factory=list)



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



def tar_header(name: str, size: int) -> bytes:
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
            out += tar_header(f"{sample.key}.{suffix}", len(data))
            out += data
            out += b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


def tar_trailer(body_size: int) -> bytes:
    # Two zero blocks, then zero padding to a full 10 KiB record, as tarfile and GNU tar write it.
    total = body_size + len(END_OF_ARCHIVE)
    return END_OF_ARCHIVE + b"\0" * (-total % tarfile.RECORDSIZE)
