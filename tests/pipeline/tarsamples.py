"""Shared helpers of the tar tests: a local-or-S3 root, random samples, and reading shards back with webdataset."""

from __future__ import annotations

import json

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.formats.wds import Sample
from pipeline.store import storage


def random_samples(n: int, seed: int = 0) -> list[Sample]:
    """n samples with an image, a JSON and sometimes a second image-like member, random bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        members = [("jpg", rng.integers(0, 256, int(rng.integers(1, 3000)), dtype=np.uint8).tobytes())]
        members.append(("json", json.dumps({"i": i, "caption": "ünïcode"}).encode()))
        if i % 3 == 0:
            members.append(("seg.png", rng.integers(0, 256, 700, dtype=np.uint8).tobytes()))
        out.append(Sample(key=f"dir.v1/{i:06d}", members=members))
    return out


def read_with_wds(uri: str) -> list[dict[str, bytes]]:
    """Read a shard back with the webdataset library (WebDataset for files, its tar iterator for S3)."""
    if storage.is_s3(uri):
        with storage.open_read(uri) as f:
            return list(group_by_keys(tar_file_expander([{"url": uri, "stream": f}])))
    return list(wds.WebDataset(uri, shardshuffle=False, empty_check=False))


def as_dicts(samples: list[Sample]) -> list[dict[str, bytes]]:
    return [{"__key__": s.key, **dict(s.members)} for s in samples]  # type: ignore[dict-item]


def strip_meta(d: dict) -> dict:
    return {k: v for k, v in d.items() if k == "__key__" or not k.startswith("__")}
