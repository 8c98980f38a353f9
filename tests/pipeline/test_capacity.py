"""The pool rule and the capacity model (pipeline/graph/capacity.py): pure functions, numbers worked by hand."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig
from pipeline.graph.capacity import ClusterShape, StageCosts, StagePool, cpus_needed, plan_pools, predict, recommend


def cfg(**kw: object) -> PipelineConfig:
    return PipelineConfig(src="a", dst="b", **kw)  # type: ignore[arg-type]


def test_cpu_only_cluster_one_restorer_and_detectors_from_the_cores_left() -> None:
    assert plan_pools(cfg(), ClusterShape(cpus=2)).detect == StagePool(1, 1, 0.5, 0.0)  # this machine: as before
    pools = plan_pools(cfg(), ClusterShape(cpus=16))
    assert pools.restore == StagePool(1, 1, 0.5, 0.0)
    assert (pools.detect.min_actors, pools.detect.max_actors, pools.detect.gpus) == (1, 7, 0.0)  # (16 - 1) // 2
    # CPU actors work a whole core each, whatever they reserve: the write tasks get the other 8 (memory.plan_memory)
    assert pools.actor_cores() == 8.0
    assert plan_pools(cfg(), ClusterShape(cpus=2)).actor_cores() == 2.0


def test_gpu_cluster_detects_on_the_gpus_beside_one_restorer_each() -> None:
    pools = plan_pools(cfg(), ClusterShape(cpus=32, gpus=4))
    assert pools.restore == StagePool(4, 4, 0.5, 0.8)  # one per GPU, 0.8 of it
    assert pools.detect == StagePool(4, 8, 0.5, 0.1)  # autoscaling, up to two per GPU at 0.1
    assert 4 * 0.8 + 8 * 0.1 <= 4 + 1e-9  # everything fits on the GPUs
    assert "detect 4-8 actor(s) x 0.1 GPU" in pools.describe()
    assert pools.actor_cores() == 4 * 0.5 + 8 * 0.5  # actors that feed GPUs hold what they reserve


def test_explicit_options_win() -> None:
    pools = plan_pools(cfg(gpus_per_detector=0.0), ClusterShape(cpus=32, gpus=2))
    assert pools.restore.gpus == 1.0 and pools.detect.gpus == 0.0 and pools.restore.max_actors == 2
    pools = plan_pools(cfg(gpus_per_restorer=0.5, detect_actors=3), ClusterShape(cpus=8, gpus=2))
    assert pools.restore == StagePool(4, 4, 0.5, 0.5) and pools.detect.fixed and pools.detect.max_actors == 3
    assert plan_pools(cfg(restore_actors=3, gpus_per_restorer=1.0), ClusterShape(cpus=2)).restore.max_actors == 3
    assert plan_pools(cfg(gpus_per_restorer=2.0), ClusterShape(cpus=8, gpus=4)).restore.max_actors == 2


COSTS = StageCosts(read_s=0.005, decode_s=0.02, detect_s=0.38, align_s=0.01, compose_s=0.05, write_s=0.04,
                   faces_per_image=1.0, restore_s_per_face=1 / 34)


def test_model_names_the_cpu_side_when_the_gpus_outrun_it() -> None:
    shape = ClusterShape(cpus=8, gpus=1)
    pools = plan_pools(cfg(gpus_per_detector=0.0), shape)  # CPU detection: 0.505 CPU-s per image
    pred = predict(COSTS, pools, shape)
    assert pred.bottleneck in ("cpu", "detect") and pred.restore_busy < 0.5
    # with the cores the model asks for, the restorer is the bottleneck and busy. The rule's detectors grow with the
    # CPUs, (cpus - 0.5) // 2 of them, and must reach 34 images/s x 0.41 s: 14 detectors, from 28.5 CPUs
    need = cpus_needed(cfg(gpus_per_detector=0.0), COSTS, gpus=1, target=1.0)
    assert need == pytest.approx(28.5, abs=0.01)
    for cpus, bottleneck in ((need, "restore"), (need - 0.02, "detect")):
        at = ClusterShape(cpus=cpus, gpus=1)
        assert predict(COSTS, plan_pools(cfg(gpus_per_detector=0.0), at), at).bottleneck == bottleneck
    # 90% of the restorers' capacity: 31 images/s, from 13 detectors (13 / 0.41 s = 31.7): 26.5 CPUs
    assert cpus_needed(cfg(gpus_per_detector=0.0), COSTS, gpus=1) == pytest.approx(26.5, abs=0.01)
    # 40 fixed detectors count 40 cores: the write tasks need the cores past them (34 / 11.1 per task: 4 tasks)
    assert cpus_needed(cfg(gpus_per_detector=0.0, detect_actors=40), COSTS, gpus=1, target=1.0) == pytest.approx(
        44.5, abs=0.01)
    # a fixed pool too small for the restorers: no CPU count helps; a restorer that costs nothing needs none
    assert cpus_needed(cfg(gpus_per_detector=0.0, detect_actors=2), COSTS, gpus=1) == float("inf")
    free = StageCosts(**{**COSTS.to_dict(), "restore_s_per_face": 0.0})
    assert cpus_needed(cfg(gpus_per_detector=0.0), free, gpus=1) == float("inf")
    big = ClusterShape(cpus=need * 1.01, gpus=1)
    # the detectors that keep up (34 images/s x 0.41 s: 14), and the write tasks get the 14 cores they leave
    pools_big = plan_pools(cfg(gpus_per_detector=0.0, detect_actors=14), big)
    assert predict(COSTS, pools_big, big).bottleneck == "restore"
    assert predict(COSTS, pools_big, big).restore_busy == pytest.approx(1.0)
    # 40 detectors on 29 cores leave the write tasks one core: 1 / 0.09 s = 11 images/s, and the model says so
    crowded = predict(COSTS, plan_pools(cfg(gpus_per_detector=0.0, detect_actors=40), big), big)
    assert crowded.bottleneck == "write" and crowded.images_per_s == pytest.approx(1 / 0.09)


def test_recommend_sizes_detectors_to_keep_up() -> None:
    shape = ClusterShape(cpus=64, gpus=2)
    rec = recommend(cfg(gpus_per_detector=0.0), COSTS, shape)
    # two restorers at 34 faces/s, one face per image: 68 images/s x 0.41 s per image in a detector actor
    assert rec["detect"]["max_actors"] == 28 and rec["restore"]["max_actors"] == 2
    assert "--detect-actors 28" in rec["flags"]
    assert rec["write_tasks"] == 64 - 28 - 2 * 0.5  # the cores the detectors and the restorers' hosts leave
