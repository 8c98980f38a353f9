"""Model directories: importing the official DR2 checkpoints; saving/loading ``model.safetensors`` + ``config.json``.

The official code ships two flat ``state_dict``s written with ``torch.save``: ``DR2_FFHQ.pkl`` (the DDPM UNet,
``DRDR.unet.UNetModel``) and ``SPARNetHD_FFHQ_DR2aug.pth`` (the enhancer, spectral-norm layout). They are
pickles, so :func:`import_checkpoint` reads them with ``torch.load(weights_only=True)``: a file that needs any
pickled code (a class, a function, a ``__reduce__`` payload) is refused before anything in it runs. The keys
and shapes are then checked against the architecture of the given config, and a model directory is written:

``DIR/model.safetensors``  the state dict (float32, contiguous), nothing executable
``DIR/config.json``        ``{"format_version", "kind", "config", "sha256", "source", "num_parameters",
                           "num_state_dict_entries"}``; ``config`` is the model's constructor kwargs

A directory rebuilds its model from itself alone (:func:`load_model_dir`), after checking the safetensors
file against the recorded sha256. Files here are local paths; fetching them is the caller's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dr2.sparnet import SPARNetConfig, SPARNetHD
from dr2.unet import UNetConfig, UNetModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


class ModelKind(StrEnum):
    """What a checkpoint or model directory holds."""

    DDPM = "ddpm"  # the DR2 noise predictor, dr2.unet.UNetModel
    SPARNETHD = "sparnethd"  # the enhancer, dr2.sparnet.SPARNetHD


class WeightsError(ValueError):
    """A weight file that cannot be used: unreadable, refused (needs code), mismatched or tampered with."""


ModelConfig = UNetConfig | SPARNetConfig


def default_config(kind: ModelKind) -> ModelConfig:
    """The full-size config of the official checkpoint of ``kind``."""
    return UNetConfig() if kind is ModelKind.DDPM else SPARNetConfig()


def build_model(kind: ModelKind, config: ModelConfig, *, device: torch.device | str = "cpu") -> nn.Module:
    """A fresh (randomly initialised) model of ``kind``; ``device="meta"`` builds only the structure."""
    _check_kind_config(kind, config)
    with torch.device(device):
        return UNetModel(config) if isinstance(config, UNetConfig) else SPARNetHD(config)


def _check_kind_config(kind: ModelKind, config: object) -> None:
    expected = UNetConfig if kind is ModelKind.DDPM else SPARNetConfig
    if not isinstance(config, expected):
        raise TypeError(f"kind {kind.value!r} needs a {expected.__name__}, got {type(config).__name__}")


def config_from_dict(kind: ModelKind, d: dict[str, Any]) -> ModelConfig:
    return UNetConfig.from_dict(d) if kind is ModelKind.DDPM else SPARNetConfig.from_dict(d)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat ``{key: tensor}`` saved with ``torch.save``, read without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's restricted unpickler stops at the first GLOBAL it does not allow, before calling anything.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(
            f"refused {path.name}: it needs pickled Python code to load, and only plain state dicts of tensors "
            f"are accepted (nothing in it was executed). torch said: {first_line}"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise WeightsError(f"cannot read {path} as a torch checkpoint: {e}") from e
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path.name} holds a {type(obj).__name__}, expected a flat state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(
            f"{path.name} is not a flat state dict of tensors: entries {bad[:5]} are not tensors "
            "(a wrapped checkpoint such as {'state_dict': ...} must be unwrapped first)"
        )
    return dict(obj)


def check_state_dict(expected: Mapping[str, Tensor], got: Mapping[str, Tensor], *, what: str) -> None:
    """Raise :class:`WeightsError` naming every missing key, unexpected key and shape difference."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [f"{what} does not match the architecture of its config"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", shapes)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise WeightsError("; ".join(parts))


def _model_from_state_dict(kind: ModelKind, config: ModelConfig, state: dict[str, Tensor], *, what: str) -> nn.Module:
    """Build on the meta device (no init cost) and assign the checked tensors; eval mode."""
    model = build_model(kind, config, device="meta")
    check_state_dict(model.state_dict(), state, what=what)
    # Fresh (aligned, owned) storage: tensors viewing a safetensors buffer can take other SIMD paths (~1e-7).
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # would mean a tensor outside the state dict: the model class must be fixed, not worked around
        raise RuntimeError(f"{type(model).__name__} has tensors outside its state dict: {left[:5]}")
    return model.eval()


def _float32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        out[k] = (v.float() if v.is_floating_point() else v).contiguous()
    return out


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model_dir(model: nn.Module, *, kind: ModelKind, out_dir: Path, source: str | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` for a UNetModel or SPARNetHD.

    ``source`` records where the weights came from (the imported file's name). Returns ``out_dir``.
    """
    kind = ModelKind(kind)
    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig | SPARNetConfig):
        raise TypeError(f"{type(model).__name__} has no UNetConfig/SPARNetConfig .config")
    _check_kind_config(kind, config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _float32(model.state_dict())
    weights = out_dir / MODEL_FILE
    tmp = out_dir / (MODEL_FILE + ".tmp")
    # One metadata key only: safetensors writes metadata in hash-map order, and the file's sha256 should
    # depend on the weights alone (the kind lives in config.json).
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind.value,
        "config": config.to_dict(),
        "sha256": sha256_file(weights),
        "source": source,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_state_dict_entries": len(state),
    }
    _atomic_write_bytes(out_dir / CONFIG_FILE, (json.dumps(info, indent=2) + "\n").encode())
    log.info("wrote %s model dir %s (sha256 %s)", kind.value, out_dir, info["sha256"][:12])
    return out_dir


def import_checkpoint(path: Path, *, kind: ModelKind, out_dir: Path, config: ModelConfig | None = None) -> Path:
    """Import an official flat ``torch.save`` state dict into a model directory; returns ``out_dir``.

    ``config`` defaults to the full-size architecture of ``kind`` (the official checkpoints). The file is read
    with ``weights_only=True`` (pickled code is refused, never run) and must match the architecture exactly:
    otherwise :class:`WeightsError` names the missing/unexpected keys and shape differences.
    """
    kind = ModelKind(kind)
    path = Path(path)
    config = default_config(kind) if config is None else config
    _check_kind_config(kind, config)
    state = _float32(read_torch_state_dict(path))
    model = _model_from_state_dict(kind, config, state, what=f"{path.name} ({kind.value})")
    return save_model_dir(model, kind=kind, out_dir=Path(out_dir), source=path.name)


def read_model_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory (no weights read)."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise WeightsError(f"{path} is not a model directory: {CONFIG_FILE} is missing")
    try:
        info = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_path} is not valid JSON: {e}") from e
    for key in ("kind", "config", "sha256"):
        if key not in info:
            raise WeightsError(f"{cfg_path} lacks {key!r}")
    if info.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise WeightsError(f"{cfg_path} has format_version {info['format_version']}, this code reads {FORMAT_VERSION}")
    try:
        ModelKind(info["kind"])
    except ValueError:
        raise WeightsError(
            f"{cfg_path}: unknown kind {info['kind']!r}; known: {[k.value for k in ModelKind]}"
        ) from None
    return info


def load_model_dir(path: Path, *, expected_kind: ModelKind | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a directory written by :func:`save_model_dir`; CPU, float32, eval mode.

    Verifies the safetensors file against the sha256 in ``config.json`` before reading it, and the kind
    against ``expected_kind``. Returns ``(model, config.json dict)``.
    """
    path = Path(path)
    info = read_model_config(path)
    kind = ModelKind(info["kind"])
    if expected_kind is not None and kind is not ModelKind(expected_kind):
        raise WeightsError(f"{path} holds a {kind.value!r} model, expected {ModelKind(expected_kind).value!r}")
    weights = path / MODEL_FILE
    if not weights.is_file():
        raise WeightsError(f"{path} is not a model directory: {MODEL_FILE} is missing")
    digest = sha256_file(weights)
    if digest != info["sha256"]:
        raise WeightsError(
            f"{weights} has sha256 {digest}, but {CONFIG_FILE} records {info['sha256']}: the file was changed "
            "or only partly copied"
        )
    config = config_from_dict(kind, info["config"])
    model = _model_from_state_dict(kind, config, load_file(str(weights)), what=str(weights))
    return model, info
