"""``dr2 nightly`` end to end on a local Ray, against local storage and the real S3 server: new shards are picked
up, changed shards redone, a shard that always fails is retried then quarantined, two runs at once split the work,
and the history tells it all."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import webdataset as wds

from jobs.cli import main
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner import nightly_state as ns
from pipeline.runner.nightly import run_nightly_job
from pipeline.store import storage
from tests.jobs.archive import encode, no_face_image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def shard_bytes(seed: int, n: int = 2) -> bytes:
    path = Path(f"/tmp/dr2-nightly-{threading.get_ident()}-{seed}.tar")
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"s{seed}_{i}", "png": encode(no_face_image(seed * 10 + i)[:32, :32], "PNG")})
    data = path.read_bytes()
    path.unlink()
    return data


def put(root: str, name: str, seed: int) -> None:
    storage.write_bytes_atomic(storage.join(root, name), shard_bytes(seed))


@pytest.fixture(params=["local", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return "s3://" + request.getfixturevalue("s3_bucket")


def cfg_for(root: str) -> PipelineConfig:
    return PipelineConfig(src=storage.join(root, "in") + "/", dst=storage.join(root, "out"),
                          restorer=RestorerKind.PASSTHROUGH, progress="quiet", wait=600)


def test_new_and_changed_shards_only(where: str) -> None:
    cfg, state = cfg_for(where), storage.join(where, "state")
    for i in range(3):
        put(cfg.src, f"a{i}.tar", i)
    r1 = run_nightly_job(cfg, state)
    assert len(r1.done) == 3 and r1.skipped == 0 and ns.exit_code(r1) == 0
    assert r1.samples == {"no_face": 6}
    for i in (3, 4):
        put(cfg.src, f"a{i}.tar", i)
    r2 = run_nightly_job(cfg, state)
    assert sorted(u.split("@")[0] for u in r2.done) == ["a3.tar", "a4.tar"] and r2.skipped == 3
    put(cfg.src, "a0.tar", 42)  # changed input: a new size/ETag/mtime
    r3 = run_nightly_job(cfg, state)
    assert [u.split("@")[0] for u in r3.done] == ["a0.tar"] and r3.skipped == 4
    out = storage.read_bytes(storage.join(cfg.dst, "a0.tar"))
    assert b"s42_0" in out and b"s0_0" not in out
    history = ns.format_history(ns.NightlyState(state))
    assert history.count("\n") == 3 and history.count(" ok ") == 3


def test_a_failing_shard_is_retried_then_quarantined(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, state = cfg_for(str(tmp_path)), str(tmp_path / "state")
    put(cfg.src, "good.tar", 1)
    put(cfg.src, "bad.tar", 2)
    (tmp_path / "out" / "bad.tar").mkdir(parents=True)  # its output can never be written: the commit fails
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--state", state, "--restorer", "passthrough",
            "--max-attempts", "2", "--progress", "quiet"]
    assert main(["nightly", *args]) == 1
    line = capsys.readouterr().out
    assert "1 done, 1 failed" in line and "bad.tar" in line and "commit failed" in line
    assert main(["nightly", *args]) == 1
    assert "quarantined: bad.tar" in capsys.readouterr().out
    r3 = run_nightly_job(cfg, state, max_attempts=2)  # quarantined: not tried again
    assert r3.failed == {} and [u.split("@")[0] for u in r3.quarantined] == ["bad.tar"] and r3.skipped == 1
    (tmp_path / "out" / "bad.tar").rmdir()
    r4 = run_nightly_job(cfg, state, max_attempts=2, retry_quarantined=True)
    assert [u.split("@")[0] for u in r4.done] == ["bad.tar"] and ns.exit_code(r4) == 0
    assert main(["nightly", "--history", state]) == 0
    assert capsys.readouterr().out.count("\n") == 5  # header + 4 runs


def test_two_runs_at_once_split_the_work(tmp_path: Path) -> None:
    cfg, state = cfg_for(str(tmp_path)), str(tmp_path / "state")
    for i in range(6):
        put(cfg.src, f"c{i}.tar", i)
    records: list[ns.RunRecord] = []

    def run() -> None:
        records.append(run_nightly_job(dataclasses.replace(cfg), state, wave=2))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [u for r in records for u in r.done]
    assert sorted(u.split("@")[0] for u in done) == [f"c{i}.tar" for i in range(6)]  # each exactly once
    assert len(ns.NightlyState(state).runs()) == 2
