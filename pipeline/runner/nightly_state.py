"""The bookkeeping of ``dr2 nightly SRC DST --state STATE_URI``: which units to run tonight, who runs them, what
happened, and the history. It knows nothing about how a unit is restored: the caller hands :func:`run_nightly` a
``process`` callable that takes a list of unit names and yields one :class:`UnitOutcome` per unit as each finishes.

Layout under STATE_URI (a local folder or an ``s3://`` prefix)::

    lease.json                        the state lease: held only while claiming units or recording outcomes
    units.json                        per-unit records: attempts, status, last error, last run, quarantined
    claims/<sha256(unit)[:16]>.json   one claim lease per unit being processed, renewed while its run lives
    runs/<start>-<run id>.json        one record per run, created at start and completed at the end

Guarantees, all from :mod:`pipeline.store.leases`:

* Two runs started at once on the same STATE_URI never process the same unit twice. A run claims units in
  waves of ``claim_batch`` while holding the state lease: a unit is claimed only if it is not done, not
  quarantined and its claim lease can be taken. A done unit is recorded as such in ``units.json`` before its
  claim is released, so a run that planned before it finished cannot pick it up afterwards. Concurrent runs
  therefore split the units wave by wave.
* A run that dies (SIGKILL, lost node) leaves its claims behind; they are taken over after they expire
  (``claim_ttl``, renewed every ``claim_ttl/3`` while the run lives). The attempt it started counts: a unit
  that kills its run every night is quarantined like one that fails cleanly.
* ``units.json`` and each run record are written by compare-and-swap, so even a writer that lost the state
  lease cannot silently overwrite another's update.
* Run records are never shared: each run creates its own object, so concurrent runs never clobber history.

Attempt policy: each run that starts a unit counts one attempt; success resets the count. A unit whose count
reaches ``max_attempts`` (default 3) is quarantined and skipped by later runs until ``retry_quarantined`` puts
it back with a fresh count. If ``process`` itself raises (broken infrastructure, not bad data), the attempts
of the units it had not reported are rolled back and the run ends with status ``error``. A run stopped by Ctrl-C
or SIGTERM (``KeyboardInterrupt``, pipeline/runner/stopping.py) is neither: what ``process`` reported is recorded, the
units it cut short get their attempt back (a unit stopped every night is never quarantined for it), the record
ends with status ``stopped``, the claims are released and the ``KeyboardInterrupt`` goes on up.

Exit codes for cron/CI (:func:`exit_code`): 0 every unit is done; 1 some units failed or are quarantined; 2 the
run could not start or could not finish (state lease not obtained, storage unreachable, ``process`` raised).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pipeline.runner import stopping
from pipeline.store import leases
from pipeline.store.leases import Lease, LeaseHeld, LeaseKeeper, Owner
from pipeline.store.storage import StorageOptions

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3


class UnitStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # an attempt started; its run holds (or held, if it died) the unit's claim
    DONE = "done"
    FAILED = "failed"


class RunStatus(StrEnum):
    RUNNING = "running"  # still running, or died without completing its record
    OK = "ok"  # every unit is done (or being done by another live run)
    FAILED = "failed"  # some units failed or are quarantined
    ERROR = "error"  # could not start or could not finish
    STOPPED = "stopped"  # stopped by Ctrl-C or SIGTERM: what finished is recorded, the rest is left for the next run


@dataclass
class UnitRecord:
    """What the state remembers about one unit."""

    attempts: int = 0  # attempts started since the last success (or since retry-quarantined)
    status: UnitStatus = UnitStatus.PENDING
    last_error: str = ""
    last_run: str = ""
    last_time: str = ""  # ISO time of the last change
    quarantined: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "status": str(self.status)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnitRecord:
        return cls(attempts=int(d.get("attempts", 0)), status=UnitStatus(d.get("status", "pending")),
                   last_error=str(d.get("last_error", "")), last_run=str(d.get("last_run", "")),
                   last_time=str(d.get("last_time", "")), quarantined=bool(d.get("quarantined", False)))


@dataclass(frozen=True)
class UnitOutcome:
    """What ``process`` reports for one unit: done or failed (with a reason a person can read), and its counts."""

    unit: str
    ok: bool
    error: str = ""
    samples: Mapping[str, int] = field(default_factory=dict)  # samples by row status, e.g. {"ok": 9, "no_face": 1}
    faces: int = 0


@dataclass(frozen=True)
class NightlyPlan:
    """Units in the order given: to run, already done (skipped), quarantined (skipped, reported)."""

    to_run: list[str]
    skipped: list[str]
    quarantined: list[str]


@dataclass
class RunRecord:
    """One run, as stored in ``runs/`` and printed by :func:`format_history`."""

    run_id: str
    host: str
    pid: int
    start: float
    end: float | None = None
    status: RunStatus = RunStatus.RUNNING
    config_hash: str = ""
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # unit -> reason
    quarantined: list[str] = field(default_factory=list)  # skipped as quarantined, or quarantined by this run
    skipped: int = 0  # already done before this run
    claimed_elsewhere: list[str] = field(default_factory=list)  # being processed by another live run
    samples: dict[str, int] = field(default_factory=dict)
    faces: int = 0
    error: str = ""

    @property
    def seconds(self) -> float:
        return ((self.end if self.end is not None else time.time()) - self.start)

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.seconds if self.end is not None and self.seconds > 0 else 0.0

    def to_bytes(self) -> bytes:
        d = dataclasses.asdict(self)
        d.update(status=str(self.status), start_iso=leases.iso(self.start),
                 end_iso=leases.iso(self.end) if self.end is not None else "",
                 seconds=round(self.seconds, 3), faces_per_s=round(self.faces_per_s, 4))
        return json.dumps(d, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RunRecord:
        d = json.loads(data)
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["status"] = RunStatus(kw.get("status", "running"))
        return cls(**kw)


# --- the stored state --------------------------------------------------------------------------------


def unit_hash(unit: str) -> str:
    return hashlib.sha256(unit.encode()).hexdigest()[:16]


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


class NightlyState:
    """The nightly job's state at ``uri``. ``lease_ttl``: the state lease (short critical sections);
    ``claim_ttl``: how long a dead run's claims block its units; ``lock_wait_s``: how long to wait for the state
    lease held by another run before giving up (exit code 2)."""

    def __init__(self, uri: str, *, options: StorageOptions | None = None, lease_ttl: float = 60.0,
                 claim_ttl: float = 900.0, lock_wait_s: float = 600.0) -> None:
        self.uri = uri.rstrip("/")
        self.options = options
        self.lease_ttl = lease_ttl
        self.claim_ttl = claim_ttl
        self.lock_wait_s = lock_wait_s

    @property
    def lease_uri(self) -> str:
        return _join(self.uri, "lease.json")

    @property
    def units_uri(self) -> str:
        return _join(self.uri, "units.json")

    def claim_uri(self, unit: str) -> str:
        return _join(self.uri, f"claims/{unit_hash(unit)}.json")

    def run_uri(self, record: RunRecord) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(record.start))
        return _join(self.uri, f"runs/{stamp}-{record.run_id}.json")

    @contextlib.contextmanager
    def locked(self, owner: Owner) -> Iterator[Lease]:
        """Hold the state lease (renewed in the background) for a read-modify-write of ``units.json``."""
        with leases.hold_lease(self.lease_uri, ttl=self.lease_ttl, owner=owner, options=self.options,
                               wait_s=self.lock_wait_s) as lease:
            yield lease

    def load_units(self) -> tuple[dict[str, UnitRecord], str | None]:
        """The unit records and the version of ``units.json`` (None: not written yet)."""
        got = leases.read_versioned(self.units_uri, options=self.options)
        if got is None:
            return {}, None
        data = json.loads(got[0])
        return {k: UnitRecord.from_dict(v) for k, v in data.get("units", {}).items()}, got[1]

    def units(self) -> dict[str, UnitRecord]:
        return self.load_units()[0]

    def save_units(self, units: Mapping[str, UnitRecord], version: str | None) -> str:
        """Write ``units.json`` by CAS on ``version``; the new version. A mismatch means someone wrote it without
        holding the state lease (or we lost ours): that is a bug or broken infrastructure, so it raises."""
        body = json.dumps({"units": {k: units[k].to_dict() for k in sorted(units)}}, sort_keys=True).encode()
        if version is None:
            new = leases.create_if_absent(self.units_uri, body, options=self.options)
        else:
            new = leases.replace_if_match(self.units_uri, body, version, options=self.options)
        if new is None:
            raise RuntimeError(f"{self.units_uri} changed under the state lease (was the lease lost?); not overwritten")
        return new

    def write_run(self, record: RunRecord, version: str | None) -> str:
        uri = self.run_uri(record)
        if version is None:
            new = leases.create_if_absent(uri, record.to_bytes(), options=self.options)
        else:
            new = leases.replace_if_match(uri, record.to_bytes(), version, options=self.options)
        if new is None:
            raise RuntimeError(f"run record {uri} exists already or changed under us (run id reused?)")
        return new

    def runs(self) -> list[RunRecord]:
        """Every run record, oldest first."""
        out: list[RunRecord] = []
        for name in leases.list_names(_join(self.uri, "runs"), options=self.options):
            if not name.endswith(".json"):
                continue
            got = leases.read_versioned(_join(self.uri, f"runs/{name}"), options=self.options)
            if got is not None:
                out.append(RunRecord.from_bytes(got[0]))
        return sorted(out, key=lambda r: (r.start, r.run_id))


# --- planning and recording --------------------------------------------------------------------------


def _unique(units: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(units))


def plan_nightly(units: Sequence[str], done: set[str], state: Mapping[str, UnitRecord],
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry_quarantined: bool = False) -> NightlyPlan:
    """Which units to run. ``done``: units whose output is complete (the job's resume markers); a unit the state
    records as done counts as done too. A unit quarantined, or whose attempts reached ``max_attempts``, is
    skipped and reported unless ``retry_quarantined``. Pure: no I/O."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    to_run: list[str] = []
    skipped: list[str] = []
    quarantined: list[str] = []
    for unit in _unique(units):
        rec = state.get(unit)
        if unit in done or (rec is not None and rec.status is UnitStatus.DONE):
            skipped.append(unit)
        elif rec is not None and (rec.quarantined or rec.attempts >= max_attempts):
            (to_run if retry_quarantined else quarantined).append(unit)
        else:
            to_run.append(unit)
    return NightlyPlan(to_run=to_run, skipped=skipped, quarantined=quarantined)


@dataclass
class _Claim:
    lease: Lease
    previous: UnitRecord  # to roll the attempt back if process raises


def _now_iso() -> str:
    return leases.iso(time.time())


def claim_units(state: NightlyState, units: Sequence[str], done: set[str], *, owner: Owner, keeper: LeaseKeeper,
                max_attempts: int, retry_quarantined: bool, limit: int | None,
                exclude: set[str]) -> tuple[dict[str, _Claim], NightlyPlan, list[str]]:
    """Under the state lease: plan, take up to ``limit`` claim leases (in unit order), count the attempts.
    Returns (claims, plan, units claimed by other live runs)."""
    claims: dict[str, _Claim] = {}
    elsewhere: list[str] = []
    with state.locked(owner):
        records, version = state.load_units()
        plan = plan_nightly(units, done, records, max_attempts, retry_quarantined)
        for unit in plan.to_run:
            if limit is not None and len(claims) >= limit:
                break
            if unit in exclude:
                continue
            try:
                lease = leases.try_acquire(state.claim_uri(unit), ttl=state.claim_ttl, owner=owner,
                                           options=state.options)
            except LeaseHeld:
                elsewhere.append(unit)
                continue
            keeper.add(lease)
            rec = records.get(unit, UnitRecord())
            claims[unit] = _Claim(lease=lease, previous=dataclasses.replace(rec))
            if rec.quarantined or rec.attempts >= max_attempts:  # only reachable with retry_quarantined
                rec = dataclasses.replace(rec, attempts=0, quarantined=False)
            if rec.status is UnitStatus.RUNNING and rec.last_run != owner.run_id:
                rec.last_error = f"run {rec.last_run} ended without recording an outcome (killed?)"
            rec.attempts += 1
            rec.status = UnitStatus.RUNNING
            rec.last_run = owner.run_id
            rec.last_time = _now_iso()
            records[unit] = rec
        if claims:
            state.save_units(records, version)
    return claims, plan, elsewhere


def record_outcomes(state: NightlyState, run_id: str, outcomes: Sequence[UnitOutcome], *,
                    max_attempts: int = DEFAULT_MAX_ATTEMPTS, owner: Owner | None = None) -> list[str]:
    """Record outcomes under the state lease: done resets the attempts; a failure keeps its reason and is retried
    by later runs until its attempts reach ``max_attempts``, then it is quarantined. Returns the units this call
    quarantined."""
    if not outcomes:
        return []
    newly: list[str] = []
    with state.locked(owner or Owner.current(run_id)):
        records, version = state.load_units()
        for o in outcomes:
            rec = records.get(o.unit, UnitRecord(attempts=1))
            rec.last_run, rec.last_time = run_id, _now_iso()
            if o.ok:
                rec.status, rec.attempts, rec.last_error, rec.quarantined = UnitStatus.DONE, 0, "", False
            else:
                rec.status, rec.last_error = UnitStatus.FAILED, o.error or "failed (no reason given)"
                if rec.attempts >= max_attempts and not rec.quarantined:
                    rec.quarantined = True
                    newly.append(o.unit)
            records[o.unit] = rec
        state.save_units(records, version)
    return newly


def _roll_back(state: NightlyState, owner: Owner, claims: Mapping[str, _Claim]) -> None:
    """``process`` raised: the units it did not report get their attempt back (infrastructure, not the unit)."""
    if not claims:
        return
    with state.locked(owner):
        records, version = state.load_units()
        for unit, claim in claims.items():
            if records.get(unit, UnitRecord()).last_run == owner.run_id:
                records[unit] = claim.previous
        state.save_units(records, version)


# --- a run -------------------------------------------------------------------------------------------

Process = Callable[[list[str]], Iterable[UnitOutcome]]


def run_nightly(state: NightlyState, units: Sequence[str], done: set[str], process: Process, *,
                max_attempts: int = DEFAULT_MAX_ATTEMPTS, retry_quarantined: bool = False, config_hash: str = "",
                run_id: str | None = None, claim_batch: int | None = 64, flush_s: float = 30.0) -> RunRecord:
    """One nightly run: claim units in waves of ``claim_batch`` (None: all at once), call ``process(wave)``,
    record the outcomes it yields (flushed to the state every ``flush_s`` and at the end of each wave), until no
    unit is left to claim. Returns the completed run record (also stored under ``runs/``).

    ``process`` yields one :class:`UnitOutcome` per unit it was given, in any order, as units finish; a unit it
    does not report counts as failed ("no outcome reported"). A bad unit is an outcome with ``ok=False``; an
    exception from ``process`` means broken infrastructure and ends the run with status ``error``.

    Raises only when the run cannot even write its record (STATE_URI unreachable, no permission): exit code 2,
    nothing recorded. Every later failure (the state lease still held by another run after ``state.lock_wait_s``,
    storage errors mid-run, ``process`` raising) ends the run with status ``error`` (exit code 2) and a record
    that says why; its claims are released on the way out. A ``KeyboardInterrupt`` (Ctrl-C, SIGTERM) ends the run
    with status ``stopped`` (see the module docstring) and is raised again once the record is written."""
    owner = Owner.current(run_id)
    record = RunRecord(run_id=owner.run_id, host=owner.host, pid=owner.pid, start=time.time(),
                       config_hash=config_hash)
    run_version = state.write_run(record, None)
    keeper = LeaseKeeper(on_lost=lambda lease: log.warning("claim lost: %s", lease.uri))
    samples: Counter[str] = Counter()
    attempted: set[str] = set()
    elsewhere: set[str] = set()  # units held by other live runs when we found nothing left to claim
    quarantined: list[str] = []
    first_plan: NightlyPlan | None = None
    stop: KeyboardInterrupt | None = None
    try:
        while True:
            stopping.check()  # no new wave once a stop was asked for, even if its first exception was lost
            claims, plan, busy = claim_units(state, units, done, owner=owner, keeper=keeper,
                                             max_attempts=max_attempts, retry_quarantined=retry_quarantined,
                                             limit=claim_batch, exclude=attempted)
            first_plan = first_plan or plan
            elsewhere = set(busy)  # the last pass is the one that counts: earlier busy units may be done since
            if not claims:
                break
            attempted.update(claims)
            wave = _Wave(state, owner, keeper, claims, record, samples, max_attempts)
            try:
                wave.consume(process(list(claims)), flush_s)
            except KeyboardInterrupt as e:  # a stop: keep what finished; the rest is no failure of theirs
                stop = e
                wave.flush()
                _roll_back(state, owner, wave.pending)  # before the claims go: nobody takes them with the count
                quarantined.extend(wave.quarantined)
                if wave.pending:
                    record.error = f"{len(wave.pending)} unit(s) cut short, given their attempt back"
                break
            except Exception as e:
                log.exception("nightly run %s: process raised; rolling back unreported attempts", owner.run_id)
                wave.flush()  # what was reported is kept; what was not gets its attempt back
                _roll_back(state, owner, wave.pending)
                quarantined.extend(wave.quarantined)
                record.status, record.error = RunStatus.ERROR, f"{type(e).__name__}: {e}"
                break
            wave.finish()
            quarantined.extend(wave.quarantined)
    except KeyboardInterrupt as e:  # stopped while claiming or recording: nothing claimed is cut short
        stop = e
    except Exception as e:  # the state itself broke mid-run (storage, the state lease): stop, say so
        log.exception("nightly run %s: bookkeeping failed; stopping", owner.run_id)
        record.status, record.error = RunStatus.ERROR, f"{type(e).__name__}: {e}"
    finally:
        keeper.close(release=True)  # also on a stop: other runs need not wait for the claims to expire
    if first_plan is not None:
        record.skipped = len(first_plan.skipped)
        quarantined = list(dict.fromkeys([*first_plan.quarantined, *quarantined]))
    record.quarantined = quarantined
    record.claimed_elsewhere = [u for u in _unique(units) if u in elsewhere and u not in attempted]
    record.samples = dict(samples)
    record.end = time.time()
    if stop is not None:
        name = stopping.signal_name(getattr(stop, "signum", signal.SIGINT))
        record.status, record.error = RunStatus.STOPPED, "; ".join(filter(None, (f"stopped by {name}", record.error)))
        try:
            state.write_run(record, run_version)
        except Exception:  # noqa: BLE001 - the stop goes on; the record stays "running", as a dead run's does
            log.warning("nightly run %s: could not complete its record", owner.run_id, exc_info=True)
        raise stop
    if record.status is not RunStatus.ERROR:
        record.status = RunStatus.FAILED if (record.failed or record.quarantined) else RunStatus.OK
    state.write_run(record, run_version)
    return record


class _Wave:
    """The outcomes of one wave of claimed units: buffered, recorded under the state lease, claims freed."""

    def __init__(self, state: NightlyState, owner: Owner, keeper: LeaseKeeper, claims: dict[str, _Claim],
                 record: RunRecord, samples: Counter[str], max_attempts: int) -> None:
        self.state, self.owner, self.keeper, self.claims = state, owner, keeper, claims
        self.record, self.samples, self.max_attempts = record, samples, max_attempts
        self.pending = dict(claims)  # claimed, outcome not recorded yet
        self.buffer: list[UnitOutcome] = []
        self.quarantined: list[str] = []

    def consume(self, outcomes: Iterable[UnitOutcome], flush_s: float) -> None:
        last_flush = time.monotonic()
        for o in outcomes:
            if o.unit not in self.pending or any(b.unit == o.unit for b in self.buffer):
                log.warning("process reported unit %r, which this wave did not claim or already reported", o.unit)
                continue
            if self.claims[o.unit].lease.lost:
                log.warning("the claim on %s was lost while it ran; recording its outcome anyway", o.unit)
            self.add(o)
            if time.monotonic() - last_flush >= flush_s:
                self.flush()
                last_flush = time.monotonic()

    def add(self, o: UnitOutcome) -> None:
        self.buffer.append(o)
        _add_to_record(self.record, o, self.samples)

    def flush(self) -> None:
        self.quarantined.extend(record_outcomes(self.state, self.owner.run_id, self.buffer,
                                                max_attempts=self.max_attempts, owner=self.owner))
        for o in self.buffer:
            self.pending.pop(o.unit, None)
            if o.ok:  # recorded as done: nobody will claim it again, so free the claim now
                self.keeper.release(self.claims[o.unit].lease)
        self.buffer.clear()

    def finish(self) -> None:
        """Units ``process`` never reported count as failed; record everything."""
        reported = {o.unit for o in self.buffer}
        for unit in [u for u in self.pending if u not in reported]:
            self.add(UnitOutcome(unit=unit, ok=False, error="no outcome reported by the job"))
        self.flush()


def _add_to_record(record: RunRecord, o: UnitOutcome, samples: Counter[str]) -> None:
    if o.ok:
        record.done.append(o.unit)
    else:
        record.failed[o.unit] = o.error or "failed (no reason given)"
    samples.update(o.samples)
    record.faces += o.faces


# --- reporting ---------------------------------------------------------------------------------------


def exit_code(record: RunRecord) -> int:
    """0 all done; 1 some units failed or are quarantined; 2 the run could not start or finish."""
    return {RunStatus.OK: 0, RunStatus.FAILED: 1}.get(record.status, 2)


def _names(units: Sequence[str], n: int = 3) -> str:
    more = f" (+{len(units) - n} more)" if len(units) > n else ""
    return ", ".join(units[:n]) + more


def summary_line(record: RunRecord, state_uri: str = "") -> str:
    """One line for cron/CI logs, e.g.
    ``dr2 nightly FAILED run 3fa2c1 on node-1: 12 done, 1 failed, 0 quarantined, 40 already done, ...``."""
    parts = [f"dr2 nightly {record.status.upper()} run {record.run_id} on {record.host}: "
             f"{len(record.done)} done, {len(record.failed)} failed, {len(record.quarantined)} quarantined, "
             f"{record.skipped} already done, {len(record.claimed_elsewhere)} running elsewhere; "
             f"{record.faces} faces in {record.seconds:.0f} s ({record.faces_per_s:.2f} faces/s)"]
    if record.failed:
        parts.append(f"failed: {_names(list(record.failed))} (first: {next(iter(record.failed.values()))})")
    if record.quarantined:
        parts.append(f"quarantined: {_names(record.quarantined)}")
    if record.error:
        parts.append(f"error: {record.error}")
    parts.append(f"exit {exit_code(record)}")
    if state_uri:
        parts.append(f"state {state_uri}")
    return "; ".join(parts)


def format_history(state: NightlyState, last: int = 10) -> str:
    """The last ``last`` runs as a table, oldest first."""
    runs = state.runs()[-last:] if last > 0 else []
    head = ("start (UTC)", "run", "host", "status", "done", "failed", "quar", "skipped", "elsewhere", "faces",
            "faces/s", "seconds", "config")
    rows = [head] + [
        (leases.iso(r.start), r.run_id, r.host, str(r.status), str(len(r.done)), str(len(r.failed)),
         str(len(r.quarantined)), str(r.skipped), str(len(r.claimed_elsewhere)), str(r.faces),
         f"{r.faces_per_s:.2f}", f"{r.seconds:.0f}" if r.end is not None else "-", r.config_hash[:12])
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not runs:
        lines.append(f"(no runs recorded under {state.uri})")
    return "\n".join(lines)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]
