"""The pool rule and the capacity model (pipeline/graph/capacity.py): pure functions, numbers worked by hand."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph.capacity import (
    ClusterShape,
    StageCosts,
    StagePool,
    cpus_needed,
    plan_pools,
    plan_write_tasks,
    predict,
    recommend,
)


def cfg(**kw: object) -> PipelineConfig:
    return PipelineConfig(src="a", dst="b", **kw)  # type: ignore[arg-type]


def test_cpu_only_cluster_one_restorer_and_detectors_from_the_cores_left() -> None:
    # this machine: a CPU restorer takes one of the two cores, 0.75 of the other rounds to one detector
    assert plan_pools(cfg(), ClusterShape(cpus=2)).detect == StagePool(1, 1, 0.5, 0.0)
    pools = plan_pools(cfg(), ClusterShape(cpus=16))
    assert pools.restore == StagePool(1, 1, 0.5, 0.0)
    assert (pools.detect.min_actors, pools.detect.max_actors, pools.detect.gpus) == (1, 11, 0.0)  # 0.75 * 15 = 11.25
    # CPU actors work a whole core each, whatever they reserve: the write tasks get the other 4 (memory.plan_memory)
    assert pools.actor_cores() == 12.0 and plan_write_tasks(16, pools.actor_cores()) == 4
    assert plan_pools(cfg(), ClusterShape(cpus=2)).actor_cores() == 2.0


def test_a_restorer_that_computes_nothing_leaves_its_core_to_the_detectors() -> None:
    # passthrough on two cores: the restorer does no work, 0.75 * 2 = 1.5 rounds to 2 detectors at most
    for kind in (RestorerKind.PASSTHROUGH, RestorerKind.SIMULATE):
        assert plan_pools(cfg(restorer=kind), ClusterShape(cpus=2)).detect == StagePool(1, 2, 0.5, 0.0)
    assert plan_pools(cfg(restorer=RestorerKind.TINY), ClusterShape(cpus=2)).detect == StagePool(1, 1, 0.5, 0.0)
    # ... and to the write tasks: on 16 cores, 0.75 * 16 = 12 detectors, the other 4 cores write
    pools = plan_pools(cfg(restorer=RestorerKind.PASSTHROUGH), ClusterShape(cpus=16))
    assert (pools.detect.max_actors, pools.restore.cores, plan_write_tasks(16, pools.actor_cores())) == (12, 0.0, 4)
    # restorers on GPUs, detection on the CPUs: the restorers' hosts hold 2 x 0.5 CPU, 0.75 * 7 = 5.25: 5
    pools = plan_pools(cfg(gpus_per_detector=0.0), ClusterShape(cpus=8, gpus=2))
    assert pools.detect == StagePool(1, 5, 0.5, 0.0)
    # the write tasks take the cores the actors leave, half a core counting as one: 8 - 5 - 1 = 2
    assert plan_write_tasks(8, pools.actor_cores()) == 2 and plan_write_tasks(2, 2.5) == 1


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
    # with the cores the model asks for, the restorer is the bottleneck and busy. 34 images/s need 14 detectors
    # (x 0.41 s), which the rule gives from 17.9 CPUs (ceil(0.75 * (cpus - 0.5))), but all the CPU work of an image
    # (0.505 s) on 85% of the cores needs 34 x 0.505 / 0.85 = 20.2 CPUs: the CPU side as a whole limits first (the
    # write tasks, floor(20.2 - 15.5 + 0.5) = 5 of them beside 15 detectors, manage 55 images/s)
    need = cpus_needed(cfg(gpus_per_detector=0.0), COSTS, gpus=1, target=1.0)
    assert need == pytest.approx(34 * 0.505 / 0.85, abs=0.01)
    for cpus, bottleneck in ((need, "restore"), (need - 0.02, "cpu")):
        at = ClusterShape(cpus=cpus, gpus=1)
        assert predict(COSTS, plan_pools(cfg(gpus_per_detector=0.0), at), at).bottleneck == bottleneck
    # 90% of the restorers' capacity: 30.6 images/s, 30.6 x 0.505 / 0.85 = 18.2 CPUs (14 detectors there)
    assert cpus_needed(cfg(gpus_per_detector=0.0), COSTS, gpus=1) == pytest.approx(0.9 * 34 * 0.505 / 0.85, abs=0.01)
    # 40 fixed detectors count 40 cores: the write tasks need the cores past them (34 / 11.1 per task: 4 tasks, from
    # 3.5 cores left: 40 + 0.5 + 3.5)
    assert cpus_needed(cfg(gpus_per_detector=0.0, detect_actors=40), COSTS, gpus=1, target=1.0) == pytest.approx(
        44.0, abs=0.01)
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
