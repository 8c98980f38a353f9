"""Face restorers: the one interface every stage calls to restore aligned 512x512 faces.

``FaceRestorer`` is the contract: a batch of aligned faces in, the same number of restored faces out,
uint8 RGB, (B, 512, 512, 3). ``PassthroughRestorer`` returns the faces unchanged, so a user can check
detection and alignment on their data before spending GPU time. ``DR2Restorer`` (below) runs the
official face path: 512 -> DDPM size -> DR2 -> enhancer -> 512.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

FACE_SIZE = 512  # aligned faces are always 512x512 (the FFHQ template); the models' sizes come from configs


@runtime_checkable
class FaceRestorer(Protocol):
    """Restores a batch of aligned faces.

    ``keys`` name each face stably (e.g. ``"shard-000/img_17/0"``); a restorer that draws random numbers
    seeds each face from its key, so a face's output never depends on the batch it landed in.
    """

    name: str

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int) -> np.ndarray:
        """(B, 512, 512, 3) uint8 RGB -> (B, 512, 512, 3) uint8 RGB."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the models (names, configs, weight checksums)."""
        ...


class PassthroughRestorer:
    """Returns faces unchanged: detection, alignment and paste-back without any model."""

    name = "passthrough"

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int) -> np.ndarray:
        _check_faces(faces, keys)
        return faces.copy()

    def describe(self) -> dict[str, Any]:
        return {"restorer": self.name}


def _check_faces(faces: np.ndarray, keys: Sequence[str]) -> None:
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or faces.dtype != np.uint8:
        raise ValueError(f"faces must be uint8 (B, {FACE_SIZE}, {FACE_SIZE}, 3), got {faces.dtype} {faces.shape}")
    if len(keys) != faces.shape[0]:
        raise ValueError(f"got {len(keys)} keys for {faces.shape[0]} faces")
