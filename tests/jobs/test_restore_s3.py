"""``dr2 restore`` with SRC, DST and the model directories on a real S3 server (SeaweedFS on loopback).

Proves on S3 what ``test_restore.py`` proves on a local disk, plus what only S3 can get wrong:

* the output contract: one output shard per input shard, every sample once, same keys and order, members
  byte for byte (read back with the webdataset library), ``.stats.json`` markers, ``_dr2/config.json``, no
  staging objects and no in-progress multipart uploads left (one shard is large enough to need multipart);
* atomic commits, seen from outside: a listing polled every ~50 ms during the run never shows a partial
  ``.tar`` (each one is downloaded when it first appears: full sample count, end-of-archive blocks) and never
  shows a shard's ``.stats.json`` before its ``.tar``;
* model directories read from ``s3://``: localized, checksum-verified, recorded in ``dr2.json``, and giving the
  same bytes as the same weights in memory; a corrupted upload stops the job with a checksum error;
* wrong credentials stop the job at once with an error that names them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import webdataset as wds
from PIL import Image

from dr2.restorer import DR2Restorer
from dr2.weights import ModelKind, save_model_dir, sha256_file
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.wds import END_OF_ARCHIVE
from pipeline.graph.models import model_cache_root
from pipeline.runner.loop import RunSummary, run_restore
from pipeline.store import storage
from pipeline.store.storage import StorageError
from tests.jobs.archive import assert_shard_matches_input, build_archive, encode, no_face_image
from tests.s3server import S3Server

log = logging.getLogger(__name__)

pytestmark = pytest.mark.usefixtures("ray_local")

BIG_SHARD = "shard-003.tar"
BIG_MEMBER_BYTES = 9 * 1024 * 1024  # over storage's 8 MiB part size: parts and the shard go up as multipart uploads
POLL_S = 0.05


# --------------------------------------------------------------------------------------------- helpers


def big_member() -> bytes:
    return np.random.default_rng(7).integers(0, 256, BIG_MEMBER_BYTES, dtype=np.uint8).tobytes()


def build_s3_archive(root: Path) -> dict[str, list[tuple[str, str]]]:
    """The archive of ``test_restore.py`` plus one shard whose sample carries a 9 MiB member."""
    expected = build_archive(root)
    with wds.TarWriter(str(root / BIG_SHARD)) as sink:
        sink.write({"__key__": "blob/big", "png": encode(no_face_image(5), "PNG"), "bin": big_member()})
    expected[BIG_SHARD] = [("blob/big", "no_face")]
    return expected


def upload_dir(client: Any, local: Path, bucket: str, prefix: str) -> None:
    for p in sorted(local.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def keys_under(client: Any, bucket: str, prefix: str) -> dict[str, str]:
    """{key: ETag} of every object under ``prefix`` (all pages)."""
    out: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def download(client: Any, bucket: str, key: str) -> bytes:
    return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def read_tar_bytes(data: bytes, tmp: Path) -> list[dict[str, Any]]:
    """Samples of a tar held in memory, read by the webdataset library from a file."""
    path = tmp / f"{hashlib.sha256(data).hexdigest()[:16]}.tar"
    path.write_bytes(data)
    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


def read_input(path: Path) -> list[dict[str, Any]]:
    # the truncated shard needs the library's own recovery handler
    return list(wds.WebDataset(str(path), shardshuffle=False, handler=wds.warn_and_continue, empty_check=False))


def assert_complete_tar(data: bytes, want_samples: int, tmp: Path, what: str) -> None:
    """A whole output shard: the end-of-archive blocks, a whole number of records, every sample."""
    assert len(data) % tarfile.RECORDSIZE == 0, f"{what}: {len(data)} bytes is not a whole number of tar records"
    assert data.endswith(END_OF_ARCHIVE), f"{what}: no end-of-archive blocks"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        assert all(m.isreg() for m in tf.getmembers()), what
    assert len(read_tar_bytes(data, tmp)) == want_samples, what


def config(src: str, dst: str, **kw: Any) -> PipelineConfig:
    base = {"restorer": RestorerKind.TINY, "N": 4, "tau": 2, "detect_batch_size": 4, "restore_batch_size": 4}
    return PipelineConfig(src=src, dst=dst, **{**base, **kw})


@dataclass
class ListingWatch:
    """What a poller of ``s3://bucket/prefix`` saw while a run was going."""

    polls: int = 0
    polls_during_run: int = 0
    checked: dict[str, int] = field(default_factory=dict)  # tar key -> poll number at which it was first checked
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def watch_listing(
    server: S3Server, bucket: str, prefix: str, want: dict[str, int], tmp: Path, stop: threading.Event,
    running: threading.Event, watch: ListingWatch,
) -> None:
    """Poll the listing until ``stop``; check every ``.tar`` the first time it (or a new version) appears."""
    client = server.client()
    seen: dict[str, str] = {}
    while True:
        final = stop.is_set()  # one more poll after the run ended, so the last commits are checked too
        try:
            listing = keys_under(client, bucket, prefix)
        except Exception as e:  # noqa: BLE001 - reported by the test, never lost in a thread
            watch.errors.append(f"list: {type(e).__name__}: {e}")
            listing = {}
        watch.polls += 1
        watch.polls_during_run += running.is_set()
        for key in listing:
            if key.endswith(".stats.json") and key.removesuffix(".stats.json") + ".tar" not in listing:
                watch.violations.append(f"poll {watch.polls}: {key} listed without its .tar")
        for key, etag in listing.items():
            if not key.endswith(".tar") or seen.get(key) == etag:
                continue
            seen[key] = etag
            name = key[len(prefix):]
            try:
                data = download(client, bucket, key)
                assert_complete_tar(data, want[name], tmp, f"{key} at poll {watch.polls}")
            except AssertionError as e:
                watch.violations.append(str(e))
            except Exception as e:  # noqa: BLE001
                watch.errors.append(f"{key}: {type(e).__name__}: {e}")
            watch.checked.setdefault(name, watch.polls)
        if final:
            return
        time.sleep(POLL_S)


@dataclass
class S3Run:
    bucket: str
    local_src: Path
    expected: dict[str, list[tuple[str, str]]]
    summary: RunSummary
    watch: ListingWatch
    outputs: dict[str, bytes]  # key under out/ -> bytes, downloaded after the run
    tmp: Path


# --------------------------------------------------------------------------------------------- the watched run


@pytest.fixture(scope="module")
def s3_run(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> S3Run:
    """Upload the archive to ``in/``, run the job into ``out/`` while a thread polls the ``out/`` listing."""
    local_src = tmp_path_factory.mktemp("s3src")
    expected = build_s3_archive(local_src)
    tmp = tmp_path_factory.mktemp("s3reads")
    bucket = s3_server.make_bucket("restore")
    client = s3_server.client()
    upload_dir(client, local_src, bucket, "in")

    want = {name: len(samples) for name, samples in expected.items()}
    watch, stop, running = ListingWatch(), threading.Event(), threading.Event()
    poller = threading.Thread(
        target=watch_listing, args=(s3_server, bucket, "out/", want, tmp, stop, running, watch), daemon=True
    )
    running.set()
    poller.start()
    try:
        summary = run_restore(config(f"s3://{bucket}/in/", f"s3://{bucket}/out/"))
    finally:
        running.clear()
        stop.set()
        poller.join(60)
    assert not poller.is_alive(), "the listing poller did not stop"
    outputs = {k[len("out/"):]: download(client, bucket, k) for k in keys_under(client, bucket, "out/")}
    return S3Run(bucket, local_src, expected, summary, watch, outputs, tmp)


def test_s3_every_sample_once_same_order_members_kept(s3_run: S3Run) -> None:
    run = s3_run
    assert run.summary.units_done == 4 and run.summary.units_skipped == 0
    assert run.summary.samples == sum(map(len, run.expected.values()))
    for shard, want in run.expected.items():
        inputs = {s["__key__"]: s for s in read_input(run.local_src / shard)}
        assert_shard_matches_input(read_tar_bytes(run.outputs[shard], run.tmp), inputs, want, shard)
    big = read_tar_bytes(run.outputs[BIG_SHARD], run.tmp)[0]
    assert big["bin"] == big_member()  # 9 MiB passed through two multipart uploads, byte for byte


def test_s3_markers_config_and_no_litter(s3_server: S3Server, s3_run: S3Run) -> None:
    run = s3_run
    stems = [name.removesuffix(".tar") for name in run.expected]
    report = {k for k in run.outputs if k.startswith("_dr2/report/")}
    assert {"_dr2/report/index.html", "_dr2/report/report.json"} <= report  # the run report and its thumbnails
    assert set(run.outputs) - report == (
        {"_dr2/config.json"} | {f"{s}.tar" for s in stems} | {f"{s}.stats.json" for s in stems})
    resolved = json.loads(run.outputs["_dr2/config.json"])
    assert resolved["config"]["src"] == f"s3://{run.bucket}/in/" and resolved["config"]["tau"] == 2
    assert resolved["models"] == {"restorer": "tiny"}
    for shard, want in run.expected.items():
        stats = json.loads(run.outputs[shard.removesuffix(".tar") + ".stats.json"])
        data = run.outputs[shard]
        assert stats["samples"] == stats["count"] == len(want), shard
        assert stats["bytes"] == len(data) and stats["sha256"] == hashlib.sha256(data).hexdigest(), shard
        assert stats["output"] == f"s3://{run.bucket}/out/{shard}"
        assert stats["source"] == f"s3://{run.bucket}/in/{shard}"
        assert stats["config_hash"] == resolved["config_hash"]
        statuses: dict[str, int] = {}
        for _, st in want:
            statuses[st] = statuses.get(st, 0) + 1
        assert stats["statuses"] == statuses, shard
    assert "truncated" in json.loads(run.outputs["shard-002.stats.json"])["read_error"]
    client: Any = s3_server.client()
    assert keys_under(client, run.bucket, "out/_dr2_staging/") == {}
    assert client.list_multipart_uploads(Bucket=run.bucket).get("Uploads", []) == []
    assert "-" in client.head_object(Bucket=run.bucket, Key=f"out/{BIG_SHARD}")["ETag"]  # it was a multipart upload


def test_s3_commits_are_atomic_in_the_listing(s3_run: S3Run) -> None:
    watch = s3_run.watch
    assert watch.errors == []
    assert watch.violations == []
    assert set(watch.checked) == set(s3_run.expected)  # every output shard was downloaded and checked
    assert watch.polls_during_run >= 20  # the listing was really watched while shards were being committed
    assert min(watch.checked.values()) <= watch.polls_during_run  # and some shard appeared while the run went on
    log.info("listing polls: %d (%d during the run); tars first checked at polls %s",
             watch.polls, watch.polls_during_run, watch.checked)


def test_s3_rerun_skips_committed_shards(s3_run: S3Run) -> None:
    again = run_restore(config(f"s3://{s3_run.bucket}/in/", f"s3://{s3_run.bucket}/out/"))
    assert again.units_skipped == 4 and again.units_done == 0


# --------------------------------------------------------------------------------------------- weights on S3


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny DR2 models (the TINY restorer's weights) saved as model directories."""
    root = tmp_path_factory.mktemp("models")
    tiny = DR2Restorer.tiny_random()
    assert tiny.enhancer is not None
    return {
        "ddpm": save_model_dir(tiny.unet, kind=ModelKind.DDPM, out_dir=root / "ddpm"),
        "sparnethd": save_model_dir(tiny.enhancer, kind=ModelKind.SPARNETHD, out_dir=root / "sparnethd"),
    }


@dataclass
class WorkerCache:
    """The node cache of s3:// model dirs as the Ray workers see it, and the entries a test made there.

    ``DR2_CACHE`` is read by the workers, whose environment was fixed when the session's Ray started: a value
    set here would not reach them. A fresh cache per test comes instead from fresh URIs (the cache is keyed
    by ``sha256(uri)[:16]``, as ``localize_model_dir`` documents): each test checks that its entries do not
    exist before the run, and removes them after.
    """

    root: Path
    made: list[Path] = field(default_factory=list)

    def entry(self, uri: str) -> Path:
        path = self.root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
        self.made.append(path)
        return path


@pytest.fixture()
def worker_cache() -> Iterator[WorkerCache]:
    root = Path(ray.get(ray.remote(num_cpus=0)(model_cache_root).remote()))
    cache = WorkerCache(root)
    yield cache
    for path in cache.made:
        shutil.rmtree(path, ignore_errors=True)


def dr2_config(bucket: str, dst: str, models: str) -> PipelineConfig:
    return config(f"s3://{bucket}/in/shard-001.tar", dst, restorer=RestorerKind.DR2,
                  ddpm=f"s3://{bucket}/{models}/ddpm", enhancer=f"s3://{bucket}/{models}/sparnethd")


def describe_difference(a: dict[str, Any], b: dict[str, Any], member: str) -> str:
    """Why two restored samples differ: their face metadata and how far apart their pixels are."""
    pa_, pb = (np.asarray(Image.open(io.BytesIO(x[member]))).astype(int) for x in (a, b))
    faces_a, faces_b = (json.loads(x["dr2.json"])["faces"] for x in (a, b))
    diff = np.abs(pa_ - pb) if pa_.shape == pb.shape else None
    return (f"{a['__key__']}: same faces metadata: {faces_a == faces_b}; "
            + (f"pixels differ at {(diff > 0).mean():.4%}, max {diff.max()}" if diff is not None else "shapes differ")
            + ("" if faces_a == faces_b else f"; faces {faces_a} vs {faces_b}"))


def fresh_entries(cache: WorkerCache, cfg: PipelineConfig) -> dict[str, Path]:
    entries = {"ddpm": cache.entry(cfg.ddpm), "sparnethd": cache.entry(cfg.enhancer)}
    assert not any(p.exists() for p in entries.values()), "the node cache already holds these URIs"
    return entries


def test_s3_model_dirs_are_localized_verified_and_recorded(
    s3_server: S3Server, s3_run: S3Run, model_dirs: dict[str, Path], worker_cache: WorkerCache
) -> None:
    client: Any = s3_server.client()
    for name, local in model_dirs.items():
        upload_dir(client, local, s3_run.bucket, f"models/{name}")
    cfg = dr2_config(s3_run.bucket, f"s3://{s3_run.bucket}/dr2-out/", "models")
    entries = fresh_entries(worker_cache, cfg)
    summary = run_restore(cfg)
    assert summary.units_done == 1 and summary.statuses == {"ok": 2}
    out = read_tar_bytes(download(client, s3_run.bucket, "dr2-out/shard-001.tar"), s3_run.tmp)
    tiny = {s["__key__"]: s for s in read_tar_bytes(s3_run.outputs["shard-001.tar"], s3_run.tmp)}
    sha = {name: sha256_file(d / "model.safetensors") for name, d in model_dirs.items()}
    for sample in out:
        meta = json.loads(sample["dr2.json"])
        assert meta["status"] == "ok" and meta["restorer"] == "dr2"
        assert meta["models"] == {"restorer": "dr2", "ddpm_sha256": sha["ddpm"], "enhancer_sha256": sha["sparnethd"]}
        # the same weights, read from S3, restore exactly as the in-memory tiny models did
        member = meta["image_member"]
        ref = tiny[sample["__key__"]]
        assert sample[member] == ref[member], describe_difference(sample, ref, member)
    resolved = json.loads(download(client, s3_run.bucket, "dr2-out/_dr2/config.json"))
    assert resolved["models"]["ddpm_sha256"] == sha["ddpm"]
    assert resolved["models"]["enhancer_sha256"] == sha["sparnethd"]
    for name, entry in entries.items():  # localized into the node cache, verified, stamped
        assert sha256_file(entry / "model.safetensors") == sha[name]
        assert (entry / ".model.safetensors.verified").read_text().startswith(sha[name])


def test_s3_corrupted_weights_stop_the_job_with_a_checksum_error(
    s3_server: S3Server, s3_run: S3Run, model_dirs: dict[str, Path], worker_cache: WorkerCache
) -> None:
    client: Any = s3_server.client()
    for name, local in model_dirs.items():
        upload_dir(client, local, s3_run.bucket, f"bad-models/{name}")
    key = "bad-models/ddpm/model.safetensors"
    data = bytearray(download(client, s3_run.bucket, key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights; config.json still records the good sha256
    client.put_object(Bucket=s3_run.bucket, Key=key, Body=bytes(data))
    cfg = dr2_config(s3_run.bucket, f"s3://{s3_run.bucket}/bad-out/", "bad-models")
    entries = fresh_entries(worker_cache, cfg)
    t0 = time.perf_counter()
    with pytest.raises(Exception) as info:  # noqa: PT011 - Ray wraps the worker's StorageError; the text is the contract
        run_restore(cfg)
    text = str(info.value)
    log.info("corrupted weights: %s after %.1f s: %s", type(info.value).__name__, time.perf_counter() - t0, text)
    assert "model.safetensors has sha256" in text and "re-upload" in text, text[-2000:]
    assert keys_under(client, s3_run.bucket, "bad-out/shard-001") == {}  # nothing committed
    assert not (entries["ddpm"] / ".model.safetensors.verified").exists()  # the bad copy was never accepted


# --------------------------------------------------------------------------------------------- credentials


def test_s3_wrong_credentials_fail_fast_naming_them(s3_run: S3Run, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + os.environ["AWS_SECRET_ACCESS_KEY"])
    storage.reset_clients()  # the cached client holds the credentials it was built with
    result: dict[str, BaseException | RunSummary] = {}

    def target() -> None:
        try:
            result["out"] = run_restore(config(f"s3://{s3_run.bucket}/in/", f"s3://{s3_run.bucket}/creds-out/"))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            result["out"] = e

    try:
        t0 = time.perf_counter()
        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        worker.join(60)
        elapsed = time.perf_counter() - t0
    finally:
        monkeypatch.undo()
        storage.reset_clients()
    assert not worker.is_alive(), "run_restore hung on wrong credentials"
    err = result["out"]
    assert isinstance(err, StorageError), err
    assert "AWS_SECRET_ACCESS_KEY" in str(err) and "access denied" in str(err), str(err)
    assert elapsed < 20, elapsed
    # the environment is back: the right credentials work again
    assert storage.exists(f"s3://{s3_run.bucket}/in/shard-000.tar")
