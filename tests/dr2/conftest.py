"""Fixtures of the dr2 tests: the tiny UNet with the golden fixture's weights (official state-dict keys)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.unet import UNetConfig, UNetModel


@pytest.fixture(scope="module")
def tiny_unet(dr2_reference: Path) -> UNetModel:
    model = UNetModel(UNetConfig.tiny()).eval()
    with np.load(dr2_reference / "unet_small_weights.npz", allow_pickle=False) as w:
        model.load_state_dict({k: torch.from_numpy(w[k]) for k in w.files}, strict=True)
    return model
