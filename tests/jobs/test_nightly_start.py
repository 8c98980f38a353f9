"""``dr2 nightly`` before any work (pipeline/runner/nightly.py), without Ray: how a unit is known to the state (its name
and its input's identity), and a run that cannot start raises before it writes anything to the state. The nightly job
end to end runs in tests/jobs/test_nightly.py (slow: it starts Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.units import Unit, UnitKind
from pipeline.runner import nightly_state as ns
from pipeline.runner.nightly import run_nightly_job, state_key


def test_a_unit_is_known_by_its_name_and_input() -> None:
    shard = Unit(name="train/0001.tar", kind=UnitKind.SHARD, source="s3://b/train/0001.tar", input="2048:etag1")
    assert state_key(shard) == "train/0001.tar@2048:etag1"
    changed = Unit(name="train/0001.tar", kind=UnitKind.SHARD, source="s3://b/train/0001.tar", input="4096:etag2")
    assert state_key(changed) != state_key(shard)  # a changed shard is a new unit to the state
    assert state_key(Unit(name="chunk-000003", kind=UnitKind.IMAGES, source="/photos")) == "chunk-000003"


def test_a_source_without_inputs_stops_the_run_before_the_state_is_touched(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    cfg = PipelineConfig(src=str(tmp_path / "src"), dst=str(tmp_path / "dst"), restorer=RestorerKind.PASSTHROUGH)
    state_uri = str(tmp_path / "state")
    with pytest.raises(FileNotFoundError, match="no .tar shards, no .parquet files and no images"):
        run_nightly_job(cfg, state_uri)
    assert ns.NightlyState(state_uri).runs() == [] and not (tmp_path / "state").exists()
