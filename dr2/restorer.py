"""Face restorers: the one interface every stage calls to restore aligned 512x512 faces.

``FaceRestorer`` is the contract: a batch of aligned faces in, the same number of restored faces out,
uint8 RGB, (B, 512, 512, 3). ``PassthroughRestorer`` returns the faces unchanged, so a user can check
detection and alignment on their data before spending GPU time. ``DR2Restorer`` (below) runs the
official face path: 512 -> DDPM size -> DR2 -> enhancer -> 512. ``restore_stages`` also returns the DR2 output
before the enhancer, for side-by-side reports. :func:`suggest_batch_size` (from :mod:`dr2.memory`) sizes the
fixed restore batch from the free device memory the caller measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dr2.diffusion import SpacedDiffusion
from dr2.lowpass import LowPass
from dr2.memory import Precision, suggest_batch_size
from dr2.sampling import KeyedNoise, dr2_sample
from dr2.sparnet import SPARNetConfig, SPARNetHD
from dr2.unet import AttentionImpl, UNetConfig, UNetModel
from dr2.weights import ModelKind, load_model_dir

__all__ = [
    "FACE_SIZE",
    "DR2Restorer",
    "FaceRestorer",
    "PassthroughRestorer",
    "Precision",
    "bicubic_resize",
    "pil_bicubic_uint8",
    "suggest_batch_size",
    "uint8_to_unit",
    "unit_to_uint8",
]

FACE_SIZE = 512  # aligned faces are always 512x512 (the FFHQ template); the models' sizes come from configs


@runtime_checkable
class FaceRestorer(Protocol):
    """Restores a batch of aligned faces.

    ``keys`` name each face stably (e.g. ``"shard-000/img_17/0"``); a restorer that draws random numbers
    seeds each face from its key, so a face's output never depends on the batch it landed in.
    """

    name: str

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                omega: int | None = None) -> np.ndarray:
        """(B, 512, 512, 3) uint8 RGB -> (B, 512, 512, 3) uint8 RGB. ``omega``: DR2's start step for this call;
        None keeps the restorer's own (set at construction)."""
        ...

    def restore_stages(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                       omega: int | None = None) -> dict[str, np.ndarray]:
        """``{"dr2": the output before the enhancer, "enhanced": what restore() returns}``, each (B, 512, 512, 3)
        uint8 RGB; "enhanced" is byte-identical to :meth:`restore` on the same input."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of the models (names, configs, weight checksums)."""
        ...


class PassthroughRestorer:
    """Returns faces unchanged: detection, alignment and paste-back without any model."""

    name = "passthrough"

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                omega: int | None = None) -> np.ndarray:
        _check_faces(faces, keys)
        return faces.copy()

    def restore_stages(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                       omega: int | None = None) -> dict[str, np.ndarray]:
        _check_faces(faces, keys)
        return {"dr2": faces.copy(), "enhanced": faces.copy()}

    def describe(self) -> dict[str, Any]:
        return {"restorer": self.name}


def _check_faces(faces: np.ndarray, keys: Sequence[str]) -> None:
    if faces.ndim != 4 or faces.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or faces.dtype != np.uint8:
        raise ValueError(f"faces must be uint8 (B, {FACE_SIZE}, {FACE_SIZE}, 3), got {faces.dtype} {faces.shape}")
    if len(keys) != faces.shape[0]:
        raise ValueError(f"got {len(keys)} keys for {faces.shape[0]} faces")


AttentionChoice = Literal["auto", "math", "sdpa"]
ModelT = TypeVar("ModelT", bound=nn.Module)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def uint8_to_unit(faces: np.ndarray, device: torch.device) -> Tensor:
    """(B, H, W, 3) uint8 RGB -> (B, 3, H, W) float32 in [-1, 1] (official ToTensor + Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.ascontiguousarray(faces)).to(device)
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def unit_to_uint8(x: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB, clamped and rounded to nearest."""
    return _quantize(x).cpu().numpy()


def _quantize(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, contiguous, on x's device."""
    y = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def bicubic_resize(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) float32 -> (B, C, size, size): Pillow's BICUBIC filter (Keys a=-0.5, antialiased when
    shrinking, kernel clipped and renormalised at the borders), via torch's antialiased bicubic, in float32."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def pil_bicubic_uint8(faces: Tensor, size: int) -> Tensor:
    """Pillow's ``Image.resize((size, size), BICUBIC)`` on uint8 images, as ``dr2e.py`` reads its input.

    faces: (B, 3, H, W) float32 holding 0..255 values -> (B, 3, size, size) float32 on the uint8 grid. Pillow
    resizes horizontally, saturates and rounds to uint8, then vertically, and rounds again; the float filter
    alone differs from it by up to ~3 grey levels at high-contrast edges. Pillow's fixed-point tap weights
    still leave a few pixels one level apart.
    """
    b, c, h, w = faces.shape
    with torch.autocast(device_type=faces.device.type, enabled=False):
        x = faces.float()
        if w != size:
            x = F.interpolate(x, size=(h, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 255.0).round()
        if h != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 255.0).round()
    return x


def _perturb_(model: nn.Module, generator: torch.Generator) -> None:
    """The fixtures' recipe: p += s * N(0, 1), s = 0.5/sqrt(fan_in) (rank >= 2) or 0.1, so no weight is zero."""
    with torch.no_grad():
        for p in model.parameters():
            s = 0.5 / float(np.sqrt(p[0].numel())) if p.ndim >= 2 else 0.1
            p.add_(s * torch.randn(p.shape, generator=generator))


class DR2Restorer:
    """The official DR2 + SPARNetHD face path (``dr2e.py``), batched, per-face seeded.

    For each aligned face (512 px, uint8 RGB):

    1. [-1, 1], then bicubic down to the DDPM's ``image_size`` (256 for the official UNet). ``dr2e.py`` does
       this with torchvision ``Resize(BICUBIC)`` on the PIL image, i.e. Pillow's antialiased bicubic on uint8
       (each 1-D pass is saturated and rounded to uint8). :func:`pil_bicubic_uint8` does the same with
       torch's antialiased bicubic (a port of Pillow's filter, Keys a=-0.5) and the same per-pass rounding,
       on the device; it matches Pillow to one grey level on ~0.5% of pixels (Pillow's fixed-point weights).
    2. DR2 (:func:`dr2.sampling.dr2_sample`) with ``N``, ``tau`` and the official omega rule; every face draws
       its noise from its own generator seeded by ``(seed, key)`` (:class:`dr2.sampling.KeyedNoise`), so a
       face's output does not depend on the batch it was in. The result is clamped to [-1, 1].
    3. Bicubic up to the enhancer's ``config.size`` (512 for the official SPARNetHD). ``dr2e.py`` calls
       torchvision ``Resize(BICUBIC)`` on the tensor; with today's torchvision (>= 0.17, ``antialias=True``)
       that is the same Pillow-style filter we use (Keys a=-0.5). torchvision < 0.17 used torch's plain
       bicubic (a=-0.75) there; the two differ by well under one grey level on a 2x upscale.
    4. SPARNetHD, clamp to [-1, 1] (the official ``saveImage`` scales to 0..255 and saturates when writing),
       bicubic to 512 if the enhancer's size differs, round to uint8.

    Without an enhancer (``enhancer=None``) step 3 goes straight to 512 and step 4 is skipped.

    ``precision``: "fp32" (default, the official numerics) or "bf16"/"fp16" autocast for the two networks, on
    any device with autocast (CUDA; CPU too, where it is slow but lets tests measure the numerics). Resizing,
    the low-pass filter, the diffusion arithmetic, GroupNorm, the attention softmax and the spectral norms stay
    float32. Measured error against fp32 is stated in ``tests/dr2/test_fastpath.py``.

    Speed options (keyword-only; their defaults keep the fp32 CPU outputs byte-identical to the reference path):

    * ``attention``: "math" (the official explicit attention), "sdpa" (``scaled_dot_product_attention``), or
      "auto" (default): "math" for fp32 on CPU, "sdpa" everywhere else.
    * ``channels_last``: run both networks in NHWC memory format; None (default) = on CUDA only.
    * ``compile``: ``torch.compile`` both networks for the fixed batch shape (``dynamic=False``; ``compile_mode``
      is torch.compile's ``mode``, e.g. "reduce-overhead" for CUDA graphs, "max-autotune"). Off by default. The
      cost is paid once per restorer, on its first batch (or in :meth:`warmup`, which returns the seconds).

    On CUDA the faces go up through pinned host memory with non-blocking copies and come back the same way,
    with one stream synchronisation per :meth:`restore` call; the sampling loop itself never synchronises
    (every per-face generator lives on the device, schedule lookups are device gathers).

    ``omega``: DR2's start step; None takes the official rule from ``N`` and ``tau``
    (:func:`dr2.diffusion.default_omega`).

    ``batch_size``: the networks always run on exactly this many faces; a longer input is split and a short
    chunk is padded (with copies of its last face, whose outputs are dropped). Kernels pick their summation
    order by batch shape (oneDNN/cuBLAS/cuDNN), so only a fixed shape makes a face's output bitwise
    independent of the batch it arrived in; at a fixed shape a row's result does not depend on its position
    or neighbours. Set it to the pipeline's batch size. ``None`` runs whatever batch is given (outputs then
    agree across batch sizes to ~1e-6 only, which flips the odd uint8 value).
    """

    name = "dr2"

    def __init__(
        self,
        *,
        unet: UNetModel,
        enhancer: SPARNetHD | None,
        diffusion: SpacedDiffusion | None = None,
        device: torch.device | str = "cpu",
        precision: Precision = "fp32",
        seed: int = 0,
        model_info: dict[str, Any] | None = None,
        batch_size: int | None = 8,
        omega: int | None = None,
        attention: AttentionChoice = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        compile_mode: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.omega = omega  # DR2's start step; None = the official rule from N and tau
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.batch_size = batch_size
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}")
        if precision != "fp32" and not torch.amp.is_autocast_available(self.device.type):
            raise ValueError(f"precision {precision!r} needs autocast, which {self.device.type} lacks; use 'fp32'")
        self.precision: Precision = precision
        if attention not in ("auto", "math", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'math' or 'sdpa', got {attention!r}")
        reference = self.device.type == "cpu" and precision == "fp32"
        self.attention: AttentionImpl = ("math" if reference else "sdpa") if attention == "auto" else attention
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self._memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.seed = seed
        self.unet = _placed(unet, self.device, self._memory_format).set_attention(self.attention)
        self.enhancer = _placed(enhancer, self.device, self._memory_format) if enhancer is not None else None
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_seconds: float | None = None  # measured on the first chunk (or by warmup) when compiling
        self._unet_fn: nn.Module = self.unet
        self._enhancer_fn: nn.Module | None = self.enhancer
        if compile:
            self._unet_fn = torch.compile(self.unet, dynamic=False, mode=compile_mode)  # type: ignore[assignment]
            if self.enhancer is not None:
                self._enhancer_fn = torch.compile(self.enhancer, dynamic=False, mode=compile_mode)  # type: ignore[assignment]
        self.diffusion = diffusion if diffusion is not None else SpacedDiffusion()
        self.ddpm_size = unet.config.image_size
        self.enhancer_size = enhancer.config.size if enhancer is not None else FACE_SIZE
        self.model_info = model_info or {}
        self._lowpass: dict[int, LowPass] = {}

    # --- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_dirs(cls, ddpm_dir: Path, enhancer_dir: Path | None, **kw: Any) -> DR2Restorer:
        """Load the models of two directories written by :mod:`dr2.weights` (checksums verified)."""
        unet, ddpm_info = load_model_dir(Path(ddpm_dir), expected_kind=ModelKind.DDPM)
        assert isinstance(unet, UNetModel)
        enhancer: SPARNetHD | None = None
        enh_info: dict[str, Any] | None = None
        if enhancer_dir is not None:
            model, enh_info = load_model_dir(Path(enhancer_dir), expected_kind=ModelKind.SPARNETHD)
            assert isinstance(model, SPARNetHD)
            enhancer = model
        info = {"ddpm": _summary(ddpm_info, ddpm_dir), "enhancer": _summary(enh_info, enhancer_dir)}
        return cls(unet=unet, enhancer=enhancer, model_info=info, **kw)

    @classmethod
    def tiny_random(cls, *, weights_seed: int = 0, enhancer: bool = True, **kw: Any) -> DR2Restorer:
        """Tiny configs (64 px UNet, 64 px SPARNetHD) with random, non-zero weights drawn from ``weights_seed``:
        tests, benchmarks, the demo. ``kw`` go to the constructor (``seed`` there is the noise seed)."""
        seed = weights_seed
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNetModel(UNetConfig.tiny())
            _perturb_(unet, g)
            sparnet: SPARNetHD | None = None
            if enhancer:
                sparnet = SPARNetHD(SPARNetConfig.tiny())
                _perturb_(sparnet, g)
                sparnet.power_iteration_(30)
        info = {
            "ddpm": {"source": f"tiny_random(seed={seed})", "config": unet.config.to_dict(), "sha256": None},
            "enhancer": None
            if sparnet is None
            else {"source": f"tiny_random(seed={seed})", "config": sparnet.config.to_dict(), "sha256": None},
        }
        return cls(unet=unet, enhancer=sparnet, model_info=info, **kw)

    # --- the face path -----------------------------------------------------------------------------------------

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                omega: int | None = None) -> np.ndarray:
        """(B, 512, 512, 3) uint8 RGB -> (B, 512, 512, 3) uint8 RGB; B may be 0. ``omega``: this call's start step
        (a block's faces of different settings are restored in one call per setting); None: the constructed one."""
        return self._download(_quantize(self.restore_float(faces, keys, N=N, tau=tau, omega=omega)))

    def restore_stages(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                       omega: int | None = None) -> dict[str, np.ndarray]:
        """``{"dr2": DR2's output x0_hat(x_tau) before the enhancer, bicubic to 512, "enhanced": the final faces}``,
        each (B, 512, 512, 3) uint8 RGB; "enhanced" is byte-identical to :meth:`restore`. Without an enhancer
        both are the same."""
        dr2, enhanced = self._run(faces, keys, N=N, tau=tau, omega=omega, stages=True)
        return {"dr2": self._download(_quantize(dr2)), "enhanced": self._download(_quantize(enhanced))}

    def restore_float(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int,
                      omega: int | None = None) -> Tensor:
        """The path of :meth:`restore` before quantisation: (B, 3, 512, 512) float32 in [-1, 1], on ``device``."""
        return self._run(faces, keys, N=N, tau=tau, omega=omega, stages=False)[1]

    @torch.inference_mode()
    def warmup(self, *, N: int, tau: int) -> float:
        """Run one batch of grey faces (compiling the networks if ``compile``); returns its wall seconds, which
        with ``compile`` is the one-off compile cost plus one batch. Outputs are not affected."""
        faces = np.full((self.batch_size or 1, FACE_SIZE, FACE_SIZE, 3), 128, np.uint8)
        t0 = time.perf_counter()
        self.restore(faces, [f"warmup/{i}" for i in range(len(faces))], N=N, tau=tau)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def _run(
        self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int, stages: bool, omega: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """(dr2 stage or an empty tensor when not ``stages``, final), each (B, 3, 512, 512) float32 on device."""
        _check_faces(faces, keys)
        B = faces.shape[0]
        if B == 0:
            empty = torch.empty((0, 3, FACE_SIZE, FACE_SIZE), device=self.device)
            return empty, empty
        chunk = self.batch_size or B
        dr2_outs, outs = [], []
        for start in range(0, B, chunk):
            part, part_keys = faces[start : start + chunk], list(keys[start : start + chunk])
            n = part.shape[0]
            if n < chunk:  # pad to the fixed shape; the padding rows' outputs are dropped
                part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
                part_keys += [f"{part_keys[-1]}\x00pad{j}" for j in range(chunk - n)]
            first = self.compile and self.compile_seconds is None
            t0 = time.perf_counter()
            x0, out = self._restore_chunk(part, part_keys, N=N, tau=tau, omega=omega)
            if first:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # once per restorer, to time the compile honestly
                self.compile_seconds = time.perf_counter() - t0
            outs.append(out[:n])
            if stages:
                dr2_outs.append(bicubic_resize(x0[:n], FACE_SIZE).clamp(-1.0, 1.0))
        dr2_all = torch.cat(dr2_outs) if stages else torch.empty(0, device=self.device)
        return dr2_all, torch.cat(outs)  # (B, 3, 512, 512)

    def _restore_chunk(self, faces: np.ndarray, keys: list[str], *, N: int, tau: int,
                       omega: int | None = None) -> tuple[Tensor, Tensor]:
        """One fixed-shape chunk -> (x0_hat at the DDPM size, final faces at 512), float32 on device."""
        x = self._upload(faces).permute(0, 3, 1, 2)  # (B, 3, 512, 512) uint8
        y = pil_bicubic_uint8(x.float(), self.ddpm_size).div(127.5).sub(1.0)  # (B, 3, S_ddpm, S_ddpm) in [-1, 1]
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        # else y keeps the strides the resize gives it (today's bytes: from the NHWC upload, channels-last-like)
        noise = KeyedNoise(keys, seed=self.seed, device=self.device)
        with self._autocast():
            x0 = dr2_sample(self._unet_fn, y, self.diffusion, N=N, tau=tau,
                            omega=self.omega if omega is None else omega, noise=noise, lowpass=self._lowpass_for(N))
        x0 = x0.float().clamp(-1.0, 1.0)  # (B, 3, S_ddpm, S_ddpm)
        h = bicubic_resize(x0, self.enhancer_size)  # (B, 3, S_enh, S_enh)
        if self._enhancer_fn is not None:
            with self._autocast():
                h = self._enhancer_fn(h.contiguous(memory_format=torch.channels_last) if self.channels_last else h)
            h = h.float().clamp(-1.0, 1.0)
        return x0, bicubic_resize(h, FACE_SIZE).clamp(-1.0, 1.0)  # (B, 3, 512, 512)

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        """One UNet call exactly as the sampler makes it (precision, memory format, compiled or not):
        x (B, 3, S, S) on device, t (B,) original steps -> (B, 6, S, S). For benchmarks."""
        with torch.inference_mode(), self._autocast():
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out: Tensor = self._unet_fn(x, t)
            return out

    def _upload(self, faces: np.ndarray) -> Tensor:
        """Host uint8 (B, H, W, 3) -> device; on CUDA through pinned memory, without blocking the host."""
        x = torch.from_numpy(np.ascontiguousarray(faces))
        if self.device.type != "cuda":
            return x.to(self.device)
        return x.pin_memory().to(self.device, non_blocking=True)

    def _download(self, y: Tensor) -> np.ndarray:
        """Device uint8 -> numpy; on CUDA a non-blocking copy into pinned memory and one stream sync."""
        if self.device.type != "cuda":
            return y.cpu().numpy()
        host = torch.empty(y.shape, dtype=y.dtype, pin_memory=True)
        host.copy_(y, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    def _autocast(self) -> torch.autocast:
        if self.precision == "fp32":
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=_AUTOCAST_DTYPES[self.precision])

    def _lowpass_for(self, N: int) -> LowPass | None:
        if N <= 1 or self.ddpm_size % N:
            return None  # dr2_sample rejects a non-divisor N itself, with the valid range in the message
        if N not in self._lowpass:
            self._lowpass[N] = LowPass(image_size=self.ddpm_size, N=N).to(self.device)
        return self._lowpass[N]

    def describe(self) -> dict[str, Any]:
        """Configs and weight checksums of both models, the schedule and the numerics (JSON-serialisable)."""
        enh = self.model_info.get("enhancer")
        return {
            "restorer": self.name,
            "ddpm": self.model_info.get("ddpm", {"config": self.unet.config.to_dict(), "sha256": None}),
            "enhancer": enh
            if enh is not None or self.enhancer is None
            else {"config": self.enhancer.config.to_dict(), "sha256": None},
            "enhancer_name": "sparnethd" if self.enhancer is not None else "none",
            "diffusion": {"section": list(self.diffusion.section), "num_timesteps": self.diffusion.num_timesteps},
            "ddpm_size": self.ddpm_size,
            "enhancer_size": self.enhancer_size,
            "precision": self.precision,
            "seed": self.seed,
            "omega": self.omega,
            "batch_size": self.batch_size,
            "attention": self.attention,
            "channels_last": self.channels_last,
            "compile": (self.compile_mode or "default") if self.compile else False,
            "noise": "KeyedNoise: torch.Generator per face, blake2b(f'{seed}:{key}')",
            "resize": "bicubic a=-0.5, antialiased (Pillow BICUBIC), float32",
        }


def _placed(model: ModelT, device: torch.device, memory_format: torch.memory_format) -> ModelT:
    """``model`` on ``device`` in eval mode, its 4-D weights in ``memory_format`` (what ``Module.to`` does with
    ``memory_format=``, which torch's type stubs do not declare)."""
    model = model.to(device).eval()
    if memory_format is torch.channels_last:
        model.to(memory_format=memory_format)  # type: ignore[call-overload]
    return model


def _summary(info: dict[str, Any] | None, path: Path | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "dir": str(path),
        "kind": info["kind"],
        "config": info["config"],
        "sha256": info["sha256"],
        "source": info.get("source"),
        "num_parameters": info.get("num_parameters"),
    }
