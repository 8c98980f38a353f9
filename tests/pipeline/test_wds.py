"""pipeline/wds.py: WebDataset tars read and written through the real webdataset library, on the local
filesystem and a real S3 server."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline import storage
from pipeline import wds as codec
from pipeline.wds import Sample, ShardReadError


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return "s3://" + request.getfixturevalue("s3_bucket")


def _samples(n: int, seed: int = 0) -> list[Sample]:
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


def _wds_tar(samples: list[Sample]) -> bytes:
    """A shard written by webdataset's own TarWriter."""
    buf = io.BytesIO()
    with wds.TarWriter(buf) as w:
        for s in samples:
            w.write({"__key__": s.key, **dict(s.members)})
    return buf.getvalue()


def _read_with_wds(uri: str) -> list[dict[str, bytes]]:
    """Read a shard back with the webdataset library (WebDataset for files, its tar iterator for S3)."""
    if storage.is_s3(uri):
        with storage.open_read(uri) as f:
            return list(group_by_keys(tar_file_expander([{"url": uri, "stream": f}])))
    return list(wds.WebDataset(uri, shardshuffle=False, empty_check=False))


def _as_dicts(samples: list[Sample]) -> list[dict[str, bytes]]:
    return [{"__key__": s.key, **dict(s.members)} for s in samples]  # type: ignore[dict-item]


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k == "__key__" or not k.startswith("__")}


def test_split_member_name_and_pick_image() -> None:
    assert codec.split_member_name("a/b.c/k1.seg.png") == ("a/b.c/k1", "seg.png")
    assert codec.split_member_name("k.jpg") == ("k", "jpg")
    assert codec.split_member_name("noext") is None
    assert codec.split_member_name("d/.hidden") is None
    assert codec.pick_image_member([("json", b""), ("seg.png", b""), ("jpg", b"")]) == "jpg"
    assert codec.pick_image_member(["json", "left.PNG"]) == "left.PNG"
    assert codec.pick_image_member(["json", "txt"]) is None


def test_iter_tar_samples_reads_wds_shards(root: str) -> None:
    samples = _samples(7)
    uri = storage.join(root, "in/shard-000.tar")
    storage.write_bytes_atomic(uri, _wds_tar(samples))
    assert list(codec.iter_tar_samples(uri)) == samples


def test_truncated_tar_yields_samples_before_the_cut(root: str) -> None:
    samples = _samples(6)
    data = _wds_tar(samples)
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)) if m.name.startswith("dir.v1/000004.")]
    # Cut inside the data of sample 4's second member: samples 0..3 are whole, sample 4 is partial.
    cut_uri = storage.join(root, "cut-in-data.tar")
    storage.write_bytes_atomic(cut_uri, data[: offsets[1] + 512 + 10])
    got: list[Sample] = []
    with pytest.raises(ShardReadError, match="after 4 complete samples") as info:
        for s in codec.iter_tar_samples(cut_uri):
            got.append(s)
    assert got == samples[:4]
    assert info.value.samples_read == 4
    assert info.value.partial is not None and info.value.partial.members == samples[4].members[:1]

    # Cut exactly at a member boundary: tarfile sees a clean end, the missing end marker tells.
    boundary_uri = storage.join(root, "cut-at-boundary.tar")
    storage.write_bytes_atomic(boundary_uri, data[: offsets[0]])
    got = []
    with pytest.raises(ShardReadError, match="no end-of-archive marker"):
        for s in codec.iter_tar_samples(boundary_uri):
            got.append(s)
    assert got == samples[:3]
    assert list(codec.iter_tar_samples(boundary_uri, require_end_marker=False)) == samples[:4]

    garbage = storage.join(root, "garbage.tar")
    storage.write_bytes_atomic(garbage, b"not a tar at all" * 100)
    with pytest.raises(ShardReadError):
        list(codec.iter_tar_samples(garbage))


def test_encode_tar_part_is_deterministic_and_concatenates() -> None:
    samples = _samples(5)
    a, b = codec.encode_tar_part(samples[:2]), codec.encode_tar_part(samples[2:])
    assert a == codec.encode_tar_part(samples[:2])
    assert len(a) % 512 == 0 and not a.endswith(b"\0" * 1024)
    whole = a + b + codec.END_OF_ARCHIVE
    members = list(tarfile.open(fileobj=io.BytesIO(whole)))
    assert [m.name for m in members] == [f"{s.key}.{sfx}" for s in samples for sfx, _ in s.members]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert [_strip(d) for d in group_by_keys(tar_file_expander([{"url": "x", "stream": io.BytesIO(whole)}]))] == (
        _as_dicts(samples)
    )


def test_empty_and_zero_byte_shards(tmp_path: Path) -> None:
    (tmp_path / "empty.tar").write_bytes(codec.tar_trailer(0))
    assert list(codec.iter_tar_samples(str(tmp_path / "empty.tar"))) == []
    (tmp_path / "zero.tar").write_bytes(b"")  # a zero-byte file is not a tar
    with pytest.raises(ShardReadError, match="empty file"):
        list(codec.iter_tar_samples(str(tmp_path / "zero.tar")))
