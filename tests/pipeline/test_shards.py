"""pipeline/shards.py: WebDataset tars read and written through the real webdataset library, staging,
commit and resume, on the local filesystem and a real S3 server."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline import schema, shards, storage
from pipeline.shards import Sample, ShardCommitError, ShardReadError


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
    assert shards.split_member_name("a/b.c/k1.seg.png") == ("a/b.c/k1", "seg.png")
    assert shards.split_member_name("k.jpg") == ("k", "jpg")
    assert shards.split_member_name("noext") is None
    assert shards.split_member_name("d/.hidden") is None
    assert shards.pick_image_member([("json", b""), ("seg.png", b""), ("jpg", b"")]) == "jpg"
    assert shards.pick_image_member(["json", "left.PNG"]) == "left.PNG"
    assert shards.pick_image_member(["json", "txt"]) is None


def test_iter_tar_samples_reads_wds_shards(root: str) -> None:
    samples = _samples(7)
    uri = storage.join(root, "in/shard-000.tar")
    storage.write_bytes_atomic(uri, _wds_tar(samples))
    assert list(shards.iter_tar_samples(uri)) == samples


def test_truncated_tar_yields_samples_before_the_cut(root: str) -> None:
    samples = _samples(6)
    data = _wds_tar(samples)
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)) if m.name.startswith("dir.v1/000004.")]
    # Cut inside the data of sample 4's second member: samples 0..3 are whole, sample 4 is partial.
    cut_uri = storage.join(root, "cut-in-data.tar")
    storage.write_bytes_atomic(cut_uri, data[: offsets[1] + 512 + 10])
    got: list[Sample] = []
    with pytest.raises(ShardReadError, match="after 4 complete samples") as info:
        for s in shards.iter_tar_samples(cut_uri):
            got.append(s)
    assert got == samples[:4]
    assert info.value.samples_read == 4
    assert info.value.partial is not None and info.value.partial.members == samples[4].members[:1]

    # Cut exactly at a member boundary: tarfile sees a clean end, the missing end marker tells.
    boundary_uri = storage.join(root, "cut-at-boundary.tar")
    storage.write_bytes_atomic(boundary_uri, data[: offsets[0]])
    got = []
    with pytest.raises(ShardReadError, match="no end-of-archive marker"):
        for s in shards.iter_tar_samples(boundary_uri):
            got.append(s)
    assert got == samples[:3]
    assert list(shards.iter_tar_samples(boundary_uri, require_end_marker=False)) == samples[:4]

    garbage = storage.join(root, "garbage.tar")
    storage.write_bytes_atomic(garbage, b"not a tar at all" * 100)
    with pytest.raises(ShardReadError):
        list(shards.iter_tar_samples(garbage))


def test_encode_tar_part_is_deterministic_and_concatenates() -> None:
    samples = _samples(5)
    a, b = shards.encode_tar_part(samples[:2]), shards.encode_tar_part(samples[2:])
    assert a == shards.encode_tar_part(samples[:2])
    assert len(a) % 512 == 0 and not a.endswith(b"\0" * 1024)
    whole = a + b + shards.END_OF_ARCHIVE
    members = list(tarfile.open(fileobj=io.BytesIO(whole)))
    assert [m.name for m in members] == [f"{s.key}.{sfx}" for s in samples for sfx, _ in s.members]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert [_strip(d) for d in group_by_keys(tar_file_expander([{"url": "x", "stream": io.BytesIO(whole)}]))] == (
        _as_dicts(samples)
    )


def test_commit_shard_exactly_once(root: str) -> None:
    dst = storage.join(root, "out")
    samples = _samples(10)
    name = "sub/shard-000.tar"
    cfg = shards.config_hash({"steps": 10, "model": "x"})
    assert shards.shard_state(dst, name, cfg) == "todo"

    # Parts arrive out of order; a retry rewrites 3-5 identically; another retry split 6-9 as 6-7 + 8-9,
    # overlapping the original 6-9 (all bytes are deterministic, any exact cover is the same shard).
    for first, last in [(6, 9), (3, 5), (0, 2), (3, 5), (6, 7), (8, 9)]:
        shards.write_shard_part(dst, name, first, samples[first : last + 1])
    with pytest.raises(ShardCommitError, match="missing 10-11"):
        shards.commit_shard(dst, name, 12, {"ok": 10}, config_hash=cfg)
    assert not storage.exists(storage.join(dst, name)) and shards.shard_state(dst, name, cfg) == "todo"

    marker = shards.commit_shard(dst, name, 10, {"ok": 10}, config_hash=cfg)
    out_uri = storage.join(dst, name)
    assert [_strip(d) for d in _read_with_wds(out_uri)] == _as_dicts(samples)
    assert list(shards.iter_tar_samples(out_uri)) == samples
    data = storage.read_bytes(out_uri)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert marker["count"] == 10 and marker["bytes"] == len(data) and marker["ok"] == 10
    assert json.loads(storage.read_bytes(storage.join(dst, "sub/shard-000.stats.json"))) == marker
    assert storage.list_prefix(storage.join(dst, shards.STAGING_DIR) + "/") == []
    assert shards.shard_state(dst, name, cfg) == "done"
    assert shards.shard_state(dst, name, shards.config_hash({"steps": 20, "model": "x"})) == "conflict"
    # The same samples give the same bytes, wherever they are committed.
    assert data == shards.encode_tar_part(samples) + shards._tar_trailer(len(shards.encode_tar_part(samples)))


def test_commit_large_shard_streams_multipart(s3_bucket: str) -> None:
    dst = f"s3://{s3_bucket}/out"
    opts = storage.StorageOptions(part_size=5 * storage.MiB)
    rng = np.random.default_rng(1)
    samples = [Sample(key=f"{i:04d}", members=[("jpg", rng.bytes(700_000))]) for i in range(16)]  # ~11 MB
    for first in range(0, 16, 4):
        shards.write_shard_part(dst, "big.tar", first, samples[first : first + 4], options=opts)
    shards.commit_shard(dst, "big.tar", 16, {}, config_hash="h", options=opts)
    assert list(shards.iter_tar_samples(f"{dst}/big.tar")) == samples


def test_write_shard_rows_groups_runs(tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    rows = [
        {
            schema.KEY: f"k{i}",
            schema.SHARD: shard,
            schema.INDEX: i,
            schema.IMAGE_MEMBER: "jpg",
            schema.IMAGE: b"in",
            schema.OUTPUT: f"out{i}".encode(),
            schema.EXTRA_NAMES: ["json"],
            schema.EXTRA_DATA: [b"{}"],
        }
        for shard, idx in [("a.tar", [2, 0, 1, 5]), ("b.tar", [0])]
        for i in idx
    ]
    parts = shards.write_shard_rows(dst, rows)
    assert [(p.unit, p.first, p.last) for p in parts] == [("a.tar", 0, 2), ("a.tar", 5, 5), ("b.tar", 0, 0)]
    got = list(shards.iter_tar_samples(parts[0].uri, require_end_marker=False))
    assert got == [Sample(key=f"k{i}", members=[("jpg", f"out{i}".encode()), ("json", b"{}")]) for i in range(3)]
    no_image = {schema.KEY: "n", schema.IMAGE_MEMBER: None, schema.EXTRA_NAMES: ["txt"], schema.EXTRA_DATA: [b"t"]}
    assert shards.sample_from_row(no_image) == Sample(key="n", members=[("txt", b"t")])


def test_config_hash_is_canonical() -> None:
    assert shards.config_hash({"a": 1, "b": [1, 2]}) == shards.config_hash({"b": [1, 2], "a": 1})
    assert shards.config_hash({"a": 1}) != shards.config_hash({"a": 2})


def test_plain_images_chunks(root: str) -> None:
    dst = storage.join(root, "restored")
    cfg = shards.config_hash({"mode": "images"})
    chunk = shards.chunk_name(3)
    rows = [
        {
            schema.KEY: f"album/{i}.jpg",
            schema.SHARD: chunk,
            schema.INDEX: i,
            schema.OUTPUT: f"img{i}".encode(),
            schema.STATUS: "ok" if i else "no_face",
            schema.FACES: json.dumps([{"score": 0.9}]) if i else "[]",
            schema.ERROR: "",
            schema.INDEX + "_np": np.int64(i),
        }
        for i in range(5)
    ]
    assert shards.chunk_state(dst, 3, cfg) == "todo"
    shards.write_image_outputs(dst, rows[2:])
    shards.write_image_outputs(dst, rows[:3])  # a retry with other boundaries: 0-2 and 2-4 overlap on 2
    with pytest.raises(ShardCommitError, match="without an exact cover"):
        shards.commit_chunk(dst, 3, 5, {}, config_hash=cfg)
    shards.write_image_outputs(dst, rows[3:])  # now 0-2 + 3-4 is an exact cover
    with pytest.raises(ShardCommitError, match="missing 5"):
        shards.commit_chunk(dst, 3, 6, {}, config_hash=cfg)
    shards.commit_chunk(dst, 3, 5, {"ok": 4}, config_hash=cfg)
    assert storage.read_bytes(storage.join(dst, "album/4.jpg")) == b"img4"
    lines = storage.read_bytes(storage.join(dst, "_dr2/manifests/chunk-000003.jsonl")).decode().splitlines()
    meta = [json.loads(x) for x in lines]
    assert [m[schema.KEY] for m in meta] == [f"album/{i}.jpg" for i in range(5)]
    assert meta[1][schema.FACES] == [{"score": 0.9}] and meta[1]["index_np"] == 1 and schema.OUTPUT not in meta[1]
    assert shards.chunk_state(dst, 3, cfg) == "done"
    assert shards.chunk_state(dst, 3, "other") == "conflict"
    assert storage.list_images(dst) == [f"album/{i}.jpg" for i in range(5)]  # _dr2/ is not an input


def test_empty_shard_commits_and_reads(tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    marker = shards.commit_shard(dst, "empty.tar", 0, {}, config_hash="h")
    assert marker["count"] == 0 and marker["bytes"] == tarfile.RECORDSIZE
    assert list(shards.iter_tar_samples(f"{dst}/empty.tar")) == []
    assert shards.shard_state(dst, "empty.tar", "h") == "done"
    (tmp_path / "zero.tar").write_bytes(b"")  # a zero-byte file is not a tar
    with pytest.raises(ShardReadError, match="empty file"):
        list(shards.iter_tar_samples(str(tmp_path / "zero.tar")))
