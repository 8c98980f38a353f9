"""The nightly job's bookkeeping, driven by a small real job that "processes" units by writing files.

State lives on a local folder and on the real S3 server; nothing is mocked. Every processing of a unit leaves
its own file (created with O_EXCL), so a unit processed twice, by any run or process, shows up as two files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.runner.nightly_state import (
    NightlyState,
    RunRecord,
    RunStatus,
    UnitOutcome,
    UnitRecord,
    UnitStatus,
    exit_code,
    format_history,
    plan_nightly,
    run_nightly,
    summary_line,
)
from pipeline.store import leases

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def state_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "state")
    bucket: str = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/nightly/state"


class FileJob:
    """Processes a unit by writing ``out/<unit>.txt`` and a per-processing marker ``seen/<unit>.<id>``."""

    def __init__(self, out: Path, *, bad: set[str] | None = None, delay_s: float = 0.0) -> None:
        self.out = out
        self.bad = set(bad or ())
        self.delay_s = delay_s
        (out / "seen").mkdir(parents=True, exist_ok=True)

    def __call__(self, units: list[str]) -> Iterator[UnitOutcome]:
        for unit in units:
            fd = os.open(self.out / "seen" / f"{unit}.{uuid.uuid4().hex}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            time.sleep(self.delay_s)
            if unit in self.bad:
                yield UnitOutcome(unit=unit, ok=False, error=f"{unit}: corrupt tar header at byte 512")
                continue
            (self.out / f"{unit}.txt").write_text(f"restored {unit}\n")
            yield UnitOutcome(unit=unit, ok=True, samples={"ok": 3, "no_face": 1}, faces=4)

    def times_processed(self, unit: str) -> int:
        return len(list((self.out / "seen").glob(f"{unit}.*")))


def test_plan_nightly_is_pure_and_follows_the_attempt_policy() -> None:
    records = {
        "done-in-state": UnitRecord(status=UnitStatus.DONE),
        "failed-once": UnitRecord(attempts=1, status=UnitStatus.FAILED, last_error="x"),
        "worn-out": UnitRecord(attempts=3, status=UnitStatus.FAILED),
        "quarantined": UnitRecord(attempts=1, status=UnitStatus.FAILED, quarantined=True),
    }
    units = ["new", "done-on-disk", "done-in-state", "failed-once", "worn-out", "quarantined", "new"]
    plan = plan_nightly(units, {"done-on-disk"}, records, max_attempts=3)
    assert plan.to_run == ["new", "failed-once"]
    assert plan.skipped == ["done-on-disk", "done-in-state"]
    assert plan.quarantined == ["worn-out", "quarantined"]
    again = plan_nightly(units, {"done-on-disk"}, records, max_attempts=3, retry_quarantined=True)
    assert again.to_run == ["new", "failed-once", "worn-out", "quarantined"] and again.quarantined == []
    with pytest.raises(ValueError):
        plan_nightly(units, set(), records, max_attempts=0)


def test_failed_unit_is_retried_then_quarantined_then_put_back(state_uri: str, tmp_path: Path) -> None:
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=30)
    job = FileJob(tmp_path / "out", bad={"u1"})
    units = ["u0", "u1", "u2"]

    r1 = run_nightly(state, units, set(), job, max_attempts=2, config_hash="cfg-a", flush_s=0)
    assert r1.done == ["u0", "u2"] and list(r1.failed) == ["u1"] and r1.quarantined == []
    assert "corrupt tar header" in r1.failed["u1"] and exit_code(r1) == 1 and r1.status is RunStatus.FAILED
    rec = state.units()["u1"]
    assert (rec.attempts, rec.status, rec.quarantined) == (1, UnitStatus.FAILED, False)
    assert "corrupt tar header" in rec.last_error and rec.last_run == r1.run_id
    assert r1.faces == 8 and r1.samples == {"ok": 6, "no_face": 2}

    r2 = run_nightly(state, units, set(), job, max_attempts=2, flush_s=0)
    assert r2.done == [] and r2.skipped == 2 and list(r2.failed) == ["u1"] and r2.quarantined == ["u1"]
    assert state.units()["u1"].quarantined and state.units()["u1"].attempts == 2

    r3 = run_nightly(state, units, set(), job, max_attempts=2, flush_s=0)
    assert r3.done == [] and r3.failed == {} and r3.quarantined == ["u1"] and exit_code(r3) == 1
    assert job.times_processed("u1") == 2  # a quarantined unit is not run again
    line = summary_line(r3, state_uri)
    assert line.startswith("dr2 nightly FAILED") and "1 quarantined" in line and "quarantined: u1" in line
    assert "exit 1" in line and "\n" not in line

    job.bad.clear()  # someone fixed the input
    r4 = run_nightly(state, units, set(), job, max_attempts=2, retry_quarantined=True, flush_s=0)
    assert r4.done == ["u1"] and exit_code(r4) == 0 and r4.status is RunStatus.OK
    rec = state.units()["u1"]
    assert (rec.attempts, rec.status, rec.quarantined, rec.last_error) == (0, UnitStatus.DONE, False, "")
    assert [job.times_processed(u) for u in units] == [1, 3, 1]

    history = format_history(state, last=3)
    lines = history.splitlines()
    assert len(lines) == 4 and lines[0].split()[:4] == ["start", "(UTC)", "run", "host"]
    assert r1.run_id not in history and all(r.run_id in history for r in (r2, r3, r4))
    assert [r.run_id for r in state.runs()] == [r1.run_id, r2.run_id, r3.run_id, r4.run_id]


def test_units_done_on_disk_are_skipped_and_infrastructure_errors_roll_back(state_uri: str, tmp_path: Path) -> None:
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=30)

    def broken(units: list[str]) -> Iterator[UnitOutcome]:
        yield UnitOutcome(unit=units[0], ok=True)
        raise ConnectionError("S3 endpoint went away")

    r = run_nightly(state, ["a", "b", "c", "d"], {"a"}, broken, flush_s=0)
    assert r.status is RunStatus.ERROR and exit_code(r) == 2 and "S3 endpoint went away" in r.error
    assert r.skipped == 1 and r.done == ["b"]
    recs = state.units()
    assert recs["b"].status is UnitStatus.DONE
    assert all(recs.get(u, UnitRecord()).attempts == 0 for u in ("c", "d"))  # not the units' fault
    job = FileJob(tmp_path / "out")
    r2 = run_nightly(state, ["a", "b", "c", "d"], {"a"}, job, flush_s=0)
    assert r2.done == ["c", "d"] and r2.skipped == 2 and exit_code(r2) == 0


def test_a_stopped_run_keeps_what_finished_gives_the_rest_their_attempt_back_and_frees_its_claims(
        state_uri: str, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM (a KeyboardInterrupt, pipeline/runner/stopping.py) after one unit of a wave: the run records
    that unit done and ends "stopped", the units cut short keep their attempt count (stopped every night, a unit is
    never quarantined for it), no claim is left, and the KeyboardInterrupt goes on up. The next run does the rest."""
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=900)  # a claim left behind would block for 15 min
    units = ["a", "b", "c"]

    def stopped_after_one(claimed: list[str]) -> Iterator[UnitOutcome]:
        yield UnitOutcome(unit=claimed[0], ok=True, faces=2)
        raise KeyboardInterrupt

    for night in range(3):  # more nights than max_attempts
        with pytest.raises(KeyboardInterrupt):
            run_nightly(state, units, set(), stopped_after_one, max_attempts=2, flush_s=0)
        record = state.runs()[-1]
        assert record.status is RunStatus.STOPPED and record.end is not None, record
        assert record.done == [units[night]] and record.failed == {} and record.quarantined == []
        left = len(units) - night - 1
        assert record.error == "stopped by Ctrl-C" + (f"; {left} unit(s) cut short, given their attempt back"
                                                      if left else ""), record.error
        recs = state.units()
        assert all(recs.get(u, UnitRecord()).attempts == 0 and not recs.get(u, UnitRecord()).quarantined
                   for u in units), recs
        assert all(recs[u].status is UnitStatus.DONE for u in units[: night + 1])
        assert leases.list_names(f"{state_uri}/claims") == [], "claims left behind"
        assert "stopped" in format_history(state).splitlines()[-1]
    job = FileJob(tmp_path / "out")
    r = run_nightly(state, units, set(), job, flush_s=0)
    assert r.status is RunStatus.OK and r.done == [] and r.skipped == 3


def test_two_concurrent_runs_split_the_units_and_never_process_one_twice(state_uri: str, tmp_path: Path) -> None:
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=30)
    job = FileJob(tmp_path / "out", delay_s=0.15)
    units = [f"shard-{i:03d}" for i in range(12)]
    results: list[RunRecord] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def one_run() -> None:
        try:
            start.wait()
            results.append(run_nightly(state, units, set(), job, claim_batch=2, flush_s=0))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [job.times_processed(u) for u in units] == [1] * 12
    a, b = results
    assert sorted(a.done + b.done) == units and not set(a.done) & set(b.done)
    # (whether both runs got units depends on thread timing on a loaded machine: not asserted)
    assert exit_code(a) == exit_code(b) == 0
    history = format_history(state)
    assert a.run_id in history and b.run_id in history
    assert all(r.status is UnitStatus.DONE for r in state.units().values())


# Long enough that the dead run's claims are surely still live when the first run after it looks, however loaded
# the machine (a 2 s ttl expired before that look now and then); the test then waits out the recorded expiry.
CLAIM_TTL_S = 8.0

_KILLED_RUN = """
import sys, time
from pathlib import Path
from pipeline.runner.nightly_state import NightlyState, UnitOutcome, run_nightly

state_uri, out, CLAIM_TTL_S = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])

def hang_on_second(units):
    (out / units[0]).write_text("done")
    yield UnitOutcome(unit=units[0], ok=True)
    (out / "ready").write_text("claimed and working")
    time.sleep(120)  # killed here

run_nightly(NightlyState(state_uri, lease_ttl=10, claim_ttl=CLAIM_TTL_S), ["k0", "k1", "k2"], set(), hang_on_second,
            run_id="killedrun", claim_batch=None, flush_s=0)
"""


@pytest.mark.slow  # a child Python run, killed, and its claims waited out
def test_claims_of_a_killed_run_are_taken_over_after_expiry(state_uri: str, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, state_uri, str(out), str(CLAIM_TTL_S)], cwd=REPO,
                             env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / "ready").exists():
            assert child.poll() is None, "the child run ended early"
            assert time.monotonic() < deadline, "the child run never got to work"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=30)
    job = FileJob(tmp_path / "out")

    early = run_nightly(state, ["k0", "k1", "k2"], set(), job, flush_s=0)  # the dead run's claims are still live
    assert early.done == [] and early.skipped == 1 and early.claimed_elsewhere == ["k1", "k2"]
    assert exit_code(early) == 0
    rec = state.units()["k1"]
    assert (rec.status, rec.attempts, rec.last_run) == (UnitStatus.RUNNING, 1, "killedrun")

    claims = [leases.read_lease(state.claim_uri(u)) for u in ("k1", "k2")]
    assert all(c is not None and c.owner.run_id == "killedrun" for c in claims), claims
    expiry = max(c.expires for c in claims if c is not None)
    while time.time() <= expiry:  # wait out the dead run's claims: until their recorded expiry has passed
        time.sleep(max(0.0, min(0.2, expiry - time.time() + 0.01)))
    late = run_nightly(state, ["k0", "k1", "k2"], set(), job, flush_s=0)
    assert late.done == ["k1", "k2"] and late.claimed_elsewhere == [] and exit_code(late) == 0
    assert [job.times_processed(u) for u in ("k0", "k1", "k2")] == [0, 1, 1]  # k0 was done by the killed run
    runs = {r.run_id: r for r in state.runs()}
    assert runs["killedrun"].status is RunStatus.RUNNING and runs["killedrun"].end is None  # it never finished
    assert "running" in format_history(state)


def test_a_run_that_cannot_get_the_state_lease_ends_with_error_and_says_who_holds_it(state_uri: str,
                                                                                      tmp_path: Path) -> None:
    state = NightlyState(state_uri, lease_ttl=10, claim_ttl=30, lock_wait_s=0.3)
    blocker = leases.try_acquire(state.lease_uri, ttl=60, owner=leases.Owner(host="cronhost", pid=42, run_id="other"))
    try:
        r = run_nightly(state, ["a"], set(), FileJob(tmp_path / "out"))
    finally:
        blocker.release()
    assert r.status is RunStatus.ERROR and exit_code(r) == 2
    assert "LeaseHeld" in r.error and "other" in r.error and "cronhost" in r.error
    assert state.runs()[-1].run_id == r.run_id and state.runs()[-1].status is RunStatus.ERROR


def test_a_run_that_cannot_write_its_record_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state folder should be")
    with pytest.raises(OSError):  # could not start: nothing recorded, the CLI exits 2
        run_nightly(NightlyState(str(blocked)), ["a"], set(), FileJob(tmp_path / "out"))
