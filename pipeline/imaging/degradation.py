"""How degraded an aligned face is, before restoration: one cheap, deterministic estimate per face.

Measured on the aligned input crop, (512, 512, 3) uint8 RGB in the FFHQ template (``pipeline/imaging/faces.py``), i.e.
on what DR2 is given: the face after detection, alignment and the resampling that alignment implies. A face that is
small in the photo is upscaled to 512 by the warp, so its crop holds little real detail although the photo itself
may be undegraded: such a face *is* in need of restoration, and the estimate says so. **Clean means clean at 512**:
the face's detail reaches (about) the crop's own pixel scale, without visible noise or JPEG blocking. In practice
that takes a face box of ~200 px or more (upscaled at most ~1.6x by the alignment) in an undegraded photo; a 90-px
face, upscaled ~3x, is ``mild`` however clean its photo.

The measures (fields of :class:`Degradation`), on the luma of the face region (``FACE_REGION`` of the template:
brows to chin, cheek to cheek, so background and hair barely count):

* ``resolution`` -- the **effective resolution**, as a factor of the crop's pixels: the largest factor N at which
  DR2's low-pass Phi_N (down by N, up by N; ``dr2/lowpass.py``) leaves the face nearly unchanged. 1 means detail
  down to the crop's pixels; 8 means no more detail than a 64x64 image holds. This is DR2's own language: DR2
  keeps Phi_N of its input and regenerates the rest, so a face whose ``resolution`` is R loses nothing real under
  a factor N <= R. Measured as: for N = 1.41, 2, 2.83, ... 32 (half octaves), d(N) = the RMS of x - Phi_N x over
  32x32 blocks, less 1.2 x the 20th percentile of the block energies (noise and grain, spread evenly over the
  face, are not detail; detail is where the eyes, mouth and edges are), divided by the face's coarse contrast (std
  of Phi_16 x); ``resolution`` is where d(N) first exceeds ``RESOLUTION_TOLERANCE`` = 0.1, interpolated in log N,
  capped at 32. Phi_N is OpenCV's area-down / cubic-up resize, a cheap stand-in for DR2's MATLAB-style filter.
* ``noise`` -- the **noise level** in 8-bit levels: the face region resampled down by ``resolution`` (at most 8),
  where noise that the warp spread over several crop pixels is pixel-sized again, then Immerkaer's estimator (the
  3x3 mask [1 -2 1; -2 4 -2; 1 -2 1], blind to shading and straight edges) made robust to detail with the median of
  its absolute response instead of the mean (sigma = 1.4826 median / 6). It reads fine skin texture and grain as
  well as noise: undegraded faces read 1.9 .. 2.7, faces flattened by JPEG below 1.5.
* ``blocking`` -- the **JPEG blocking** in dB. Block edges repeat every 8 photo pixels, which the warp turns into a
  grid of unknown period P = 8 x (crop pixels per photo pixel), turned by the head's roll. The absolute second
  differences of the luma are averaged over 32-pixel stripes (rows for the vertical grid lines, columns for the
  horizontal ones) and the power spectra of these profiles summed; for each candidate P in 8 .. 64 crop pixels the
  comb's strength is the smaller excess, over the spectrum's local median (+-25% in frequency), of its first two
  harmonics 1/P and 2/P; ``blocking`` is the strongest comb and ``block_period`` its P. Asking for both harmonics
  rejects the ripple that resampling itself leaves at the photo's pixel period.

``score`` is in the unit of ``resolution``: the **equivalent low-pass factor** (at the 512 crop) that the face
calls for, ``resolution * 2 ** (noise_octaves + blocking_octaves)``:

* noise: Phi_N divides the std of noise that is white at the face's own scale by N, so noise sigma above
  ``NOISE_FREE`` (3 levels) asks for a further factor ``sigma / NOISE_FREE``;
* blocking: its excess over ``BLOCKING_FREE`` (3 dB) adds one octave per ``BLOCKING_PER_OCTAVE`` (12 dB), scaled by
  ``TEXTURE_TYPICAL / noise`` (2 / noise, noise floored at 0.5): how much of the blocks' texture the quantisation
  flattened. At quality 20 and below the grid's strength saturates while the blocks keep losing their texture; the
  texture loss alone (a naturally smooth face) counts for nothing.

The ``verdict`` cuts the score at :class:`DegradationThresholds`, which speak DR2's factors at the 512 crop (the
presets filter at the DDPM's 256, so a factor F at 512 is N = F / 2 there): ``clean`` up to ``clean_max_factor``
(2.5); ``mild`` up to ``mild_max_factor`` (8: the mild preset, N = 4 at 256, keeps everything real such a face
holds); ``moderate`` up to ``moderate_max_factor`` (16: N = 8); ``severe`` above (N = 16, factor 32).

Calibration (``tests/pipeline/test_degradation.py``; the table: ``benchmarks/bench_degradation.py``): real photos
(Grace Hopper, face box 179 x 220 px; the same photo mirrored, rotated 7 degrees and shrunk to 0.8; the astronaut,
88 x 113 px; Grace Hopper at half size) degraded in the photo along known ladders (down/up-scaling by 2 .. 16,
Gaussian blur sigma 1 .. 6, Gaussian noise std 5 .. 40, JPEG quality 50 .. 10, and ``jobs.demo.degrade``'s blur +
downscale + noise + JPEG 40 mix at 1 .. 16), detected with the project's MTCNN and aligned as the pipeline does.

* Every ladder is ordered: Spearman(score, level) = 1.00 for every face and ladder (estimator version 1).
* Undegraded faces of 200 px and more (16 variants of the Grace Hopper photo: mirrored, rotated +-5/10 degrees,
  shifted, gray, re-encoded at JPEG 90/95, upscaled 1.2/1.5x): all clean, scores 1.99 .. 2.16.
* Faces downscaled by 8 or more (17 detected): none clean, all moderate or severe (lowest score 9.0).
* ``resolution`` matches the known factor (crop pixels per photo pixel x downscaling) up to x4 and reads 20-25%
  low beyond (Grace Hopper: 3.0, 4.5, 5.1, 7.6, 9.0, 14.3, 20.9 for 3.0, 4.5, 6.0, 8.9, 11.9, 17.9, 23.8).
* Photo noise std 10 reads 4.0 .. 4.4 (mild), std 25 7.9 .. 8.7 (moderate), std 40 8.8 .. 12.2 (moderate or
  severe); JPEG quality 10 is moderate on 200-px faces, quality 30 and above mild.

Why the defaults: ``RESOLUTION_TOLERANCE`` makes ``resolution`` equal the known factor on the x2 and x3 rungs; the
clean limit 2.5 sits between undegraded 200-px faces (<= 2.2) and the same faces down/up-scaled by 2 or blurred by
sigma 1 (>= 3.0); ``NOISE_FREE`` and ``BLOCKING_FREE`` sit just above what undegraded faces read (noise <= 2.7,
blocking <= 4.0 dB, a JPEG original's own grid included, which counts for <= 0.05 octave); ``BLOCKING_PER_OCTAVE``
makes quality 10 moderate and keeps quality 50 within mild; mild/moderate are DR2's preset factors.

Cost: about 3 ms per face on one CPU thread (the resolution ladder stops at its crossing: sharp faces are cheaper).
Deterministic: no randomness, and the same numbers for the same crop on a given build of OpenCV and numpy.

Limits -- what it cannot see:

* Only the face region's luma: colour casts, faded colour, chroma noise and colour bleeding are invisible, and so
  is damage confined to hair, background or the crop's border. Profile or occluded faces put background or hands
  into the region.
* It does not know faces: a naturally smooth face (a child, make-up, soft focus, airbrushing) reads as lower
  resolution than a wrinkled one of the same sharpness; a deeply textured face (wrinkles, stubble, film grain)
  reads as slightly noisy. Noise weaker than about std 6 in the photo is not told from skin texture.
* Noise must be spread evenly over the face: noise smoothed into blotches (denoising, JPEG over noise) reads low,
  and very strong noise masks fine detail, so ``resolution`` rises with it (std 40 doubles it).
* Blocking is found only where the JPEG grid is roughly along the crop's axes and 8 .. 64 crop pixels wide: heads
  rolled by more than ~10 degrees in the photo, JPEG before a rotation or resize, or block grids of tiny faces
  (> 8x upscaled) go unseen and count only through the detail they removed. Quality 50 and above is mostly
  invisible, as it is to the eye at this size; a halftone screen or a regular fabric can read as blocking.
* Motion blur, defocus, scratches, scan lines and stains count only as far as they remove detail or add even
  texture. Beyond a factor of ~20 the resolution saturates (at 32 a face is 16 px of information).
* The calibration rests on two real people (one of them only at 90 px: the only faces that ship offline) and on
  synthetic degradations; the clean limit rests on variants of one photograph. Re-run the calibration on a sample
  of your own archive, and change the thresholds, before trusting the verdicts on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import StrEnum

import cv2
import numpy as np

ESTIMATOR_VERSION = "degradation-1"  # bump whenever a measure, a constant or a default threshold changes

FACE_SIZE = 512
# The region the filters run on (the face with a margin, so Phi_N sees past the measured region's edges) and the
# measured region inside it, as (y0, y1, x0, x1) of the 512 template: brows to chin, cheek to cheek.
CONTEXT_REGION = (128, 448, 96, 416)
FACE_REGION = (176, 432, 144, 368)
BLOCK = 32  # side of the blocks whose energies give the detail floor
FLOOR_PERCENTILE = 20.0
FLOOR_WEIGHT = 1.2  # the floor is subtracted this many times (noise energy fluctuates from block to block)
LADDER = tuple(2.0 ** (k / 2) for k in range(1, 11))  # Phi_N factors 1.41 .. 32, half an octave apart
MAX_FACTOR = LADDER[-1]
CONTRAST_FACTOR = 16.0  # the face's coarse contrast: std of Phi_16 over the region
MIN_CONTRAST = 1.0  # 8-bit levels; a region flatter than this holds no face to measure (-> MAX_FACTOR)
RESOLUTION_TOLERANCE = 0.1  # d(N) / contrast at which Phi_N starts to change the face
NOISE_FREE = 3.0  # noise (8-bit levels) that does not count: undegraded faces read 1.9 .. 2.7
BLOCKING_FREE = 3.0  # dB of blocking that does not count: undegraded photos read up to ~4 (their own JPEG)
BLOCKING_PER_OCTAVE = 12.0  # dB of blocking above BLOCKING_FREE that count as one octave, at TEXTURE_TYPICAL
NOISE_MAX_SCALE = 8.0  # noise is read at most this far down: smaller images are too few pixels for a median
TEXTURE_TYPICAL = 2.0  # the noise reading of an undegraded face (skin texture, grain)
TEXTURE_MIN = 0.5  # floor of the noise reading in the blocking term (a face flattened to nothing)
_STRIPE = 32  # rows (columns) averaged into one profile for the blocking spectrum
_NFFT = 1024  # profiles are zero-padded to this length: frequency steps of 1/1024 cycle per pixel
_PERIODS = np.arange(8.0, 64.0, 0.25)  # candidate grid periods (crop pixels): 8 x scale for scales 1 .. 8
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_EPS = 1e-6


class Verdict(StrEnum):
    """What a face needs (later phases map it to a DR2 setting)."""

    CLEAN = "clean"  # nothing to restore
    MILD = "mild"  # DR2 mild: N = 4, tau = 22 (the official demo's settings)
    MODERATE = "moderate"  # N = 8, tau = 35
    SEVERE = "severe"  # N = 16, tau = 35


@dataclass(frozen=True, kw_only=True)
class DegradationThresholds:
    """Where the score (an equivalent low-pass factor at the 512 crop) changes verdict; see the module docstring.

    ``clean_max_factor`` is calibrated (undegraded 200-px faces score 2.0 .. 2.2, the same faces down/up-scaled by
    2 or blurred by sigma 1 score 3.0 and more); the other two are DR2's own preset factors at 512 (N = 4 and 8 at
    the DDPM's 256).
    """

    clean_max_factor: float = 2.5
    mild_max_factor: float = 8.0
    moderate_max_factor: float = 16.0

    def __post_init__(self) -> None:
        if not 1.0 <= self.clean_max_factor <= self.mild_max_factor <= self.moderate_max_factor:
            raise ValueError(
                "need 1 <= clean_max_factor <= mild_max_factor <= moderate_max_factor, got "
                f"{self.clean_max_factor}, {self.mild_max_factor}, {self.moderate_max_factor}"
            )

    def verdict(self, score: float) -> Verdict:
        if score <= self.clean_max_factor:
            return Verdict.CLEAN
        if score <= self.mild_max_factor:
            return Verdict.MILD
        if score <= self.moderate_max_factor:
            return Verdict.MODERATE
        return Verdict.SEVERE


@dataclass(frozen=True)
class Degradation:
    """One face's estimate: ``score`` (equivalent low-pass factor at 512, >= 1, higher = more degraded), its
    ``verdict``, and the measures behind it (module docstring)."""

    score: float
    verdict: Verdict
    resolution: float  # effective resolution as a factor of the crop's pixels, 1 .. 32
    noise: float  # 8-bit levels at the face's effective resolution
    blocking: float  # dB, JPEG grid strength
    block_period: float  # crop pixels, the period of the strongest grid candidate (meaningful when blocking is high)
    version: str = ESTIMATOR_VERSION

    def to_dict(self) -> dict[str, float | str]:
        """JSON-ready (what dr2.json carries as a face's ``degradation``), floats rounded to 3 decimals."""
        d = asdict(self)
        return {k: (round(v, 3) if isinstance(v, float) else str(v)) for k, v in d.items()}

    @staticmethod
    def from_dict(d: dict[str, float | str]) -> Degradation:
        return Degradation(
            score=float(d["score"]),
            verdict=Verdict(str(d["verdict"])),
            resolution=float(d["resolution"]),
            noise=float(d["noise"]),
            blocking=float(d["blocking"]),
            block_period=float(d["block_period"]),
            version=str(d.get("version", ESTIMATOR_VERSION)),
        )


def estimate_degradation(crop: np.ndarray, thresholds: DegradationThresholds | None = None) -> Degradation:
    """The degradation estimate of one aligned face ``crop`` (512, 512, 3) uint8 RGB (module docstring)."""
    if crop.shape != (FACE_SIZE, FACE_SIZE, 3) or crop.dtype != np.uint8:
        raise ValueError(f"crop must be uint8 ({FACE_SIZE}, {FACE_SIZE}, 3), got {crop.dtype} {crop.shape}")
    t = thresholds or DegradationThresholds()
    cy0, cy1, cx0, cx1 = CONTEXT_REGION
    luma = cv2.cvtColor(crop[cy0:cy1, cx0:cx1], cv2.COLOR_RGB2GRAY).astype(np.float32)  # (320, 320) in 0..255
    fy0, fy1, fx0, fx1 = FACE_REGION
    face = (slice(fy0 - cy0, fy1 - cy0), slice(fx0 - cx0, fx1 - cx0))  # the measured region inside the context
    resolution = effective_resolution(luma, face)
    noise = noise_level(luma[face], scale=min(resolution, NOISE_MAX_SCALE))
    blocking, period = blocking_strength(luma[face])
    score = resolution * 2.0 ** (noise_octaves(noise) + blocking_octaves(blocking, noise))
    return Degradation(
        score=score,
        verdict=t.verdict(score),
        resolution=resolution,
        noise=noise,
        blocking=blocking,
        block_period=period,
    )


def noise_octaves(noise: float) -> float:
    """Octaves of low-pass the noise calls for: Phi_N divides the std of noise that is white at the face's
    effective resolution by N, so noise sigma needs a factor sigma / NOISE_FREE beyond ``resolution``."""
    return math.log2(noise / NOISE_FREE) if noise > NOISE_FREE else 0.0


def blocking_octaves(blocking: float, noise: float) -> float:
    """Octaves the JPEG blocking calls for: its excess over BLOCKING_FREE, weighted by how much of the face's fine
    texture the quantisation flattened (the noise reading below TEXTURE_TYPICAL: at quality 20 and below the grid
    strength saturates while the blocks keep losing their texture)."""
    return max(0.0, blocking - BLOCKING_FREE) / BLOCKING_PER_OCTAVE * TEXTURE_TYPICAL / max(noise, TEXTURE_MIN)


def lowpass(x: np.ndarray, N: float) -> np.ndarray:
    """OpenCV's stand-in for DR2's Phi_N on a 2-D float32 image: area resize down by N, cubic back up."""
    h, w = x.shape
    small = (max(1, round(w / N)), max(1, round(h / N)))
    return cv2.resize(cv2.resize(x, small, interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_CUBIC)


def _block_energies(x: np.ndarray) -> np.ndarray:
    """Mean of x over each BLOCK x BLOCK block (edges that do not fill a block are dropped), flattened."""
    h, w = (x.shape[0] // BLOCK) * BLOCK, (x.shape[1] // BLOCK) * BLOCK
    return x[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3)).ravel()


def detail_ratio(luma: np.ndarray, face: tuple[slice, slice], N: float) -> float:
    """d(N): the heterogeneous detail Phi_N removes from the face region of ``luma`` (RMS over BLOCK-sized blocks,
    less FLOOR_WEIGHT times the FLOOR_PERCENTILE of the block energies), in 8-bit levels."""
    h = (luma - lowpass(luma, N))[face]
    e = _block_energies(h * h)
    return math.sqrt(max(float(e.mean()) - FLOOR_WEIGHT * float(np.percentile(e, FLOOR_PERCENTILE)), 0.0))


def effective_resolution(luma: np.ndarray, face: tuple[slice, slice]) -> float:
    """The largest N (1 .. 32) at which Phi_N removes at most RESOLUTION_TOLERANCE of the face's contrast in detail:
    the first crossing of d(N) / contrast up the LADDER, interpolated in log N (d(1) = 0: Phi_1 is the identity).
    Stops at the crossing, so a sharp face costs two or three filters."""
    contrast = float(np.std(lowpass(luma, CONTRAST_FACTOR)[face]))
    if contrast < MIN_CONTRAST:
        return MAX_FACTOR
    prev_N, prev_r = 1.0, 0.0
    for N in LADDER:
        r = detail_ratio(luma, face, N) / contrast
        if r > RESOLUTION_TOLERANCE:
            t = (RESOLUTION_TOLERANCE - prev_r) / (r - prev_r)
            return float(2.0 ** (math.log2(prev_N) + t * (math.log2(N) - math.log2(prev_N))))
        prev_N, prev_r = N, r
    return MAX_FACTOR


def noise_level(face: np.ndarray, *, scale: float) -> float:
    """Robust Immerkaer noise estimate (8-bit levels) of the face region (2-D float32) area-resampled down by
    ``scale`` (the face's effective resolution, where noise the warp spread out is pixel-sized again)."""
    h, w = face.shape
    if scale > 1.0:
        size = (max(5, round(w / scale)), max(5, round(h / scale)))
        face = cv2.resize(face, size, interpolation=cv2.INTER_AREA)
    r = cv2.filter2D(face, cv2.CV_32F, _IMMERKAER, borderType=cv2.BORDER_REFLECT)[1:-1, 1:-1]
    return float(np.median(np.abs(r))) * 1.4826 / 6.0


def _stripe_spectrum(diff: np.ndarray) -> np.ndarray:
    """Mean power spectrum (NFFT // 2 + 1,) of the stripe profiles of ``diff`` (H, W) along axis 1."""
    H, W = diff.shape
    p = diff[: H // _STRIPE * _STRIPE].reshape(H // _STRIPE, _STRIPE, W).mean(axis=1)  # (stripes, W)
    p = (p - p.mean(axis=1, keepdims=True)) * np.hanning(W)[None, :]
    return (np.abs(np.fft.rfft(p, _NFFT, axis=1)) ** 2).mean(axis=0)


def _bins() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spectrum bins of the combs' two harmonics for every candidate period, and the local-median windows of the
    bins involved: ``used`` (B,) bins, ``window`` (B, W) indices into the spectrum, ``valid`` (B, W) mask;
    ``harmonics`` (2, periods) positions in ``used``."""
    i1 = np.rint(_NFFT / _PERIODS).astype(np.int64)
    i2 = np.rint(2 * _NFFT / _PERIODS).astype(np.int64)
    used = np.unique(np.concatenate([i1, i2]))
    lo, hi = np.rint(0.75 * used).astype(np.int64), np.rint(1.25 * used).astype(np.int64)
    width = int((hi - lo).max()) + 1
    window = lo[:, None] + np.arange(width)[None, :]
    valid = window <= hi[:, None]
    harmonics = np.stack([np.searchsorted(used, i1), np.searchsorted(used, i2)])
    return used, np.minimum(window, _NFFT // 2), valid, harmonics


_USED, _WINDOW, _VALID, _HARMONICS = _bins()
_COUNT = _VALID.sum(axis=1)


def blocking_strength(face: np.ndarray) -> tuple[float, float]:
    """(dB, period in crop pixels) of the strongest 8x8-block grid candidate in the face region's luma (2-D
    float32); 0 dB when no comb stands out of the spectrum."""
    dx = np.abs(np.diff(face, 2, axis=1))  # vertical grid lines -> peaks along x
    dy = np.abs(np.diff(face, 2, axis=0)).T  # horizontal grid lines -> peaks along y (transposed)
    logs = np.log(_stripe_spectrum(dx) + _stripe_spectrum(dy) + _EPS)  # (NFFT // 2 + 1,)
    # local median of each used bin's window: pad with +inf, sort, take the middle of the valid entries
    win = np.sort(np.where(_VALID, logs[_WINDOW], np.inf), axis=1)
    rows = np.arange(len(_USED))
    base = 0.5 * (win[rows, (_COUNT - 1) // 2] + win[rows, _COUNT // 2])
    peak = np.maximum(np.maximum(logs[_USED], logs[_USED - 1]), logs[_USED + 1])  # +-1 bin: peaks fall between
    excess = peak - base  # (B,)
    comb = np.minimum(excess[_HARMONICS[0]], excess[_HARMONICS[1]])  # (periods,)
    best = int(np.argmax(comb))
    return max(0.0, float(comb[best]) * 10.0 / math.log(10.0)), float(_PERIODS[best])
