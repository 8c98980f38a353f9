"""A real interruption: ``dr2 restore`` is SIGKILLed, with its whole local Ray, right after its first shard
commit; a rerun must skip the committed shards without touching them, do the rest, and leave every output
shard byte-identical to an uninterrupted run's.

Every run here is the real CLI in a subprocess that starts its own local Ray, isolated from any other Ray on
the machine (the session's ``ray_local``, other users') by its own ``RAY_TMPDIR`` and no ``RAY_ADDRESS``. Each
subprocess leads its own session; Ray's processes (GCS, raylet, workers) stay in it, so killing its process
group is the interruption, and the test checks afterwards that no process of that session or of that Ray temp
dir is left (``ray stop`` would also stop the test session's Ray, so it is not used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import webdataset as wds

from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, degrade, grace_hopper

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDS = ("shard-000.tar", "shard-001.tar", "shard-002.tar", "shard-003.tar")
COMMON = ["--restorer", "tiny", "--N", "4", "--tau", "2", "--cpus-per-actor", "0.5",
          "--object-store-memory", str(300 * 2**20), "--restore-batch-size", "2"]
# Execution settings only (not in the config hash): outputs must not depend on them. The interrupted run
# moves one image at a time, so its shard commits are spread out and the kill lands between them. (The
# restorer's batch size is part of the config: the networks' batch shape sets float rounding.)
SLOW_BATCHES = ["--detect-batch-size", "1"]
FAST_BATCHES = ["--detect-batch-size", "4"]
STARTUP_TIMEOUT_S = 600.0  # per run: a cold Python + Ray + two actors takes 30-70 s on 2 cores, minutes when loaded


def build_archive(root: Path) -> str:
    """Four shards of growing size: degraded real faces, a face-less photo, extra members. Returns the braces."""
    root.mkdir(parents=True, exist_ok=True)
    faces = [degrade(astronaut(), 4, seed=1), degrade(grace_hopper(), 8, seed=2),
             degrade(astronaut(), 8, seed=3), degrade(grace_hopper(), 4, seed=4)]
    for s, name in enumerate(SHARDS):
        with wds.TarWriter(str(root / name)) as sink:
            sink.write({"__key__": f"s{s}_plain", "png": encode(no_face_image(s), "PNG"), "txt": b"no face"})
            for i in range(s):  # shard-000 has no face at all: it is committed first, long before the others
                sink.write({"__key__": f"s{s}_face{i}", "jpg": encode(faces[(s + i) % len(faces)], quality=90),
                            "json": json.dumps({"shard": s, "i": i}).encode()})
    return str(root / "shard-{000..003}.tar")


# --------------------------------------------------------------------------------------------- processes


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def leftover_processes(session: int, marker: str) -> list[int]:
    """Live processes of ``session``, or whose command line names ``marker`` (the run's Ray temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state == "Z":  # exited, waiting for its parent to reap it
            continue
        if _session_of(pid) == session or marker in _cmdline(pid):
            found.append(pid)
    return found


def kill_run(proc: subprocess.Popen[bytes], marker: str, *, timeout: float = 20.0) -> None:
    """SIGKILL the run's process group, then anything of its session or Ray temp dir still alive; wait until
    none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while left := leftover_processes(proc.pid, marker):
        if time.monotonic() > deadline:
            raise AssertionError(f"processes of the killed run survive: {[(p, _cmdline(p)[:120]) for p in left]}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


class Runner:
    """Starts ``python -m jobs.cli restore`` runs, each with its own local Ray in ``ray_tmp``."""

    def __init__(self, ray_tmp: Path, log_dir: Path) -> None:
        self.ray_tmp = ray_tmp
        self.log_dir = log_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update({"RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                         "RAY_USAGE_STATS_ENABLED": "0"})
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, src: str, dst: Path, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "restore", src, str(dst), *COMMON, *extra],
                                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append(proc)
        return proc

    def output(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, src: str, dst: Path, *extra: str, timeout: float) -> str:
        proc = self.start(name, src, dst, *extra)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            kill_run(proc, str(self.ray_tmp))  # a finished run leaves nothing either; this proves it
        assert code == 0, f"{name} exited {code}:\n{self.output(name)[-3000:]}"
        return self.output(name)

    def cleanup(self) -> None:
        for proc in self.started:
            kill_run(proc, str(self.ray_tmp))


@pytest.fixture()
def runner(tmp_path: Path) -> Iterator[Runner]:
    # Ray's unix socket paths must stay short (about 107 bytes): a short temp dir, not pytest's tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dr2ri-"))
    r = Runner(ray_tmp, tmp_path)
    try:
        yield r
    finally:
        r.cleanup()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def units_line(output: str) -> tuple[int, int, int]:
    """(total, already done, written) from the summary table the CLI prints."""
    m = re.search(r"(\d+) total, (\d+) already done, (\d+) written", output)
    assert m, output[-3000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


# --------------------------------------------------------------------------------------------- the test


def test_sigkill_after_first_commit_then_resume_matches_a_clean_run(tmp_path: Path, runner: Runner) -> None:
    src = build_archive(tmp_path / "archive")
    dst = tmp_path / "interrupted"

    # 1. start, and kill the whole process group as soon as the first shard is committed
    proc = runner.start("interrupted", src, dst, *SLOW_BATCHES)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    markers: list[Path] = []
    while not markers:
        markers = sorted(dst.glob("*.stats.json"))
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before its first commit was seen:\n"
                        f"{runner.output('interrupted')[-3000:]}")
        if time.monotonic() > deadline:
            kill_run(proc, str(runner.ray_tmp))
            pytest.fail(f"no shard committed within {STARTUP_TIMEOUT_S} s:\n{runner.output('interrupted')[-3000:]}")
        time.sleep(0.02)
    kill_run(proc, str(runner.ray_tmp))
    assert proc.returncode == -signal.SIGKILL

    committed = sorted(p.name.removesuffix(".stats.json") + ".tar" for p in dst.glob("*.stats.json"))
    assert committed and len(committed) < len(SHARDS), f"the kill should land between commits: {committed}"
    for shard in committed:
        assert (dst / shard).is_file()  # the tar is in place before its marker
    assert not [s for s in SHARDS if s not in committed and (dst / s).exists()]  # nothing half-committed
    before = {s: (fingerprint(dst / s), fingerprint(dst / s.replace(".tar", ".stats.json"))) for s in committed}

    # 2. resume: the committed shards are skipped and left alone, the others are done
    out = runner.run("resumed", src, dst, *FAST_BATCHES, timeout=STARTUP_TIMEOUT_S)
    assert units_line(out) == (len(SHARDS), len(committed), len(SHARDS) - len(committed))
    for s, prints in before.items():
        assert (fingerprint(dst / s), fingerprint(dst / s.replace(".tar", ".stats.json"))) == prints, s
    assert not list(dst.glob("_dr2_staging/**/*.part"))

    # 3. an uninterrupted run gives the same bytes for every shard
    clean = tmp_path / "clean"
    assert units_line(runner.run("clean", src, clean, *FAST_BATCHES, timeout=STARTUP_TIMEOUT_S)) == (4, 0, 4)
    assert sorted(p.name for p in dst.glob("*.tar")) == sorted(p.name for p in clean.glob("*.tar")) == list(SHARDS)
    for s in SHARDS:
        assert (dst / s).read_bytes() == (clean / s).read_bytes(), s
        stats, ref = (json.loads((d / s.replace(".tar", ".stats.json")).read_text()) for d in (dst, clean))
        assert (stats["samples"], stats["statuses"], stats["config_hash"]) == (
            ref["samples"], ref["statuses"], ref["config_hash"]), s
