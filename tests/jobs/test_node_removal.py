"""A worker node removed mid-job on a simulated multi-node cluster (``ray.cluster_utils.Cluster``): the job must
complete with every input sample exactly once, the statuses of a clean run and the same bytes as a clean run.

The cluster runs in a subprocess (tests/jobs/node_removal_run.py) isolated like the interruption tests' runs: its
own short ``RAY_TMPDIR``, no ``RAY_*`` variables, its own session, and every process of it killed and checked gone
afterwards (the test session has its own local Ray, ``ray_local``, which the clean run uses). The script holds
work on the worker with failpoints, so the removal always hits a detector call, a write task and the restorer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner.loop import run_restore
from tests.jobs import node_removal_run
from tests.jobs.archive import build_archive
from tests.jobs.test_interrupt import REPO, Runner, kill_run

SHARDS = ("shard-000.tar", "shard-001.tar", "shard-002.tar")
# until the failpoints hold work, then until the job ends, plus a cold start of Python, Ray and two nodes
RUN_TIMEOUT_S = node_removal_run.HANG_TIMEOUT_S + node_removal_run.JOB_TIMEOUT_S + 300.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("ray_local"),
]


def read_back(tar: Path) -> list[tuple[str, str]]:
    """(key, status) of every sample of an output shard, through the webdataset library."""
    return [(s["__key__"], json.loads(s["dr2.json"])["status"])
            for s in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)]


def run_on_cluster(src: str, dst: Path, work: Path) -> dict[str, Any]:
    """The job on a two-node cluster that loses its worker; the script's last JSON line (see node_removal_run)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dr2nr-"))  # Ray's socket paths must stay short: not pytest's tmp_path
    failpoints = work / "failpoints"
    failpoints.mkdir()
    log = work / "cluster.log"
    env = Runner(ray_tmp, work).env  # no RAY_* of this session, its own RAY_TMPDIR, the repo on the path
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tests.jobs.node_removal_run", src, str(dst),
                                     str(failpoints)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_run(proc, str(ray_tmp))  # the cluster's raylets and workers too; fails if any survives
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    text = log.read_text(errors="replace")
    reached = sorted(p.name for p in failpoints.iterdir())
    lines = [line for line in text.splitlines() if line.startswith('{"worker"')]
    assert code == 0 and lines, (
        f"the cluster run {'exited ' + str(code) if code is not None else f'ran past {RUN_TIMEOUT_S:.0f} s'} "
        f"without its result line; failpoints reached: {reached}\n{text[-4000:]}")
    got: dict[str, Any] = json.loads(lines[-1])
    assert got["removed"], f"the worker was never removed: failpoints reached {reached}, wanted both .hung files"
    return got


def test_a_worker_node_removed_mid_job_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    expected = build_archive(tmp_path / "in")
    src = str(tmp_path / "in" / "shard-{000..002}.tar")
    got = run_on_cluster(src, tmp_path / "out", tmp_path)

    # the removal hit work: both stage actors lived on the removed node (the head has no CPU)
    on_worker = {a["class"] for a in got["actors_at_removal"] if a["node"] == got["worker"] and a["state"] == "ALIVE"}
    assert {"DetectActor", "RestoreActor"} <= on_worker, got["actors_at_removal"]
    assert got["job"] == "done", f"the job did not survive the node removal:\n{got['job']}"
    assert (got["units_done"], got["failed"]) == (len(SHARDS), {}), got

    clean = run_restore(PipelineConfig(src=src, dst=str(tmp_path / "clean"), restorer=RestorerKind.PASSTHROUGH,
                                       progress="quiet", report=False))
    assert (got["samples"], got["statuses"]) == (clean.samples, dict(clean.statuses))
    for name in SHARDS:
        out = tmp_path / "out" / name
        assert read_back(out) == expected[name], name  # every input sample once, in order, with its status
        assert out.read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
