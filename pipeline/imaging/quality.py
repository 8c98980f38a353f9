"""Face-level quality measures: cheap, deterministic numbers that say whether a restored face looks wrong.

Each restored face is measured from its aligned input crop and its restored crop, both (512, 512, 3) uint8 RGB
in the FFHQ template (see ``pipeline/imaging/faces.py``). None of the measures needs a learned model, so they run on
the CPU in a few milliseconds per face and give the same number on every machine.

The three numbers (fields of :class:`FaceQuality`):

* ``lowfreq_psnr`` (dB) -- **low-frequency consistency**. PSNR (peak 1.0 on [0, 1] RGB) between input and
  output after both pass through DR2's own low-pass filter Phi_N (``dr2.lowpass.LowPass``: cubic down by N,
  cubic up by N; N is the run's N). DR2 samples under the constraint Phi_N(output) ~ Phi_N(input) (the paper's
  Eq. 7: from step omega on, the low frequencies are taken from the diffused input), so a large drift means the
  output stopped following the input: a different face, a colour cast, noise. DR2 filters at the DDPM's size
  (256 for the official weights), so pass ``ddpm_size``: the measure then filters the 512 crop by
  ``N * 512 / ddpm_size`` (N = 8 at 256 keeps 32x32, which is a factor 16 at 512). With a factor of 1 the
  filter is the identity and this is a plain PSNR (then a real restoration also lowers it: every change counts).
  The input is the aligned crop DR2 was given, before DR2's own bicubic resize to ``ddpm_size``.
  Limits: it is a difference, not a judgement. A heavily degraded input (x8 with noise) restored perfectly
  scores lower than a mild one, because Phi_N keeps some of the degradation's own noise and blur; larger N
  forgives more. It sees the whole 512 crop, background and hair included.
* ``delta_e`` -- **colour shift**: mean CIE76 Delta E (Euclidean distance in CIE L*a*b*, OpenCV's D65 Lab on
  float32 RGB in [0, 1]) between input and output after both are area-downsampled to 32x32 (16x: what is left
  is colour and shading, not texture or noise). About 1 is the smallest difference a person notices side by
  side; 2-10 is a visible tint; above that, a different colour. CIE76 (not CIEDE2000) because it is one line,
  monotone and the threshold is calibrated on it; it over-weights changes in saturated colours (a vivid
  background counts more than skin). It assumes the input's colours are right: a restoration that correctly
  removes a colour cast is flagged too.
* ``sharpness_gain`` -- variance of the Laplacian (3x3, on luma) of the output divided by that of the input
  (both plus a small epsilon, so two flat crops give 1). Above 1 the output has more fine detail than the
  input; below 1 it is blurrier. Restoring a blurred face should raise it a lot (x4-x8 degradations: 10 to
  several hundred), so only gross excess is flagged: noise or ringing pasted in scores in the thousands.
  Limits: it counts noise and JPEG blocking as "detail", and a clean input legitimately gives ~1.

:class:`QualityThresholds` holds the limits, and :func:`flags` turns a measurement into reasons. A face with
any flag is *suspect*: it is kept and written like every other face (the pipeline never drops a face on these
numbers); the report shows suspect faces first, by :func:`severity`.

Default thresholds, from ``python -m tests.pipeline.test_quality`` (41 aligned faces: astronaut, Grace Hopper
and 39 gray LFW faces upscaled 6x; factors 1, 4, 8 and 16 at 512), comparing plausible restorations (the clean
face as the output for its x2/x4/x8 degraded input, identity, Gaussian blur sigma 1, unsharp masking, JPEG q30)
with plausible failures (hue rotated 40/90 degrees, a (1.25, 1, 0.75) colour cast, uniform noise, another face,
Gaussian blur sigma 4). Worst cases seen:

* ``lowfreq_psnr >= 20 dB``. Restorations: min 29.7 at factor 16, 24.6 at 8, 21.2 at 4, 19.2 at 1 (all
  clean-for-x8; x4 and milder >= 22.7). Failures: another face <= 19.3; noise <= 11.6 on the colour faces
  (<= 23.3 on gray LFW at 16); hue 40 on the colour faces 18.7 to 25.2; cast <= 21.0.
* ``delta_e <= 10``. Restorations: max 7.2 (Grace Hopper, clean for x8), <= 3.5 for x4 and milder. Failures:
  cast >= 19.3; hue 40 >= 15.7 on the colour faces; noise >= 6.9; another face >= 6.4.
* ``0.2 <= sharpness_gain <= 1000``. Restorations: min 0.21 (blur sigma 1), max 124 (clean for x8). Failures:
  blur sigma 4 <= 0.31 (median 0.11); noise over a clean input 142 to 14764 (median 5298).

So: one clean-for-x8 face falls under 20 dB at factor 1 (no low-pass there to forgive the degradation); hue
rotation is invisible on gray faces (nothing to rotate); the sharpness bounds are loose on purpose, because the
gain is relative to the input (a sharp restoration of an x8 input and noise over a clean input both score ~130),
and a correct restoration that removes noise legitimately lowers it. The flags catch gross failures: a wrong colour,
a different face, noise; they do not rank good restorations. No learned metric (LPIPS, NIQE, identity
similarity) is used: their weights are not available offline here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np
import torch

from dr2.lowpass import LowPass

FACE_SIZE = 512  # aligned crops are (512, 512, 3), the FFHQ template DR2 was trained on
COLOUR_SIZE = 32  # side of the low-frequency image Delta E is measured on (512 / 16)
_EPS = 1e-6


@dataclass(frozen=True)
class FaceQuality:
    """The measures of one restored face (see the module docstring for what each means)."""

    lowfreq_psnr: float  # dB, PSNR of Phi_N(input) vs Phi_N(output), peak 1.0; capped at 100 for equal images
    delta_e: float  # mean CIE76 Delta E at 32x32
    sharpness_gain: float  # var(Laplacian(output)) / var(Laplacian(input))
    N: int  # the low-pass factor lowfreq_psnr was measured with, at the 512 crop (crop_factor)

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready, floats rounded to 4 decimals (what report.json and dr2.json carry)."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @staticmethod
    def from_dict(d: dict[str, float | int]) -> FaceQuality:
        return FaceQuality(
            lowfreq_psnr=float(d["lowfreq_psnr"]),
            delta_e=float(d["delta_e"]),
            sharpness_gain=float(d["sharpness_gain"]),
            N=int(d["N"]),
        )


@dataclass(frozen=True, kw_only=True)
class QualityThresholds:
    """Where a measurement becomes a flag. Defaults calibrated as the module docstring says."""

    min_lowfreq_psnr: float = 20.0  # dB; below: "lowfreq_drift"
    max_delta_e: float = 10.0  # CIE76; above: "colour_shift"
    min_sharpness_gain: float = 0.2  # below: "sharpness_loss" (the output is much blurrier than the input)
    max_sharpness_gain: float = 1000.0  # above: "sharpness_excess" (noise / ringing, not detail)

    def __post_init__(self) -> None:
        if not 0 < self.min_sharpness_gain < self.max_sharpness_gain:
            raise ValueError(
                f"need 0 < min_sharpness_gain < max_sharpness_gain, got {self.min_sharpness_gain}, "
                f"{self.max_sharpness_gain}"
            )


FLAG_LOWFREQ = "lowfreq_drift"
FLAG_COLOUR = "colour_shift"
FLAG_SHARPNESS_LOSS = "sharpness_loss"
FLAG_SHARPNESS_EXCESS = "sharpness_excess"


@lru_cache(maxsize=8)
def _lowpass(N: int) -> LowPass:
    return LowPass(image_size=FACE_SIZE, N=N).eval()


def _check(name: str, x: np.ndarray) -> None:
    if x.shape != (FACE_SIZE, FACE_SIZE, 3) or x.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 ({FACE_SIZE}, {FACE_SIZE}, 3), got {x.dtype} {x.shape}")


def crop_factor(N: int, ddpm_size: int = FACE_SIZE) -> int:
    """The low-pass factor at the 512 crop that cuts where Phi_N cuts at the DDPM's size (DR2 filters at
    ``ddpm_size``, 256 for the official UNet: N = 8 there keeps 32x32, which is a factor 16 at 512)."""
    if FACE_SIZE % ddpm_size or FACE_SIZE % (N * (FACE_SIZE // ddpm_size)):
        raise ValueError(f"N={N} at ddpm_size={ddpm_size} does not map to a divisor of {FACE_SIZE}")
    return N * (FACE_SIZE // ddpm_size)


def lowfreq_psnr(inp: np.ndarray, out: np.ndarray, *, N: int, ddpm_size: int = FACE_SIZE) -> float:
    """PSNR (dB, peak 1) between Phi(inp) and Phi(out), Phi the 512-pixel equivalent of DR2's Phi_N at
    ``ddpm_size`` (:func:`crop_factor`); both (512, 512, 3) uint8. 100.0 when equal.

    Phi is linear, so Phi(out) - Phi(inp) = Phi(out - inp): one filter pass on the difference.
    """
    factor = crop_factor(N, ddpm_size)
    diff = out.astype(np.float32) - inp.astype(np.float32)  # (512, 512, 3) in [-255, 255]
    x = torch.from_numpy(diff).permute(2, 0, 1).unsqueeze(0) / 255.0  # (1, 3, 512, 512)
    with torch.inference_mode():
        low = _lowpass(factor)(x)  # (1, 3, 512, 512)
    mse = float(torch.mean(low * low))
    return 100.0 if mse <= 1e-10 else -10.0 * math.log10(mse)


def _lab_small(rgb: np.ndarray) -> np.ndarray:
    small = cv2.resize(rgb, (COLOUR_SIZE, COLOUR_SIZE), interpolation=cv2.INTER_AREA)  # (32, 32, 3) uint8
    return cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)  # L in [0, 100], a/b about +-100


def mean_delta_e(inp: np.ndarray, out: np.ndarray) -> float:
    """Mean CIE76 Delta E between the 32x32 area-downsampled versions of two RGB uint8 images."""
    d = _lab_small(inp) - _lab_small(out)
    return float(np.mean(np.sqrt(np.sum(d * d, axis=2))))


def laplacian_variance(rgb: np.ndarray) -> float:
    """Variance of the 3x3 Laplacian of the luma (values in [0, 255])."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float(cv2.Laplacian(gray, cv2.CV_32F, ksize=1).var())


def measure_face(inp: np.ndarray, out: np.ndarray, *, N: int, ddpm_size: int = FACE_SIZE) -> FaceQuality:
    """The three measures of one face: ``inp`` the aligned input crop, ``out`` the restored crop, both
    (512, 512, 3) uint8 RGB; ``N`` the run's low-pass factor and ``ddpm_size`` the side DR2 applied it at (the
    DDPM's ``image_size``, 256 for the official weights; the default 512 applies N to the crop itself)."""
    _check("inp", inp)
    _check("out", out)
    gain = (laplacian_variance(out) + _EPS) / (laplacian_variance(inp) + _EPS)
    return FaceQuality(
        lowfreq_psnr=lowfreq_psnr(inp, out, N=N, ddpm_size=ddpm_size),
        delta_e=mean_delta_e(inp, out),
        sharpness_gain=gain,
        N=crop_factor(N, ddpm_size),
    )


def flags(q: FaceQuality, thresholds: QualityThresholds | None = None) -> list[str]:
    """The reasons ``q`` looks wrong (empty when none): any of lowfreq_drift, colour_shift, sharpness_loss,
    sharpness_excess, in that order."""
    t = thresholds or QualityThresholds()
    out = []
    if q.lowfreq_psnr < t.min_lowfreq_psnr:
        out.append(FLAG_LOWFREQ)
    if q.delta_e > t.max_delta_e:
        out.append(FLAG_COLOUR)
    if q.sharpness_gain < t.min_sharpness_gain:
        out.append(FLAG_SHARPNESS_LOSS)
    if q.sharpness_gain > t.max_sharpness_gain:
        out.append(FLAG_SHARPNESS_EXCESS)
    return out


def severity(q: FaceQuality, thresholds: QualityThresholds | None = None) -> float:
    """How far past its thresholds a face is: 0 when unflagged, else the sum over flags of the relative excess
    (PSNR in units of 10 dB below the limit, Delta E and sharpness as ratios to the limit). Sorts the report."""
    t = thresholds or QualityThresholds()
    s = 0.0
    if q.lowfreq_psnr < t.min_lowfreq_psnr:
        s += (t.min_lowfreq_psnr - q.lowfreq_psnr) / 10.0
    if q.delta_e > t.max_delta_e:
        s += q.delta_e / t.max_delta_e - 1.0
    if q.sharpness_gain < t.min_sharpness_gain:
        s += math.log2(t.min_sharpness_gain / max(q.sharpness_gain, _EPS))
    if q.sharpness_gain > t.max_sharpness_gain:
        s += math.log2(q.sharpness_gain / t.max_sharpness_gain)
    return s
