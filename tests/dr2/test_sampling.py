"""The DR2 loop against the traced official dr2_sample_loop (golden fixtures), and its noise sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.diffusion import SpacedDiffusion
from dr2.lowpass import LowPass
from dr2.sampling import KeyedNoise, ReplayNoise, dr2_sample
from dr2.unet import UNetModel


def _rel(a: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(a.numpy() - ref).max() / np.abs(ref).max())


class RecordingNoise:
    """Wraps a noise source and keeps every draw, to check the draw count and order."""

    def __init__(self, inner: KeyedNoise) -> None:
        self.inner = inner
        self.draws: list[torch.Tensor] = []

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draw = self.inner(like)
        self.draws.append(draw)
        return draw




@pytest.fixture(scope="module")
def diffusion() -> SpacedDiffusion:
    return SpacedDiffusion()


def test_trajectory_matches_official(tiny_unet: UNetModel, diffusion: SpacedDiffusion, dr2_reference: Path) -> None:
    with np.load(dr2_reference / "dr2_trajectory.npz", allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    noise = ReplayNoise([torch.from_numpy(ref[f"noise_{k:03d}"]) for k in range(6)])
    trace: list[dict[str, torch.Tensor]] = []
    out = dr2_sample(tiny_unet, torch.from_numpy(ref["y"]), diffusion, N=4, tau=2, omega=4, noise=noise, trace=trace)
    assert noise.remaining == 0  # all 6 draws consumed, the last one (z at tau) discarded
    assert [int(s["i"][0]) for s in trace] == ref["t_index"].tolist()
    assert [int(diffusion.model_timesteps(s["i"])[0]) for s in trace] == ref["t_model"].tolist()
    for k, step in enumerate(trace):
        names = ["x_in", "model_out", "pred_xstart"] + (["sample", "x_lowpass"] if k < 2 else [])
        assert set(step) == {"i", *names}
        for name in names:
            assert _rel(step[name], ref[f"{name}_{k:03d}"]) < 1e-5, (name, k)
    assert _rel(out, ref["out"]) < 1e-5
    assert torch.equal(out, trace[-1]["pred_xstart"])


def test_keyed_noise_batch_invariance(tiny_unet: UNetModel, diffusion: SpacedDiffusion) -> None:
    g = torch.Generator().manual_seed(21)
    y = torch.rand(4, 3, 64, 64, generator=g) * 2 - 1
    keys = [f"shard-000/img_{k}/0" for k in range(4)]
    batched = dr2_sample(tiny_unet, y, diffusion, N=4, tau=1, omega=3, noise=KeyedNoise(keys, seed=7))
    alone = dr2_sample(tiny_unet, y[2:3], diffusion, N=4, tau=1, omega=3, noise=KeyedNoise(keys[2:3], seed=7))
    assert batched.shape == (4, 3, 64, 64)
    assert float((batched[2:3] - alone).abs().max()) <= 1e-6
    assert float(batched.abs().max()) <= 1.0
    other_seed = dr2_sample(tiny_unet, y[2:3], diffusion, N=4, tau=1, omega=3, noise=KeyedNoise(keys[2:3], seed=8))
    assert float((other_seed - alone).abs().max()) > 1e-3


def test_keyed_noise_streams() -> None:
    like = torch.zeros(2, 3, 4, 4)
    a = KeyedNoise(["a", "b"], seed=0)
    first, second = a(like), a(like)
    assert not torch.equal(first, second)  # the streams advance
    assert not torch.equal(first[0], first[1])  # keys differ
    b = KeyedNoise(["b"], seed=0)
    torch.testing.assert_close(b(like[:1]), first[1:2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 keys"):
        a(torch.zeros(3, 3, 4, 4))


def test_replay_noise_checks() -> None:
    noise = ReplayNoise([torch.zeros(1, 3, 4, 4)])
    with pytest.raises(ValueError, match="shape"):
        noise(torch.zeros(2, 3, 4, 4))
    assert noise.remaining == 1
    noise(torch.zeros(1, 3, 4, 4))
    assert noise.remaining == 0
    with pytest.raises(RuntimeError, match="exhausted"):
        noise(torch.zeros(1, 3, 4, 4))


def test_n1_replaces_x_by_diffused_input(tiny_unet: UNetModel, diffusion: SpacedDiffusion) -> None:
    y = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = RecordingNoise(KeyedNoise(["face"], seed=1))
    trace: list[dict[str, torch.Tensor]] = []
    omega, tau = 2, 1
    dr2_sample(tiny_unet, y, diffusion, N=1, tau=tau, omega=omega, noise=noise, trace=trace)
    assert len(noise.draws) == 1 + (omega - tau + 1) + (omega - tau)  # initial, z per step, y-noise per step < tau
    # Step at i = 2: draws are [x_omega noise, z, y_1 noise]; x entering i = 1 is exactly y_1.
    y1 = diffusion.q_sample(y, torch.tensor([1]), noise.draws[2])
    assert torch.equal(trace[1]["x_in"], y1)


def test_validation_errors(tiny_unet: UNetModel, diffusion: SpacedDiffusion) -> None:
    y = torch.zeros(1, 3, 64, 64)
    noise = KeyedNoise(["k"])
    with pytest.raises(ValueError, match=r"omega must be in \[tau, 99\]"):
        dr2_sample(tiny_unet, y, diffusion, N=4, tau=2, omega=100, noise=noise)
    with pytest.raises(ValueError, match="omega must be"):
        dr2_sample(tiny_unet, y, diffusion, N=1, tau=95, noise=noise)  # default omega = min(95 + 5, 100) = 100
    with pytest.raises(ValueError, match="omega must be"):
        dr2_sample(tiny_unet, y, diffusion, N=4, tau=5, omega=4, noise=noise)
    with pytest.raises(ValueError, match="tau must be"):
        dr2_sample(tiny_unet, y, diffusion, N=4, tau=-1, omega=4, noise=noise)
    with pytest.raises(ValueError, match="N must be"):
        dr2_sample(tiny_unet, y, diffusion, N=3, tau=0, noise=noise)
    with pytest.raises(ValueError, match="lowpass is"):
        dr2_sample(tiny_unet, y, diffusion, N=4, tau=0, noise=noise, lowpass=LowPass(image_size=64, N=2))
