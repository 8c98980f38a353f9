"""Storage: one small abstraction over local paths and ``s3://`` URIs.

Everything that reads or writes bytes outside the process goes through here, so that the rest of the
pipeline handles a URI as a string and never branches on where it lives.

* A URI is either ``s3://bucket/key`` or a local path (an optional ``file://`` is stripped).
* S3 goes through boto3. The endpoint and region come from :class:`StorageOptions` or, when unset,
  from the standard chain (``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``/
  ``AWS_SECRET_ACCESS_KEY``, profiles, instance roles), which is also what Ray workers inherit.
  Credentials are never passed through our code and never logged.
* Retries: every S3 request is retried by botocore's own retry handler (``retries={"mode":
  "adaptive" | "standard", "max_attempts": N}``): exponential backoff with jitter on throttling
  (``SlowDown``, 503), 5xx and connection errors; ``adaptive`` adds client-side rate limiting.
  A body that breaks mid-stream is resumed by :func:`open_read` with a ranged GET at the offset
  reached (pinned to the object's ETag), which botocore alone does not do.
* Writes are atomic: :class:`AtomicWriter` makes an object appear under its final name whole or not
  at all (local: temp file in the same directory, fsync, ``os.replace``; S3: one PUT when small,
  otherwise a multipart upload completed only on a clean exit and aborted on an exception).
* Broken infrastructure raises :class:`StorageError` with a message that says what to check (wrong
  credentials, a missing bucket, an unreachable endpoint); a missing object raises
  :class:`FileNotFoundError`, as for a local path (STYLE rule 7).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal, TypeVar

import boto3
import botocore.exceptions
from botocore.config import Config

log = logging.getLogger(__name__)

MiB = 1024 * 1024
S3_SCHEME = "s3://"
T = TypeVar("T")


class StorageError(RuntimeError):
    """Broken infrastructure (credentials, bucket, endpoint, checksum): the job must stop."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3. Unset fields fall back to the standard AWS environment/credential chain.

    ``retry_mode``/``max_attempts`` configure botocore's retry handler (backoff with jitter on
    throttling, 5xx and connection errors). ``part_size`` is the multipart part size of
    :class:`AtomicWriter` (S3 needs >= 5 MiB for all but the last part); an object smaller than one
    part is written with a single PUT. ``list_page_size`` is the ``MaxKeys`` of each listing page
    (S3 caps it at 1000; smaller values exist to test paging cheaply). ``read_chunk_size`` is the
    buffer of :func:`open_read`.
    """

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 10
    retry_mode: Literal["standard", "adaptive"] = "adaptive"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    part_size: int = 8 * MiB
    list_page_size: int = 1000
    read_chunk_size: int = 1 * MiB

    def __post_init__(self) -> None:
        if self.part_size < 5 * MiB:
            raise ValueError(f"part_size must be >= 5 MiB (S3 multipart minimum), got {self.part_size}")
        if not 1 <= self.list_page_size <= 1000:
            raise ValueError(f"list_page_size must be in 1..1000, got {self.list_page_size}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


DEFAULT_OPTIONS = StorageOptions()


# --- URIs -------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def local_path(uri: str) -> Path:
    """The local path of a non-S3 URI (``file://`` stripped)."""
    if is_s3(uri):
        raise ValueError(f"not a local path: {uri!r}")
    return Path(uri.removeprefix("file://"))


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (works for both S3 and local paths)."""
    out = base.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def relative_to(uri: str, root: str) -> str:
    """``uri`` relative to ``root`` (a prefix of it), in POSIX form."""
    r = root.rstrip("/") + "/"
    if not uri.startswith(r):
        raise ValueError(f"{uri!r} is not under {root!r}")
    return uri[len(r) :]


# --- S3 client and error translation ---------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _client_for(options: StorageOptions, pid: int) -> Any:
    # One client per (options, process): boto3 clients are thread-safe but must not cross a fork.
    del pid
    config = Config(
        retries={"max_attempts": options.max_attempts, "mode": options.retry_mode},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        s3={"addressing_style": options.addressing_style},
        max_pool_connections=32,
    )
    session = boto3.session.Session()
    client = session.client("s3", endpoint_url=options.endpoint_url, region_name=options.region, config=config)
    log.debug("S3 client: endpoint=%s region=%s", client.meta.endpoint_url, client.meta.region_name)
    return client


def s3_client(options: StorageOptions | None = None) -> Any:
    """The cached boto3 S3 client for these options in this process."""
    return _client_for(options or DEFAULT_OPTIONS, os.getpid())


def reset_clients() -> None:
    """Forget cached clients (after the AWS environment changed, e.g. in tests)."""
    _client_for.cache_clear()


_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "403",
    "Forbidden",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}


def _endpoint(options: StorageOptions | None) -> str:
    try:
        return str(s3_client(options).meta.endpoint_url)
    except Exception:  # the client itself could not be built: say what was configured
        return (options or DEFAULT_OPTIONS).endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "(AWS default)")


def _bucket_missing(bucket: str, options: StorageOptions | None) -> bool:
    try:
        s3_client(options).head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as e:
        return str(e.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket", "NotFound"}
    return False


def translate_error(e: Exception, uri: str, op: str, options: StorageOptions | None = None) -> Exception:
    """The error a person can act on for a failed S3 call made outside this module (e.g. a lease's conditional
    write): ``FileNotFoundError`` or a :class:`StorageError` naming credentials, bucket or endpoint."""
    return _translate(e, uri, op, options)


def _translate(e: Exception, uri: str, op: str, options: StorageOptions | None) -> Exception:
    """Turn a botocore exception into FileNotFoundError (missing object) or a StorageError that says what to check."""
    where = f"{op} {uri} (endpoint {_endpoint(options)})"
    if isinstance(e, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
        return StorageError(
            f"no usable AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or give the node an instance role"
        )
    if isinstance(e, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
        return StorageError(f"cannot reach S3 for {where}: check AWS_ENDPOINT_URL / --endpoint-url and the network")
    if isinstance(e, botocore.exceptions.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(uri)[0]
        if code == "NoSuchBucket" or (code in _MISSING_KEY_CODES and _bucket_missing(bucket, options)):
            return StorageError(
                f"bucket {bucket!r} does not exist for {where}: check the URI, AWS_ENDPOINT_URL and AWS_DEFAULT_REGION"
            )
        if code in _MISSING_KEY_CODES:
            return FileNotFoundError(f"no such object: {uri}")
        if code in _AUTH_CODES:
            return StorageError(
                f"access denied ({code}) for {where}: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                f"the instance role) and that they are allowed to {op} objects in bucket {bucket!r}"
            )
        return StorageError(f"S3 error {code} for {where}: {e}")
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return StorageError(f"S3 failure for {where}: {e}")
    return e


def _s3_call(uri: str, op: str, fn: Callable[[], T], options: StorageOptions | None) -> T:
    try:
        return fn()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise _translate(e, uri, op, options) from e


# --- listing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI, size in bytes and a version stamp (S3 ETag, or local mtime in ns)."""

    uri: str
    size: int
    version: str


def s3_object(bucket: str, obj: dict[str, Any]) -> ObjectInfo:
    """An entry of an S3 listing (``Key``, ``Size``, ``ETag``) as an :class:`ObjectInfo`."""
    return ObjectInfo(f"{S3_SCHEME}{bucket}/{obj['Key']}", int(obj["Size"]), str(obj.get("ETag", "")).strip('"'))


def local_object(path: str, uri: str | None = None) -> ObjectInfo:
    """A local file as an :class:`ObjectInfo` named ``uri`` (default: its absolute path); version = mtime in ns."""
    st = os.stat(path)
    return ObjectInfo(os.path.abspath(path) if uri is None else uri, st.st_size, str(st.st_mtime_ns))


def iter_s3_objects(bucket: str, prefix: str, options: StorageOptions | None) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix`` as boto3 returns it, following continuation tokens page by page."""
    opts = options or DEFAULT_OPTIONS
    client = s3_client(opts)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": opts.list_page_size}
    uri = f"{S3_SCHEME}{bucket}/{prefix}"
    while True:
        page = _s3_call(uri, "list", lambda: client.list_objects_v2(**kwargs), opts)
        yield from page.get("Contents", [])
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def iter_s3_keys(bucket: str, prefix: str, options: StorageOptions | None) -> Iterator[tuple[str, int]]:
    """(key, size) of every object under ``prefix``."""
    for obj in iter_s3_objects(bucket, prefix, options):
        yield obj["Key"], int(obj["Size"])


def list_objects(uri: str, *, options: StorageOptions | None = None) -> list[ObjectInfo]:
    """Like :func:`list_prefix`, with each object's size and version stamp, from ONE paged listing on S3.

    This is how a driver learns the state of thousands of objects (markers, inputs) without one request
    per object. Local version stamps are ``mtime_ns``; S3's are ETags.
    """
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        return sorted(
            (s3_object(bucket, o) for o in iter_s3_objects(bucket, prefix, options)),
            key=lambda o: o.uri,
        )
    out = []
    for f in list_prefix(uri, options=options):
        try:
            out.append(local_object(f, f))
        except FileNotFoundError:  # removed while listing
            continue
    return out


def list_prefix(uri: str, *, options: StorageOptions | None = None) -> list[str]:
    """Every object/file whose URI starts with ``uri`` (string-prefix semantics, recursive), sorted.

    ``s3://b/dir/`` lists the keys under ``dir/``; ``s3://b/dir`` also matches ``dir.txt``. Local
    paths follow the same rule: a directory lists its files recursively.
    """
    if is_s3(uri):
        bucket, prefix = split_s3(uri)
        return sorted(f"{S3_SCHEME}{bucket}/{k}" for k, _ in iter_s3_keys(bucket, prefix, options))
    path = local_path(uri)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    parent, name = path.parent, path.name
    if not parent.is_dir():
        return []
    out: list[str] = []
    for p in parent.iterdir():
        if not p.name.startswith(name):
            continue
        if p.is_file():
            out.append(str(p))
        elif p.is_dir():
            out.extend(str(q) for q in p.rglob("*") if q.is_file())
    return sorted(out)


# --- reading ---------------------------------------------------------------------------------------

_STREAM_ERRORS = (
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    ConnectionError,
)


class _S3RawReader(io.RawIOBase):
    """A seekable raw stream over one S3 object: one GET streamed from the current offset.

    If the body breaks mid-stream, the read resumes with a ranged GET at the offset reached (up to
    ``max_attempts`` times, with backoff), pinned to the ETag of the first response so that an object
    replaced in the meantime raises instead of mixing two versions.
    """

    def __init__(self, uri: str, options: StorageOptions) -> None:
        super().__init__()
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._options = options
        self._client = s3_client(options)
        head = _s3_call(uri, "read", lambda: self._client.head_object(Bucket=self._bucket, Key=self._key), options)
        self._size = int(head["ContentLength"])
        self._etag = str(head["ETag"])
        self._pos = 0
        self._body: Any = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        new = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset, io.SEEK_END: self._size + offset}[whence]
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        if new != self._pos:
            self._drop_body()
            self._pos = new
        return self._pos

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None

    def _open_body(self) -> None:
        def get() -> Any:
            return self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", IfMatch=self._etag
            )

        self._body = _s3_call(self._uri, "read", get, self._options)["Body"]

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or len(view) == 0:
            return 0
        for attempt in range(self._options.max_attempts):
            try:
                if self._body is None:
                    self._open_body()
                data = self._body.read(len(view))
                if not data and self._pos < self._size:
                    raise ConnectionError(f"S3 body ended at {self._pos} of {self._size} bytes")
                n = len(data)
                view[:n] = data
                self._pos += n
                return n
            except _STREAM_ERRORS as e:
                self._drop_body()
                if attempt + 1 == self._options.max_attempts:
                    raise StorageError(f"reading {self._uri} broke at byte {self._pos}: {e}") from e
                log.warning("S3 read of %s broke at byte %d (%s); resuming", self._uri, self._pos, e)
                time.sleep(min(2.0**attempt * 0.1, 5.0))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(uri: str, *, options: StorageOptions | None = None) -> BinaryIO:
    """A buffered binary reader that streams ``uri`` (never the whole object in memory); close it after use.

    S3 objects are streamed with one GET (resumed with a ranged GET if the body breaks) and are
    seekable. Missing objects raise ``FileNotFoundError``.
    """
    opts = options or DEFAULT_OPTIONS
    if is_s3(uri):
        return io.BufferedReader(_S3RawReader(uri, opts), buffer_size=opts.read_chunk_size)  # type: ignore[return-value]
    return open(local_path(uri), "rb")


def read_bytes(uri: str, *, options: StorageOptions | None = None) -> bytes:
    """The whole content of a (small) object or file."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(options)
        return _s3_call(uri, "read", lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(), options)
    return local_path(uri).read_bytes()


def sha256_of(uri: str, *, options: StorageOptions | None = None) -> str:
    """sha256 of an object's bytes, streamed."""
    h = hashlib.sha256()
    with open_read(uri, options=options) as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def stat(uri: str, *, options: StorageOptions | None = None) -> ObjectInfo | None:
    """Size and version stamp of one object (None when missing), as :func:`list_objects` gives them."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(options)
        try:
            head = _s3_call(uri, "check", lambda: client.head_object(Bucket=bucket, Key=key), options)
        except FileNotFoundError:
            return None
        return ObjectInfo(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
    try:
        return local_object(str(local_path(uri)))
    except FileNotFoundError:
        return None


def exists(uri: str, *, options: StorageOptions | None = None) -> bool:
    """Whether the object/file exists. A missing bucket or refused credentials raise ``StorageError``."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(options)
        try:
            _s3_call(uri, "check", lambda: client.head_object(Bucket=bucket, Key=key), options)
        except FileNotFoundError:
            return False
        return True
    return local_path(uri).is_file()


def delete(uri: str, *, options: StorageOptions | None = None) -> None:
    """Delete one object/file; deleting a missing one is not an error (as on S3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(options)
        _s3_call(uri, "delete", lambda: client.delete_object(Bucket=bucket, Key=key), options)
        return
    local_path(uri).unlink(missing_ok=True)


def delete_many(uris: Iterable[str], *, options: StorageOptions | None = None) -> None:
    """Delete several objects (S3: batched ``DeleteObjects`` of up to 1000 keys per bucket)."""
    by_bucket: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            by_bucket.setdefault(bucket, []).append(key)
        else:
            delete(uri)
    client = s3_client(options)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            uri = f"{S3_SCHEME}{bucket}/{keys[i]}"
            call = functools.partial(client.delete_objects, Bucket=bucket, Delete=batch)
            resp = _s3_call(uri, "delete", call, options)
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise StorageError(f"could not delete s3://{bucket}/{err.get('Key')}: {err.get('Code')}")


# --- atomic writing --------------------------------------------------------------------------------


class _S3UploadFile(io.RawIOBase):
    """A write-only file that buffers parts of ``part_size`` and uploads them as a multipart upload.

    Nothing is visible under the key until :meth:`commit`; :meth:`abort` leaves no object and no
    in-progress upload behind. Parts are bytes in memory, so botocore can retry each one.
    """

    def __init__(self, uri: str, options: StorageOptions) -> None:
        super().__init__()
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        if not self._key or self._key.endswith("/"):
            raise ValueError(f"not an object URI: {uri!r}")
        self._options = options
        self._client = s3_client(options)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed upload")
        mv = memoryview(b).cast("B")
        self._buf += mv
        self._written += len(mv)
        while len(self._buf) >= self._options.part_size:
            part = bytes(self._buf[: self._options.part_size])
            del self._buf[: self._options.part_size]
            self._upload_part(part)
        return len(mv)

    def tell(self) -> int:
        return self._written

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        return _s3_call(self._uri, op, fn, self._options)

    def _upload_part(self, data: bytes) -> None:
        if self._upload_id is None:
            resp = self._call("write", lambda: self._client.create_multipart_upload(Bucket=self._bucket, Key=self._key))
            self._upload_id = str(resp["UploadId"])
        number = len(self._parts) + 1
        upload_id = self._upload_id
        resp = self._call(
            "write",
            lambda: self._client.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=data
            ),
        )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def commit(self) -> None:
        if self._upload_id is None:
            data = bytes(self._buf)
            self._call("write", lambda: self._client.put_object(Bucket=self._bucket, Key=self._key, Body=data))
        else:
            if self._buf or not self._parts:
                self._upload_part(bytes(self._buf))
            upload_id, parts = self._upload_id, list(self._parts)
            self._call(
                "write",
                lambda: self._client.complete_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        self._buf = bytearray()
        super().close()

    def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id is not None:
            upload_id = self._upload_id
            try:
                self._call(
                    "abort",
                    lambda: self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id),
                )
            except Exception:  # we are already failing; say so, do not mask the original error
                log.exception("could not abort multipart upload of %s", self._uri)
        super().close()

    def close(self) -> None:
        # Closing without commit() (e.g. by garbage collection) must never publish a partial object.
        if not self.closed:
            self.abort()


class AtomicWriter:
    """Context manager yielding a writable binary file; the object appears whole on a clean exit, never partial.

    * local: a temp file in the target's directory, flushed and ``fsync``-ed, then ``os.replace``-d
      onto the final name (and the directory fsync-ed); removed on an exception.
    * S3: bytes are buffered; below ``options.part_size`` the object is written with one PUT on
      exit, above it as a multipart upload (parts of ``part_size``) that is completed only on a
      clean exit and aborted on an exception, so no object and no in-progress upload remain.

    Writing the same bytes to the same name twice (a retried task) is harmless: last writer wins
    and both wrote the same thing.
    """

    def __init__(self, uri: str, *, options: StorageOptions | None = None) -> None:
        self.uri = uri
        self._options = options or DEFAULT_OPTIONS
        self._file: Any = None
        self._tmp: Path | None = None

    def __enter__(self) -> IO[bytes]:
        if is_s3(self.uri):
            # No BufferedWriter on top: closing one would close (= abort) the upload; the upload buffers itself.
            self._file = _S3UploadFile(self.uri, self._options)
            return self._file  # type: ignore[no-any-return]
        final = local_path(self.uri)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        return self._file  # type: ignore[no-any-return]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(self._file, _S3UploadFile):
            if exc_type is None:
                self._file.commit()
            else:
                self._file.abort()
            return
        assert self._tmp is not None
        f = self._file
        if exc_type is not None:
            with contextlib.suppress(Exception):
                f.close()
            self._tmp.unlink(missing_ok=True)
            return
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.chmod(self._tmp, 0o644)  # mkstemp makes 0600
            os.replace(self._tmp, local_path(self.uri))
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        fsync_dir(local_path(self.uri).parent)


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def is_temp_name(uri: str) -> bool:
    """Whether ``uri`` is a local :class:`AtomicWriter` temp file (``.NAME.XXXXXXXX.tmp``); never true on S3."""
    return not is_s3(uri) and bool(_TEMP_NAME.match(uri.rsplit("/", 1)[-1]))


def remove_stale_temps(uri: str) -> int:
    """Delete the temp files that killed :class:`AtomicWriter` writes of ``uri`` left beside it (local only: an
    S3 upload that never completed leaves no object). Call it only while no one else writes ``uri``."""
    if is_s3(uri):
        return 0
    final = local_path(uri)
    n = 0
    for tmp in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(uri: str, data: bytes, *, options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (see :class:`AtomicWriter`)."""
    with AtomicWriter(uri, options=options) as f:
        f.write(data)


def write_json_atomic(uri: str, obj: Any, *, options: StorageOptions | None = None) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), options=options)


def remove_tree(uri: str, *, options: StorageOptions | None = None) -> None:
    """Delete everything under a local directory or S3 prefix (missing is fine)."""
    if is_s3(uri):
        delete_many(list_prefix(uri.rstrip("/") + "/", options=options), options=options)
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)
