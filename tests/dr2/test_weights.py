"""Weight import and model directories: official flat checkpoints in, safetensors + config.json out, numbers kept."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.sparnet import SPARNetConfig
from dr2.unet import UNetConfig
from dr2.weights import (
    CONFIG_FILE,
    MODEL_FILE,
    ModelKind,
    WeightsError,
    import_checkpoint,
    load_model_dir,
    save_model_dir,
    sha256_file,
)


def _rel(a: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(a.detach().numpy().astype(np.float64) - ref).max() / np.abs(ref).max())


def _official_checkpoint(npz: Path, out: Path) -> Path:
    """The fixture weights in the official layout: a flat state dict written by torch.save."""
    w = np.load(npz, allow_pickle=False)
    torch.save({k: torch.from_numpy(w[k]) for k in w.files}, out)
    return out


@pytest.mark.parametrize("kind", [ModelKind.DDPM, ModelKind.SPARNETHD])
def test_round_trip_reproduces_fixture_outputs(kind: ModelKind, dr2_reference: Path, tmp_path: Path) -> None:
    stem, config = (
        ("unet_small", UNetConfig.tiny()) if kind is ModelKind.DDPM else ("sparnethd_small", SPARNetConfig.tiny())
    )
    ckpt = _official_checkpoint(dr2_reference / f"{stem}_weights.npz", tmp_path / "official.pth")
    out_dir = import_checkpoint(ckpt, kind=kind, out_dir=tmp_path / "model", config=config)
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_FILE, MODEL_FILE]

    info = json.loads((out_dir / CONFIG_FILE).read_text())
    assert info["kind"] == kind.value and info["source"] == "official.pth"
    assert info["config"] == config.to_dict()
    assert info["sha256"] == sha256_file(out_dir / MODEL_FILE)
    n_params = 1_105_158 if kind is ModelKind.DDPM else 394_310
    assert info["num_parameters"] == n_params

    model, loaded_info = load_model_dir(out_dir, expected_kind=kind)
    assert loaded_info == info and not model.training
    io = np.load(dr2_reference / f"{stem}_io.npz", allow_pickle=False)
    with torch.no_grad():
        if kind is ModelKind.DDPM:
            out = model(torch.from_numpy(io["x"]), torch.from_numpy(io["t"]))
        else:
            out = model(torch.from_numpy(io["x"]))
    assert _rel(out, io["out"]) < 1e-5

    # save_model_dir of the loaded model writes the same bytes again
    again = save_model_dir(model, kind=kind, out_dir=tmp_path / "again", source="official.pth")
    assert sha256_file(again / MODEL_FILE) == info["sha256"]


class _Payload:
    """Unpickling this runs os.system(...): the marker file proves whether the payload executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, bad)
    with pytest.raises(WeightsError, match="refused evil.pth: it needs pickled Python code"):
        import_checkpoint(bad, kind=ModelKind.SPARNETHD, out_dir=tmp_path / "out", config=SPARNetConfig.tiny())
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # a raw pickle (not a torch zip) carrying the same payload is refused too
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(WeightsError):
        import_checkpoint(raw, kind=ModelKind.DDPM, out_dir=tmp_path / "out", config=UNetConfig.tiny())
    assert not marker.exists()


def test_mismatched_checkpoint_names_keys_and_shapes(dr2_reference: Path, tmp_path: Path) -> None:
    w = np.load(dr2_reference / "sparnethd_small_weights.npz", allow_pickle=False)
    state = {k: torch.from_numpy(w[k]) for k in w.files}
    del state["out_conv.conv2d.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["encoder.0.conv2d.weight_orig"] = torch.zeros(8, 3, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        import_checkpoint(
            tmp_path / "bad.pth", kind=ModelKind.SPARNETHD, out_dir=tmp_path / "o", config=SPARNetConfig.tiny()
        )
    msg = str(err.value)
    assert "1 missing keys: out_conv.conv2d.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "encoder.0.conv2d.weight_orig: file (8, 3, 5, 5) vs model (8, 3, 3, 3)" in msg
    # the small weights against the default (full-size) architecture: refused, not silently partly loaded
    torch.save({k: torch.from_numpy(w[k]) for k in w.files}, tmp_path / "small.pth")
    with pytest.raises(WeightsError, match="shape differences"):
        import_checkpoint(tmp_path / "small.pth", kind=ModelKind.SPARNETHD, out_dir=tmp_path / "o")
    with pytest.raises(WeightsError, match="not a flat state dict"):
        torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "wrapped.pth")
        import_checkpoint(tmp_path / "wrapped.pth", kind=ModelKind.DDPM, out_dir=tmp_path / "o")


def test_load_model_dir_verifies_checksum_and_kind(dr2_reference: Path, tmp_path: Path) -> None:
    ckpt = _official_checkpoint(dr2_reference / "sparnethd_small_weights.npz", tmp_path / "s.pth")
    out_dir = import_checkpoint(ckpt, kind=ModelKind("sparnethd"), out_dir=tmp_path / "m", config=SPARNetConfig.tiny())
    with pytest.raises(WeightsError, match="holds a 'sparnethd' model, expected 'ddpm'"):
        load_model_dir(out_dir, expected_kind=ModelKind.DDPM)
    data = bytearray((out_dir / MODEL_FILE).read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last weight
    (out_dir / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_model_dir(out_dir)
    with pytest.raises(WeightsError, match="config.json is missing"):
        load_model_dir(tmp_path)


def test_kind_and_config_must_agree(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="needs a UNetConfig"):
        import_checkpoint(tmp_path / "x.pth", kind=ModelKind.DDPM, out_dir=tmp_path / "o", config=SPARNetConfig.tiny())
