"""The respaced DDPM schedule of DR2: betas, posterior coefficients, q_sample and p_mean_variance.

Matches ``DRDR.space_diffusion.SpacedDiffusion(denoise_fn, section=[100])`` of the official DR2 code (itself
the guided-diffusion / ILVR-ADM ``GaussianDiffusion`` with respacing) with its defaults: a linear beta schedule
from 1e-4 to 0.02 over 1000 training steps, kept steps ``space_timesteps(1000, [100])`` (0, 10, 20, ..., 989,
999), epsilon prediction (``ModelMeanType.EPSILON``) and learned-range variance (``ModelVarType.LEARNED_RANGE``).

Like the official code, every schedule array is computed and kept in float64 (numpy) and each coefficient is
cast to float32 when it is used (the official ``_extract``); the casts are precomputed once here, which gives
the same float32 numbers. The schedule holds no model: the network is called by the sampler
(``dr2.sampling``), and :meth:`SpacedDiffusion.p_mean_variance` takes the model output as an argument.

Indices ``i`` are RESPACED indices 0..num_timesteps-1, one per sample, shape (B,); the UNet receives
``model_timesteps(i)``, the original 0..999 step.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np
import torch
from torch import Tensor

from dr2.omega import default_omega  # noqa: F401 - re-exported: the official rule lives where no torch is needed


class ModelMeanType(Enum):
    """What the network predicts for the mean (guided-diffusion names)."""

    PREVIOUS_X = "previous_x"
    START_X = "start_x"
    EPSILON = "epsilon"  # DR2


class ModelVarType(Enum):
    """How the variance is obtained (guided-diffusion names)."""

    LEARNED = "learned"
    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED_RANGE = "learned_range"  # DR2: log-variance interpolates between posterior and beta by v in [-1, 1]


def space_timesteps(num_timesteps: int, section_counts: Sequence[int]) -> list[int]:
    """Original steps kept when each of ``len(section_counts)`` equal portions is strided to its count (sorted)."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    steps: set[int] = set()
    for k, count in enumerate(section_counts):
        size = size_per + (1 if k < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return sorted(steps)




class SpacedDiffusion:
    """Respaced Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021) as DR2 uses it.

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)                      -> :meth:`q_sample`
    p(x_{t-1} | x_t): x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps,
    mean = coef1_t x0_hat + coef2_t x_t, log var = frac log beta_t + (1 - frac) log beta~_t, frac = (v+1)/2
                                                                            -> :meth:`p_mean_variance`
    """

    def __init__(
        self,
        *,
        section: tuple[int, ...] = (100,),
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
        model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
    ) -> None:
        self.section = tuple(section)
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        if model_mean_type == ModelMeanType.PREVIOUS_X:
            raise NotImplementedError("PREVIOUS_X mean prediction is not supported (DR2 predicts epsilon)")
        self.original_num_steps = num_train_timesteps
        # The guided-diffusion "linear" schedule, scaled so that it works for any number of training steps.
        scale = 1000 / num_train_timesteps
        self.base_betas = np.linspace(scale * beta_start, scale * beta_end, num_train_timesteps, dtype=np.float64)
        base_alphas_cumprod = np.cumprod(1.0 - self.base_betas, axis=0)

        kept = set(space_timesteps(num_train_timesteps, self.section))
        last = 1.0
        betas: list[float] = []
        steps: list[int] = []
        for t, abar in enumerate(base_alphas_cumprod):
            if t in kept:
                betas.append(1 - abar / last)
                last = abar
                steps.append(t)
        self.timestep_map = np.asarray(steps, dtype=np.int64)  # (T,) kept original steps
        self.num_timesteps = len(steps)
        # What the UNet is fed: int(step * 1000 / num_train_timesteps) (official ``_scale_timesteps``).
        self._model_steps = torch.tensor([int(s * (1000.0 / num_train_timesteps)) for s in steps], dtype=torch.int64)

        b = np.asarray(betas, dtype=np.float64)
        self.betas = b
        alphas = 1.0 - b
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0); its variance is 0 at t = 0, so the log is clipped to element 1.
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)
        fixed_large = np.append(self.posterior_variance[1], b[1:])
        self._log_fixed_large = np.log(fixed_large)

        # float32 casts, as the official code casts each float64 coefficient at use.
        names = (
            "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod",
            "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod",
            "posterior_mean_coef1",
            "posterior_mean_coef2",
            "posterior_log_variance_clipped",
            "log_betas",
            "_log_fixed_large",
        )
        self._f32 = {n: torch.from_numpy(getattr(self, n).astype(np.float32)) for n in names}
        self._on_device: dict[tuple[str, torch.device], Tensor] = {}
        self._steps_on_device: dict[torch.device, Tensor] = {}

    # --- helpers -------------------------------------------------------------------------------------------

    def _coef(self, name: str, i: Tensor, like: Tensor) -> Tensor:
        """float32 coefficient ``name`` at respaced indices i (B,), shaped (B, 1, ..., 1) to broadcast on like."""
        key = (name, i.device)
        table = self._on_device.get(key)
        if table is None:
            table = self._on_device[key] = self._f32[name].to(i.device)
        return table[i].reshape(-1, *([1] * (like.ndim - 1)))

    def _check_index(self, i: Tensor, x: Tensor) -> None:
        if i.ndim != 1 or i.shape[0] != x.shape[0]:
            raise ValueError(f"step indices must have shape (B,) = ({x.shape[0]},), got {tuple(i.shape)}")

    def model_timesteps(self, i: Tensor) -> Tensor:
        """Respaced indices (B,) -> the original 0..999 steps (B,) int64 that the UNet was trained with."""
        table = self._steps_on_device.get(i.device)
        if table is None:
            table = self._steps_on_device[i.device] = self._model_steps.to(i.device)
        return table[i]

    # --- the process -----------------------------------------------------------------------------------------

    def q_sample(self, x_start: Tensor, i: Tensor, noise: Tensor) -> Tensor:
        """Diffuse x_start to respaced step i: sqrt(abar_i) x_start + sqrt(1 - abar_i) noise. All (B, C, H, W)."""
        self._check_index(i, x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        a = self._coef("sqrt_alphas_cumprod", i, x_start)  # (B, 1, 1, 1)
        b = self._coef("sqrt_one_minus_alphas_cumprod", i, x_start)
        return a * x_start + b * noise

    def p_mean_variance(
        self, model_output: Tensor, x: Tensor, i: Tensor, *, clip_denoised: bool = True
    ) -> dict[str, Tensor]:
        """Mean, log-variance and x0 prediction of p(x_{i-1} | x_i) from the network output at x_i.

        model_output: (B, 2C, H, W) = [eps, v] for learned variances, else (B, C, H, W); x: (B, C, H, W);
        i: (B,) respaced indices. Returns ``mean``, ``log_variance``, ``pred_xstart`` (all (B, C, H, W)); with
        ``clip_denoised`` the x0 prediction is clamped to [-1, 1] before the mean is formed.
        """
        self._check_index(i, x)
        C = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (x.shape[0], 2 * C, *x.shape[2:]):
                raise ValueError(f"model output {tuple(model_output.shape)} must have 2*{C} channels for x")
            model_output, var_values = torch.split(model_output, C, dim=1)  # (B, C, H, W) each
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self._coef("posterior_log_variance_clipped", i, x)
                max_log = self._coef("log_betas", i, x)
                frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]; not clamped (official)
                log_variance = frac * max_log + (1 - frac) * min_log
        else:
            fixed_small = self.model_var_type == ModelVarType.FIXED_SMALL
            name = "posterior_log_variance_clipped" if fixed_small else "_log_fixed_large"
            log_variance = self._coef(name, i, x).expand_as(x)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = (
                self._coef("sqrt_recip_alphas_cumprod", i, x) * x
                - self._coef("sqrt_recipm1_alphas_cumprod", i, x) * model_output
            )
        else:  # START_X
            pred_xstart = model_output
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean = self._coef("posterior_mean_coef1", i, x) * pred_xstart + self._coef("posterior_mean_coef2", i, x) * x
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}
