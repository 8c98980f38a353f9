"""Leases: the one mutual-exclusion mechanism of the project, on a local path or an ``s3://`` URI.

A lease is a small JSON object at a URI that says who holds something and until when::

    {"owner": {"host": ..., "pid": ..., "run_id": ...}, "token": ..., "acquired": ..., "renewed": ..., "expires": ...}

The nightly job takes one on its STATE_URI while it claims units, one per claimed unit (``claims/<hash>``),
and the restore job takes one on its DST. Everything rests on two conditional writes, which both S3 and a
POSIX filesystem provide:

* **acquire** is a conditional create. S3: ``PutObject`` with ``If-None-Match: *`` (refused with 412 when the
  key exists). Local: the record is written to a temporary file and ``os.link``-ed to its name, which fails
  when the name exists, so a reader never sees a half-written record.
* **renew**, **takeover** and **release** are compare-and-swap on the version the caller read. S3: the ETag,
  sent as ``If-Match`` on ``PutObject``/``DeleteObject``. Local: the sha-256 of the bytes, compared and
  replaced (``os.replace``) while holding ``fcntl.flock`` on a per-lease lock file (``.<name>.lock`` beside
  it), so that two read-check-replace sequences cannot interleave.

A lease whose holder has gone (killed, partitioned) is taken over only after its ``expires`` has passed, and
only by CAS on the version that was read: of two takers, exactly one wins and the other sees the winner's
record and gets :class:`LeaseHeld`. Liveness of the old owner is never guessed from a pid: another host's pid
means nothing here.

Time is wall-clock epoch seconds from the holder's clock. Hosts that share a lease must keep their clocks in
step (NTP); choose ``ttl`` much larger than the skew you tolerate. The local backend is exact on one host and
on filesystems with working ``flock`` and ``link`` (not every network filesystem); use ``s3://`` across hosts.

:class:`Lease` holds one acquisition; :func:`hold_lease` wraps acquire, a background renewer (every ``ttl/3``)
and release in a context manager; :class:`LeaseKeeper` renews many leases from one thread (the nightly job's
claims). A renewal refused by CAS marks the lease *lost*: code that holds a lease checks ``lease.lost`` (or
calls ``lease.check()``) before it commits work that the lease protects.

The conditional-object primitives (:func:`read_versioned`, :func:`create_if_absent`, :func:`replace_if_match`,
:func:`delete_if_match`) are public because other bookkeeping that must never clobber a concurrent writer (the
nightly job's run and unit records) uses the same two guarantees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import botocore.exceptions

from pipeline.runner import stopping
from pipeline.store.storage import StorageOptions, fsync_dir, is_s3, local_path, s3_client, split_s3

log = logging.getLogger(__name__)

Clock = Callable[[], float]

# S3 answers a failed precondition with 412 PreconditionFailed; AWS answers 409 ConditionalRequestConflict when
# a concurrent conditional write to the same key is in flight. Both mean "someone else's write won".
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
# servers that do not know conditional deletes (If-Match on DeleteObject) answer one of these
_UNSUPPORTED_CODES = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


# --- errors ------------------------------------------------------------------------------------------


def iso(t: float) -> str:
    """Epoch seconds -> ``2026-12-02T16:01:35Z`` (UTC, whole seconds)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class LeaseHeld(RuntimeError):  # noqa: N818 -- the name the jobs and the issue use; it reads as a state
    """The lease is held by someone else and has not expired. The message names them and the expiry."""

    def __init__(self, uri: str, record: LeaseRecord, *, now: float | None = None) -> None:
        self.uri = uri
        self.record = record
        o = record.owner
        left = record.expires - (time.time() if now is None else now)
        super().__init__(
            f"lease {uri} is held by run {o.run_id} (pid {o.pid} on host {o.host}) until {iso(record.expires)} "
            f"(in {max(left, 0.0):.0f} s); if that run is dead, the lease can be taken over after it expires"
        )


class LeaseLost(RuntimeError):  # noqa: N818 -- pairs with LeaseHeld
    """A lease we held was taken over, released by someone else, or could not be renewed before it expired."""


# --- the record --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: the host, the process and the run (a job-level id shared by its processes)."""

    host: str
    pid: int
    run_id: str

    @classmethod
    def current(cls, run_id: str | None = None) -> Owner:
        return cls(host=socket.gethostname(), pid=os.getpid(), run_id=run_id or uuid.uuid4().hex[:12])

    def __str__(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host})"

    def dead_here(self) -> bool:
        """Whether this owner is a process of this host that has exited. (A pid reused by an unrelated process
        reads as alive: the lease is then taken over at expiry, as for another host.)"""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


@dataclass(frozen=True)
class LeaseRecord:
    """The JSON body of a lease. ``token`` is unique per acquisition, so that two acquisitions by the same owner
    (or identical timestamps) never produce identical bytes, and hence never the same version."""

    owner: Owner
    token: str
    acquired: float
    renewed: float
    expires: float

    def to_bytes(self) -> bytes:
        d = dataclasses.asdict(self)
        d["expires_iso"] = iso(self.expires)  # for people reading the object; ignored on load
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, uri: str = "") -> LeaseRecord:
        try:
            d = json.loads(data)
            o = d["owner"]
        except (ValueError, KeyError, TypeError) as e:  # never written by us: say so instead of a KeyError
            raise RuntimeError(f"{uri or 'lease'} does not hold a lease record ({e}); nothing in this project writes "
                               "such a file: remove it if you are sure no job is running") from e
        return cls(owner=Owner(host=str(o["host"]), pid=int(o["pid"]), run_id=str(o["run_id"])), token=str(d["token"]),
                   acquired=float(d["acquired"]), renewed=float(d["renewed"]), expires=float(d["expires"]))

    def expired(self, now: float) -> bool:
        return now >= self.expires


# --- conditional objects -----------------------------------------------------------------------------


def _code(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: botocore.exceptions.ClientError) -> str:
    return str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def _is_conflict(e: botocore.exceptions.ClientError) -> bool:
    return _code(e) in _CONFLICT_CODES or _status(e) in {"412", "409"}


def _version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """Exclusive ``flock`` on the per-object lock file. The lock file is never deleted: deleting it while someone
    waits on it would let a third process lock a new file of the same name and run beside the waiter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _write_temp(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def read_versioned(uri: str, *, options: StorageOptions | None = None) -> tuple[bytes, str] | None:
    """The object's bytes and version (S3 ETag; local sha-256), or None when it does not exist."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            r = s3_client(options).get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING_CODES:
                return None
            raise
        return r["Body"].read(), str(r["ETag"])
    try:
        data = local_path(uri).read_bytes()
    except FileNotFoundError:
        return None
    return data, _version(data)


def create_if_absent(uri: str, data: bytes, *, options: StorageOptions | None = None) -> str | None:
    """Create the object only if nothing exists at ``uri``; its version, or None when it already exists."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            r = s3_client(options).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except botocore.exceptions.ClientError as e:
            if _is_conflict(e):
                return None
            raise
        return str(r["ETag"])
    path = local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name: the record appears whole or not at all
    except FileExistsError:
        return None
    finally:
        tmp.unlink()
    fsync_dir(path.parent)
    return _version(data)


def replace_if_match(uri: str, data: bytes, version: str, *, options: StorageOptions | None = None) -> str | None:
    """Replace the object only if it still has ``version``; the new version, or None when it changed or vanished."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            r = s3_client(options).put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except botocore.exceptions.ClientError as e:
            if _is_conflict(e) or _code(e) in _MISSING_CODES:
                return None
            raise
        return str(r["ETag"])
    path = local_path(uri)
    with _flocked(path):
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            return None
        if _version(current) != version:
            return None
        tmp = _write_temp(path, data)
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return _version(data)


def delete_if_match(uri: str, version: str, *, options: StorageOptions | None = None) -> bool:
    """Delete the object only if it still has ``version``; False when it changed or is gone."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client(options)
        # HEAD first: a server that ignores If-Match on DeleteObject (older S3-compatible stores) must not delete a
        # lease someone else took over. What is left is the gap between HEAD and DELETE, open only to a taker after
        # our lease expired, i.e. when we had lost it anyway.
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as e:
            if _code(e) in _MISSING_CODES:
                return False
            raise
        if str(head["ETag"]) != version:
            return False
        try:
            client.delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except botocore.exceptions.ClientError as e:
            if _is_conflict(e) or _code(e) in _MISSING_CODES:
                return False
            if _code(e) not in _UNSUPPORTED_CODES:
                raise
            log.debug("S3 endpoint refuses conditional DeleteObject; deleting %s after the ETag check", uri)
            client.delete_object(Bucket=bucket, Key=key)
        return True
    path = local_path(uri)
    with _flocked(path):
        try:
            current = path.read_bytes()
        except FileNotFoundError:
            return False
        if _version(current) != version:
            return False
        path.unlink()
    return True


def list_names(prefix_uri: str, *, options: StorageOptions | None = None) -> list[str]:
    """The names (not URIs) of the objects directly under the folder/prefix ``prefix_uri``, sorted; hidden local
    files (lock and temporary files start with a dot) are left out."""
    if is_s3(prefix_uri):
        bucket, key = split_s3(prefix_uri)
        prefix = key.rstrip("/") + "/" if key else ""
        names: list[str] = []
        paginator = s3_client(options).get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
            names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
        return sorted(n for n in names if n and not n.endswith("/"))  # some servers list a folder marker
    folder = local_path(prefix_uri)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


# --- a lease -----------------------------------------------------------------------------------------


def read_lease(uri: str, *, options: StorageOptions | None = None) -> LeaseRecord | None:
    """The current record at ``uri`` (whoever holds it), or None."""
    got = read_versioned(uri, options=options)
    return LeaseRecord.from_bytes(got[0], uri) if got else None


class Lease:
    """One acquisition of the lease at ``uri``. Built by :func:`acquire`; renew, release, check ``lost``.

    Methods are thread-safe (the renewer thread and the holder may call them at once).
    """

    def __init__(self, uri: str, record: LeaseRecord, version: str, *, ttl: float, options: StorageOptions | None,
                 clock: Clock) -> None:
        self.uri = uri
        self.ttl = ttl
        self.options = options
        self._record = record
        self._version = version
        self._clock = clock
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._released = False

    @property
    def record(self) -> LeaseRecord:
        return self._record

    @property
    def owner(self) -> Owner:
        return self._record.owner

    @property
    def expires(self) -> float:
        return self._record.expires

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def released(self) -> bool:
        return self._released

    def seconds_left(self) -> float:
        """Seconds until the expiry we last wrote (negative once past it)."""
        return self._record.expires - self._clock()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is no longer ours (call before committing protected work)."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        if self._released:
            raise LeaseLost(f"lease {self.uri} was released")

    def mark_lost(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost = why
                log.warning("%s", why)

    def renew(self) -> None:
        """Push ``expires`` to now + ttl by CAS on the version we hold. Raises :class:`LeaseLost` (and marks the
        lease lost) if someone else's write is there now; storage errors propagate, the lease stays ours."""
        with self._lock:
            if self._lost is not None or self._released:
                raise LeaseLost(self._lost or f"lease {self.uri} was released")
            now = self._clock()
            record = dataclasses.replace(self._record, renewed=now, expires=now + self.ttl)
            version = replace_if_match(self.uri, record.to_bytes(), self._version, options=self.options)
            if version is None:
                self._lost = f"lease {self.uri} of {self.owner} was taken over or removed by someone else"
                log.warning("%s", self._lost)
                raise LeaseLost(self._lost)
            self._record, self._version = record, version

    def release(self) -> bool:
        """Delete the lease if it is still ours (same version); True if it was deleted. Idempotent."""
        with self._lock:
            if self._released:
                return False
            self._released = True
            if self._lost is not None:
                return False
            ok = delete_if_match(self.uri, self._version, options=self.options)
            if not ok:
                log.warning("lease %s was no longer ours at release (taken over after expiry?)", self.uri)
            return ok

    def __repr__(self) -> str:
        state = "lost" if self.lost else "released" if self._released else f"until {iso(self.expires)}"
        return f"Lease({self.uri!r}, {self.owner}, {state})"


def try_acquire(uri: str, *, ttl: float, owner: Owner | None = None, options: StorageOptions | None = None,
                clock: Clock = time.time, take_dead: bool = False) -> Lease:
    """Take the lease at ``uri`` for ``ttl`` seconds, or raise :class:`LeaseHeld` naming the current holder.

    Absent -> conditional create. Present and expired -> takeover by CAS on the version read (of several takers
    exactly one wins). Present and live -> :class:`LeaseHeld`, even when the holder is this same owner: a lease is
    not re-entrant. With ``take_dead``, a lease whose owner is a process of THIS host that has exited counts as
    expired (a killed run on the same machine need not be waited out; another host's owner is judged by the clock).
    """
    if ttl <= 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl}")
    owner = owner or Owner.current()
    for _ in range(100):  # each turn ends in a win, LeaseHeld, or a record that vanished under us (then retry)
        now = clock()
        record = LeaseRecord(owner=owner, token=uuid.uuid4().hex, acquired=now, renewed=now, expires=now + ttl)
        version = create_if_absent(uri, record.to_bytes(), options=options)
        if version is not None:
            return Lease(uri, record, version, ttl=ttl, options=options, clock=clock)
        got = read_versioned(uri, options=options)
        if got is None:
            continue  # released between our create and our read
        current = LeaseRecord.from_bytes(got[0], uri)
        if not current.expired(now) and not (take_dead and current.owner.dead_here()):
            raise LeaseHeld(uri, current, now=now)
        version = replace_if_match(uri, record.to_bytes(), got[1], options=options)
        if version is not None:
            why = f"expired {iso(current.expires)}" if current.expired(now) else "its process is gone from this host"
            log.info("took over the lease %s from %s (%s)", uri, current.owner, why)
            return Lease(uri, record, version, ttl=ttl, options=options, clock=clock)
        winner = read_lease(uri, options=options)
        if winner is not None and not winner.expired(clock()):
            raise LeaseHeld(uri, winner, now=clock())
    raise RuntimeError(f"lease {uri}: could not settle after 100 attempts (storage changing under us?)")


def acquire(uri: str, *, ttl: float, owner: Owner | None = None, options: StorageOptions | None = None,
            wait_s: float = 0.0, poll_s: float = 0.2, clock: Clock = time.time, take_dead: bool = False) -> Lease:
    """:func:`try_acquire`, retried every ``poll_s`` for up to ``wait_s`` seconds while the lease is held."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return try_acquire(uri, ttl=ttl, owner=owner, options=options, clock=clock, take_dead=take_dead)
        except LeaseHeld:
            if time.monotonic() + poll_s > deadline:
                raise
        time.sleep(poll_s)


# --- renewal -----------------------------------------------------------------------------------------


class LeaseKeeper:
    """A daemon thread that renews every lease it holds, each at a third of its ttl.

    A renewal refused by CAS marks that lease lost. A storage error (network, throttling past botocore's own
    retries) is retried on the next turn; if the lease's expiry passes before a renewal succeeds it is marked
    lost, because from then on another run may take it over. ``on_lost`` is called once per lost lease, from the
    keeper's thread.
    """

    def __init__(self, *, on_lost: Callable[[Lease], None] | None = None, tick_s: float | None = None) -> None:
        self._leases: dict[int, tuple[Lease, float]] = {}  # id -> (lease, next renewal, monotonic)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._on_lost = on_lost
        self._tick_s = tick_s
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()
        # a run stopped hard (its grace period over, a second signal) still releases what it holds: the next run
        # need not wait for the leases to expire
        self._forget = stopping.add_last_words(self._release_all)

    def add(self, lease: Lease) -> Lease:
        with self._lock:
            self._leases[id(lease)] = (lease, time.monotonic() + lease.ttl / 3)
        self._wake.set()
        return lease

    def discard(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(id(lease), None)

    def release(self, lease: Lease) -> bool:
        self.discard(lease)
        return lease.release()

    def leases(self) -> list[Lease]:
        with self._lock:
            return [lease for lease, _ in self._leases.values()]

    def close(self, *, release: bool = True) -> None:
        """Stop renewing; release the leases still held (unless ``release=False``)."""
        self._forget()
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if release:
            for lease in self.leases():
                try:
                    lease.release()
                except Exception:  # a failed release only delays the next taker until expiry
                    log.warning("could not release lease %s", lease.uri, exc_info=True)
        with self._lock:
            self._leases.clear()

    def _release_all(self) -> None:
        for lease in self.leases():
            lease.release()

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                due = [(k, lease) for k, (lease, at) in self._leases.items() if at <= now]
            for k, lease in due:
                self._renew_one(k, lease)
            with self._lock:
                upcoming = [at for _, at in self._leases.values()]
            wait = (min(upcoming) - time.monotonic()) if upcoming else 3600.0
            if self._tick_s is not None:
                wait = min(wait, self._tick_s)
            self._wake.wait(max(wait, 0.01))
            self._wake.clear()

    def _renew_one(self, key: int, lease: Lease) -> None:
        retry_s = max(min(lease.ttl / 10, 5.0), 0.05)
        try:
            lease.renew()
            next_at = time.monotonic() + lease.ttl / 3
        except LeaseLost:
            self._lost(key, lease)
            return
        except Exception as e:  # storage trouble: keep trying until the lease would have expired
            if lease.seconds_left() <= retry_s:
                lease.mark_lost(f"lease {lease.uri} could not be renewed before it expired: {e}")
                self._lost(key, lease)
                return
            log.warning("renewing lease %s failed (will retry in %.1f s): %s", lease.uri, retry_s, e)
            next_at = time.monotonic() + retry_s
        with self._lock:
            if key in self._leases:
                self._leases[key] = (lease, next_at)

    def _lost(self, key: int, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(key, None)
        if self._on_lost is not None:
            try:
                self._on_lost(lease)
            except Exception:
                log.exception("on_lost callback failed for %s", lease.uri)


@contextlib.contextmanager
def hold_lease(uri: str, *, ttl: float, owner: Owner | None = None, options: StorageOptions | None = None,
               wait_s: float = 0.0, on_lost: Callable[[Lease], None] | None = None,
               take_dead: bool = False) -> Iterator[Lease]:
    """Acquire the lease (waiting up to ``wait_s``), renew it in the background every ``ttl/3``, release it on
    exit (only if still ours). Raises :class:`LeaseHeld` when it cannot be taken. Inside the block, check
    ``lease.lost`` / ``lease.check()`` before committing work the lease protects."""
    lease = acquire(uri, ttl=ttl, owner=owner, options=options, wait_s=wait_s, poll_s=min(2.0, max(0.2, wait_s / 100)),
                    take_dead=take_dead)
    keeper = LeaseKeeper(on_lost=on_lost)
    keeper.add(lease)
    try:
        yield lease
    finally:
        keeper.close(release=True)


def describe(record: LeaseRecord, *, now: float | None = None) -> dict[str, Any]:
    """A flat, printable view of a record (for status output)."""
    now = time.time() if now is None else now
    return {"run_id": record.owner.run_id, "host": record.owner.host, "pid": record.owner.pid,
            "acquired": iso(record.acquired), "expires": iso(record.expires),
            "expired": record.expired(now)}
