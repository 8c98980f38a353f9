"""The respaced schedule and the omega rule against the official SpacedDiffusion (golden fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.diffusion import SpacedDiffusion, default_omega, space_timesteps

SCHEDULE = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
)


@pytest.fixture(scope="module")
def respacing(dr2_reference: Path) -> dict[str, np.ndarray]:
    with np.load(dr2_reference / "respacing.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_schedule_matches_official(respacing: dict[str, np.ndarray]) -> None:
    d = SpacedDiffusion()
    assert d.num_timesteps == 100
    assert d.timestep_map.dtype == np.int64
    np.testing.assert_array_equal(d.timestep_map, respacing["timestep_map"])
    np.testing.assert_allclose(d.base_betas, respacing["base_betas_f64"], rtol=1e-12, atol=0)
    for name in SCHEDULE:
        ours = getattr(d, name)
        assert ours.dtype == np.float64 and ours.shape == (100,), name
        np.testing.assert_allclose(ours, respacing[f"{name}_f64"], rtol=1e-12, atol=0, err_msg=name)
        np.testing.assert_array_max_ulp(ours.astype(np.float32), respacing[name], maxulp=1)


def test_model_timesteps_per_sample() -> None:
    d = SpacedDiffusion()
    i = torch.tensor([0, 1, 4, 50, 99])
    assert d.model_timesteps(i).tolist() == [0, 10, 40, 505, 999]
    assert d.model_timesteps(i).dtype == torch.int64
    assert space_timesteps(1000, [100]) == d.timestep_map.tolist()


def test_omega_rule_matches_official(respacing: dict[str, np.ndarray]) -> None:
    for prefix in ("omega", "omega_ext"):
        Ns, taus, table = respacing[f"{prefix}_N"], respacing[f"{prefix}_tau"], respacing[f"{prefix}_table"]
        got = np.array([[default_omega(int(n), int(t)) for t in taus] for n in Ns], dtype=np.int64)
        np.testing.assert_array_equal(got, table)


def test_per_sample_steps_match_single_sample_calls() -> None:
    d = SpacedDiffusion()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g)
    model_out = torch.randn(3, 6, 8, 8, generator=g)
    i = torch.tensor([0, 17, 99])
    xt = d.q_sample(x0, i, noise)
    out = d.p_mean_variance(model_out, xt, i)
    assert set(out) == {"mean", "log_variance", "pred_xstart"}
    for b in range(3):
        sl = slice(b, b + 1)
        ib = i[sl]
        # q_sample: sqrt(abar) x0 + sqrt(1 - abar) noise, with float32 coefficients
        a = float(np.float32(d.sqrt_alphas_cumprod[int(ib)]))
        s = float(np.float32(d.sqrt_one_minus_alphas_cumprod[int(ib)]))
        torch.testing.assert_close(xt[sl], a * x0[sl] + s * noise[sl], rtol=0, atol=0)
        single = d.p_mean_variance(model_out[sl], xt[sl], ib)
        for k in out:
            torch.testing.assert_close(out[k][sl], single[k], rtol=0, atol=0)
    assert float(out["pred_xstart"].abs().max()) <= 1.0
    unclipped = d.p_mean_variance(model_out, xt, i, clip_denoised=False)["pred_xstart"]
    assert float(unclipped.abs().max()) > 1.0


def test_shape_errors() -> None:
    d = SpacedDiffusion()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="shape"):
        d.q_sample(x, torch.tensor([1]), x)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x, torch.tensor([1, 2]), x[:1])
    with pytest.raises(ValueError, match="2\\*3 channels"):
        d.p_mean_variance(x, x, torch.tensor([1, 2]))
