"""pipeline: everything that moves records. Reading shards, decoding images, face detection,
alignment and paste-back, the Ray stages that wrap ``dr2``, writing shards, per-shard stats and resume.

Depends on ``dr2``; never imported by it.

The Python API (:mod:`pipeline.api`) is re-exported here under stable names::

    from pipeline import PipelineConfig, Restorer, restore_dataset, run

They are loaded on first use (PEP 562), so that importing any ``pipeline`` module stays as cheap as the module itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import RestoredFace, RestoredImage, Restorer, resolve_config, restore_dataset, run
    from pipeline.config import PRESETS, PipelineConfig, RestorerKind
    from pipeline.schema import Status

_EXPORTS = {
    "Restorer": "pipeline.api", "RestoredImage": "pipeline.api", "RestoredFace": "pipeline.api",
    "restore_dataset": "pipeline.api", "run": "pipeline.api", "resolve_config": "pipeline.api",
    "PipelineConfig": "pipeline.config", "RestorerKind": "pipeline.config", "PRESETS": "pipeline.config",
    "Status": "pipeline.schema",
}
__all__ = ["PRESETS", "PipelineConfig", "RestoredFace", "RestoredImage", "Restorer", "RestorerKind", "Status",
           "resolve_config", "restore_dataset", "run"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
