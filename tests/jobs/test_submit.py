"""``dr2 submit`` against a real Ray head that this module starts (``ray start --head``) and stops.

The head gets its own short temp dir, its own free ports (outside Ray's worker range 10002-19999) and its own
token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), so it neither sees nor disturbs anyone else's Ray on this machine.
It is stopped by terminating exactly the processes that mention its temp dir or its GCS address, never with
``ray stop`` (which kills every Ray process on the machine). Every ``dr2 submit`` runs as a subprocess with the
head's token in its environment, as a person's shell would.

The job submitted is a real ``dr2 restore --restorer passthrough`` on one small shard of the test archive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs import submit
from jobs.parser import build_parser
from tests.jobs.archive import build_archive

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420  # a cold Ray worker, MTCNN on 2 busy cores


def _free_port() -> int:
    """An ephemeral port (32768+ on Linux): outside Ray's worker range and its +10000 twins do not matter here."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not 10002 <= port <= 19999:
            return port


@dataclass
class Head:
    address: str
    gcs: str
    temp: Path
    env: dict[str, str]


def _our_pids(temp: Path, gcs: str) -> list[int]:
    """Processes of this head: their command line or environment mentions its temp dir or its GCS address."""
    marks = [str(temp).encode(), gcs.encode()]
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            blob = (entry / "cmdline").read_bytes() + b"\0" + (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if any(m in blob for m in marks):
            pids.append(int(entry.name))
    return pids


def _stop_head(temp: Path, gcs: str) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in _our_pids(temp, gcs):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _our_pids(temp, gcs) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _our_pids(temp, gcs):
            return


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Head]:
    temp = Path(tempfile.mkdtemp(prefix="rsub", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    gcs_port, dash_port = _free_port(), _free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex + uuid.uuid4().hex,
               RAY_USAGE_STATS_ENABLED="0", RAY_worker_niceness="0", PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
               PYTHONPATH=str(REPO))
    cmd = [str(VENV_BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp}", "--num-cpus=2",
           "--num-gpus=0", f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
           f"--object-manager-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
           f"--runtime-env-agent-port={_free_port()}", f"--object-store-memory={400 * 2**20}",
           "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        head = Head(address=f"http://127.0.0.1:{dash_port}", gcs=gcs, temp=temp, env=env)
        deadline = time.monotonic() + 120
        while "no Ray dashboard" in dr2_submit(head, "--status", "dr2-none").stderr:
            assert time.monotonic() < deadline, "the dashboard never came up"
            time.sleep(2)
        yield head
    finally:
        _stop_head(temp, gcs)
        left = _our_pids(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived: {left}"


def dr2_submit(head: Head, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", head.address, *args],
                          cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)


def list_jobs(head: Head) -> list[dict[str, str]]:
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(json.dumps([{'id': j.submission_id, 'status': str(j.status)} for j in C(sys.argv[1]).list_jobs()]))")
    out = subprocess.run([sys.executable, "-c", code, head.address], env=head.env, capture_output=True, text=True,
                         timeout=120, check=True)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


# --- without a cluster --------------------------------------------------------------------------------


def test_submission_id_is_deterministic_and_normalized() -> None:
    a = submit.submission_id(["restore", "s3://b/in/", "s3://b/out/", "--N=4"])
    assert a == submit.submission_id(["restore", "s3://b/in/", "s3://b/out/", "--N", "4"])
    assert a.startswith("dr2-") and len(a) == 4 + 16
    assert a != submit.submission_id(["restore", "s3://b/in/", "s3://b/out/", "--N", "8"])
    assert a != submit.submission_id(["restore", "s3://b/in/", "s3://b/out/", "--N", "4"], key="2026-12-02")


def test_runtime_env_ships_the_project_without_venv_and_pins_deps_but_not_ray_or_torch() -> None:
    env = submit.build_runtime_env(REPO, deps="pip", env_vars={"AWS_ENDPOINT_URL": "http://s3.local"})
    assert env["working_dir"] == str(REPO)
    assert {".venv/", ".git/", "demo/", "out/"} <= set(env["excludes"])
    packages = env["pip"]["packages"]
    names = [p.split("=")[0].split("[")[0].lower() for p in packages]
    assert "ray" not in names and "torch" not in names
    assert "webdataset==1.0.2" in packages and all("==" in p for p in packages)
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://s3.local"}
    assert "pip" not in submit.build_runtime_env(REPO, deps="installed")
    from ray.runtime_env import RuntimeEnv

    assert RuntimeEnv(**env)["pip"]["packages"] == packages  # Ray's own validation of the runtime_env
    assert submit.entrypoint(["restore", "a b", "c"]) == "python -m jobs.cli restore 'a b' c"


@pytest.mark.slow  # two `dr2 submit` CLI subprocesses
def test_unreachable_address_and_bad_job_lines_say_what_to_do() -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", f"http://127.0.0.1:{port}", "--",
                          "restore", "in", "out", "--preset", "mild"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert f"no Ray dashboard at http://127.0.0.1:{port}" in run.stderr and "ray start --head" in run.stderr
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--", "demo"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "give the job after `--`" in bad.stderr


# --- against a real head ------------------------------------------------------------------------------


@pytest.mark.slow
def test_submit_follow_attach_status_logs_stop(ray_head: Head, tmp_path: Path) -> None:
    build_archive(tmp_path / "archive")
    src, dst = str(tmp_path / "archive" / "shard-001.tar"), str(tmp_path / "restored")
    job = ["restore", src, dst, "--restorer", "passthrough", "--cpus-per-actor", "0.5", "--preset", "mild"]
    sid = submit.submission_id(job)

    first = dr2_submit(ray_head, "--deps", "installed", "--follow", "--", *job, timeout=JOB_TIMEOUT_S)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"submitted {sid}" in first.stdout and f"job {sid} SUCCEEDED" in first.stdout
    assert f"output: {dst}" in first.stdout  # the job's own last line, streamed by --follow
    assert (Path(dst) / "shard-001.tar").is_file()

    again = dr2_submit(ray_head, "--deps", "installed", "--", *job)
    assert again.returncode == 0, again.stderr
    assert f"job {sid} already exists (SUCCEEDED): attached" in again.stdout
    assert [j["id"] for j in list_jobs(ray_head)].count(sid) == 1

    status = dr2_submit(ray_head, "--status", sid)
    assert status.returncode == 0 and f"{sid}: SUCCEEDED" in status.stdout
    logs = dr2_submit(ray_head, "--logs", sid)
    assert logs.returncode == 0 and f"output: {dst}" in logs.stdout

    # a second job line (another key): submitted, then stopped before it can finish
    other = dr2_submit(ray_head, "--deps", "installed", "--key", "stop-me", "--", *job)
    assert other.returncode == 0, other.stderr
    other_id = submit.submission_id(job, key="stop-me")
    assert other_id != sid and f"submitted {other_id}" in other.stdout
    stop = dr2_submit(ray_head, "--stop", other_id)
    assert stop.returncode == 0 and other_id in stop.stdout, stop.stderr
    followed = dr2_submit(ray_head, "--logs", other_id, "--follow", timeout=JOB_TIMEOUT_S)
    assert followed.returncode == 1, followed.stdout + followed.stderr
    assert f"{other_id}: STOPPED" in dr2_submit(ray_head, "--status", other_id).stdout
    assert dr2_submit(ray_head, "--status", "dr2-0000000000000000").returncode == 2


def test_stop_wait_covers_the_job_lines_grace_period() -> None:
    assert submit.stop_wait_s(["restore", "a", "b"], build_parser()) == 30 + submit.STOP_MARGIN_S
    assert submit.stop_wait_s(["restore", "a", "b", "--stop-grace", "7.5"], build_parser()) == 8 + submit.STOP_MARGIN_S


@pytest.mark.slow
def test_stop_gives_the_job_a_clean_stop(ray_head: Head, tmp_path: Path) -> None:
    """``dr2 submit --stop`` of a job whose restore actor never answers: Ray's job manager sends the entrypoint SIGTERM,
    which stops it as Ctrl-C would (one line in the job's log, no stack dump, its DST lease released) before the
    SIGKILL that follows RAY_JOB_STOP_WAIT_TIME_S (3 s by default in Ray 2.60; dr2 submit sets grace + margin)."""
    build_archive(tmp_path / "archive")
    src, dst, fp = str(tmp_path / "archive" / "shard-001.tar"), tmp_path / "restored", tmp_path / "fp"
    fp.mkdir()
    job = ["restore", src, str(dst), "--restorer", "passthrough", "--cpus-per-actor", "0.5", "--stop-grace", "20"]
    sub = dr2_submit(ray_head, "--deps", "installed", "--key", "clean-stop", "--env",
                     "DR2_FAILPOINTS=restore.batch=hang@1", "--env", f"DR2_FAILPOINTS_DIR={fp}", "--", *job)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    sid = submit.submission_id(job, key="clean-stop")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (fp / "restore.batch.hung").exists():
        assert time.monotonic() < deadline, dr2_submit(ray_head, "--logs", sid).stdout[-3000:]
        time.sleep(0.2)
    stop = dr2_submit(ray_head, "--stop", sid)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    followed = dr2_submit(ray_head, "--logs", sid, "--follow", timeout=JOB_TIMEOUT_S)
    assert followed.returncode == 1, followed.stdout + followed.stderr  # STOPPED
    logs = dr2_submit(ray_head, "--logs", sid).stdout
    assert "dr2 restore: interrupted by SIGTERM: 0 of 1 unit(s) committed" in logs, logs[-3000:]
    assert "SIGTERM received" not in logs and "PC: @" not in logs, logs[-3000:]
    assert not (dst / "_dr2" / "lease.json").exists(), "the job's DST lease was not released"
