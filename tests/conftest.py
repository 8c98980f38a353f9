"""Shared test configuration: where the golden fixtures live (copied from the official DR2 code's output), the real
S3 server, and the rule that puts every test that starts Ray into the ``slow`` tier.

Two tiers (README, "Tests"): ``pytest -m "not slow"`` is the developers' fast tier, ``pytest`` runs everything (CI).
``slow`` means a test starts Ray, a Ray head, Chromium or a CLI subprocess, or takes more than about 3 s on an idle
2-core machine. Tests that use a Ray fixture are marked here, by rule, so that a new end-to-end test lands in the
slow tier without anyone remembering the marker; everything else slow carries ``@pytest.mark.slow`` in its file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.s3server import S3Server

FIXTURES = Path(__file__).parent / "fixtures"
DR2_REFERENCE = FIXTURES / "dr2_reference"

# Two cores: keep torch from oversubscribing them when Ray workers run beside the test process.
torch.set_num_threads(2)

# The Ray the tests start (ray_local, simulated clusters) runs its workers at the test's priority, as dr2's own
# init_ray does: at Ray's default nice 15 they starve beside any normal-priority load, and a loaded suite crawls.
os.environ.setdefault("RAY_worker_niceness", "0")


# Fixtures that start Ray (a local Ray, a Ray head): any test that depends on one, directly or through another
# fixture, is end-to-end and belongs to the slow tier.
RAY_FIXTURES = frozenset({"ray_local", "ray_head"})


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def dr2_reference() -> Path:
    return DR2_REFERENCE


# --- S3: a real SeaweedFS server on loopback (tests/s3server.py) ---------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server for the whole session, also published through the standard AWS variables.

    Ray workers and any code that uses the default credential chain read ``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_DEFAULT_REGION``; they are set for the
    session and restored at its end. Start Ray AFTER this fixture so its workers inherit them.
    """
    from pipeline.store import storage

    server = S3Server.start()
    mp = pytest.MonkeyPatch()
    try:
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(k, raising=False)
        for k, v in server.env().items():
            mp.setenv(k, v)
        storage.reset_clients()
        yield server
    finally:
        mp.undo()
        storage.reset_clients()
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh empty bucket on the session's S3 server."""
    return s3_server.make_bucket()
