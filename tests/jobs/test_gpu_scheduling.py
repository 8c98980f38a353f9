"""The restorer pool on GPU clusters: one actor per GPU by default, on a simulated two-node cluster with fake GPU
resources (``ray.cluster_utils.Cluster``), in a subprocess so that it does not meet the session's local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.build import restore_pool
from pipeline.config import PipelineConfig


def test_restore_pool_defaults_to_one_actor_per_gpu() -> None:
    cfg = PipelineConfig(src="a", dst="b")
    assert restore_pool(cfg, 0.0) == (1, 0.0)  # CPU-only: one CPU actor
    assert restore_pool(cfg, 4.0) == (4, 1.0)
    assert restore_pool(PipelineConfig(src="a", dst="b", gpus_per_restorer=0.5), 2.0) == (4, 0.5)
    assert restore_pool(PipelineConfig(src="a", dst="b", restore_actors=3, gpus_per_restorer=1.0), 0.0) == (3, 1.0)


SCRIPT = textwrap.dedent('''
    import json, logging, sys
    import ray
    from ray.cluster_utils import Cluster
    from jobs.restore import run_restore
    from pipeline.config import PipelineConfig, RestorerKind

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    seen = {}
    pools = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("restorer pool"):
                pools.append(record.getMessage())

    logging.getLogger("pipeline.build").addHandler(Grab())
    logging.getLogger("pipeline.build").setLevel(logging.INFO)

    def on_part(part, summary):
        seen.setdefault("restorers", len(pools))

    cfg = PipelineConfig(src=sys.argv[1], dst=sys.argv[2], restorer=RestorerKind.PASSTHROUGH, progress="quiet",
                         address=cluster.address)
    summary = run_restore(cfg, on_part=on_part)
    seen["pool"] = pools[0] if pools else ""
    seen["samples"] = summary.samples
    print("RESULT " + json.dumps(seen))
    ray.shutdown()
    cluster.shutdown()
''')


@pytest.mark.slow
def test_a_cluster_with_two_gpus_gets_two_gpu_restorers(tmp_path: Path) -> None:
    import webdataset as wds

    from tests.jobs.archive import encode, no_face_image

    src = tmp_path / "in"
    src.mkdir()
    for s in range(2):
        with wds.TarWriter(str(src / f"s{s}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"k{s}{i}", "png": encode(no_face_image(i)[:32, :32], "PNG")})
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["pool"] == "restorer pool: 2 actor(s), 1.0 GPU each" and result["samples"] == 6, result
    # the job finished: its two 1-GPU restorers were placed on the fake GPUs of the two workers (a pool that could
    # not be placed would never start)
