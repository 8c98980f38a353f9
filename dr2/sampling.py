"""The DR2 sampling loop (Wang et al., "DR2: Diffusion-based Robust Degradation Remover for Blind Face
Restoration", CVPR 2023, Sec. 3), batched, and the noise sources it draws from.

The paper's notation:

* y: the degraded input; y_t = sqrt(abar_t) y + sqrt(1 - abar_t) eps is the diffused input (q(y_t | y)).
* omega: the start step. The loop starts from x_omega = y_omega, where the degradation is drowned in noise.
* At each step t = omega .. tau the DDPM proposes x'_{t-1} ~ p_theta(x_{t-1} | x_t), and the low frequencies
  are taken from the diffused input ("iterative refinement"):
  x_{t-1} = Phi_N(y_{t-1}) + (I - Phi_N)(x'_{t-1}),  Phi_N = up_N(down_N(.)) (:class:`dr2.lowpass.LowPass`).
* tau: the output step. At t = tau the loop stops and returns the DDPM's x0 prediction x0_hat(x_tau, tau)
  ("truncated output"), not a sample.

This follows the official ``GaussianDiffusion.dr2_sample_loop`` step for step, including the order of the
random draws (so the golden trace replays): first the noise of x_omega, then per step the p_sample noise z
(also drawn at t = tau, where it is discarded), then, if t != tau, the noise of y_{t-1}. With N = 1 the
official code skips the filter and sets x_{t-1} = y_{t-1}; so does this one. Unlike the official loop (batch
1, one RNG for everything) it runs any batch, and the draws come from a :class:`NoiseSource`:
:class:`KeyedNoise` gives every sample its own generator seeded from its key, so a face's result does not
depend on the batch it was restored in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from dr2.diffusion import SpacedDiffusion, default_omega
from dr2.lowpass import LowPass


class NoiseSource(Protocol):
    """Returns a standard-normal draw shaped (and typed, and placed) like ``like`` (B, C, H, W)."""

    def __call__(self, like: Tensor) -> Tensor: ...


def key_seed(seed: int, key: str) -> int:
    """Stable 63-bit seed of sample ``key`` under run seed ``seed`` (blake2b of ``f"{seed}:{key}"``)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class KeyedNoise:
    """One ``torch.Generator`` per sample, seeded from the sample's key: draws are independent of batching.

    The generators live on ``device`` (CPU and CUDA generators give different streams for one seed); each
    call draws sample b's slice from generator b, in float32, then moves it to ``like``'s device and dtype.
    """

    def __init__(self, keys: Sequence[str], *, seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.keys = list(keys)
        self.seed = seed
        self.device = torch.device(device)
        self._generators = []
        for key in self.keys:
            g = torch.Generator(device=self.device)
            g.manual_seed(key_seed(seed, key))
            self._generators.append(g)

    def __call__(self, like: Tensor) -> Tensor:
        if like.shape[0] != len(self._generators):
            raise ValueError(f"KeyedNoise has {len(self._generators)} keys, asked for a batch of {like.shape[0]}")
        shape = tuple(like.shape[1:])
        draws = [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in self._generators]
        return torch.stack(draws).to(device=like.device, dtype=like.dtype)  # (B, C, H, W)


class ReplayNoise:
    """Replays recorded draws in order (the golden trace); raises when exhausted or on a shape mismatch."""

    def __init__(self, draws: Sequence[Tensor]) -> None:
        self._draws = list(draws)
        self._next = 0

    @property
    def remaining(self) -> int:
        return len(self._draws) - self._next

    def __call__(self, like: Tensor) -> Tensor:
        if self._next >= len(self._draws):
            raise RuntimeError(f"ReplayNoise exhausted after {len(self._draws)} draws")
        draw = self._draws[self._next]
        if tuple(draw.shape) != tuple(like.shape):
            raise ValueError(f"recorded draw {self._next} has shape {tuple(draw.shape)}, asked for {tuple(like.shape)}")
        self._next += 1
        return draw.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def dr2_sample(
    model: nn.Module,
    y: Tensor,
    diffusion: SpacedDiffusion,
    *,
    N: int,
    tau: int,
    omega: int | None = None,
    noise: NoiseSource,
    lowpass: LowPass | None = None,
    clip_denoised: bool = True,
    trace: list[dict[str, Tensor]] | None = None,
) -> Tensor:
    """Run DR2 on a batch of degraded faces; returns x0_hat at step tau, (B, 3, H, W) in [-1, 1].

    Args:
        model: the DDPM UNet, ``model(x (B,3,H,W), t (B,) original steps) -> (B, 6, H, W)`` = [eps, v].
        y: (B, 3, H, W) degraded faces in [-1, 1] at the UNet's size, H == W.
        diffusion: the respaced schedule (respaced steps 0..num_timesteps-1).
        N: the low-pass factor of Phi_N; must divide H. N = 1 replaces x by y_{t-1} at every step.
        tau: the output step, 0 <= tau <= omega.
        omega: the start step, tau <= omega < num_timesteps; default :func:`dr2.diffusion.default_omega`.
        noise: where the standard-normal draws come from (:class:`KeyedNoise`, :class:`ReplayNoise`).
        lowpass: a prebuilt Phi_N for (H, N); built here when omitted.
        clip_denoised: clamp x0_hat to [-1, 1] (official default).
        trace: if a list is given, one dict per step is appended (``i``, ``x_in``, ``model_out``,
            ``pred_xstart`` and, for steps before tau, ``sample`` and ``x_lowpass``). Tests use it.
    """
    if y.ndim != 4 or y.shape[2] != y.shape[3]:
        raise ValueError(f"y must be (B, C, S, S), got {tuple(y.shape)}")
    size = int(y.shape[-1])
    T = diffusion.num_timesteps
    if N < 1 or size % N:
        raise ValueError(f"N must be a positive divisor of the image size {size}, got N={N}")
    if omega is None:
        omega = default_omega(N, tau)
    if not 0 <= tau < T:
        raise ValueError(f"tau must be in [0, {T - 1}], got tau={tau}")
    if not tau <= omega <= T - 1:
        raise ValueError(f"omega must be in [tau, {T - 1}] = [{tau}, {T - 1}], got omega={omega} (N={N}, tau={tau})")
    if N > 1:
        if lowpass is None:
            lowpass = LowPass(image_size=size, N=N).to(y.device)
        elif lowpass.N != N or lowpass.image_size != size:
            raise ValueError(f"lowpass is Phi_{lowpass.N} at {lowpass.image_size} px, need Phi_{N} at {size} px")

    B = y.shape[0]

    def steps(i: int) -> Tensor:
        return torch.full((B,), i, dtype=torch.long, device=y.device)  # (B,) respaced index

    x = diffusion.q_sample(y, steps(omega), noise(y))  # x_omega = y_omega, (B, 3, H, W)
    for i in range(omega, tau - 1, -1):
        t = steps(i)
        model_out = model(x, diffusion.model_timesteps(t))  # (B, 6, H, W): eps, v
        out = diffusion.p_mean_variance(model_out, x, t, clip_denoised=clip_denoised)
        z = noise(x)  # drawn at tau too (and discarded), as the official p_sample does
        step: dict[str, Tensor] = {}
        if trace is not None:
            step = {"i": t, "x_in": x, "model_out": model_out, "pred_xstart": out["pred_xstart"]}
            trace.append(step)
        if i == tau:
            pred_xstart: Tensor = out["pred_xstart"]  # truncated output x0_hat(x_tau, tau)
            return pred_xstart
        # i > tau >= 0, so the "no noise at t = 0" mask of p_sample is 1 here.
        sample = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z  # x'_{i-1}
        y_prev = diffusion.q_sample(y, t - 1, noise(y))  # y_{i-1}
        if lowpass is not None:
            x = sample - lowpass(sample) + lowpass(y_prev)  # (I - Phi_N) x'_{i-1} + Phi_N y_{i-1}
        else:
            x = y_prev
        if trace is not None:
            step["sample"] = sample
            step["x_lowpass"] = x
    raise AssertionError("unreachable: the loop returns at i == tau")
