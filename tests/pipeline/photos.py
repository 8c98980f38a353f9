"""Real face photos that ship offline, and degraded / multi-face versions of them, for tests and benchmarks.

Sources (all inside installed wheels, nothing downloaded):

* :func:`astronaut` -- ``skimage.data.astronaut()``, Eileen Collins, 512x512 RGB, one face.
* :func:`grace_hopper` -- matplotlib's sample ``grace_hopper.jpg``, 512 wide x 600 high RGB, one face.
* :func:`lfw_faces` / :func:`lfw_nonfaces` -- ``skimage.data.lfw_subset()``: 200 gray 25x25 crops from LFW;
  its docstring says the first 100 are faces and the last 100 non-faces (background patches).

Builders: :func:`degrade` (blur, downsample by ``factor``, noise, JPEG, back up to size),
:func:`canvas_with_faces` (``n`` faces at different sizes on one canvas, with their boxes),
:func:`lfw_for_detection` (upscale and pad the tiny LFW crops so MTCNN sees them as photos).
Import as ``from tests.pipeline.photos import astronaut`` (run pytest as ``python -m pytest`` from the root).
"""

from __future__ import annotations

import functools
import io

import cv2
import numpy as np
from PIL import Image

# Head regions (x1, y1, x2, y2) with margin, around the MTCNN boxes of each photo's face.
ASTRONAUT_HEAD = (140, 30, 310, 215)
GRACE_HOPPER_HEAD = (120, 70, 410, 400)


@functools.cache
def _astronaut() -> np.ndarray:
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut())


def astronaut() -> np.ndarray:
    """(512, 512, 3) uint8 RGB."""
    return _astronaut().copy()


@functools.cache
def grace_hopper_bytes() -> bytes:
    """The original JPEG file's bytes (a baseline RGB JPEG with JFIF header)."""
    import matplotlib.cbook

    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with open(str(path), "rb") as f:
        return f.read()


def grace_hopper() -> np.ndarray:
    """(600, 512, 3) uint8 RGB."""
    return np.asarray(Image.open(io.BytesIO(grace_hopper_bytes())).convert("RGB")).copy()


@functools.cache
def _lfw() -> np.ndarray:
    import skimage.data

    return np.rint(skimage.data.lfw_subset() * 255).astype(np.uint8)  # (200, 25, 25) float [0, 1] -> uint8


def lfw_faces() -> np.ndarray:
    """(100, 25, 25) uint8 gray face crops."""
    return _lfw()[:100].copy()


def lfw_nonfaces() -> np.ndarray:
    """(100, 25, 25) uint8 gray background crops (no face)."""
    return _lfw()[100:].copy()


def lfw_for_detection(crops: np.ndarray, *, upscale: int = 6, pad: float = 0.25) -> list[np.ndarray]:
    """Tight 25x25 gray crops -> RGB uint8 photos: bicubic upscale, then a mid-gray border of ``pad`` x side.

    The crops are cut tight around the face, so a face box reaches past their edges; the border gives
    the detector the context a photo would.
    """
    out = []
    for crop in crops:
        side = crop.shape[0] * upscale
        big = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)
        p = int(round(side * pad))
        big = cv2.copyMakeBorder(big, p, p, p, p, cv2.BORDER_CONSTANT, value=128)
        out.append(np.repeat(big[:, :, None], 3, axis=2))
    return out


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) uint8 luma."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    """Round-trip through a JPEG at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB")).copy()


def degrade(img: np.ndarray, factor: int, seed: int, *, noise: float = 4.0, quality: int = 60) -> np.ndarray:
    """A blind-restoration style degradation of RGB uint8 ``img``, same size out.

    Gaussian blur (sigma = factor / 2), area downsample by ``factor``, Gaussian noise (std ``noise``, seeded),
    JPEG at ``quality``, bicubic upsample back to the input size.
    """
    h, w = img.shape[:2]
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(img, (0, 0), sigmaX=max(factor / 2.0, 0.5))
    x = cv2.resize(x, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    x = np.clip(x.astype(np.float32) + rng.normal(0.0, noise, x.shape), 0, 255).astype(np.uint8)
    x = jpeg(x, quality)
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)


def face_patches() -> list[np.ndarray]:
    """The two head regions (astronaut, Grace Hopper) as RGB uint8 patches."""
    a, g = astronaut(), grace_hopper()
    ax1, ay1, ax2, ay2 = ASTRONAUT_HEAD
    gx1, gy1, gx2, gy2 = GRACE_HOPPER_HEAD
    return [a[ay1:ay2, ax1:ax2].copy(), g[gy1:gy2, gx1:gx2].copy()]


def canvas_with_faces(
    n: int, seed: int, *, size: tuple[int, int] = (768, 1024), min_height: int = 80, max_height: int = 240
) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """``n`` head patches at different sizes (heights spread over [min_height, max_height], some mirrored)
    on a smooth noisy background of ``size`` (H, W), one per grid cell so none overlap.

    Returns the canvas (H, W, 3) uint8 and each patch's placed box (x1, y1, x2, y2).
    """
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = 90 + 60 * (xx / W) + 40 * (yy / H)
    canvas = np.stack([base, base * 0.95 + 10, base * 0.9 + 20], axis=2)
    canvas = np.clip(canvas + rng.normal(0, 3, canvas.shape), 0, 255).astype(np.uint8)
    cols = int(np.ceil(np.sqrt(n * W / H)))
    rows = int(np.ceil(n / cols))
    cell_h, cell_w = H // rows, W // cols
    heights = np.linspace(min_height, max_height, n) if n > 1 else np.array([max_height])
    rng.shuffle(heights)
    patches = face_patches()
    boxes: list[tuple[int, int, int, int]] = []
    for i in range(n):
        patch = patches[i % len(patches)]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        ph = int(min(heights[i], cell_h - 4))
        pw = int(round(patch.shape[1] * ph / patch.shape[0]))
        if pw > cell_w - 4:
            pw = cell_w - 4
            ph = int(round(patch.shape[0] * pw / patch.shape[1]))
        resized = cv2.resize(np.ascontiguousarray(patch), (pw, ph), interpolation=cv2.INTER_AREA)
        r, c = divmod(i, cols)
        y = r * cell_h + int(rng.integers(0, cell_h - ph + 1))
        x = c * cell_w + int(rng.integers(0, cell_w - pw + 1))
        canvas[y : y + ph, x : x + pw] = resized
        boxes.append((x, y, x + pw, y + ph))
    return canvas, boxes
