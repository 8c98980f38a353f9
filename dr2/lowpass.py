"""The low-pass filter Phi_N of DR2: cubic downsampling by N followed by cubic upsampling by N.

Matches the official ``DRDR.resizer.Resizer`` pair that ``dr2e.py`` builds (``down = Resizer(shape, 1/N)``,
``up = Resizer(shape_d, N)``; the resizer is Assaf Shocher's MATLAB-``imresize`` port):

* Keys cubic kernel with a = -0.5; antialiasing only when downscaling (the kernel is stretched by 1/scale and
  has 4/scale taps);
* output pixel o maps to input coordinate o/scale + (1 - 1/scale)/2 (half-pixel centres), in float64;
* tap weights normalised to sum to 1, borders by mirror (reflect, edge pixel repeated) indexing, all-zero tap
  rows removed, weights cast to float32;
* the down pair resizes width then height, the up pair height then width (the order numpy's argsort gave the
  official code on x86; it only changes float rounding).

The taps are the official ones (:func:`resize_taps` reproduces its weight and index tables exactly); they are
applied as one small dense (out, in) float32 matrix per axis, which is batch- and device-agnostic and far
cheaper than the official gather of every tap. The filter always runs in float32, even under autocast.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel, a = -0.5."""
    ax = np.abs(x)
    ax2 = ax**2
    ax3 = ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((1 < ax) & (ax <= 2))


def resize_taps(in_length: int, out_length: int, scale: float, *, antialiasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-output tap weights and input indices along one axis, as the official ``Resizer.contributions``.

    Returns ``weights`` (taps, out_length) float32 and ``fov`` (taps, out_length) int64 such that
    ``out[o] = sum_k weights[k, o] * in[fov[k, o]]``. ``antialiasing`` stretches the kernel by 1/scale (the
    official code turns it on for every axis as soon as any axis is downscaled).
    """
    # Antialiasing stretches the kernel by 1/scale: scale * cubic(scale * d), over 4/scale taps.
    k_scale = scale if antialiasing else 1.0
    width = 4.0 * (1.0 / k_scale)  # as the official code computes it (same rounding)

    def kernel(arg: np.ndarray) -> np.ndarray:
        return k_scale * _cubic(k_scale * arg)

    out_coords = np.arange(1, out_length + 1)
    shifted = out_coords - (out_length - in_length * scale) / 2
    match = shifted / scale + 0.5 * (1 - 1 / scale)  # (out,) input coordinate of each output pixel (1-based)
    left = np.floor(match - width / 2)
    expanded = int(np.ceil(width) + 2)
    fov = (left[:, None] + np.arange(expanded) - 1).astype(np.int64)  # (out, expanded) 0-based candidates
    weights = kernel(1.0 * match[:, None] - fov - 1)  # (out, expanded)
    sums = np.sum(weights, axis=1)
    sums[sums == 0] = 1.0
    weights = 1.0 * weights / sums[:, None]
    mirror = np.concatenate((np.arange(in_length), np.arange(in_length - 1, -1, step=-1)))  # reflect borders
    fov = mirror[np.mod(fov, mirror.shape[0])]
    keep = np.nonzero(np.any(weights, axis=0))[0]  # drop taps that are zero for every output pixel
    return weights[:, keep].T.astype(np.float32), fov[:, keep].T.astype(np.int64)


@lru_cache(maxsize=64)
def _matrix(in_length: int, out_length: int, scale: float, antialiasing: bool) -> np.ndarray:
    """Dense (out_length, in_length) float32 matrix of the taps (mirrored taps that hit one pixel add up)."""
    w, fov = resize_taps(in_length, out_length, scale, antialiasing=antialiasing)
    m = np.zeros((out_length, in_length), dtype=np.float64)
    cols = np.broadcast_to(np.arange(out_length), w.shape)
    np.add.at(m, (cols.ravel(), fov.ravel()), w.astype(np.float64).ravel())
    return m.astype(np.float32)


def _axis_order(scale_h: float, scale_w: float) -> list[int]:
    """Axes (2 = H, 3 = W) with scale != 1, smallest scale first; ties: W first when shrinking, H first else."""
    dims = [(s, (-d if s < 1 else d), d) for d, s in ((2, scale_h), (3, scale_w)) if s != 1]
    return [d for _, _, d in sorted(dims)]


class _Resize(nn.Module):
    """One official ``Resizer`` between fixed spatial sizes, for any batch and channel count."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int], scales: tuple[float, float]) -> None:
        super().__init__()
        antialias = any(s < 1 for s in scales)
        self.in_hw = in_hw
        self.out_hw = out_hw
        self.order = _axis_order(*scales)
        mats = {
            2: _matrix(in_hw[0], out_hw[0], scales[0], antialias),
            3: _matrix(in_hw[1], out_hw[1], scales[1], antialias),
        }
        self.m_h: Tensor
        self.m_w: Tensor
        self.register_buffer("m_h", torch.from_numpy(mats[2].copy()), persistent=False)  # (H_out, H_in)
        self.register_buffer("m_w", torch.from_numpy(mats[3].T.copy()), persistent=False)  # (W_in, W_out)

    def forward(self, x: Tensor) -> Tensor:
        # x (B, C, H_in, W_in) -> (B, C, H_out, W_out), computed in float32
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(f"expected spatial size {self.in_hw}, got {tuple(x.shape[-2:])}")
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float()
            for d in self.order:
                h = torch.matmul(self.m_h, h) if d == 2 else torch.matmul(h, self.m_w)
        return h.to(dtype)


def resize(x: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Cubic resize of x (B, C, H, W) to (B, C, *out_hw) with the official Resizer semantics (antialiased down)."""
    in_hw = (int(x.shape[-2]), int(x.shape[-1]))
    scales = (out_hw[0] / in_hw[0], out_hw[1] / in_hw[1])
    return _Resize(in_hw, (int(out_hw[0]), int(out_hw[1])), scales).to(x.device)(x)


class LowPass(nn.Module):
    """Phi_N(x) = up_N(down_N(x)) at a square ``image_size``; any batch, device and channel count.

    N is the paper's low-pass factor: down shrinks by 1/N (antialiased), up enlarges by N. N = 1 is the
    identity (DR2 then replaces x by the diffused input outright).
    """

    def __init__(self, *, image_size: int, N: int) -> None:
        super().__init__()
        if N < 1 or image_size % N:
            raise ValueError(f"N must be >= 1 and divide image_size {image_size}, got N={N}")
        self.image_size = image_size
        self.N = N
        small = image_size // N
        self._down: nn.Module = nn.Identity()
        self._up: nn.Module = nn.Identity()
        if N > 1:
            self._down = _Resize((image_size, image_size), (small, small), (1 / N, 1 / N))
            self._up = _Resize((small, small), (image_size, image_size), (float(N), float(N)))

    def down(self, x: Tensor) -> Tensor:
        """(B, C, S, S) -> (B, C, S/N, S/N)."""
        out: Tensor = self._down(x)
        return out

    def up(self, x: Tensor) -> Tensor:
        """(B, C, S/N, S/N) -> (B, C, S, S)."""
        out: Tensor = self._up(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (B, C, S, S)
