"""The simulated restorer (pipeline/graph/simulate.py): it takes the time of full, padded batches and returns the faces
unchanged, and says everywhere that it is not a restoration. Runs through a pipeline in the slow tests
(tests/jobs/test_restore.py, test_gpu_scheduling.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.graph.simulate import SimulatedRestorer


def test_time_follows_padded_batches() -> None:
    r = SimulatedRestorer(faces_per_s=8.0, batch_size=4)
    assert [r.seconds_for(n) for n in (0, 1, 4, 5, 8)] == [0.0, 0.5, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError):
        SimulatedRestorer(faces_per_s=0.0, batch_size=4)
    with pytest.raises(ValueError):
        SimulatedRestorer(faces_per_s=1.0, batch_size=0)


def test_faces_come_back_unchanged_after_their_time_and_it_says_so() -> None:
    r = SimulatedRestorer(faces_per_s=100.0, batch_size=2)
    faces = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    t0 = time.monotonic()
    out = r.restore(faces, ["a", "b", "c"], N=8, tau=35)
    assert time.monotonic() - t0 >= r.seconds_for(3) == 0.04  # at least its time; a loaded machine takes longer
    assert out is not faces and np.array_equal(out, faces)
    stages = r.restore_stages(faces[:1], ["a"], N=8, tau=35)
    assert np.array_equal(stages["dr2"], faces[:1]) and np.array_equal(stages["enhanced"], faces[:1])
    info = r.describe()
    assert info["restorer"] == "simulate" and info["faces_per_s"] == 100.0
    assert "NOT a restoration" in info["note"] and "100 faces/s" in info["note"]
