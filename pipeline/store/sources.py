"""Sources: what SRC names. Brace patterns, globs, directories and S3 prefixes become sorted URIs of input
shards, and image folders become sorted relative image paths.

Braces (``shard-{000..099}.tar``, ``{train,val}/``) are expanded by the ``braceexpand`` package, the one
webdataset itself uses, so a pattern means here what it means to ``wds.WebDataset``. Globs follow the shell
(``*`` and ``?`` stop at ``/``, ``**`` crosses it) on local paths and on S3 keys alike. Listing goes through
:mod:`pipeline.store.storage` (paged on S3).
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from braceexpand import braceexpand

from pipeline.formats.wds import IMAGE_EXTENSIONS, escape_name
from pipeline.store import storage
from pipeline.store.storage import ObjectInfo, StorageOptions

log = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{000..009}`` (zero-padded ranges) and ``{a,b}``, nested, left to right."""
    return list(braceexpand(pattern))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Glob -> regex over S3 keys: ``*``/``?`` stop at ``/``, ``**`` crosses it, ``[...]`` as in fnmatch."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif c == "*":
            out += "[^/]*"
            i += 1
        elif c == "?":
            out += "[^/]"
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out += re.escape(c)
                i += 1
            else:
                body = pattern[i + 1 : j]
                out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
                i = j + 1
        else:
            out += re.escape(c)
            i += 1
    return re.compile(out + r"\Z")


def _expand_one(uri: str, keep: Callable[[str], bool], options: StorageOptions | None) -> list[ObjectInfo]:
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        m = _GLOB_CHARS.search(key)
        if m:
            rx = _glob_regex(key)
            return [storage.s3_object(bucket, o) for o in storage.iter_s3_objects(bucket, key[: m.start()], options)
                    if rx.match(o["Key"]) and keep(o["Key"])]
        if keep(key):
            info = storage.stat(uri, options=options)
            if info is not None:
                return [info]
        prefix = key if (key == "" or key.endswith("/")) else key + "/"
        listed = storage.iter_s3_objects(bucket, prefix, options)
        found = [storage.s3_object(bucket, o) for o in listed if keep(o["Key"])]
        if not found and keep(key):
            raise FileNotFoundError(f"no such object: {uri}")
        return found
    path = uri.removeprefix("file://")
    if _GLOB_CHARS.search(path):
        return [storage.local_object(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p) and keep(p)]
    p = Path(path)
    if p.is_dir():
        return [storage.local_object(str(q)) for q in p.rglob("*") if q.is_file() and keep(q.name)]
    if p.is_file():
        return [storage.local_object(str(p))]
    raise FileNotFoundError(f"no such file or directory: {uri}")


COMPRESSED_SHARDS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


def expand_source_objects(
    spec: str | Sequence[str], *, suffixes: Sequence[str] = (".tar",), options: StorageOptions | None = None
) -> list[ObjectInfo]:
    """Input shards named by ``spec`` -> sorted, de-duplicated objects (URI, size, version) ending in ``suffixes``.

    ``spec`` is one pattern or a list of them. Each pattern is brace-expanded first
    (``shards-{000..009}.tar``, ``{train,val}/``), then each result is:

    * a file or object: taken as is (a named file that does not exist raises ``FileNotFoundError``);
    * a directory or an S3 prefix: every matching file below it, recursively (S3 listing is paginated);
    * a glob (``*``, ``?``, ``[..]``, ``**``): matched against local paths or S3 keys
      (``*`` does not cross ``/``; ``**`` does).

    Local results are absolute paths; S3 results are ``s3://bucket/key``. Sizes and versions (S3 ETag, local
    mtime) come from the same listing: a rerun compares them with what the unit's marker recorded. Compressed
    shards (``.tar.gz`` ...) that the patterns match are not inputs: a warning names how many were left out.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    sfx = tuple(s.lower() for s in suffixes)
    found: dict[str, ObjectInfo] = {}
    compressed: set[str] = set()

    def keep(name: str) -> bool:
        low = name.lower()
        if low.endswith(COMPRESSED_SHARDS):
            compressed.add(name)
        return low.endswith(sfx)

    for pattern in patterns:
        for uri in expand_braces(pattern):
            found.update((o.uri, o) for o in _expand_one(uri, keep, options))
    if compressed:
        log.warning("%d compressed shard(s) (e.g. %s) were left out: dr2 reads uncompressed .tar shards; "
                    "decompress them first (gunzip keeps the .tar)", len(compressed), sorted(compressed)[0])
    return [found[u] for u in sorted(found)]


def expand_sources(
    spec: str | Sequence[str], *, suffixes: Sequence[str] = (".tar",), options: StorageOptions | None = None
) -> list[str]:
    """The URIs of :func:`expand_source_objects`."""
    return [o.uri for o in expand_source_objects(spec, suffixes=suffixes, options=options)]


IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
"""File suffixes of plain-image inputs: the one list (:data:`pipeline.formats.wds.IMAGE_EXTENSIONS`), dotted."""
INTERNAL_DIRS = ("_dr2", "_dr2_staging")
"""Directories the pipeline writes next to its outputs; never listed as inputs."""


def list_image_objects(
    root_uri: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, *, options: StorageOptions | None = None
) -> list[tuple[str, ObjectInfo]]:
    """(relative POSIX path, object) of the images under a local folder or S3 prefix (recursive, sorted): the
    images :func:`list_image_inputs` keeps."""
    return list_image_inputs(root_uri, suffixes, options=options)[0]


def list_image_inputs(
    root_uri: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, *, options: StorageOptions | None = None
) -> tuple[list[tuple[str, ObjectInfo]], list[tuple[str, str]]]:
    """The images under a local folder or S3 prefix (recursive, sorted), and the image paths refused, each with
    its reason: a name that is not valid UTF-8 or that would be written outside DST (``..``, absolute), or a
    symbolic link (never followed: it could point anywhere on the machine). Refused paths are not lost: they go to
    their chunk's marker (:func:`pipeline.formats.units.image_chunks`).

    Suffixes match case-insensitively. The pipeline's own ``_dr2*`` directories are skipped.
    """
    sfx = tuple(s.lower() for s in suffixes)
    root = root_uri.rstrip("/")
    out: list[tuple[str, ObjectInfo | None]] = []
    if storage.is_s3(root_uri):
        bucket, prefix = storage.split_s3(root + "/")
        prefix = "" if prefix == "/" else prefix
        listed = storage.iter_s3_objects(bucket, prefix, options)
        out = [(o["Key"][len(prefix):], storage.s3_object(bucket, o)) for o in listed]
    else:
        base = storage.local_path(root_uri)
        if not base.is_dir():
            raise FileNotFoundError(f"no such directory: {root_uri}")
        out = [(p.relative_to(base).as_posix(), None if p.is_symlink() else storage.local_object(str(p)))
               for p in base.rglob("*") if p.is_symlink() or p.is_file()]
    kept: list[tuple[str, ObjectInfo]] = []
    refused: list[tuple[str, str]] = []
    for rel, info in out:
        if not rel.lower().endswith(sfx) or rel.split("/", 1)[0] in INTERNAL_DIRS:
            continue
        reason = _refusal(rel) or ("a symbolic link (not followed)" if info is None else None)
        if reason:
            refused.append((rel, reason))
        elif info is not None:
            kept.append((rel, info))
    if refused:
        log.warning("%d image path(s) under %s are left out (e.g. %s: %s); their chunks' markers list them",
                    len(refused), root_uri, escape_name(refused[0][0]), refused[0][1])
    return sorted(kept), sorted(refused)


def _refusal(rel: str) -> str | None:
    if not _safe_relative(rel):
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            return "name is not valid UTF-8"
        return "would be written outside DST"
    return None


def _safe_relative(rel: str) -> bool:
    """Whether ``rel`` can name an output under DST: valid UTF-8, relative, no ``..`` or empty component."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    parts = rel.split("/")
    return not rel.startswith("/") and "\\" not in rel and all(p not in ("", ".", "..") for p in parts)


def list_images(
    root_uri: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, *, options: StorageOptions | None = None
) -> list[str]:
    """Relative POSIX paths of :func:`list_image_objects`."""
    return [r for r, _ in list_image_objects(root_uri, suffixes, options=options)]
