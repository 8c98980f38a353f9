"""Exactly-once outputs for any :class:`~pipeline.formats.units.Unit`: stage parts, commit, resume.

A unit's life:

1. Writers stage finished samples as *parts* (:func:`write_part`): bytes written atomically to
   ``{unit.staging_uri(dst, config_hash)}{first:09d}-{last:09d}.part``. The name holds the sample indexes it
   covers, the folder holds the unit's id and the config hash, and the bytes are deterministic, so a retried
   block overwrites the same name with the same bytes and nothing of another unit or config can be taken
   for it.
2. The driver calls :func:`commit` once the parts cover every index: the unit's format streams them in index order
   into ``unit.output_uri(dst)`` (atomically, never holding the unit in memory: tar parts concatenated and closed
   with the end-of-archive blocks, parquet parts re-encoded row group by row group), then the commit writes
   ``unit.marker_uri(dst)`` LAST (the commit marker, with size and sha256), then
   deletes the parts. A :class:`Committer` does this for the driver, in batches when units complete faster than
   one at a time (thousands of tiny shards): in the driver's threads where that is cheap, else as Ray tasks.
3. :func:`unit_states` tells, for many units at once, which are ``done`` (same config hash, output present
   with the size its marker records), ``conflict`` (committed under another config) or ``todo``, from ONE
   listing of DST plus a read of each marker found. A crash anywhere before the marker leaves the unit
   ``todo``; a crash after it leaves only staging litter, which :func:`clear_staging` removes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import failpoints
from pipeline.formats.base import OutputSink
from pipeline.formats.units import STAGING_DIR, Unit
from pipeline.store import storage
from pipeline.store.storage import AtomicWriter, StorageOptions

log = logging.getLogger(__name__)

PART_RE = re.compile(r"(\d{9})-(\d{9})\.part")

UnitState = Literal["todo", "done", "conflict"]


class ShardCommitError(RuntimeError):
    """The staged parts do not cover the unit's indexes: a commit now would lose or repeat samples."""


@dataclass(frozen=True)
class PartInfo:
    """A staged part: which unit it belongs to and the indexes it covers."""

    unit: str
    first: int
    last: int
    uri: str


def part_uri(unit: Unit, dst: str, config_hash: str, first: int, last: int) -> str:
    return f"{unit.staging_uri(dst, config_hash)}{first:09d}-{last:09d}.part"


def write_part(unit: Unit, dst: str, config_hash: str, first: int, count: int, data: bytes, *,
               options: StorageOptions | None = None) -> PartInfo:
    """Stage ``data``, the encoded samples ``first..first+count-1`` of ``unit``, as one part, atomically."""
    if count < 1:
        raise ValueError("a part needs at least one sample")
    last = first + count - 1
    uri = part_uri(unit, dst, config_hash, first, last)
    storage.write_bytes_atomic(uri, data, options=options)
    return PartInfo(unit=unit.name, first=first, last=last, uri=uri)


# --- commit ----------------------------------------------------------------------------------------


def _list_parts(staging: str, options: StorageOptions | None) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(first, last, uri) of the part files directly in ``staging``, and every file there (for cleanup)."""
    every = storage.list_prefix(staging, options=options)
    parts = []
    for uri in every:
        rel = uri[len(staging.rstrip("/")) + 1 :]
        m = PART_RE.fullmatch(rel)
        if m:
            parts.append((int(m.group(1)), int(m.group(2)), uri))
    return sorted(parts), every


def cover(parts: Iterable[tuple[int, int, Any]], expected_count: int, unit: str) -> list[tuple[int, int, Any]]:
    """A chain of ``(first, last, x)`` parts covering ``0..expected_count-1`` exactly once, in order.

    Parts from retries with the same batch boundaries share a name (identical bytes); retries with
    other boundaries may overlap: any exact cover is correct, since every part holds the same
    deterministic rows. Raises :class:`ShardCommitError` naming the missing indexes when none exists.
    The driver uses the same rule on the summaries it receives, so its counts match the committed parts.
    """
    parts = list(parts)
    starts: dict[int, list[tuple[int, int, Any]]] = {}
    for p in parts:
        if p[0] <= p[1] < expected_count:
            starts.setdefault(p[0], []).append(p)
    prev: dict[int, tuple[int, int, Any]] = {}
    frontier, seen = [0], {0}
    while frontier:
        pos = frontier.pop(0)
        for p in starts.get(pos, []):
            nxt = p[1] + 1
            if nxt not in seen:
                seen.add(nxt)
                prev[nxt] = p
                frontier.append(nxt)
    if expected_count in seen:
        chain: list[tuple[int, int, Any]] = []
        pos = expected_count
        while pos > 0:
            p = prev[pos]
            chain.append(p)
            pos = p[0]
        return chain[::-1]
    covered = [False] * expected_count
    for first, last, _ in parts:
        for i in range(first, min(last, expected_count - 1) + 1):
            covered[i] = True
    missing = [i for i, c in enumerate(covered) if not c]
    beyond = [f"{a}-{b}" for a, b, _ in parts if b >= expected_count]
    raise ShardCommitError(
        f"{unit}: staged parts do not cover indexes 0..{expected_count - 1}"
        + (f"; missing {_ranges(missing)}" if missing else "; parts overlap without an exact cover")
        + (f"; parts beyond the expected count: {beyond}" if beyond else "")
    )


def covers(parts: Iterable[tuple[int, int, Any]], expected_count: int) -> bool:
    try:
        cover(parts, expected_count, "")
    except ShardCommitError:
        return False
    return True


def _ranges(indexes: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (first 20 runs)."""
    runs: list[list[int]] = []
    for i in indexes:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ", ".join(text[:20]) + (" ..." if len(text) > 20 else "")


def commit(unit: Unit, dst: str, config_hash: str, expected_count: int, stats: Mapping[str, Any], *,
           options: StorageOptions | None = None) -> dict[str, Any]:
    """Assemble the staged parts of ``unit`` into its output, mark it done, drop the parts.

    Checks that the parts cover indexes ``0..expected_count-1`` exactly once (overlapping retries are fine
    when an exact cover exists; else :class:`ShardCommitError`), has the unit's format assemble them in order into an
    :class:`~pipeline.store.storage.AtomicWriter` (:meth:`pipeline.formats.base.Format.assemble`), then writes the
    marker = ``stats`` + ``unit``, ``output``, ``count``, ``bytes``, ``sha256``, ``parts``, ``config_hash``, and only
    then deletes the parts. Returns the marker. Memory: one 8 MiB chunk, or one parquet row group (plus an S3 part
    buffer).

    Idempotent: parts that no longer cover the unit while its marker is in place (same config hash, count and
    input, and an output of the recorded size) mean that an earlier attempt of this same commit got past its
    marker (a retried task whose worker died after it): that marker is returned, what is left staged goes.
    Within a run holding DST's lease nothing else removes parts whose summaries the driver has seen.
    """
    staging = unit.staging_uri(dst, config_hash)
    parts, every = _list_parts(staging, options)
    try:
        chain = cover(parts, expected_count, unit.name)
    except ShardCommitError:
        marker = _committed(unit, dst, config_hash, expected_count, options)
        if marker is None:
            raise
        log.info("%s: already committed by an earlier attempt; removing what is left staged", unit.name)
        storage.delete_many(every, options=options)
        _prune_local_dirs(staging)
        return marker
    failpoints.hit("commit.begin")
    final_uri = unit.output_uri(dst)
    storage.remove_stale_temps(final_uri)  # a commit killed mid-write left a full-size temp file here
    with AtomicWriter(final_uri, options=options) as out:
        sink = OutputSink(out)
        unit.format.assemble(unit, [uri for _, _, uri in chain], expected_count, sink, options)
    failpoints.hit("commit.after_output")
    marker = dict(stats)
    marker.update({"unit": unit.name, "output": final_uri, "count": expected_count, "bytes": sink.size,
                   "sha256": sink.digest.hexdigest(), "parts": len(chain), "config_hash": config_hash,
                   "input": unit.input})
    storage.write_json_atomic(unit.marker_uri(dst), marker, options=options)  # the commit point
    failpoints.hit("commit.after_marker")
    storage.delete_many(every, options=options)
    _prune_local_dirs(staging)
    return marker


def _committed(unit: Unit, dst: str, config_hash: str, expected_count: int,
               options: StorageOptions | None) -> dict[str, Any] | None:
    """The unit's marker if it records this commit (config hash, count, input) and its output has the recorded size."""
    marker = read_marker(unit, dst, options=options)
    if marker is None or (marker.get("config_hash"), marker.get("count"), marker.get("input")) != (
            config_hash, expected_count, unit.input):
        return None
    out = storage.stat(unit.output_uri(dst), options=options)
    return marker if out is not None and out.size == marker.get("bytes") else None


@dataclass(frozen=True)
class CommitJob:
    """A unit whose parts cover it, ready to commit: its sample count and the stats its marker carries."""

    unit: Unit
    expected: int
    stats: Mapping[str, Any]


def describe(e: BaseException) -> str:
    """``Type: last line of the message``: how a failed commit is reported."""
    lines = [t.strip() for t in str(e).splitlines() if t.strip()]
    return f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__


SMALL_COMMIT_BYTES = 64 * storage.MiB


def commits_here(unit: Unit, dst: str) -> bool:
    """Whether the driver commits ``unit`` itself, in a thread: on a local DST (its files are on the driver's
    filesystem; a cluster's DST folder is one every node mounts), and for small units on S3 (a few requests and
    bytes: cheaper than a Ray task). A large shard on S3 is committed in a Ray task, so that its bytes do not all
    pass through the driver's node."""
    if not storage.is_s3(dst):
        return True
    nbytes, nrows = unit.size_hint
    return nrows is not None or (nbytes is not None and nbytes <= SMALL_COMMIT_BYTES)


@dataclass
class CommitResult:
    """What became of one commit: ``error`` empty when committed; ``at`` (``time.perf_counter``) when the driver
    learned it."""

    job: CommitJob
    error: str
    at: float


@dataclass
class Committer:
    """The driver's commits: :meth:`put` a complete unit and it is committed soon after, in the background.

    ``slots`` threads each take what is queued when they become free (a fair share, ``max_batch`` at most; a large
    S3 shard alone) and commit it, unit after unit: one unit when units complete slowly, a batch when they complete
    faster than commits go (thousands of tiny shards), so that no unit waits for a later one and no Ray task is
    paid per unit. A unit is committed in the thread itself (:func:`commits_here`) or in a Ray task through
    ``remote(fn, *args, **kwargs)`` (blocking, returns ``fn``'s value). Before each batch ``check()`` runs (the DST
    lease: a lost lease fails the batch's units, never commits them). A commit in the driver's thread hits the
    ``commit.*`` failpoints in the driver (``exit`` there ends the run, which a rerun resumes)."""

    dst: str
    config_hash: str
    remote: Callable[..., Any]
    check: Callable[[], None]
    describe: Callable[[BaseException], str] = describe
    options: StorageOptions | None = None
    slots: int = 4
    max_batch: int = 256
    _queue: list[CommitJob] = field(default_factory=list)
    _results: list[CommitResult] = field(default_factory=list)
    _inflight: int = 0  # jobs taken and not yet done
    _active: int = 0  # threads committing
    _closing: bool = False
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _threads: list[threading.Thread] = field(default_factory=list)

    def put(self, job: CommitJob) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("the committer is closed")
            self._queue.append(job)
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, name=f"commit-{i}", daemon=True)
                                 for i in range(self.slots)]
                for t in self._threads:
                    t.start()
            self._cond.notify()

    def results(self) -> list[CommitResult]:
        """The commits finished since the last call."""
        with self._cond:
            out, self._results = self._results, []
        return out

    def pending(self) -> int:
        """Units queued or being committed."""
        with self._cond:
            return len(self._queue) + self._inflight

    def close(self) -> list[CommitResult]:
        """Commit what is queued, wait for every commit, and return the results not yet taken."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._queue or self._inflight:
                self._cond.wait(timeout=0.5)  # a timeout: Ctrl-C reaches a waiting main thread
        for t in self._threads:
            t.join()
        return self.results()

    def _take(self) -> list[CommitJob]:
        """The next batch, lock held: the first job if it is committed in a Ray task (alone: a large shard), else the
        jobs committed here, a fair share of the queue per free thread."""
        first = self._queue[0]
        if not commits_here(first.unit, self.dst):
            return [self._queue.pop(0)]
        here = [j for j in self._queue if commits_here(j.unit, self.dst)]
        free = max(1, len(self._threads) - self._active)
        batch = here[: min(self.max_batch, math.ceil(len(here) / free))]
        taken = {id(j) for j in batch}
        self._queue = [j for j in self._queue if id(j) not in taken]
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._take()
                self._inflight += len(batch)
                self._active += 1
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._inflight -= len(batch)
                    self._active -= 1
                    self._cond.notify_all()

    def _done(self, job: CommitJob, error: str) -> None:
        with self._cond:
            self._results.append(CommitResult(job, error, time.perf_counter()))

    def _commit(self, batch: list[CommitJob]) -> None:
        try:
            self.check()
        except Exception as e:  # noqa: BLE001 - the lease is lost: these units are not committed by this run
            for job in batch:
                self._done(job, self.describe(e))
            return
        for job in batch:
            args = (job.unit, self.dst, self.config_hash, job.expected, job.stats)
            try:
                if commits_here(job.unit, self.dst):
                    commit(*args, options=self.options)
                else:  # a large shard on S3: a task of its own, retried if its worker dies (commit is idempotent)
                    self.remote(commit, *args, options=self.options)
                error = ""
            except Exception as e:  # noqa: BLE001 - this unit's failure; the others go on
                log.warning("%s: commit failed: %s", job.unit.name, e)
                error = self.describe(e)
            self._done(job, error)


def clear_stagings(units: Sequence[Unit], dst: str, config_hash: str, *, options: StorageOptions | None = None) -> None:
    """:func:`clear_staging` for many units, from ONE listing of DST's staging folder (usually empty): thousands of
    units cost one request, not one each."""
    root = storage.join(dst, STAGING_DIR) + "/"
    wanted = {u.staging_uri(dst, config_hash)[len(root):].rstrip("/") for u in units}
    present = {uri[len(root):].split("/", 1)[0] for uri in storage.list_prefix(root, options=options)}
    for name in sorted(present & wanted):
        storage.remove_tree(root + name + "/", options=options)


def _prune_local_dirs(staging: str) -> None:
    """Remove the now-empty local staging directory and ``_dr2_staging`` itself when empty (S3 has no dirs)."""
    if storage.is_s3(staging):
        return
    path = storage.local_path(staging.rstrip("/"))
    for p in (path, path.parent):
        if p.name and p.is_dir():
            try:
                p.rmdir()
            except OSError:  # not empty (other units' parts) or gone
                return


def clear_staging(unit: Unit, dst: str, config_hash: str, *, options: StorageOptions | None = None) -> None:
    """Delete the staged parts of ``unit`` under ``config_hash``: before (re)processing a ``todo`` unit, so that
    parts left by an interrupted earlier run never mix into this one, and after a crash between marker and
    cleanup."""
    storage.remove_tree(unit.staging_uri(dst, config_hash), options=options)


# --- resume ----------------------------------------------------------------------------------------


def read_marker(unit: Unit, dst: str, *, options: StorageOptions | None = None) -> dict[str, Any] | None:
    try:
        marker: dict[str, Any] = json.loads(storage.read_bytes(unit.marker_uri(dst), options=options))
    except FileNotFoundError:
        return None
    return marker


def unit_states(units: Sequence[Unit], dst: str, config_hash: str, *, verify: bool = False, tidy: bool = False,
                options: StorageOptions | None = None) -> dict[str, UnitState]:
    """The state of every unit, from ONE (paged) listing of DST and a read of each marker found. With ``tidy`` (only
    while holding DST's lease), what that listing shows left by interrupted runs goes too: the staged parts of
    committed units (a commit killed after its marker) and local temp files (writes killed mid-way).

    ``done`` needs the marker's config hash and an output whose size equals the marker's ``bytes`` (and, with
    ``verify``, whose sha256 equals the marker's); an output that is missing or does not match is redone, with
    a warning that says so.
    """
    listing = {o.uri: o for o in storage.list_objects(dst.rstrip("/") + "/", options=options)}
    with_marker = [u for u in units if u.marker_uri(dst) in listing]
    states: dict[str, UnitState] = {u.name: "todo" for u in units}

    def check(u: Unit) -> tuple[str, UnitState]:
        marker = read_marker(u, dst, options=options)
        if marker is None:
            return u.name, "todo"
        if marker.get("config_hash") != config_hash:
            return u.name, "conflict"
        if u.input and marker.get("input") and marker["input"] != u.input:
            log.warning("%s: its input changed since it was committed (%s, now %s); redoing it", u.name,
                        marker["input"], u.input)
            return u.name, "todo"
        out = listing.get(u.output_uri(dst))
        if out is None:
            log.warning("%s: marker present but %s is gone; redoing it", u.name, u.output_uri(dst))
            return u.name, "todo"
        if "bytes" in marker and out.size != marker["bytes"]:
            log.warning("%s: output holds %d bytes, its marker records %s; redoing it", u.name, out.size,
                        marker["bytes"])
            return u.name, "todo"
        if verify and marker.get("sha256") != storage.sha256_of(u.output_uri(dst), options=options):
            log.warning("%s: output sha256 does not match its marker; redoing it", u.name)
            return u.name, "todo"
        return u.name, "done"

    with ThreadPoolExecutor(max_workers=16) as pool:
        states.update(pool.map(check, with_marker))
        # a commit killed between its marker and its clean-up left the unit's parts: seen in the same listing
        staged = {uri.rstrip("/").rsplit("/", 2)[-2] for uri in listing if f"/{STAGING_DIR}/" in uri}
        leftovers = [u for u in units if states[u.name] == "done"
                     and u.staging_uri(dst, config_hash).rstrip("/").rsplit("/", 1)[-1] in staged]
        if leftovers and tidy:
            log.info("removing the staged parts of %d committed unit(s) (a commit interrupted after its marker)",
                     len(leftovers))
            list(pool.map(lambda u: clear_staging(u, dst, config_hash, options=options), leftovers))
    temps = [uri for uri in listing if storage.is_temp_name(uri)] if tidy else []
    if temps:
        log.info("removing %d temp file(s) left in DST by interrupted writes", len(temps))
        storage.delete_many(temps, options=options)
    return states
