"""The simulated restorer: a capacity tool that stands in for a GPU's time, never for its output.

``--restorer simulate --simulate-faces-per-s R`` runs every stage of a real run except DR2: the restorer actor holds
the resources Ray gives it (a GPU on a GPU cluster, a fake one on a simulated cluster) and, for each call, sleeps
the time ``R`` faces per second would take, then returns the faces unchanged. With it the balance of a GPU node
(is the CPU side fast enough to keep the GPUs busy?) can be run and measured on CPUs alone.

Its time follows the real restorer's batching: the networks always run full batches of ``batch_size`` faces
(short batches are padded, :class:`dr2.restorer.DR2Restorer`), so a call on ``n`` faces takes
``ceil(n / batch_size) * batch_size / R`` seconds. It is NOT a restoration: every output's ``dr2.json`` carries
``"simulated"``, and the run summary and the report say so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

SIMULATED_NOTE = ("simulated restorer (a capacity tool): faces passed through unchanged after the time a restorer "
                  "at {rate:g} faces/s would take; NOT a restoration")


class SimulatedRestorer:
    """Sleeps like a restorer of ``faces_per_s`` faces per second (full batches of ``batch_size``), returns faces
    unchanged."""

    name = "simulate"

    def __init__(self, *, faces_per_s: float, batch_size: int) -> None:
        if faces_per_s <= 0 or batch_size < 1:
            raise ValueError(f"faces_per_s must be > 0 and batch_size >= 1, got {faces_per_s}, {batch_size}")
        self.faces_per_s = float(faces_per_s)
        self.batch_size = int(batch_size)

    def seconds_for(self, n_faces: int) -> float:
        """What a call on ``n_faces`` takes: full batches, padded."""
        return math.ceil(n_faces / self.batch_size) * self.batch_size / self.faces_per_s if n_faces else 0.0

    def _wait(self, n_faces: int) -> None:
        time.sleep(self.seconds_for(n_faces))

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                omega: int | None = None) -> np.ndarray:
        self._wait(len(keys))
        return faces.copy()

    def restore_stages(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                       omega: int | None = None) -> dict[str, np.ndarray]:
        self._wait(len(keys))
        return {"dr2": faces, "enhanced": faces.copy()}

    def describe(self) -> dict[str, Any]:
        return {"restorer": self.name, "faces_per_s": self.faces_per_s, "batch_size": self.batch_size,
                "note": SIMULATED_NOTE.format(rate=self.faces_per_s)}
