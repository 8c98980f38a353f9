"""pipeline/store/storage.py (with the listing of pipeline/store/sources.py and the model cache of
pipeline/graph/models.py) on the local filesystem and a real S3 server (SeaweedFS on loopback)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from pipeline.graph import models
from pipeline.store import sources, storage
from pipeline.store.storage import AtomicWriter, StorageError, StorageOptions
from tests.s3server import S3Server

SMALL_PARTS = StorageOptions(part_size=5 * storage.MiB)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty root URI: a local directory or an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return "s3://" + request.getfixturevalue("s3_bucket")


def _put(uri: str, data: bytes = b"x") -> None:
    storage.write_bytes_atomic(uri, data)


def test_roundtrip_exists_delete(root: str) -> None:
    uri = storage.join(root, "a/b/c.bin")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello"
    storage.write_bytes_atomic(uri, b"again")  # overwrite
    assert storage.read_bytes(uri) == b"again"
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # missing is fine
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(uri)
    with pytest.raises(FileNotFoundError):
        storage.open_read(uri)


def test_atomic_writer_invisible_until_exit_and_after_error(root: str) -> None:
    uri = storage.join(root, "d/out.tar")
    with AtomicWriter(uri) as f:
        f.write(b"partial")
        assert not storage.exists(uri)
        assert storage.list_prefix(storage.join(root, "d/out")) == []
    assert storage.read_bytes(uri) == b"partial"

    uri2 = storage.join(root, "d/failed.tar")
    with pytest.raises(RuntimeError, match="boom"), AtomicWriter(uri2) as f:
        f.write(b"some bytes")
        raise RuntimeError("boom")
    assert not storage.exists(uri2)
    assert storage.list_prefix(storage.join(root, "d/")) == [uri if storage.is_s3(uri) else os.path.abspath(uri)]


def test_s3_multipart_commit_and_abort(s3_server: S3Server, s3_bucket: str) -> None:
    data = np.random.default_rng(0).integers(0, 256, size=11 * storage.MiB + 123, dtype=np.uint8).tobytes()
    uri = f"s3://{s3_bucket}/big.bin"
    with AtomicWriter(uri, options=SMALL_PARTS) as f:
        for i in range(0, len(data), 3 * storage.MiB):  # writes that straddle part boundaries
            f.write(data[i : i + 3 * storage.MiB])
        assert not storage.exists(uri)
    assert storage.read_bytes(uri) == data
    client = s3_server.client()
    head = client.head_object(Bucket=s3_bucket, Key="big.bin")  # type: ignore[attr-defined]
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB

    bad = f"s3://{s3_bucket}/aborted.bin"
    with pytest.raises(ValueError, match="stop"), AtomicWriter(bad, options=SMALL_PARTS) as f:
        f.write(data)  # two parts already uploaded
        raise ValueError("stop")
    assert not storage.exists(bad)
    uploads = client.list_multipart_uploads(Bucket=s3_bucket)  # type: ignore[attr-defined]
    assert uploads.get("Uploads", []) == []


def test_open_read_streams_and_seeks(root: str) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB
    uri = storage.join(root, "stream.bin")
    storage.write_bytes_atomic(uri, data)
    with storage.open_read(uri, options=StorageOptions(read_chunk_size=64 * 1024)) as f:
        got = io.BytesIO()
        while chunk := f.read(100_003):
            got.write(chunk)
        assert got.getvalue() == data
        f.seek(1000)
        assert f.read(10) == data[1000:1010]
        f.seek(-5, io.SEEK_END)
        assert f.read() == data[-5:]


def test_s3_reader_refuses_an_object_replaced_mid_read(s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/changing.bin"
    storage.write_bytes_atomic(uri, b"a" * 100_000)
    with storage.open_read(uri, options=StorageOptions(read_chunk_size=16 * 1024)) as f:
        assert f.read(10) == b"a" * 10
        storage.write_bytes_atomic(uri, b"b" * 100_000)
        f.seek(50_000)  # forces a new ranged GET, pinned to the first ETag
        with pytest.raises(StorageError, match="PreconditionFailed"):
            f.read(10)


def test_list_prefix_pages(s3_bucket: str) -> None:
    uris = [f"s3://{s3_bucket}/p/{i:04d}.bin" for i in range(23)]
    for u in uris:
        _put(u)
    _put(f"s3://{s3_bucket}/other.bin")
    paged = StorageOptions(list_page_size=5)  # 5 pages
    assert storage.list_prefix(f"s3://{s3_bucket}/p/", options=paged) == uris
    assert storage.list_prefix(f"s3://{s3_bucket}/", options=paged) == sorted([*uris, f"s3://{s3_bucket}/other.bin"])


def test_list_prefix_over_1000_keys(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    keys = [f"many/{i:05d}.tar" for i in range(1100)]
    for k in keys:
        client.put_object(Bucket=s3_bucket, Key=k, Body=b"")  # type: ignore[attr-defined]
    listed = storage.list_prefix(f"s3://{s3_bucket}/many/")
    assert listed == [f"s3://{s3_bucket}/{k}" for k in keys]
    assert sources.expand_sources(f"s3://{s3_bucket}/many/0{{09..10}}*.tar") == [
        f"s3://{s3_bucket}/many/{i:05d}.tar" for i in range(900, 1100)
    ]


def test_expand_braces() -> None:
    assert sources.expand_braces("s-{000..003}.tar") == [f"s-{i:03d}.tar" for i in range(4)]
    assert sources.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert sources.expand_braces("{x,{y,z}w}") == ["x", "yw", "zw"]
    assert sources.expand_braces("{8..10}") == ["8", "9", "10"]
    assert sources.expand_braces("plain{x}") == ["plain{x}"]


def test_expand_sources(root: str) -> None:
    names = ["train/s-000.tar", "train/s-001.tar", "train/s-002.tar", "val/s-000.tar", "train/notes.txt"]
    for n in names:
        _put(storage.join(root, n))
    uris = {
        n: (storage.join(root, n) if storage.is_s3(root) else os.path.abspath(storage.join(root, n))) for n in names
    }
    tars = sorted(v for k, v in uris.items() if k.endswith(".tar"))
    assert sources.expand_sources(root) == tars  # directory / prefix, recursive
    assert sources.expand_sources(storage.join(root, "train")) == tars[:3]
    assert sources.expand_sources(storage.join(root, "train/*.tar")) == tars[:3]
    assert sources.expand_sources(storage.join(root, "*/s-000.tar")) == [uris["train/s-000.tar"], uris["val/s-000.tar"]]
    assert sources.expand_sources(storage.join(root, "**/*.tar")) == tars
    assert sources.expand_sources(storage.join(root, "train/s-{000..001}.tar")) == tars[:2]
    assert sources.expand_sources(storage.join(root, "{train,val}/s-000.tar")) == [
        uris["train/s-000.tar"],
        uris["val/s-000.tar"],
    ]
    assert sources.expand_sources([storage.join(root, "val"), storage.join(root, "val/s-000.tar")]) == [
        uris["val/s-000.tar"]
    ]
    with pytest.raises(FileNotFoundError):
        sources.expand_sources(storage.join(root, "train/s-{000..009}.tar"))


def test_list_images(root: str) -> None:
    for n in ["a.jpg", "sub/b.PNG", "sub/deep/c.webp", "sub/readme.txt", "_dr2/manifests/x.jpg"]:
        _put(storage.join(root, n))
    assert sources.list_images(root) == ["a.jpg", "sub/b.PNG", "sub/deep/c.webp"]
    assert sources.list_images(storage.join(root, "sub") + "/", [".png"]) == ["b.PNG"]


def test_missing_bucket_is_a_clear_error(s3_server: S3Server) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-dr2' does not exist.*AWS_ENDPOINT_URL"):
        storage.exists("s3://no-such-bucket-dr2/x.tar")
    with pytest.raises(StorageError, match="does not exist"):
        sources.expand_sources("s3://no-such-bucket-dr2/shards/")
    with pytest.raises(StorageError, match="does not exist"):
        storage.write_bytes_atomic("s3://no-such-bucket-dr2/x", b"1")


def test_wrong_credentials_are_a_clear_error(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_secret = "not-the-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage.reset_clients()
    try:
        for op in (
            lambda: storage.exists(f"s3://{s3_bucket}/x"),
            lambda: storage.list_prefix(f"s3://{s3_bucket}/"),
            lambda: storage.write_bytes_atomic(f"s3://{s3_bucket}/x", b"1"),
        ):
            with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") as info:
                op()
            assert wrong_secret not in str(info.value)
    finally:
        monkeypatch.undo()
        storage.reset_clients()


def _model_dir(root: str) -> tuple[str, bytes]:
    weights = save_safetensors({"w": np.arange(1000, dtype=np.float32).reshape(10, 100)})
    config = {"model": "tiny", "sha256": hashlib.sha256(weights).hexdigest()}
    storage.write_bytes_atomic(storage.join(root, "model/model.safetensors"), weights)
    storage.write_json_atomic(storage.join(root, "model/config.json"), config)
    return storage.join(root, "model"), weights


def test_localize_model_dir(s3_bucket: str, tmp_path: Path) -> None:
    uri, weights = _model_dir(f"s3://{s3_bucket}")
    cache = tmp_path / "cache"
    local = models.localize_model_dir(uri, cache)
    assert (local / "model.safetensors").read_bytes() == weights
    assert json.loads((local / "config.json").read_text())["model"] == "tiny"
    assert models.localize_model_dir(uri + "/", cache) == local  # same cache key

    (local / "model.safetensors").write_bytes(b"corrupted cache")  # a damaged cached copy is replaced
    assert (models.localize_model_dir(uri, cache) / "model.safetensors").read_bytes() == weights

    local_dir = tmp_path / "here"
    local_dir.mkdir()
    assert models.localize_model_dir(str(local_dir), cache) == local_dir


def test_localize_model_dir_checksum_mismatch(s3_bucket: str, tmp_path: Path) -> None:
    uri, weights = _model_dir(f"s3://{s3_bucket}")
    storage.write_bytes_atomic(storage.join(uri, "model.safetensors"), weights[:-4] + b"\0\0\0\0")
    with pytest.raises(StorageError, match="sha256 .* but config.json records"):
        models.localize_model_dir(uri, tmp_path / "cache")
    storage.write_json_atomic(storage.join(uri, "config.json"), {"model": "tiny"})
    with pytest.raises(StorageError, match="records no 'sha256'"):
        models.localize_model_dir(uri, tmp_path / "cache")


class _CuttingProxy:
    """A loopback TCP proxy to the S3 server that breaks the first connection carrying more than
    ``cut_after`` bytes to the client: a real mid-body connection drop, without mocks."""

    def __init__(self, target_port: int, cut_after: int) -> None:
        self.cut_after = cut_after
        self.cuts = 0
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            upstream = socket.create_connection(self._target)
            for src, dst, down in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, down, client, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool, *both: socket.socket) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if down and self.cuts == 0 and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    dst.sendall(data[: self.cut_after - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(2)
        self._listener.close()


def test_s3_read_resumes_after_a_dropped_connection(
    s3_server: S3Server, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = np.random.default_rng(2).integers(0, 256, size=3 * storage.MiB, dtype=np.uint8).tobytes()
    storage.write_bytes_atomic(f"s3://{s3_bucket}/resume.bin", data)
    proxy = _CuttingProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]), cut_after=1_000_000)
    try:
        opts = StorageOptions(endpoint_url=f"http://127.0.0.1:{proxy.port}", max_attempts=3)
        with storage.open_read(f"s3://{s3_bucket}/resume.bin", options=opts) as f:
            got = f.read()
        assert proxy.cuts == 1
        assert got == data
        assert any("resuming" in r.getMessage() for r in caplog.records)
    finally:
        proxy.close()


def test_localize_model_dir_concurrent(s3_bucket: str, tmp_path: Path) -> None:
    uri, weights = _model_dir(f"s3://{s3_bucket}")
    with ThreadPoolExecutor(3) as pool:
        dirs = list(pool.map(lambda _: models.localize_model_dir(uri, tmp_path / "cache"), range(3)))
    assert len(set(dirs)) == 1
    assert (dirs[0] / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in dirs[0].iterdir() if p.name.endswith(".tmp")) == []


def test_list_images_never_follows_links_or_leaves_dst(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"x")
    (root / "sub" / "b.png").write_bytes(b"y")
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"s")
    (root / "link.jpg").symlink_to(secret)  # would read a file outside the folder
    os.makedirs(bytes(root) + b"/lat\xe9n", exist_ok=True)  # a directory name that is not UTF-8
    with open(bytes(root) + b"/lat\xe9n/c.jpg", "wb") as f:
        f.write(b"z")
    assert sources.list_images(str(root)) == ["a.jpg", "sub/b.png"]
    assert "left out" in caplog.text
