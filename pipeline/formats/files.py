"""Planning shared by the formats whose unit is one input file (tar shards, parquet files): SRC's files of a suffix,
named by their path relative to their common folder, refused when they lie inside DST."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

from pipeline.store import storage
from pipeline.store.sources import expand_source_objects
from pipeline.store.storage import ObjectInfo


def common_dir(uris: Sequence[str]) -> str:
    """The deepest folder (or S3 prefix, by ``/`` segments) holding every URI."""
    dirs = [u.rsplit("/", 1)[0] for u in uris]
    if any(storage.is_s3(d) for d in dirs):
        parts = [d.split("/") for d in dirs]
        common = []
        for segs in zip(*parts, strict=False):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        return "/".join(common)
    return posixpath.commonpath(dirs)


def inside(path: str, root: str) -> bool:
    """Whether ``path`` lies in ``root`` (by path components, not by string prefix)."""
    if storage.is_s3(path) != storage.is_s3(root):
        return False
    if storage.is_s3(path):
        return (path.rstrip("/") + "/").startswith(root.rstrip("/") + "/")
    return Path(os.path.abspath(path)).is_relative_to(Path(os.path.abspath(root)))


def list_files(src: str, dst: str, suffix: str, options: storage.StorageOptions) -> list[tuple[str, ObjectInfo]]:
    """(path relative to the files' common folder, object) of every ``suffix`` file SRC names, sorted; raises when
    one lies inside DST (outputs would be read back as inputs)."""
    # a file named as such is listed whatever its name: a format takes only files of its own suffix, so that
    # ``--input-format auto`` never reads a parquet file as a tar or the other way round
    found = [o for o in expand_source_objects(src, suffixes=(suffix,), options=options)
             if o.uri.lower().endswith(suffix)]
    within = [o.uri for o in found if inside(o.uri, dst)]
    if within:
        raise ValueError(f"SRC matches files inside DST ({within[0]}): outputs would be read back as inputs. "
                         "Choose a DST outside SRC.")
    if not found:
        return []
    root = common_dir([o.uri for o in found])
    return [(o.uri[len(root):].lstrip("/"), o) for o in found]
