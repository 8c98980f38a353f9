"""The pools on GPU clusters (one restorer per GPU, detectors on the GPUs beside them) and the busy fraction the
simulated restorer reaches there, on a simulated two-node cluster with fake GPU
resources (``ray.cluster_utils.Cluster``), in a subprocess so that it does not meet the session's local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.jobs.archive import encode
from tests.pipeline.photos import astronaut, degrade, grace_hopper

SCRIPT = textwrap.dedent('''
    import json, logging, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipeline.runner.loop import run_restore
    from pipeline.config import PipelineConfig, RestorerKind

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    seen = {}
    pools = []

    class Grab(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("pools:"):
                pools.append(record.getMessage())

    logging.getLogger("pipeline.graph.build").addHandler(Grab())
    logging.getLogger("pipeline.graph.build").setLevel(logging.INFO)

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
    # the rule (pipeline/graph/capacity.py): a restorer per GPU at 0.8 of it, detectors autoscaling 1-2 per GPU at 0.1
    assert result["pool"] == "pools: detect 2-4 actor(s) x 0.1 GPU, restore 2 actor(s) x 0.8 GPU", result
    assert result["samples"] == 6, result
    # the job finished: its two 1-GPU restorers were placed on the fake GPUs of the two workers (a pool that could
    # not be placed would never start)


def face_archive(root: Path, shards: int, images: int) -> str:
    """Small photos with one face each (astronaut, Grace Hopper; degraded): cheap CPU work per face."""
    import cv2
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    photos = [cv2.resize(astronaut(), (320, 320), interpolation=cv2.INTER_AREA),
              cv2.resize(grace_hopper(), (320, 384), interpolation=cv2.INTER_AREA)]
    for s in range(shards):
        with wds.TarWriter(str(root / f"f{s}.tar")) as sink:
            for i in range(images):
                sink.write({"__key__": f"f{s}_{i}", "jpg": encode(degrade(photos[i % 2], 2, seed=i), "JPEG")})
    return str(root / "f*.tar")


def capacity_run(tmp_path: Path, *args: str) -> dict[str, object]:
    src = face_archive(tmp_path / "in", 3, 8)
    out = subprocess.run([sys.executable, "-m", "tests.jobs.capacity_run", src, str(tmp_path / "out"), *args],
                         capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    result: dict[str, object] = json.loads(lines[0][len("RESULT "):])
    return result


@pytest.mark.slow
def test_simulated_gpu_is_kept_busy_where_the_model_says_the_cpus_suffice(tmp_path: Path) -> None:
    """A simulated GPU at 4 faces/s on a cluster whose CPU side needs far fewer cores than it has: the model names
    the restorer as the bottleneck, and the run keeps it >= 90% busy from its first block to its last.

    All 24 photos make one block of rows (--rows-per-block 64), and the GPU restorer takes them as detection slices
    them, four faces a call: Ray bundles a GPU stage's blocks up to its batch size in rows before it calls, and with
    rows_per_block as that size the restorer waited for every face and took them in one call."""
    r = capacity_run(tmp_path, "--cpus", "2", "--gpus", "1", "--faces-per-s", "4", "--rows-per-block", "64")
    pred, busy = r["predicted"], r["busy"]
    assert isinstance(pred, dict) and isinstance(busy, dict), r
    assert pred["bottleneck"] == "restore" and pred["cpus_for_restore_busy_0_9"] < 2, pred
    assert r["faces"] == 24 and busy["restore"]["actors"] == 1, r
    assert busy["restore"]["steady_fraction"] >= 0.9, busy
    assert busy["restore"].get("waits", {}).get("count", 0) >= 5, busy  # six calls of four faces, not one of 24


@pytest.mark.slow
def test_a_gpu_faster_than_the_cpu_side_waits_and_the_model_names_the_cpu_stage(tmp_path: Path) -> None:
    """The same archive with a simulated GPU at 2000 faces/s and one detector: the model names a CPU stage as the
    bottleneck and the restorer's measured busy fraction is low, as predicted."""
    r = capacity_run(tmp_path, "--cpus", "2", "--gpus", "1", "--faces-per-s", "2000", "--detect-actors", "1")
    pred, busy = r["predicted"], r["busy"]
    assert isinstance(pred, dict) and isinstance(busy, dict), r
    assert pred["bottleneck"] in ("detect", "write", "cpu") and pred["busy"]["restore"] < 0.2, pred
    assert r["faces"] == 24 and busy["restore"]["fraction"] < 0.3, busy
