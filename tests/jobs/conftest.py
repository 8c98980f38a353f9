"""One local Ray for the job tests (starting Ray costs seconds on 2 cores), started after the S3 test server
so that its workers inherit the server's endpoint and credentials, as a real node inherits its environment."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable, Iterator

import pytest
import ray

from pipeline.procs import process_tree


@pytest.fixture(scope="session")
def ray_local(s3_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # the node-local model cache of this session's workers: never the machine's shared /tmp/dr2-cache
    cache = str(tmp_path_factory.mktemp("dr2-cache"))
    # address="local": always a fresh local Ray, even if a killed run left /tmp/ray/ray_current_cluster behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DR2_CACHE": cache}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    below = process_tree(os.getpid()) or []  # the raylet, the GCS, and the workers below the raylet
    ray.shutdown()
    _kill_left(pid for pid, _ in below)


def _kill_left(pids: Iterable[int]) -> None:
    """SIGKILL the processes of this session's Ray still alive after ``ray.shutdown()``.

    Why: a worker whose actor Ray had killed mid-session (its dataset done) can finish its core worker's shutdown and
    then never exit, blocked in a futex. One such detector actor of a CI run was still alive 16 minutes after the
    session ended, reparented to init and holding 600 MB. Only Ray's own processes (workers are named ``ray::...``)
    among those found below this process before the shutdown are killed."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if cmd.startswith(b"ray::") or b"raylet" in cmd or b"gcs_server" in cmd:
                os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            continue
