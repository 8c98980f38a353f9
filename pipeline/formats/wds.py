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
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Self

from pipeline.store import storage
from pipeline.store.storage import StorageOptions

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
    notes: list[MemberNote] = field(default_factory=list, compare=False)
    """Members of this sample that are NOT carried under their own name, each with the reason."""


@dataclass(frozen=True)
class MemberNote:
    """A tar member that cannot be carried to the output under its own name: ``name`` is the original member
    name, escaped so that it is valid UTF-8 and printable (non-UTF-8 bytes as ``\\xNN``); ``reason`` says why
    (a link, a device or directory entry, no suffix, a repeated name, an unsafe path, ...)."""

    name: str
    reason: str


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/abc.seg.png`` -> ``("dir/abc", "seg.png")``; None for names that are not sample members.

    Same rule as webdataset's ``base_plus_ext``: the basename needs a non-empty stem and a dot.
    """
    head, sep, base = name.rpartition("/")
    dot = base.find(".")
    if dot <= 0:
        return None
    return head + sep + base[:dot], base[dot + 1 :]


_SURROGATE = re.compile("[\udc80-\udcff]")
"""The characters tarfile's ``surrogateescape`` makes of bytes that are not UTF-8."""


def escape_name(name: str) -> str:
    """``name`` as valid, printable UTF-8: bytes that were not UTF-8 (surrogate-escaped by tarfile) become
    ``\\xNN``, control and other non-printable characters their Python escape."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` must not be written as a member name of an output tar, or None if it is safe.

    Unsafe: not valid UTF-8 (tarfile's surrogate escapes), a NUL, a backslash (a path separator on Windows:
    ``..\\x.jpg`` escapes there), an absolute path, or any ``..`` component. A ``..`` that stays inside the
    root after normalisation (``a/../x.jpg``) is refused too: it extracts over ``x.jpg``, so one member would
    silently replace another. With these refused, ``posixpath.normpath`` of the name can neither leave the
    extraction root nor be absolute, and outputs hold no links, so nothing extracts outside the root.
    """
    if _SURROGATE.search(name):
        return "name is not valid UTF-8"
    if "\0" in name:
        return "NUL in name"
    if "\\" in name:
        return "backslash in name (a path separator on Windows)"
    if name.startswith("/"):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' component in path"
    return None


_DEVICE_KINDS = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo"}


def _member_problem(info: tarfile.TarInfo, suffix: str) -> str | None:
    """Why a member with a usable key is not carried as ``suffix`` (None: it is carried)."""
    if info.issym():
        return f"symbolic link to {escape_name(info.linkname)!r}, not followed"
    if info.islnk():
        return f"hard link to {escape_name(info.linkname)!r}, not followed"
    if info.type in _DEVICE_KINDS:
        return f"{_DEVICE_KINDS[info.type]} entry"
    if not info.isreg():
        return f"unsupported member type {info.type!r}"
    if not suffix:
        return "no suffix after the key's dot"
    if suffix.startswith("__") and suffix.endswith("__"):
        return "WebDataset meta name as suffix (it would overwrite the sample's own fields)"
    return unsafe_name_reason(suffix)


def iter_tar_samples(
    uri: str, *, options: StorageOptions | None = None, require_end_marker: bool = True,
    on_note: Callable[[MemberNote], None] | None = None,
) -> Iterator[Sample]:
    """Stream the samples of one tar shard (local or S3), in order, without loading the shard.

    Members are grouped into samples by WebDataset's rule (consecutive members with the same key). Every
    member is accounted for: one that is not carried under its own name is recorded as a :class:`MemberNote`
    (its name escaped to printable UTF-8), never dereferenced and never extracted:

    * on its sample (``Sample.notes``) when its key is usable: links, devices, fifos, unknown types, a
      suffix that is empty, unsafe or a WebDataset meta name, a repeated member name (the first copy is
      kept). A sample whose members are all notes (e.g. only symlinks) is still yielded, with no members,
      so that its key reaches the output.
    * through ``on_note`` (the unit's record; logged when None) when it belongs to no sample that can be
      written: directory entries, names with no suffix (``README``, ``__key__``, ``._x.jpg``) unless the
      name is the current sample's key, and every member of a sample whose KEY is unusable (unsafe by
      :func:`unsafe_name_reason`, not UTF-8, or already used by an earlier, non-adjacent sample of the
      shard, which would write the same output names twice). Such a sample is not yielded.

    Names are read as UTF-8 with surrogate escapes, so a tar with other encodings (GNU tar, latin-1) is
    read, and its non-UTF-8 names are reported rather than failing the job.

    Truncated or corrupt input: every sample known to be complete (a later member began) is yielded,
    then :class:`ShardReadError` is raised with the interrupted sample in ``partial``. A tar that
    simply stops at a member boundary without the end-of-archive blocks counts as truncated (its
    last sample may be missing members) unless ``require_end_marker=False``. Storage failures
    (credentials, network) raise :class:`~pipeline.store.storage.StorageError` instead.
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

    def unit_note(name: str, reason: str) -> None:
        note = MemberNote(name=escape_name(name), reason=reason)
        if on_note is None:
            log.warning("%s: member %r not carried: %s", uri, note.name, reason)
        else:
            on_note(note)

    count = 0
    current: Sample | None = None
    current_names: set[str] = set()
    rejected: tuple[str, str] | None = None  # (key, reason) while reading the members of an unusable key
    seen: set[str] = set()  # keys of this shard so far
    with storage.open_read(uri, options=options) as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndAwareTarInfo, encoding="utf-8",
                              errors="surrogateescape") as tf:
                for info in tf:
                    name = info.name
                    if info.isdir():
                        unit_note(name, "directory entry")
                        continue
                    parts = split_member_name(name)
                    if parts is None:
                        if current is not None and name == current.key:
                            current.notes.append(MemberNote(escape_name(name), "no suffix"))
                        elif rejected is not None and name == rejected[0]:
                            unit_note(name, rejected[1])
                        else:
                            meta = "/" not in name and name.startswith("__") and name.endswith("__")
                            unit_note(name, "WebDataset meta name" if meta else "no suffix: not a sample member")
                        continue
                    key, suffix = parts
                    if rejected is not None and key == rejected[0]:
                        unit_note(name, rejected[1])
                        continue
                    if current is None or current.key != key:
                        bad_key = unsafe_name_reason(key)
                        bad_key = None if bad_key is None else f"unsafe sample key: {bad_key}"
                        if bad_key is None and key in seen:
                            bad_key = "sample key repeated: an earlier, non-adjacent sample of this shard has it"
                        if current is not None:
                            yield current
                            count += 1
                        current, current_names, rejected = None, set(), None
                        if bad_key is not None:
                            rejected = (key, bad_key)
                            unit_note(name, rejected[1])
                            continue
                        seen.add(key)
                        current = Sample(key=key, members=[])
                    problem = _member_problem(info, suffix)
                    if problem is None and suffix in current_names:
                        problem = "repeated member name in the sample (the first copy is kept)"
                    if problem is not None:
                        current.notes.append(MemberNote(escape_name(name), problem))
                        continue
                    f = tf.extractfile(info)
                    assert f is not None  # a regular file always has a reader
                    data = f.read()
                    if len(data) != info.size:
                        raise tarfile.ReadError(f"member {escape_name(name)!r} cut at {len(data)} of {info.size} bytes")
                    current_names.add(suffix)
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

    A member name that is unsafe (:func:`unsafe_name_reason`) or that would not read back as the same key
    and suffix raises ValueError: the reader never yields such names, so this is defence in depth, and a
    shard that could write outside the extraction root must not be produced at all.
    """
    out = bytearray()
    for sample in samples:
        for suffix, data in sample.members:
            name = f"{sample.key}.{suffix}"
            problem = unsafe_name_reason(name)
            if problem is None and split_member_name(name) != (sample.key, suffix):
                problem = "it would not read back as the same key and suffix"
            if problem is not None:
                raise ValueError(f"refusing to write tar member {escape_name(name)!r}: {problem}")
            out += tar_header(name, len(data))
            out += data
            out += b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return bytes(out)


def tar_trailer(body_size: int) -> bytes:
    # Two zero blocks, then zero padding to a full 10 KiB record, as tarfile and GNU tar write it.
    total = body_size + len(END_OF_ARCHIVE)
    return END_OF_ARCHIVE + b"\0" * (-total % tarfile.RECORDSIZE)
