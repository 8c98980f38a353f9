"""``dr2 estimate``: it lists, samples and measures for real, and its answer follows the cluster shape it is given.

Its accuracy against real runs is a benchmark (benchmarks/bench_estimate.py), not a test: wall times on a shared
2-core machine are not something a test should assert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.estimate import estimate, sample_units
from pipeline.config import PipelineConfig, RestorerKind
from tests.jobs.archive import build_archive, encode
from tests.pipeline.photos import astronaut


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    build_archive(root)
    return root


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main(["estimate", *argv, "--json"]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out


def test_estimate_prints_the_plan_as_json(archive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    e = run_json(capsys, str(archive / "shard-{000..002}.tar"), "--restorer", "passthrough")
    for key in ("images", "faces", "bottleneck", "predicted_wall_s", "recommended", "capacity_images_per_s",
                "stage_ms_per_image", "gpu_hours", "busy"):
        assert key in e, key
    assert e["units"] == 3
    # 12 rows in the archive; shards are counted from the sample's images per byte: the right order of size
    assert 6 <= int(e["images"]) <= 20, e["images"]  # type: ignore[call-overload]
    assert int(e["faces"]) >= 2 and e["bottleneck"] in ("detect", "write", "cpu", "restore")  # type: ignore[call-overload]
    stages = e["stage_ms_per_image"]
    assert isinstance(stages, dict) and stages["detect"] > 0 and stages["decode"] > 0
    rec = e["recommended"]
    assert isinstance(rec, dict) and rec["detect"]["max_actors"] >= 1 and "--detect-actors" in rec["flags"]


def test_a_folder_of_images_is_counted_exactly_and_text_is_readable(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(5):
        (src / f"p{i}.jpg").write_bytes(encode(astronaut(), quality=85))
    assert main(["estimate", str(src), "--restorer", "passthrough", "--sample-images", "3"]) == 0
    text = capsys.readouterr().out
    assert "images                    5" in text and "bottleneck" in text and "predicted wall time" in text
    e = run_json(capsys, str(src), "--restorer", "passthrough", "--sample-images", "3")
    assert e["images"] == 5 and e["faces"] == 5 and e["sampled"]["images"] == 3  # type: ignore[index]


def test_the_answer_follows_the_cluster_shape(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(4):
        (src / f"p{i}.jpg").write_bytes(encode(astronaut(), quality=85))
    # four one-face photos, restored in batches of four (no padding in the FLOP model); CPU detection
    cfg = PipelineConfig(src=str(src), dst="", restorer=RestorerKind.DR2, N=8, tau=35, restore_batch_size=4,
                         gpus_per_detector=0.0, detect_actors=64)
    from pipeline.graph.capacity import ClusterShape

    # sixteen H100s and two cores: the CPU side cannot feed them
    few = estimate(cfg, cluster=ClusterShape(cpus=2, gpus=16), gpu_type="H100", sample_images=4)
    assert few["bottleneck"] in ("cpu", "write", "detect") and few["busy"]["restore"] < 0.5  # type: ignore[index]
    assert few["restore"]["seconds_per_face"] == pytest.approx(  # type: ignore[index]
        (26 * 387.9 + 1447.1) / (989.4 * 1e3 * 0.35), rel=1e-3)
    # one GPU and more than the cores the model asks for it (the same measured costs): the GPU is the bottleneck,
    # whichever CPU stage the load of the moment made the slowest (the 64 detectors count 64 cores and the write tasks
    # get those past them: under load, write was the bottleneck at the CPUs a closed form over CPU time had named)
    need = float(estimate(cfg, cluster=ClusterShape(cpus=2, gpus=1), gpu_type="H100",  # type: ignore[arg-type]
                          sampled=few["measured"])["cpus_for_restore_busy_0_9"])
    at = estimate(cfg, cluster=ClusterShape(cpus=need, gpus=1), gpu_type="H100", sampled=few["measured"])
    assert at["images_per_s"] >= 0.9 * at["capacity_images_per_s"]["restore"] * 0.999, at  # type: ignore[index,operator]
    # with cores to spare past the 64 detectors' (the write tasks get what they leave): the GPU is the bottleneck
    one = estimate(cfg, cluster=ClusterShape(cpus=2 * max(need, 80.0), gpus=1), gpu_type="H100",
                   sampled=few["measured"])
    # busy: the work share of the restorer's time (Ray's per-call time is not busy)
    assert one["bottleneck"] == "restore" and one["busy"]["restore"] > 0.8  # type: ignore[index]
    assert one["gpu_hours"] > 0 and one["gpu_hours_restoring"] > 0  # type: ignore[operator]
    with pytest.raises(ValueError, match="unknown GPU"):
        estimate(cfg, cluster=ClusterShape(cpus=4, gpus=1), gpu_type="Z9000")


def test_restore_calls_follow_the_stages_slicing_and_padding() -> None:
    from jobs.estimate import padded, restore_calls

    cfg = PipelineConfig(src="a", dst="b", restore_batch_size=8, detect_batch_size=8, rows_per_block=256)
    # two faces per image: every detect batch of 8 images holds 16 faces = faces_block -> one full call each
    calls = restore_calls(cfg, [2], images_per_unit=32, units=1)
    assert calls == [16, 16, 16, 16] and padded(calls, 8) == 64
    # one face per image, 20 images a unit: 16, then the unit's last 4 faces padded to 8
    calls = restore_calls(cfg, [1], images_per_unit=20, units=1)
    assert calls == [16, 4] and padded(calls, 8) == 24


def test_units_are_sampled_by_seed() -> None:
    from pipeline.formats.units import Unit, UnitKind

    units = [Unit(name=f"u{i}", kind=UnitKind.SHARD, source=f"s{i}") for i in range(20)]
    a, b = sample_units(units, 3, seed=1), sample_units(units, 3, seed=1)
    assert a == b and len(a) == 3 and a != sample_units(units, 3, seed=2)


def test_a_simulated_restorer_takes_no_cpu_core_however_its_rate_is_given() -> None:
    from jobs.estimate import Sampled, restore_cost
    from pipeline.graph.capacity import ClusterShape

    cpu_only = ClusterShape(cpus=8, gpus=0)
    sim = PipelineConfig(src="a", dst="b", restorer=RestorerKind.SIMULATE, simulate_faces_per_s=4.0,
                         restore_batch_size=1)
    for given in (None, 5.0):  # its own rate, or --restorer-faces-per-s
        per_face, _, on_cpu = restore_cost(sim, Sampled(), cpu_only, gpu_type="H100", mfu=0.35, faces_per_s=given,
                                           slices=[1, 1])
        assert not on_cpu and per_face == pytest.approx(1 / (given or 4.0))
    # a CPU restorer's measured time does take a core
    tiny = PipelineConfig(src="a", dst="b", restorer=RestorerKind.TINY, restore_batch_size=1)
    sampled = Sampled(images=2, faces=2, restore_measured=True, call_faces=[1, 1])
    sampled.seconds["restore"] = 3.0
    per_face, _, on_cpu = restore_cost(tiny, sampled, cpu_only, gpu_type="H100", mfu=0.35, faces_per_s=None,
                                       slices=[1, 1])
    assert on_cpu and per_face == pytest.approx(1.5)
