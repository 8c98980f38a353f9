"""SPARNetHD against the official model: full-size state-dict manifest, and the small golden fixture's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.sparnet import SPARNetConfig, SPARNetHD, SpectralNormConv2d


def _rel(a: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    return float(np.abs(a.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def small_model(dr2_reference: Path) -> SPARNetHD:
    w = np.load(dr2_reference / "sparnethd_small_weights.npz", allow_pickle=False)
    model = SPARNetHD(SPARNetConfig.tiny())
    model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files}, strict=True)
    return model.eval()


def test_full_size_state_dict_matches_official_manifest(dr2_reference: Path) -> None:
    manifest = json.loads((dr2_reference / "sparnethd_manifest.json").read_text())
    assert SPARNetConfig().to_dict() == manifest["config"]
    with torch.device("meta"):
        model = SPARNetHD(SPARNetConfig())
    sd = model.state_dict()
    assert list(sd) == list(manifest["params"])  # same keys, same order
    assert {k: list(v.shape) for k, v in sd.items()} == manifest["params"]
    assert len(sd) == manifest["num_state_dict_entries"] == 892
    assert sum(b.numel() for b in model.buffers()) == manifest["state_dict_buffer_numel"]
    assert len(list(model.buffers())) == manifest["state_dict_buffer_keys_count"] == 354
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert not any(k.endswith(".weight") and "conv2d" in k for k in sd)  # spectral-norm layout only


def test_tiny_config_is_the_fixture_config(dr2_reference: Path) -> None:
    cfg = json.loads((dr2_reference / "sparnethd_small_config.json").read_text())
    assert SPARNetConfig.tiny() == SPARNetConfig.from_dict(cfg["kwargs"])
    assert SPARNetConfig.from_dict(cfg["full_size_kwargs"]) == SPARNetConfig()
    model = SPARNetHD(SPARNetConfig.tiny())
    assert sum(p.numel() for p in model.parameters()) == cfg["derived"]["num_parameters"]
    assert len(model.state_dict()) == cfg["derived"]["num_state_dict_entries"]
    assert len(list(model.buffers())) == cfg["derived"]["num_spectral_norm_buffers"]


def test_small_fixture_output(small_model: SPARNetHD, dr2_reference: Path) -> None:
    io = np.load(dr2_reference / "sparnethd_small_io.npz", allow_pickle=False)
    u_before = {k: v.clone() for k, v in small_model.state_dict().items() if k.endswith(("weight_u", "weight_v"))}
    with torch.no_grad():
        out = small_model(torch.from_numpy(io["x"]))
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
    assert _rel(out, io["out"]) < 1e-5
    # eval never runs the power iteration: the stored vectors are untouched
    after = small_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in u_before.items())


def test_eval_uses_stored_vectors_not_exact_spectral_norm(small_model: SPARNetHD, dr2_reference: Path) -> None:
    cfg = json.loads((dr2_reference / "sparnethd_small_config.json").read_text())
    conv = small_model.get_submodule("encoder.1.conv1.conv2d")
    assert isinstance(conv, SpectralNormConv2d)
    w = conv.weight_orig.detach().double()
    with torch.no_grad():
        sigma_used = float((w / conv.normalized_weight().double()).flatten()[0])
    ref = cfg["sigma_per_conv"]["encoder.1.conv1.conv2d.weight"]
    assert sigma_used == pytest.approx(ref["sigma_eval"], rel=1e-5)
    assert float(torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)) == pytest.approx(
        ref["top_singular_value"], rel=1e-5
    )


def test_batch_independence_and_float_range(small_model: SPARNetHD) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        batched = small_model(x)
        single = torch.cat([small_model(x[i : i + 1]) for i in range(3)])
    assert float((batched - single).abs().max()) <= 1e-5


def test_train_mode_power_iteration_moves_vectors_toward_top_singular_pair() -> None:
    conv = SpectralNormConv2d(4, 6, 3, stride=1, bias=False)
    w = conv.weight_orig.detach().reshape(6, -1)
    top = float(torch.linalg.matrix_norm(w, ord=2))
    conv.power_iteration_(200)
    sigma = float(torch.dot(conv.weight_u, torch.mv(w, conv.weight_v)))
    assert sigma == pytest.approx(top, rel=1e-4)
    conv.train()
    conv(torch.zeros(1, 4, 5, 5))  # a train forward runs one more iteration, in place, like torch's hook
    assert float(torch.dot(conv.weight_u, torch.mv(w, conv.weight_v))) == pytest.approx(top, rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "key_present", "key_absent"),
    [
        ({"norm_type": "bn", "relu_type": "prelu"}, "preact_func.0.norm.running_mean", "conv1.conv2d.bias"),
        ({"norm_type": "none"}, "conv1.conv2d.bias", "preact_func.0.norm.weight"),
        ({"att_name": "spar3d"}, "att_func.b1_1.conv2d.weight_orig", "shortcut_func.conv2d.weight"),
        ({"bottleneck_size": 128}, "att_func.b1_-1.conv2d.weight_orig", "att_func.b1_1.conv2d.weight_orig"),
    ],
)
def test_other_official_configs_build_and_run(kwargs: dict, key_present: str, key_absent: str) -> None:
    cfg = SPARNetConfig(size=32, min_ch=8, max_ch=16, min_feat_size=16, res_depth=-1, bottleneck_size=16)
    cfg = SPARNetConfig.from_dict({**cfg.to_dict(), **kwargs})
    model = SPARNetHD.random(cfg, seed=0)
    keys = list(model.state_dict())
    assert any(k.endswith(key_present) for k in keys), keys
    assert not any(k.endswith(key_absent) for k in keys)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    if kwargs.get("att_name") == "spar3d":  # the 3-D mask has one channel per feature channel
        conv = model.get_submodule("res_layers.0.att_func.out_block.0.conv2d")
        assert isinstance(conv, SpectralNormConv2d) and conv.weight_orig.shape[0] == 16


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="norm_type"):
        SPARNetConfig(norm_type="layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown SPARNetConfig keys"):
        SPARNetConfig.from_dict({"size": 64, "channels": 3})
    assert SPARNetConfig.from_dict(SPARNetConfig.tiny().to_dict()) == SPARNetConfig.tiny()
