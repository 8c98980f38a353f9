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
