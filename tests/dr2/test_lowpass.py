"""Phi_N against the official Resizer pair (golden fixtures), and its batch/size independence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dr2.lowpass import LowPass, resize, resize_taps


def _rel(a: torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    r = ref.numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.abs(a.numpy() - r).max() / np.abs(r).max())


def _official_apply(x: torch.Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int], down: bool) -> torch.Tensor:
    """The official Resizer forward written out: per axis, out = sum_k w[k] * x[fov[k]] (gather over taps)."""
    order = (3, 2) if down else (2, 3)
    for dim in order:
        n_in, n_out = (in_hw[0], out_hw[0]) if dim == 2 else (in_hw[1], out_hw[1])
        w, fov = resize_taps(n_in, n_out, n_out / n_in, antialiasing=down)
        xt = x.transpose(dim, 0)  # (L, ...)
        shape = (*w.shape, *([1] * (xt.ndim - 1)))
        xt = torch.sum(xt[torch.from_numpy(fov)] * torch.from_numpy(w).reshape(shape), dim=0)
        x = xt.transpose(dim, 0)
    return x


@pytest.fixture(scope="module")
def resizer(dr2_reference: Path) -> dict[str, np.ndarray]:
    with np.load(dr2_reference / "resizer.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("N", [2, 4, 8])
def test_matches_official_resizer(resizer: dict[str, np.ndarray], N: int) -> None:
    x = torch.from_numpy(resizer["x"])  # (2, 3, 64, 64)
    lp = LowPass(image_size=64, N=N)
    down = lp.down(x)
    assert down.shape == (2, 3, 64 // N, 64 // N)
    assert _rel(down, resizer[f"down_N{N}"]) < 1e-6
    assert _rel(lp(x), resizer[f"lowpass_N{N}"]) < 1e-6
    for kind, (n_in, n_out, scale, aa) in {"down": (64, 64 // N, 1 / N, True), "up": (64 // N, 64, N, False)}.items():
        w, fov = resize_taps(n_in, n_out, scale, antialiasing=aa)
        assert w.shape[0] == (4 * N if kind == "down" else 4)
        for dim in (2, 3):  # square images: the same taps on both axes
            np.testing.assert_array_max_ulp(w, resizer[f"{kind}_N{N}_weights_dim{dim}"].reshape(w.shape), maxulp=1)
            np.testing.assert_array_equal(fov, resizer[f"{kind}_N{N}_fov_dim{dim}"])


def test_any_batch_and_size() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 48, 48, generator=g)
    lp = LowPass(image_size=48, N=4)
    batched = lp(x)
    assert batched.shape == (3, 3, 48, 48)
    for b in range(3):
        torch.testing.assert_close(lp(x[b : b + 1]), batched[b : b + 1], rtol=0, atol=1e-6)
    # Same numbers as the official gather-over-taps formulation at this size.
    ref = _official_apply(_official_apply(x, (48, 48), (12, 12), True), (12, 12), (48, 48), False)
    assert _rel(batched, ref) < 1e-6
    # resize() is the same filter for arbitrary output sizes.
    assert _rel(resize(x, (12, 12)), lp.down(x)) < 1e-7
    assert resize(x, (20, 36)).shape == (3, 3, 20, 36)


def test_dtype_identity_and_errors() -> None:
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    assert LowPass(image_size=16, N=2)(x).dtype == torch.float64
    assert torch.equal(LowPass(image_size=16, N=1)(x), x)
    with pytest.raises(ValueError, match="divide"):
        LowPass(image_size=64, N=3)
    with pytest.raises(ValueError, match="spatial size"):
        LowPass(image_size=16, N=2)(torch.zeros(1, 3, 32, 32))
