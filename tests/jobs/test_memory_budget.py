"""A run's memory budget changes how blocks are cut, never an output byte (issue 19): the same archive through a local
Ray under a tiny budget (blocks of one photo's pixels, one write task) and under the default budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph import memory
from pipeline.runner.loop import run_restore
from tests.jobs.archive import build_archive

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]


def test_a_tiny_budget_gives_the_same_bytes_as_a_large_one(tmp_path: Path) -> None:
    src = tmp_path / "in"
    build_archive(src)
    base = {"src": str(src / "shard-{000..002}.tar"), "restorer": RestorerKind.TINY, "N": 4, "tau": 2,
            "restore_batch_size": 4}
    large = run_restore(PipelineConfig(dst=str(tmp_path / "large"), **base))  # type: ignore[arg-type]
    tiny = run_restore(PipelineConfig(dst=str(tmp_path / "tiny"), memory_budget_mb=64, block_megapixels=0.3,
                                      **base))  # type: ignore[arg-type]
    assert large.units_done == tiny.units_done == 3
    assert tiny.memory["block_pixels"] == 300_000 and tiny.memory["budget_bytes"] == 64 * memory.MiB
    assert large.memory["block_pixels"] > 100 * tiny.memory["block_pixels"]
    for shard in ("shard-000.tar", "shard-001.tar", "shard-002.tar"):
        assert (tmp_path / "tiny" / shard).read_bytes() == (tmp_path / "large" / shard).read_bytes(), shard
    report = json.loads((tmp_path / "tiny" / "_dr2" / "report" / "report.json").read_text())
    assert report["memory"]["block_pixels"] == 300_000


def test_the_re_blocking_runs_inside_the_read_task_and_takes_no_cpu_of_its_own() -> None:
    """The re-blocking after the reader fuses into the read task at TASK_CPUS (build._repartition_in_the_task): as a
    task of its own it took Ray's default of one CPU, which a 2-CPU node whose actors hold half a CPU each and whose
    reader holds a quarter could not give, and a 200-photo run stood still. Checked on the optimised plan (an
    upgrade of Ray that stops the fusion fails here) and by the blocks it makes."""
    import warnings

    import ray
    from ray.data._internal.logical.optimizers import get_execution_plan

    from pipeline.graph import build
    from pipeline.graph.capacity import TASK_CPUS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # max_retries through ray_remote_args, as build does
        read = ray.data.from_items([{"n": 10}, {"n": 7}], override_num_blocks=2).map_batches(
            lambda b: {"i": list(range(int(b["n"][0])))}, batch_size=1, num_cpus=TASK_CPUS,
            max_retries=build.MAX_RETRIES)
    ds = build._repartition_in_the_task(read, 4)
    physical = get_execution_plan(ds._logical_plan)[0].dag
    assert physical.name.endswith("->StreamingRepartition[num_rows_per_block=4,strict=False]"), physical.name
    assert physical.name.startswith("MapBatches(")
    sizes = sorted(len(b["i"]) for b in ds.iter_batches(batch_size=None))
    assert sum(sizes) == 17 and max(sizes) <= 4
