"""Building the models a stage holds, from the job config: the MTCNN detector and the face restorer.

Device choice lives here, not in ``dr2`` (which never picks a device): ``auto`` means CUDA when this
process can see a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` for an actor given ``num_gpus``), else CPU.
Model directories given as ``s3://`` URIs are copied to a node-local cache and checksum-verified first.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dr2.restorer import DR2Restorer, FaceRestorer, PassthroughRestorer
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.mtcnn import MTCNN, MTCNNConfig, load_mtcnn
from pipeline.storage import localize_model_dir, read_bytes

log = logging.getLogger(__name__)

WEIGHTS_HELP = (
    "DR2 needs its weights: download DR2_FFHQ.pkl and SPARNetHD_FFHQ_DR2aug.pth from the links in the official "
    "repository (Kaldwin0106/DR2_Drgradation_Remover, readme), then run `dr2 weights import DR2_FFHQ.pkl --kind ddpm "
    "--out models/ddpm` and `dr2 weights import SPARNetHD_FFHQ_DR2aug.pth --kind sparnethd --out models/sparnethd`, "
    "and pass --ddpm models/ddpm --enhancer models/sparnethd. To check detection and alignment without weights, "
    "use --restorer passthrough."
)


def model_cache_root() -> Path:
    """Where s3:// model dirs are cached on this node."""
    return Path(os.environ.get("DR2_CACHE", Path(tempfile.gettempdir()) / "dr2-cache"))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but this process sees no CUDA device")
    return torch.device(device)


def check_restorer_config(cfg: PipelineConfig) -> None:
    """Refuse to run DR2 without weights, saying how to get them."""
    if cfg.restorer is RestorerKind.DR2 and (not cfg.ddpm or not cfg.enhancer):
        missing = " and ".join(n for n, v in (("--ddpm", cfg.ddpm), ("--enhancer", cfg.enhancer)) if not v)
        raise ValueError(f"--restorer dr2 needs {missing}. {WEIGHTS_HELP}")


def build_detector(cfg: PipelineConfig, device: torch.device) -> MTCNN:
    mtcnn_cfg = MTCNNConfig(
        min_face_size=max(12, cfg.min_face_size),
        thresholds=(0.6, 0.7, cfg.detect_threshold),
        max_side=cfg.detect_max_side,
    )
    return load_mtcnn(mtcnn_cfg, device=device)


def build_restorer(cfg: PipelineConfig, device: torch.device) -> FaceRestorer:
    check_restorer_config(cfg)
    if cfg.restorer is RestorerKind.PASSTHROUGH:
        return PassthroughRestorer()
    if cfg.restorer is RestorerKind.TINY:
        return DR2Restorer.tiny_random(device=device, precision=cfg.precision, seed=cfg.seed,
                                       batch_size=cfg.restore_batch_size, omega=cfg.omega)
    cache = model_cache_root()
    ddpm = localize_model_dir(cfg.ddpm, cache)
    enhancer = None if cfg.enhancer == "none" else localize_model_dir(cfg.enhancer, cache)
    return DR2Restorer.from_dirs(ddpm, enhancer, device=device, precision=cfg.precision, seed=cfg.seed,
                                 batch_size=cfg.restore_batch_size, omega=cfg.omega)


def _sha256_of(model_dir: str) -> str:
    blob = json.loads(read_bytes(f"{model_dir.rstrip('/')}/config.json"))
    return str(blob["sha256"])


def model_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The models' identity without loading them: restorer kind and weight checksums (from config.json)."""
    check_restorer_config(cfg)
    if cfg.restorer is RestorerKind.DR2:
        return {
            "restorer": "dr2",
            "ddpm_sha256": _sha256_of(cfg.ddpm),
            "enhancer_sha256": "none" if cfg.enhancer == "none" else _sha256_of(cfg.enhancer),
        }
    return {"restorer": cfg.restorer.value}
