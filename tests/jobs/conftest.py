"""One local Ray for the job tests (starting Ray costs seconds on 2 cores), started after the S3 test server
so that its workers inherit the server's endpoint and credentials, as a real node inherits its environment."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local(s3_server: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # the node-local model cache of this session's workers: never the machine's shared /tmp/dr2-cache
    cache = str(tmp_path_factory.mktemp("dr2-cache"))
    # address="local": always a fresh local Ray, even if a killed run left /tmp/ray/ray_current_cluster behind
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DR2_CACHE": cache}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
