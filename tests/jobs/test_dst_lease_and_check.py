"""One writer per DST (the lease, without Ray: it is taken before anything else) and ``dr2 check-output``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.check import check_output
from jobs.cli import main
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats import shards
from pipeline.formats import wds as codec
from pipeline.formats.units import Unit, UnitKind
from pipeline.formats.wds import Sample
from pipeline.runner.loop import LEASE_FILE, run_restore
from pipeline.store import storage
from pipeline.store.leases import LeaseHeld, Owner, try_acquire


def test_a_second_run_on_the_same_dst_stops_naming_the_holder(tmp_path: Path, capsys) -> None:
    dst = tmp_path / "out"
    holder = Owner(host="gpu-node-7", pid=4242, run_id="nightly-1")
    try_acquire(storage.join(str(dst), LEASE_FILE), ttl=300, owner=holder)
    cfg = PipelineConfig(src=str(tmp_path / "in"), dst=str(dst), restorer=RestorerKind.PASSTHROUGH)
    with pytest.raises(LeaseHeld, match="gpu-node-7"):
        run_restore(cfg)
    code = main(["restore", str(tmp_path / "in"), str(dst), "--restorer", "passthrough"])
    err = capsys.readouterr().err
    assert code == 2 and "nightly-1" in err and "gpu-node-7" in err and "--wait" in err


def test_a_dead_local_holder_is_taken_over_at_once(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited
    uri = storage.join(str(tmp_path), LEASE_FILE)
    try_acquire(uri, ttl=3600, owner=Owner(host=socket.gethostname(), pid=pid, run_id="killed"))
    with pytest.raises(LeaseHeld):
        try_acquire(uri, ttl=60)  # the clock alone says it is live
    lease = try_acquire(uri, ttl=60, take_dead=True)
    assert lease.owner.pid == os.getpid()


def _commit(dst: str, name: str, n: int) -> Unit:
    unit = Unit(name=name, kind=UnitKind.SHARD, source="")
    samples = [Sample(key=f"k{i}", members=[("txt", b"x" * i)]) for i in range(n)]
    shards.write_part(unit, dst, "h" * 64, 0, n, codec.encode_tar_part(samples))
    shards.commit(unit, dst, "h" * 64, n, {"samples": n})
    return unit


def test_check_output_finds_every_kind_of_mismatch(tmp_path: Path, capsys) -> None:
    dst = str(tmp_path / "out")
    for i in range(4):
        _commit(dst, f"s{i}.tar", 3)
    assert all(c.ok for c in check_output(dst)) and len(check_output(dst)) == 4
    assert main(["check-output", dst]) == 0
    assert "all match" in capsys.readouterr().out
    data = (tmp_path / "out" / "s1.tar").read_bytes()
    (tmp_path / "out" / "s1.tar").write_bytes(data[:-512])  # truncated after its commit
    (tmp_path / "out" / "s2.tar").write_bytes(data[:-1] + b"!")  # same size, other bytes
    (tmp_path / "out" / "s3.tar").unlink()
    marker = json.loads((tmp_path / "out" / "s0.stats.json").read_text())
    (tmp_path / "out" / "stray.tar").write_bytes(data)
    (tmp_path / "out" / "_dr2_staging" / "x").mkdir(parents=True)
    (tmp_path / "out" / "_dr2_staging" / "x" / "000000000-000000001.part").write_bytes(b"p")
    problems = {c.unit: c.problem for c in check_output(dst) if not c.ok}
    assert set(problems) == {"s1.tar", "s2.tar", "s3.tar", "stray.tar", "_dr2_staging/x/000000000-000000001.part"}
    assert "size" in problems["s1.tar"] and "sha256" in problems["s2.tar"] and "missing" in problems["s3.tar"]
    assert marker["count"] == 3
    assert main(["check-output", dst]) == 1
    assert "MISMATCH" in capsys.readouterr().out
