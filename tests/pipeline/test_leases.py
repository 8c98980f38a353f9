"""Leases on real storage: a local folder and the real S3 server (SeaweedFS honours If-None-Match / If-Match).

Every test runs on both backends. Races are real: threads and forked processes released together by a
barrier, many rounds, and exactly one taker may win each round."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.store import leases
from pipeline.store.leases import LeaseHeld, LeaseLost, LeaseRecord, Owner


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "leases")
    bucket: str = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/leases"


def dead_owner() -> Owner:
    return Owner(host="gone-host", pid=999999, run_id="deadrun")


def plant_expired(uri: str) -> None:
    """A lease left behind by a run that died: it expired a second ago."""
    now = time.time()
    rec = LeaseRecord(owner=dead_owner(), token=uuid.uuid4().hex, acquired=now - 60, renewed=now - 30, expires=now - 1)
    assert leases.create_if_absent(uri, rec.to_bytes()) is not None


def test_acquire_then_second_acquire_is_refused_naming_the_owner(root: str) -> None:
    uri = f"{root}/a.json"
    first = leases.try_acquire(uri, ttl=60, owner=Owner(host="hostA", pid=11, run_id="run-a"))
    rec = leases.read_lease(uri)
    assert rec is not None and rec.owner == first.owner and rec.token == first.record.token
    assert rec.expires == pytest.approx(time.time() + 60, abs=5)
    with pytest.raises(LeaseHeld) as err:
        leases.try_acquire(uri, ttl=60, owner=Owner(host="hostB", pid=22, run_id="run-b"))
    msg = str(err.value)
    assert "run-a" in msg and "pid 11" in msg and "hostA" in msg and leases.iso(rec.expires) in msg
    assert err.value.record.owner.run_id == "run-a"
    # not re-entrant either: the same owner asking again is refused
    with pytest.raises(LeaseHeld):
        leases.try_acquire(uri, ttl=60, owner=first.owner)


def test_renew_moves_expiry_and_release_deletes(root: str) -> None:
    uri = f"{root}/r.json"
    lease = leases.try_acquire(uri, ttl=30)
    before = lease.expires
    time.sleep(0.05)
    lease.renew()
    stored = leases.read_lease(uri)
    assert stored is not None and stored.expires == lease.expires > before and stored.renewed > stored.acquired
    assert lease.release() is True
    assert leases.read_lease(uri) is None
    assert lease.release() is False  # idempotent
    with pytest.raises(LeaseLost):
        lease.renew()
    leases.try_acquire(uri, ttl=30).release()  # free again


def later(seconds: float) -> leases.Clock:
    """A taker's clock that reads ``seconds`` ahead of ours: how a lease looks once that much time has passed,
    without sleeping through it (a sleep races a loaded machine: a 0.3 s lease can expire before the refusal below
    is even asked for)."""
    return lambda: time.time() + seconds


def test_expired_lease_is_taken_over_and_the_old_holder_finds_out(root: str) -> None:
    uri = f"{root}/t.json"
    old = leases.try_acquire(uri, ttl=30, owner=Owner(host="h", pid=1, run_id="old"))
    with pytest.raises(LeaseHeld):
        leases.try_acquire(uri, ttl=30, clock=later(29))  # still live a second before its expiry
    new = leases.try_acquire(uri, ttl=30, owner=Owner(host="h", pid=2, run_id="new"), clock=later(31))
    stored = leases.read_lease(uri)
    assert stored is not None and stored.owner.run_id == "new"
    # the old holder cannot renew nor delete the new holder's lease
    with pytest.raises(LeaseLost):
        old.renew()
    assert old.lost
    assert old.release() is False
    stored = leases.read_lease(uri)
    assert stored is not None and stored.owner.run_id == "new"
    assert new.release() is True


def test_acquire_waits_for_a_release(root: str) -> None:
    uri = f"{root}/w.json"
    held = leases.try_acquire(uri, ttl=30)
    releasing = threading.Event()

    def release() -> None:
        releasing.set()  # before the release: once it deletes the lease, the waiter may take it at once, and under
        held.release()  # load it did so before this thread ran again (an event set after release() read unset)

    timer = threading.Timer(0.3, release)
    timer.start()
    got = leases.acquire(uri, ttl=30, wait_s=120, poll_s=0.05)  # generous: a loaded machine may be slow to release
    assert releasing.is_set()  # it waited for the release (the lease was live until then), however long that took
    timer.join()
    assert got.record.token != held.record.token
    got.release()


def test_threads_racing_for_an_expired_lease_exactly_one_wins(root: str) -> None:
    n_threads, rounds = 5, 10
    for r in range(rounds):
        uri = f"{root}/race-{r}.json"
        plant_expired(uri)
        barrier = threading.Barrier(n_threads)
        wins: list[str] = []
        refused: list[str] = []

        def take(i: int, uri: str = uri, barrier: threading.Barrier = barrier,
                 wins: list[str] = wins, refused: list[str] = refused) -> None:
            barrier.wait()
            try:
                leases.try_acquire(uri, ttl=60, owner=Owner(host="h", pid=i, run_id=f"t{i}"))
                wins.append(f"t{i}")
            except LeaseHeld as e:
                refused.append(e.record.owner.run_id)

        threads = [threading.Thread(target=take, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, (r, wins)
        assert refused == [wins[0]] * (n_threads - 1), (r, refused)  # every loser was told who won
        stored = leases.read_lease(uri)
        assert stored is not None and stored.owner.run_id == wins[0]


def _race_in_process(root: str, rounds: int, barrier: Any, results: Any, i: int) -> None:
    from pipeline.store import storage

    storage.reset_clients()  # a forked child builds its own S3 client
    for r in range(rounds):
        barrier.wait()
        try:
            leases.try_acquire(f"{root}/prace-{r}.json", ttl=60, owner=Owner.current(run_id=f"p{i}"))
            results.put((r, f"p{i}"))
        except LeaseHeld:
            results.put((r, None))


def test_processes_racing_for_expired_leases_exactly_one_wins_each_round(root: str) -> None:
    n_procs, rounds = 3, 12
    for r in range(rounds):
        plant_expired(f"{root}/prace-{r}.json")
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(n_procs)
    results = ctx.Queue()
    procs = [ctx.Process(target=_race_in_process, args=(root, rounds, barrier, results, i)) for i in range(n_procs)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in range(n_procs * rounds)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for r in range(rounds):
        winners = [w for rr, w in got if rr == r and w is not None]
        assert len(winners) == 1, (r, got)
        stored = leases.read_lease(f"{root}/prace-{r}.json")
        assert stored is not None and stored.owner.run_id == winners[0]


def test_renewer_keeps_the_lease_past_its_ttl_and_releases_on_exit(root: str) -> None:
    uri = f"{root}/keep.json"
    ttl = 2.0  # renewed every ttl/3; on a loaded machine a renewal can come late, so not much shorter than this
    with leases.hold_lease(uri, ttl=ttl) as lease:
        first_expiry = lease.expires
        # wait (for the event, not a fixed time) until a renewal written after the first expiry is stored
        deadline = time.monotonic() + 60
        while (stored := leases.read_lease(uri)) is None or stored.renewed <= first_expiry:
            assert time.monotonic() < deadline, "the lease was never renewed past its first ttl"
            time.sleep(0.05)
        assert not lease.lost
        lease.check()
        assert stored.owner == lease.owner and stored.expires == pytest.approx(stored.renewed + ttl)
        assert lease.expires >= stored.expires > first_expiry + ttl
        with pytest.raises(LeaseHeld):  # a renewal just stored has most of its ttl left: another taker is refused
            leases.try_acquire(uri, ttl=10)
    assert lease.released and leases.read_lease(uri) is None


def test_renewer_marks_the_lease_lost_when_someone_else_took_it(root: str) -> None:
    uri = f"{root}/lost.json"
    lost = threading.Event()
    with leases.hold_lease(uri, ttl=0.6, on_lost=lambda _: lost.set()) as lease:
        got = leases.read_versioned(uri)
        assert got is not None
        usurper = LeaseRecord(owner=Owner(host="x", pid=3, run_id="usurper"), token="u", acquired=time.time(),
                              renewed=time.time(), expires=time.time() + 60)
        assert leases.replace_if_match(uri, usurper.to_bytes(), got[1]) is not None
        assert lost.wait(60)  # returns as soon as the renewer finds out (within ttl/3 on an idle machine)
        assert lease.lost
        with pytest.raises(LeaseLost):
            lease.check()
    stored = leases.read_lease(uri)  # release on exit did not delete the usurper's lease
    assert stored is not None and stored.owner.run_id == "usurper"


def test_conditional_objects(root: str) -> None:
    uri = f"{root}/objs/x.json"
    v1 = leases.create_if_absent(uri, b"one")
    assert v1 is not None and leases.create_if_absent(uri, b"two") is None
    assert leases.replace_if_match(uri, b"three", "wrong-version") is None
    v2 = leases.replace_if_match(uri, b"three", v1)
    assert v2 is not None and leases.read_versioned(uri) == (b"three", v2)
    assert leases.delete_if_match(uri, v1) is False
    assert leases.list_names(f"{root}/objs") == ["x.json"]  # local lock files are hidden
    assert leases.delete_if_match(uri, v2) is True
    assert leases.read_versioned(uri) is None and leases.list_names(f"{root}/objs") == []


def test_a_file_that_is_not_a_lease_is_refused_clearly(root: str) -> None:
    uri = f"{root}/junk.json"
    assert leases.create_if_absent(uri, b"not json") is not None
    with pytest.raises(RuntimeError, match="does not hold a lease record"):
        leases.try_acquire(uri, ttl=10)
