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

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import webdataset as wds

from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, degrade, grace_hopper

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHARDS = tuple(f"shard-{s:03d}.tar" for s in range(6))
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
            for i in range(min(s, 3)):  # shard-000 has no face at all: it is committed first, long before the others
                sink.write({"__key__": f"s{s}_face{i}", "jpg": encode(faces[(s + i) % len(faces)], quality=90),
                            "json": json.dumps({"shard": s, "i": i}).encode()})
    return str(root / f"shard-{{000..{len(SHARDS) - 1:03d}}}.tar")


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

    def start(self, name: str, src: str, dst: Path, *extra: str, failpoints: str = "") -> subprocess.Popen[bytes]:
        """Start a run; ``failpoints`` arms pipeline/failpoints.py in all its processes, counted in ``name``'s
        own folder (:meth:`failpoint_dir`)."""
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process below
        env = dict(self.env)
        if failpoints:
            self.failpoint_dir(name).mkdir()
            env.update({"DR2_FAILPOINTS": failpoints, "DR2_FAILPOINTS_DIR": str(self.failpoint_dir(name))})
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "restore", src, str(dst), *COMMON, *extra],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.started.append(proc)
        return proc

    def failpoint_dir(self, name: str) -> Path:
        return self.log_dir / f"{name}.failpoints"

    def output(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, src: str, dst: Path, *extra: str, timeout: float, failpoints: str = "") -> str:
        proc = self.start(name, src, dst, *extra, failpoints=failpoints)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            kill_run(proc, str(self.ray_tmp))  # a finished run leaves nothing either; this proves it
        assert code == 0, f"{name} exited {code}:\n{self.output(name)[-3000:]}"
        return self.output(name)

    def cleanup(self) -> None:
        for proc in self.started:
            kill_run(proc, str(self.ray_tmp))


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    # Ray's unix socket paths must stay short (about 107 bytes): a short temp dir, not pytest's tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="dr2ri-"))
    r = Runner(ray_tmp, tmp_path_factory.mktemp("runs"))
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


# --------------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def clean(archive: str, runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: the bytes every other run must end with."""
    dst = tmp_path_factory.mktemp("clean") / "out"
    assert units_line(runner.run("clean", archive, dst, *FAST_BATCHES, timeout=STARTUP_TIMEOUT_S)) == (
        len(SHARDS), 0, len(SHARDS))
    return dst


SITES = ("detect.batch", "restore.batch", "write.block",
         "commit.begin", "commit.mid_output", "commit.after_output", "commit.after_marker")


def schedule(seed: int) -> list[str]:
    """Where the SIGKILLs after the first one land, then the Ctrl-C: four failpoints, two of them inside a commit, in
    random order; the Ctrl-C at a stage (at a held commit it would wait for that commit, as it should, forever)."""
    rng = random.Random(seed)
    commits = [s for s in SITES if s.startswith("commit.")]
    stages = [s for s in SITES if s not in commits]
    in_commit = rng.sample(commits, 2)
    kills = in_commit + rng.sample([s for s in SITES if s not in in_commit], 2)
    rng.shuffle(kills)
    return kills + [rng.choice(stages)]


def wait_for(what: str, found: Callable[[], bool], proc: subprocess.Popen[bytes], runner: Runner, name: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not found():
        if proc.poll() is not None:
            pytest.fail(f"{name} ended (code {proc.returncode}) before {what}:\n{runner.output(name)[-3000:]}")
        if time.monotonic() > deadline:
            kill_run(proc, str(runner.ray_tmp))
            pytest.fail(f"{name}: no {what} within {STARTUP_TIMEOUT_S} s:\n{runner.output(name)[-3000:]}")
        time.sleep(0.02)


def check_committed(dst: Path, seen: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]]) -> None:
    """Every marker's output is whole (its size and sha256), and what an earlier run committed is untouched."""
    for marker in sorted(dst.glob("*.stats.json")):
        shard = dst / marker.name.replace(".stats.json", ".tar")
        stats = json.loads(marker.read_text())
        data = shard.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (stats["bytes"], stats["sha256"]), shard.name
        prints = (fingerprint(shard), fingerprint(marker))
        assert seen.setdefault(shard.name, prints) == prints, f"{shard.name} was rewritten after its commit"


def test_six_interruptions_then_resume_match_a_clean_run(archive: str, clean: Path, runner: Runner,
                                                          tmp_path: Path) -> None:
    """SIGKILL of the whole run right after its first commit, then at four random failpoints (two inside a commit:
    parts listed, output half written, output in place without its marker, marker without its parts deleted),
    then Ctrl-C at a fifth; each rerun resumes. The last rerun loses its restore actor once on the way. The
    result is byte-identical to the clean run, and nothing is ever rewritten once committed."""
    seed = int(os.environ.get("DR2_TEST_SEED", "7"))
    points = schedule(seed)
    dst = tmp_path / "out"
    seen: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {}
    where = [f"seed {seed}"]

    # 1. the first commit is seen by the test, which kills the process group with everything in it
    proc = runner.start("run0", archive, dst, *SLOW_BATCHES)
    wait_for("a first commit", lambda: any(dst.glob("*.stats.json")), proc, runner, "run0")
    kill_run(proc, str(runner.ray_tmp))
    assert proc.returncode == -signal.SIGKILL
    check_committed(dst, seen)
    assert 0 < len(seen) < len(SHARDS), f"the kill should land between commits: {sorted(seen)}"

    # 2-5. SIGKILL while one of the run's processes is held at a failpoint
    for n, point in enumerate(points[:4], start=1):
        name = f"run{n}"
        where.append(f"{name}: {point}")
        proc = runner.start(name, archive, dst, *SLOW_BATCHES, failpoints=f"{point}=hang@1")
        wait_for(f"failpoint {point}", (runner.failpoint_dir(name) / f"{point}.hung").exists, proc, runner, name)
        kill_run(proc, str(runner.ray_tmp))
        check_committed(dst, seen)
        assert not list(dst.glob("*.stats.json.tmp*")), where

    # 6. Ctrl-C (SIGINT to the driver) at the last point: exit 130 with the resume hint, and no process left
    name = "run5"
    where.append(f"{name}: Ctrl-C at {points[4]}")
    proc = runner.start(name, archive, dst, *SLOW_BATCHES, failpoints=f"{points[4]}=hang@1")
    wait_for(f"failpoint {points[4]}", (runner.failpoint_dir(name) / f"{points[4]}.hung").exists, proc, runner, name)
    os.kill(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        kill_run(proc, str(runner.ray_tmp))
    out = runner.output(name)
    assert code == 130, f"{where}: Ctrl-C gave {code}:\n{out[-3000:]}"
    assert "interrupted" in out and "rerun the same command" in out, out[-3000:]
    check_committed(dst, seen)

    # 7. the rerun finishes (its restore actor dies once on the way and Ray brings it back)
    done = len(seen)
    out = runner.run("last", archive, dst, *FAST_BATCHES, timeout=STARTUP_TIMEOUT_S, failpoints="restore.batch=exit@1")
    assert units_line(out) == (len(SHARDS), done, len(SHARDS) - done), where
    assert (runner.failpoint_dir("last") / "restore.batch.1").exists(), "the restore actor was never killed"
    check_committed(dst, seen)
    assert sorted(p.name for p in dst.glob("*.tar")) == sorted(p.name for p in clean.glob("*.tar")) == list(SHARDS)
    for s in SHARDS:
        assert (dst / s).read_bytes() == (clean / s).read_bytes(), (s, where)
        stats, ref = (json.loads((d / s.replace(".tar", ".stats.json")).read_text()) for d in (dst, clean))
        assert (stats["samples"], stats["statuses"], stats["config_hash"]) == (
            ref["samples"], ref["statuses"], ref["config_hash"]), s
    assert not list(dst.glob("_dr2_staging/**/*.part")) and not list(dst.rglob("*.tmp*")), where


def test_a_restore_actor_that_dies_on_its_third_batch_is_survived(archive: str, clean: Path, runner: Runner,
                                                                  tmp_path: Path) -> None:
    """The restore actor's process exits in the middle of the run (its third block): Ray restarts it, the block is
    redone on the new actor and the run ends as the clean one did, byte for byte."""
    dst = tmp_path / "out"
    out = runner.run("third", archive, dst, *FAST_BATCHES, timeout=STARTUP_TIMEOUT_S, failpoints="restore.batch=exit@3")
    assert units_line(out) == (len(SHARDS), 0, len(SHARDS)), out[-3000:]
    arrivals = sorted(p.name for p in runner.failpoint_dir("third").glob("restore.batch.*"))
    assert "restore.batch.3" in arrivals and "restore.batch.4" in arrivals, arrivals  # it died there and went on
    for s in SHARDS:
        assert (dst / s).read_bytes() == (clean / s).read_bytes(), s
    assert not list(dst.glob("_dr2_staging/**/*.part")), "staged parts left behind"


def test_an_actor_that_always_dies_is_one_line_naming_its_block(archive: str, runner: Runner, tmp_path: Path) -> None:
    proc = runner.start("always", archive, tmp_path / "out", *FAST_BATCHES, failpoints="restore.batch=exit")
    try:
        code = proc.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        kill_run(proc, str(runner.ray_tmp))
    out = runner.output("always")
    errors = [line for line in out.splitlines() if line.startswith("dr2 restore: error:")]
    assert code == 2 and len(errors) == 1, out[-3000:]
    m = re.search(r"the restore stage's actor died (\d) time\(s\), (\d) of them on the block of shard-\d{3}\.tar "
                  r"rows \d+-\d+", errors[0])
    assert m and int(m.group(1)) >= 3 and 1 <= int(m.group(2)) <= int(m.group(1)), errors[0]  # 1 + 2 restarts
    assert "Traceback" not in out, out[-3000:]
    assert not list((tmp_path / "out").glob("*.stats.json"))  # every block goes through the restorer
