"""pipeline/formats/shards.py and pipeline/formats/units.py: staging, commit and resume for any unit, on the local
filesystem and a real S3 server; outputs read back with the real webdataset library."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline import failpoints
from pipeline.config import config_hash
from pipeline.formats import shards
from pipeline.formats import wds as codec
from pipeline.formats.shards import ShardCommitError
from pipeline.formats.units import STAGING_DIR, Unit, UnitKind, chunk_name
from pipeline.formats.wds import Sample
from pipeline.store import storage
from tests.pipeline.tarsamples import as_dicts, random_samples, read_with_wds, strip_meta


def shard(name: str) -> Unit:
    return Unit(name=name, kind=UnitKind.SHARD, source="")


def stage(unit: Unit, dst: str, cfg: str, first: int, samples: list[Sample], **kw: object) -> None:
    shards.write_part(unit, dst, cfg, first, len(samples), codec.encode_tar_part(samples), **kw)  # type: ignore[arg-type]


def state(unit: Unit, dst: str, cfg: str, **kw: object) -> str:
    return shards.unit_states([unit], dst, cfg, **kw)[unit.name]  # type: ignore[arg-type]


def test_commit_shard_exactly_once(root: str) -> None:
    dst = storage.join(root, "out")
    samples = random_samples(10)
    unit = shard("sub/shard-000.tar")
    cfg = config_hash({"steps": 10, "model": "x"})
    assert state(unit, dst, cfg) == "todo"

    # Parts arrive out of order; a retry rewrites 3-5 identically; another retry split 6-9 as 6-7 + 8-9,
    # overlapping the original 6-9 (all bytes are deterministic, any exact cover is the same shard).
    for first, last in [(6, 9), (3, 5), (0, 2), (3, 5), (6, 7), (8, 9)]:
        stage(unit, dst, cfg, first, samples[first : last + 1])
    with pytest.raises(ShardCommitError, match="missing 10-11"):
        shards.commit(unit, dst, cfg, 12, {"ok": 10})
    assert not storage.exists(storage.join(dst, unit.name)) and state(unit, dst, cfg) == "todo"

    marker = shards.commit(unit, dst, cfg, 10, {"ok": 10})
    out_uri = storage.join(dst, unit.name)
    assert [strip_meta(d) for d in read_with_wds(out_uri)] == as_dicts(samples)
    assert list(codec.iter_tar_samples(out_uri)) == samples
    data = storage.read_bytes(out_uri)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert marker["count"] == 10 and marker["bytes"] == len(data) and marker["ok"] == 10
    assert json.loads(storage.read_bytes(storage.join(dst, "sub/shard-000.stats.json"))) == marker
    assert storage.list_prefix(storage.join(dst, STAGING_DIR) + "/") == []
    assert state(unit, dst, cfg) == "done"
    assert state(unit, dst, config_hash({"steps": 20, "model": "x"})) == "conflict"
    # The same samples give the same bytes, wherever they are committed.
    assert data == codec.encode_tar_part(samples) + codec.tar_trailer(len(codec.encode_tar_part(samples)))


def test_a_damaged_output_is_redone(root: str) -> None:
    dst = storage.join(root, "out")
    unit, cfg = shard("s.tar"), "h" * 64
    stage(unit, dst, cfg, 0, random_samples(3))
    shards.commit(unit, dst, cfg, 3, {})
    assert state(unit, dst, cfg) == "done" and state(unit, dst, cfg, verify=True) == "done"
    data = storage.read_bytes(unit.output_uri(dst))
    storage.write_bytes_atomic(unit.output_uri(dst), data[:-1024])  # truncated after its commit
    assert state(unit, dst, cfg) == "todo"
    storage.write_bytes_atomic(unit.output_uri(dst), data[:-1] + b"x")  # same size, other bytes
    assert state(unit, dst, cfg) == "done" and state(unit, dst, cfg, verify=True) == "todo"
    storage.delete(unit.output_uri(dst))
    assert state(unit, dst, cfg) == "todo"


@pytest.mark.parametrize("point", ["commit.begin", "commit.mid_output", "commit.after_output", "commit.after_marker"])
def test_a_commit_stopped_anywhere_is_redone_or_done_and_leaves_no_parts(
        root: str, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that stops at any of its failpoints leaves either no marker (the unit is redone from scratch) or a
    whole output with its marker, whose leftover parts the next planning removes."""
    dst = storage.join(root, "out")
    unit, other, cfg = shard("s.tar"), shard("t.tar"), "h" * 64
    samples = random_samples(12)
    for u in (unit, other):
        stage(u, dst, cfg, 0, samples[:6])
        stage(u, dst, cfg, 6, samples[6:])
    monkeypatch.setenv(failpoints.ENV, f"{point}=raise")
    with pytest.raises(failpoints.FailpointError):
        shards.commit(unit, dst, cfg, 12, {})
    monkeypatch.delenv(failpoints.ENV)
    assert storage.list_prefix(unit.staging_uri(dst, cfg))  # its parts are still there
    if point == "commit.after_marker":
        assert state(unit, dst, cfg) == "done" and storage.list_prefix(unit.staging_uri(dst, cfg))  # looks only
        assert state(unit, dst, cfg, tidy=True) == "done"
        assert storage.list_prefix(unit.staging_uri(dst, cfg)) == []
        assert list(codec.iter_tar_samples(unit.output_uri(dst))) == samples
    else:
        assert state(unit, dst, cfg) == "todo"
    assert len(storage.list_prefix(other.staging_uri(dst, cfg))) == 2  # another unit's parts are not touched


def test_units_never_share_staging(tmp_path: Path) -> None:
    """``a.tar`` and ``a/b.tar`` (and two configs of one unit) stage apart: one commit never takes or deletes
    another's parts."""
    dst = str(tmp_path / "out")
    a, ab = shard("a.tar"), shard("a/b.tar")
    sa, sab = random_samples(2, seed=1), random_samples(3, seed=2)
    stage(a, dst, "c1", 0, sa)
    stage(ab, dst, "c1", 0, sab)
    stage(a, dst, "c2", 0, random_samples(2, seed=3))
    for u in (a, ab):
        for other in (a, ab):
            if u != other:
                assert not u.staging_uri(dst, "c1").startswith(other.staging_uri(dst, "c1"))
    assert a.staging_uri(dst, "c1") != a.staging_uri(dst, "c2")
    shards.commit(a, dst, "c1", 2, {})
    assert list(codec.iter_tar_samples(a.output_uri(dst))) == sa
    assert len(storage.list_prefix(ab.staging_uri(dst, "c1"))) == 1  # untouched
    assert len(storage.list_prefix(a.staging_uri(dst, "c2"))) == 1
    shards.commit(ab, dst, "c1", 3, {})
    assert list(codec.iter_tar_samples(ab.output_uri(dst))) == sab


def test_commit_large_shard_streams_multipart(s3_bucket: str) -> None:
    dst = f"s3://{s3_bucket}/out"
    opts = storage.StorageOptions(part_size=5 * storage.MiB)
    rng = np.random.default_rng(1)
    samples = [Sample(key=f"{i:04d}", members=[("jpg", rng.bytes(700_000))]) for i in range(16)]  # ~11 MB
    unit = shard("big.tar")
    for first in range(0, 16, 4):
        stage(unit, dst, "h", first, samples[first : first + 4], options=opts)
    shards.commit(unit, dst, "h", 16, {}, options=opts)
    assert list(codec.iter_tar_samples(f"{dst}/big.tar")) == samples


def test_config_hash_is_canonical() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_plain_images_chunks(root: str) -> None:
    dst = storage.join(root, "restored")
    cfg = config_hash({"mode": "images"})
    unit = Unit(name=chunk_name(3), kind=UnitKind.IMAGES, source="")
    lines = [json.dumps({"key": f"album/{i}.jpg", "index": i}).encode() + b"\n" for i in range(5)]
    assert state(unit, dst, cfg) == "todo"
    shards.write_part(unit, dst, cfg, 2, 3, b"".join(lines[2:]))
    shards.write_part(unit, dst, cfg, 0, 3, b"".join(lines[:3]))  # a retry with other boundaries: overlap on 2
    with pytest.raises(ShardCommitError, match="without an exact cover"):
        shards.commit(unit, dst, cfg, 5, {})
    shards.write_part(unit, dst, cfg, 3, 2, b"".join(lines[3:]))  # now 0-2 + 3-4 is an exact cover
    with pytest.raises(ShardCommitError, match="missing 5"):
        shards.commit(unit, dst, cfg, 6, {})
    shards.commit(unit, dst, cfg, 5, {"ok": 4})
    got = storage.read_bytes(storage.join(dst, "_dr2/manifests/chunk-000003.jsonl")).splitlines(keepends=True)
    assert got == lines
    assert state(unit, dst, cfg) == "done"
    assert state(unit, dst, "other") == "conflict"


def test_empty_shard_commits_and_reads(tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    unit = shard("empty.tar")
    marker = shards.commit(unit, dst, "h", 0, {})
    assert marker["count"] == 0 and marker["bytes"] == tarfile.RECORDSIZE
    assert list(codec.iter_tar_samples(f"{dst}/empty.tar")) == []
    assert state(unit, dst, "h") == "done"


def test_planning_reads_markers_from_one_listing(s3_bucket: str) -> None:
    """unit_states on many units: one paged listing (page size 7 here) decides which have markers."""
    dst = f"s3://{s3_bucket}/many"
    opts = storage.StorageOptions(list_page_size=7)
    units = [shard(f"p/{i:04d}.tar") for i in range(40)]
    for u in units[::3]:
        stage(u, dst, "h", 0, random_samples(1), options=opts)
        shards.commit(u, dst, "h", 1, {}, options=opts)
    states = shards.unit_states(units, dst, "h", options=opts)
    assert [n for n, s in states.items() if s == "done"] == [u.name for u in units[::3]]
    assert sum(s == "todo" for s in states.values()) == 40 - len(units[::3])



def test_planning_removes_temp_files_of_interrupted_writes(tmp_path: Path) -> None:
    """What a killed local write leaves (``.NAME.XXXXXXXX.tmp`` beside outputs, markers, report images) is removed
    by the next planning, which holds DST; files that only look alike stay."""
    dst = str(tmp_path / "out")
    unit = shard("s.tar")
    stage(unit, dst, "h" * 64, 0, random_samples(2))
    shards.commit(unit, dst, "h" * 64, 2, {})
    temps = [tmp_path / "out" / ".s.tar.k2j4l5m6.tmp", tmp_path / "out" / "_dr2" / "report" / "faces" /
             ".a_input.jpg.abcd_123.tmp"]
    kept = [tmp_path / "out" / ".keep.tmp", tmp_path / "out" / "photo.tmp"]
    for p in temps + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert state(unit, dst, "h" * 64) == "done" and all(p.exists() for p in temps)  # without tidy: looks only
    assert state(unit, dst, "h" * 64, tidy=True) == "done"
    assert [p.exists() for p in temps + kept] == [False, False, True, True]


def test_refused_image_paths_go_to_their_chunk_and_its_identity() -> None:
    """(The S3 test server normalises ``..``, ``//`` and backslashes in keys, so refused keys are made up here.)"""
    from pipeline.formats.units import chunk_of, image_chunks
    from pipeline.store.sources import _refusal
    from pipeline.store.storage import ObjectInfo

    names = ["a/../../x.jpg", "/etc/y.jpg", "d//e.jpg", "w\\in.jpg", "caf\udce9.jpg"]
    refused = [(n, _refusal(n) or "") for n in names]
    assert [r for _, r in refused] == ["would be written outside DST"] * 4 + ["name is not valid UTF-8"]
    assert _refusal("ok/a.jpg") is None and _refusal("..jpg") is None
    kept = [(f"img{i}.jpg", ObjectInfo(uri=f"s3://b/img{i}.jpg", size=i, version=str(i))) for i in range(6)]
    units = image_chunks("s3://b/", kept, 3, refused)
    assert sorted(n for u in units for n, _ in u.refused) == sorted(
        ["a/../../x.jpg", "/etc/y.jpg", "d//e.jpg", "w\\in.jpg", "caf\\xe9.jpg"])  # escaped: valid UTF-8
    for u in units:
        assert all(u.name == chunk_name(chunk_of(n.replace("\\xe9", "\udce9"), 3)) for n, _ in u.refused)
        assert Unit.from_item(u.to_item()) == u
    plain = {u.name: u.input for u in image_chunks("s3://b/", kept, 3)}
    assert {u.name for u in units if u.input != plain.get(u.name)} == {u.name for u in units if u.refused}


# --- committing many units ---------------------------------------------------------------------------


def sized_shard(name: str, nbytes: int = 1000) -> Unit:
    return Unit(name=name, kind=UnitKind.SHARD, source="", input=f"{nbytes}:v1")


def test_a_commit_retried_after_its_marker_returns_it_and_rewrites_nothing(root: str) -> None:
    """A commit task whose worker died after the marker (and the parts' removal) is retried by Ray: the parts are
    gone and the marker is in place, so the commit returns that marker and touches nothing."""
    dst = storage.join(root, "out")
    unit, cfg = sized_shard("s.tar"), "h" * 64
    stage(unit, dst, cfg, 0, random_samples(4))
    marker = shards.commit(unit, dst, cfg, 4, {"ok": 4})
    data = storage.read_bytes(unit.output_uri(dst))
    assert shards.commit(unit, dst, cfg, 4, {"ok": 4, "other": "stats"}) == marker  # no parts: already done
    assert storage.read_bytes(unit.output_uri(dst)) == data and shards.read_marker(unit, dst) == marker
    with pytest.raises(ShardCommitError, match="missing"):  # a marker of another count is not this commit's
        shards.commit(unit, dst, cfg, 5, {})
    with pytest.raises(ShardCommitError, match="missing"):  # nor one of another config
        shards.commit(unit, dst, "g" * 64, 4, {})
    storage.write_bytes_atomic(unit.output_uri(dst), data[:-512])  # an output that is not the marker's
    with pytest.raises(ShardCommitError, match="missing"):
        shards.commit(unit, dst, cfg, 4, {})


def test_clear_stagings_removes_only_the_given_units_parts(root: str) -> None:
    dst = storage.join(root, "out")
    units = [sized_shard(f"d/{i}.tar") for i in range(4)]
    for u in units:
        stage(u, dst, "c1", 0, random_samples(1))
    stage(units[0], dst, "c2", 0, random_samples(1))  # another config's parts stay
    shards.clear_stagings(units[:2] + [sized_shard("never-staged.tar")], dst, "c1")
    left = storage.list_prefix(storage.join(dst, STAGING_DIR) + "/")
    assert [u for u in units if any(x.startswith(u.staging_uri(dst, "c1")) for x in left)] == units[2:]
    assert len(storage.list_prefix(units[0].staging_uri(dst, "c2"))) == 1


def committer(dst: str, **kw: object) -> shards.Committer:
    def remote(fn: object, *args: object, **kwargs: object) -> object:  # a Ray task's stand-in: the same call
        remote.calls += 1  # type: ignore[attr-defined]
        return fn(*args, **kwargs)  # type: ignore[operator]

    remote.calls = 0  # type: ignore[attr-defined]
    return shards.Committer(dst, "h" * 64, remote=remote, check=lambda: None, **kw)  # type: ignore[arg-type]


def test_the_committer_commits_many_units_each_once_and_a_failure_alone(root: str) -> None:
    dst = storage.join(root, "out")
    units = [sized_shard(f"tiny/{i:04d}.tar") for i in range(60)]
    samples = {u.name: random_samples(2, seed=i) for i, u in enumerate(units)}
    for u in units:
        stage(u, dst, "h" * 64, 0, samples[u.name])
    c = committer(dst, slots=3)
    for i, u in enumerate(units):
        c.put(shards.CommitJob(u, 3 if i == 7 else 2, {"n": i}))  # unit 7: its parts do not cover 3 samples
    results = c.results() + c.close()
    assert sorted(r.job.unit.name for r in results) == sorted(u.name for u in units)  # each exactly once
    failed = {r.job.unit.name: r.error for r in results if r.error}
    assert list(failed) == ["tiny/0007.tar"] and failed["tiny/0007.tar"].startswith("ShardCommitError: ")
    for i, u in enumerate(units):
        if i != 7:
            assert list(codec.iter_tar_samples(u.output_uri(dst))) == samples[u.name]
            assert shards.read_marker(u, dst)["n"] == i  # type: ignore[index]
    assert c.remote.calls == 0  # type: ignore[attr-defined]  # all small: committed in the committer's threads
    assert c.pending() == 0 and all(not t.is_alive() for t in c._threads)


def test_the_committer_fails_units_once_the_lease_is_lost(tmp_path: Path) -> None:
    dst = str(tmp_path / "out")
    unit = sized_shard("s.tar")
    stage(unit, dst, "h" * 64, 0, random_samples(1))

    def lost() -> None:
        raise RuntimeError("lease DST/_dr2/lease.json was taken over")

    c = shards.Committer(dst, "h" * 64, remote=lambda *a, **k: None, check=lost)
    c.put(shards.CommitJob(unit, 1, {}))
    [result] = c.close()
    assert result.error == "RuntimeError: lease DST/_dr2/lease.json was taken over"
    assert shards.read_marker(unit, dst) is None and not storage.exists(unit.output_uri(dst))


def test_the_committer_sends_a_large_s3_shard_to_a_task_of_its_own(s3_bucket: str) -> None:
    dst = f"s3://{s3_bucket}/out"
    big, small = sized_shard("big.tar", shards.SMALL_COMMIT_BYTES + 1), sized_shard("small.tar")
    for u in (big, small):
        stage(u, dst, "h" * 64, 0, random_samples(2))
    assert not shards.commits_here(big, dst) and shards.commits_here(small, dst)
    assert shards.commits_here(big, "/local/dst")
    c = committer(dst)
    c.put(shards.CommitJob(big, 2, {}))
    c.put(shards.CommitJob(small, 2, {}))
    assert sorted((r.job.unit.name, r.error) for r in c.close()) == [("big.tar", ""), ("small.tar", "")]
    assert c.remote.calls == 1  # type: ignore[attr-defined]
    assert list(codec.iter_tar_samples(big.output_uri(dst))) == random_samples(2)
