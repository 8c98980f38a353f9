"""The DDPM UNet against the official checkpoint layout and the official forward pass (golden fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.unet import AttentionBlock, UNetConfig, UNetModel, timestep_embedding


def _rel(a: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(a.detach().numpy() - ref).max() / np.abs(ref).max())




def test_full_size_state_dict_matches_official_manifest(dr2_reference: Path) -> None:
    manifest = json.loads((dr2_reference / "ddpm_unet_manifest.json").read_text())
    assert UNetConfig().to_dict() == manifest["config"]
    with torch.device("meta"):
        model = UNetModel(UNetConfig())
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == manifest["params"]  # same keys, same shapes
    assert len(shapes) == 362
    assert sum(p.numel() for p in model.parameters()) == 93_563_910
    assert not list(model.buffers())


def test_tiny_config_is_the_fixture_config(dr2_reference: Path) -> None:
    fixture = json.loads((dr2_reference / "unet_small_config.json").read_text())
    assert UNetConfig.from_dict(fixture["kwargs"]) == UNetConfig.tiny()
    assert UNetConfig.tiny().to_dict() == {**fixture["kwargs"], "dropout": 0.0}
    assert UNetConfig.from_dict(json.loads(json.dumps(UNetConfig.tiny().to_dict()))) == UNetConfig.tiny()
    with pytest.raises(ValueError, match="unknown UNetConfig keys"):
        UNetConfig.from_dict({**fixture["kwargs"], "learn_sigma": True})

    model = UNetModel(UNetConfig.tiny())
    assert len(model.state_dict()) == fixture["derived"]["num_state_dict_entries"]
    assert sum(p.numel() for p in model.parameters()) == fixture["derived"]["num_parameters"]
    heads = {name: m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}
    assert heads == fixture["derived"]["heads"]


def test_tiny_forward_matches_official(tiny_unet: UNetModel, dr2_reference: Path) -> None:
    with np.load(dr2_reference / "unet_small_io.npz", allow_pickle=False) as io:
        x, t, out_ref, temb_ref = (io[k] for k in ("x", "t", "out", "temb"))
    temb = timestep_embedding(torch.from_numpy(t), 32)
    assert float(np.abs(temb.numpy() - temb_ref).max()) < 2e-5
    with torch.no_grad():
        out = tiny_unet(torch.from_numpy(x), torch.from_numpy(t))
    assert out.shape == (2, 6, 64, 64) and out.dtype == torch.float32
    assert _rel(out, out_ref) < 1e-5
    # Batch-agnostic: each sample alone (with its own timestep) gives the batched result.
    with torch.no_grad():
        for b in range(2):
            alone = tiny_unet(torch.from_numpy(x[b : b + 1]), torch.from_numpy(t[b : b + 1]))
            assert _rel(alone, out_ref[b : b + 1]) < 1e-5


def test_other_sizes_and_batches(tiny_unet: UNetModel) -> None:
    x = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_unet(x, torch.tensor([0, 500, 999]))
    assert out.shape == (3, 6, 32, 48)
    with pytest.raises(ValueError, match="timesteps"):
        tiny_unet(x, torch.tensor([1, 2]))


def test_variants_the_official_class_accepts() -> None:
    base = UNetConfig.tiny().to_dict()
    # Plain resampling blocks (resblock_updown=False): conv Downsample "op" / Upsample "conv", or pooling only.
    conv = UNetModel(UNetConfig.from_dict({**base, "resblock_updown": False}))
    keys = conv.state_dict().keys()
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.1.conv.weight" in keys
    pool = UNetModel(UNetConfig.from_dict({**base, "resblock_updown": False, "conv_resample": False}))
    assert not any(".op." in k or ".conv." in k for k in pool.state_dict())
    # num_heads instead of num_head_channels; separate upsampling heads; the new attention order.
    heads = UNetModel(
        UNetConfig.from_dict(
            {**base, "num_head_channels": -1, "num_heads": 2, "num_heads_upsample": 1, "use_new_attention_order": True}
        )
    )
    got = {n: m.num_heads for n, m in heads.named_modules() if isinstance(m, AttentionBlock)}
    assert got == {"input_blocks.5.1": 2, "middle_block.1": 2, "output_blocks.2.1": 1, "output_blocks.3.1": 1}
    # Class-conditional: label embedding, and labels are required.
    cond = UNetModel(UNetConfig.from_dict({**base, "num_classes": 5}))
    assert tuple(cond.state_dict()["label_emb.weight"].shape) == (5, 128)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        for model in (conv, pool, heads):
            assert model(x, t).shape == (2, 6, 16, 16)
        assert cond(x, t, torch.tensor([0, 4])).shape == (2, 6, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        cond(x, t)
