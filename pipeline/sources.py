"""Sources: what SRC names. Brace patterns, globs, directories and S3 prefixes become sorted URIs of input
shards, and image folders become sorted relative image paths.

Braces (``shard-{000..099}.tar``, ``{train,val}/``) are expanded by the ``braceexpand`` package, the one
webdataset itself uses, so a pattern means here what it means to ``wds.WebDataset``. Globs follow the shell
(``*`` and ``?`` stop at ``/``, ``**`` crosses it) on local paths and on S3 keys alike. Listing goes through
:mod:`pipeline.storage` (paged on S3).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

from pipeline import storage
from pipeline.storage import StorageOptions
from pipeline.wds import IMAGE_EXTENSIONS

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


def _expand_one(uri: str, suffixes: tuple[str, ...], options: StorageOptions | None) -> list[str]:
    def keep(name: str) -> bool:
        return name.lower().endswith(suffixes)

    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        m = _GLOB_CHARS.search(key)
        if m:
            literal = key[: m.start()]
            rx = _glob_regex(key)
            return [
                f"{storage.S3_SCHEME}{bucket}/{k}"
                for k, _ in storage.iter_s3_keys(bucket, literal, options)
                if rx.match(k) and keep(k)
            ]
        if keep(key) and storage.exists(uri, options=options):
            return [uri]
        prefix = key if (key == "" or key.endswith("/")) else key + "/"
        keys = storage.iter_s3_keys(bucket, prefix, options)
        found = [f"{storage.S3_SCHEME}{bucket}/{k}" for k, _ in keys if keep(k)]
        if not found and keep(key):
            raise FileNotFoundError(f"no such object: {uri}")
        return found
    path = uri.removeprefix("file://")
    if _GLOB_CHARS.search(path):
        return [os.path.abspath(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p) and keep(p)]
    p = Path(path)
    if p.is_dir():
        return [os.path.abspath(q) for q in p.rglob("*") if q.is_file() and keep(q.name)]
    if p.is_file():
        return [os.path.abspath(p)]
    raise FileNotFoundError(f"no such file or directory: {uri}")


def expand_sources(
    spec: str | Sequence[str], *, suffixes: Sequence[str] = (".tar",), options: StorageOptions | None = None
) -> list[str]:
    """Input shards named by ``spec`` -> sorted, de-duplicated URIs of files ending in ``suffixes``.

    ``spec`` is one pattern or a list of them. Each pattern is brace-expanded first
    (``shards-{000..009}.tar``, ``{train,val}/``), then each result is:

    * a file or object: taken as is (a named file that does not exist raises ``FileNotFoundError``);
    * a directory or an S3 prefix: every matching file below it, recursively (S3 listing is paginated);
    * a glob (``*``, ``?``, ``[..]``, ``**``): matched against local paths or S3 keys
      (``*`` does not cross ``/``; ``**`` does).

    Local results are absolute paths; S3 results are ``s3://bucket/key``.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    sfx = tuple(s.lower() for s in suffixes)
    found: set[str] = set()
    for pattern in patterns:
        for uri in expand_braces(pattern):
            found.update(_expand_one(uri, sfx, options))
    return sorted(found)


IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
"""File suffixes of plain-image inputs: the one list (:data:`pipeline.wds.IMAGE_EXTENSIONS`), dotted."""
INTERNAL_DIRS = ("_dr2", "_dr2_staging")
"""Directories the pipeline writes next to its outputs; never listed as inputs."""


def list_images(
    root_uri: str, suffixes: Sequence[str] = IMAGE_SUFFIXES, *, options: StorageOptions | None = None
) -> list[str]:
    """Relative POSIX paths of the images under a local folder or S3 prefix (recursive, sorted).

    Suffixes match case-insensitively. The pipeline's own ``_dr2*`` directories are skipped.
    """
    sfx = tuple(s.lower() for s in suffixes)
    root = root_uri.rstrip("/")
    if storage.is_s3(root_uri):
        bucket, prefix = storage.split_s3(root + "/")
        prefix = "" if prefix == "/" else prefix
        rels = [k[len(prefix) :] for k, _ in storage.iter_s3_keys(bucket, prefix, options)]
    else:
        base = storage.local_path(root_uri)
        if not base.is_dir():
            raise FileNotFoundError(f"no such directory: {root_uri}")
        rels = [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]
    return sorted(r for r in rels if r.lower().endswith(sfx) and r.split("/", 1)[0] not in INTERNAL_DIRS)
