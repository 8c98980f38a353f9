"""Calibration of the per-face degradation estimate (``pipeline/imaging/degradation.py``) on real face photos.

Real photos are degraded *in the photo* along known ladders, then detected with the project's MTCNN and aligned
exactly as the pipeline does (``build_detector`` and ``AlignOptions`` from the default ``PipelineConfig``), and the
estimate runs on the aligned 512 crop -- what DR2 would be given. Faces (:data:`LADDER_FACES`):

* ``grace`` -- Grace Hopper (matplotlib's sample photo): face box 179 x 220 px, upscaled ~1.5x by the alignment;
  the largest real face that ships offline.
* ``grace_tilted`` -- the same photo mirrored, rotated by 7 degrees and shrunk to 0.8 (another view: other pixel
  grid, other crop position, a rolled JPEG grid).
* ``astronaut`` -- Eileen Collins (skimage): face box 88 x 113 px, upscaled ~3x.
* ``grace_half`` -- Grace Hopper at half size (area resampled): face box ~90 x 110 px, upscaled ~3x.

Ladders (:data:`LADDERS`), level 0 always the undegraded photo: down/up-scaling (area down by f, cubic back up),
Gaussian blur (sigma in photo pixels), Gaussian noise (std in 8-bit levels, per channel, seeded), JPEG quality,
and the demo archive's mix (``jobs.demo.degrade``: blur 0.6 f, area down by f, noise std 6, JPEG 40, cubic up).

The clean set (:func:`clean_photos`): undegraded variants of the Grace Hopper photo whose face box is 200 px or
more (mirrored, rotated, shifted, re-encoded at JPEG 90/95 as ``jobs/demo_data`` holds it, gray, bicubic upscaled).

Run as a script for the calibration table: ``.venv/bin/python benchmarks/bench_degradation.py``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch

from jobs.demo import degrade as demo_degrade
from jobs.demo import demo_photo
from pipeline.config import PipelineConfig
from pipeline.graph.models import build_detector
from pipeline.imaging.degradation import (
    ESTIMATOR_VERSION,
    Degradation,
    DegradationThresholds,
    Verdict,
    estimate_degradation,
)
from pipeline.imaging.faces import AlignOptions, align_faces
from pipeline.imaging.mtcnn import MTCNN
from tests.pipeline import photos

Degrade = Callable[[np.ndarray, float], np.ndarray]


def _resize(rgb: np.ndarray, f: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma)


def _noise(rgb: np.ndarray, std: float) -> np.ndarray:
    rng = np.random.default_rng(int(std) + 17)
    return np.clip(rgb.astype(np.float32) + rng.normal(0.0, std, rgb.shape), 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: float) -> np.ndarray:
    return photos.jpeg(rgb, int(quality))


def _mix(rgb: np.ndarray, factor: float) -> np.ndarray:
    return demo_degrade(rgb, int(factor), seed=int(factor))


@dataclass(frozen=True)
class Ladder:
    """Known degradation levels, mildest first; ``levels[0]`` is the undegraded photo (``apply`` is not called)."""

    name: str
    unit: str
    levels: tuple[float, ...]
    apply: Degrade


LADDERS = (
    Ladder("downscale", "factor", (1, 2, 3, 4, 6, 8, 12, 16), _resize),
    Ladder("blur", "sigma px", (0, 1, 1.5, 2, 3, 4, 6), _blur),
    Ladder("noise", "std", (0, 5, 10, 15, 25, 40), _noise),
    Ladder("jpeg", "quality", (100, 50, 40, 30, 20, 15, 10), _jpeg),
    Ladder("mix", "factor", (0, 1, 2, 4, 8, 16), _mix),
)
DOWNSCALED_8 = {("downscale", 8.0), ("downscale", 12.0), ("downscale", 16.0), ("mix", 8.0), ("mix", 16.0)}


def _rotate(rgb: np.ndarray, degrees: float, scale: float, center: tuple[float, float]) -> np.ndarray:
    m = cv2.getRotationMatrix2D(center, degrees, scale)
    return cv2.warpAffine(rgb, m, (rgb.shape[1], rgb.shape[0]), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)


def _grace_tilted() -> np.ndarray:
    g = np.ascontiguousarray(photos.grace_hopper()[:, ::-1])
    return _rotate(g, 7.0, 0.8, (256.0, 230.0))


@functools.cache
def ladder_faces() -> dict[str, np.ndarray]:
    """The undegraded photos the ladders start from, by name."""
    grace = photos.grace_hopper()
    return {
        "grace": grace,
        "grace_tilted": _grace_tilted(),
        "astronaut": photos.astronaut(),
        "grace_half": cv2.resize(grace, (256, 300), interpolation=cv2.INTER_AREA),
    }


LADDER_FACES = ("grace", "grace_tilted", "astronaut", "grace_half")


def clean_photos() -> dict[str, np.ndarray]:
    """Undegraded photos of a face of 200 px or more (Grace Hopper's box: 179 x 220; the variants keep >= 200)."""
    g = photos.grace_hopper()
    c = (268.0, 229.0)  # the face's centre in the photo
    up = cv2.resize(g, (614, 720), interpolation=cv2.INTER_CUBIC)
    return {
        "original": g,
        "demo_q90": demo_photo("grace_hopper.jpg"),
        "q95": photos.jpeg(g, 95),
        "mirrored": np.ascontiguousarray(g[:, ::-1]),
        "rot+5": _rotate(g, 5.0, 1.0, c),
        "rot-5": _rotate(g, -5.0, 1.0, c),
        "rot+10": _rotate(g, 10.0, 1.0, c),
        "rot-10": _rotate(g, -10.0, 1.0, c),
        "shift3": np.ascontiguousarray(g[3:, 5:]),
        "shift5_q90": photos.jpeg(np.ascontiguousarray(g[5:, 3:]), 90),
        "gray": np.repeat(photos.to_gray(g)[:, :, None], 3, axis=2),
        "upscaled1.2": up,
        "upscaled1.2_q90": photos.jpeg(up, 90),
        "upscaled1.5": cv2.resize(g, (768, 900), interpolation=cv2.INTER_CUBIC),
        "mirrored_rot+8": _rotate(np.ascontiguousarray(g[:, ::-1]), 8.0, 1.0, (512 - c[0], c[1])),
        "mirrored_q90": photos.jpeg(np.ascontiguousarray(g[:, ::-1]), 90),
    }


@dataclass(frozen=True)
class Sample:
    """One photo of the calibration set, and its face as the pipeline would align it (None: not detected)."""

    face: str  # a LADDER_FACES name, or the clean_photos() variant's name
    ladder: str  # a LADDERS name, or "clean"
    level: float
    crop: np.ndarray | None
    box: tuple[float, float, float, float] | None


def pipeline_detector() -> tuple[MTCNN, AlignOptions]:
    """MTCNN and alignment options exactly as the pipeline builds them from the default config."""
    cfg = PipelineConfig()
    opts = AlignOptions(select=cfg.select, max_faces=cfg.max_faces, min_face_size=cfg.min_face_size)
    return build_detector(cfg, torch.device("cpu")), opts


def _center(box: tuple[float, float, float, float] | np.ndarray) -> np.ndarray:
    return np.array([(box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0])


def _align_nearest(
    detector: MTCNN, opts: AlignOptions, images: list[np.ndarray], near: list[np.ndarray]
) -> list[tuple[np.ndarray, tuple[float, float, float, float]] | None]:
    """Detect and align each image; keep the aligned face whose box centre is nearest ``near`` (within half a box
    of it: a false detection elsewhere in a degraded photo is not the face being measured)."""
    out: list[tuple[np.ndarray, tuple[float, float, float, float]] | None] = []
    for img, want in zip(images, near, strict=True):
        (det,) = detector.detect([img])
        best = None
        for f in align_faces(img, det, opts):
            size = max(f.meta.box[2] - f.meta.box[0], f.meta.box[3] - f.meta.box[1])
            dist = float(np.linalg.norm(_center(f.meta.box) - want))
            if dist < size / 2 and (best is None or dist < best[0]):
                best = (dist, f.crop, f.meta.box)
        out.append(None if best is None else (best[1], best[2]))
    return out


def _largest_face(detector: MTCNN, opts: AlignOptions, img: np.ndarray) -> tuple[float, float, float, float]:
    (det,) = detector.detect([img])
    faces = align_faces(img, det, opts)
    assert faces, "the undegraded photo must have a face"
    return faces[0].meta.box


def around_face(detector: MTCNN, opts: AlignOptions, photo: np.ndarray, margin: float = 1.8) -> np.ndarray:
    """The part of ``photo`` around its (largest) face: a square of ``margin`` x the box's longer side, clipped.

    The ladders degrade this region at the face's native size, which is what degrading the whole photo does to
    the face, and detection on it costs a fraction of the whole photo's (the test runs on two loaded cores).
    """
    box = _largest_face(detector, opts, photo)
    cx, cy = _center(box)
    half = margin * max(box[2] - box[0], box[3] - box[1]) / 2.0
    h, w = photo.shape[:2]
    x0, y0 = max(0, int(cx - half)), max(0, int(cy - half))
    x1, y1 = min(w, int(cx + half)), min(h, int(cy + half))
    return np.ascontiguousarray(photo[y0:y1, x0:x1])


def calibration_samples(detector: MTCNN, opts: AlignOptions) -> list[Sample]:
    """Every ladder level of every ladder face, and the clean set, detected and aligned as the pipeline does."""
    samples: list[Sample] = []
    for name, full in ladder_faces().items():
        photo = around_face(detector, opts, full)
        center = _center(_largest_face(detector, opts, photo))
        for ladder in LADDERS:
            imgs = [photo if i == 0 else ladder.apply(photo, lvl) for i, lvl in enumerate(ladder.levels)]
            for lvl, got in zip(ladder.levels, _align_nearest(detector, opts, imgs, [center] * len(imgs)), strict=True):
                samples.append(Sample(name, ladder.name, float(lvl), *(got if got else (None, None))))
    for name, full in clean_photos().items():
        photo = around_face(detector, opts, full)
        (got,) = _align_nearest(detector, opts, [photo], [_center(_largest_face(detector, opts, photo))])
        samples.append(Sample(name, "clean", 0.0, *(got if got else (None, None))))
    return samples


def rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), dtype=np.float64)
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on the ranks)."""
    ra, rb = rank(np.asarray(a, dtype=np.float64)), rank(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / np.sqrt((ra @ ra) * (rb @ rb)))


def severity_level(ladder: Ladder, level: float) -> float:
    """The ladder's level as "more is worse" (JPEG quality runs the other way)."""
    return -level if ladder.name == "jpeg" else level


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch and one OpenCV thread: on two cores shared with other jobs, more threads only fight (a detection
    takes ~0.05 s on one thread and ~0.5 s on two oversubscribed ones)."""
    torch_threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv_threads)


@dataclass(frozen=True)
class Estimated:
    sample: Sample
    estimate: Degradation


@pytest.fixture(scope="module")
def estimates() -> list[Estimated]:
    """The calibration set, detected once per test module, with each detected face's estimate."""
    with single_threaded():
        detector, opts = pipeline_detector()
        samples = calibration_samples(detector, opts)
        return [Estimated(s, estimate_degradation(s.crop)) for s in samples if s.crop is not None]


# The calibration set detects ~150 photos one by one (about 5 s idle, 20 s loaded): the tests that need it are slow.
calibration = pytest.mark.slow


@pytest.fixture(scope="module")
def grace_crop() -> np.ndarray:
    """The undegraded Grace Hopper face, aligned exactly as the calibration set aligns its "original" photo."""
    with single_threaded():
        detector, opts = pipeline_detector()
        photo = around_face(detector, opts, clean_photos()["original"])
        (got,) = _align_nearest(detector, opts, [photo], [_center(_largest_face(detector, opts, photo))])
    assert got is not None
    return got[0]


def ladder_correlations(estimates: list[Estimated]) -> dict[tuple[str, str], float]:
    """(ladder, face) -> Spearman between the score and the known level, over the levels where the face was found."""
    out = {}
    for ladder in LADDERS:
        for face in LADDER_FACES:
            got = [e for e in estimates if e.sample.ladder == ladder.name and e.sample.face == face]
            lv = np.array([severity_level(ladder, e.sample.level) for e in got])
            sc = np.array([e.estimate.score for e in got])
            out[(ladder.name, face)] = spearman(sc, lv)
    return out


# --- the Done-when of the issue ---------------------------------------------------------------------------------


@calibration
def test_every_ladder_is_ordered(estimates: list[Estimated]) -> None:
    rho = ladder_correlations(estimates)
    bad = {k: round(v, 3) for k, v in rho.items() if not v >= 0.9}
    assert not bad, f"Spearman < 0.9 for {bad}"


@calibration
def test_every_ladder_level_is_detected_but_the_harshest(estimates: list[Estimated]) -> None:
    # the calibration means something only if MTCNN finds the faces it is computed on; a 90-px face downscaled
    # by 16 is 6 px of information, which no detector finds (and the pipeline would never restore)
    found = {(e.sample.face, e.sample.ladder, e.sample.level) for e in estimates}
    missing = [
        (face, ladder.name, lvl)
        for face in LADDER_FACES
        for ladder in LADDERS
        for lvl in ladder.levels
        if (face, ladder.name, float(lvl)) not in found
    ]
    assert len(missing) <= 4, missing
    assert all(lvl >= 16 for _, _, lvl in missing), missing


@calibration
def test_undegraded_large_faces_are_clean(estimates: list[Estimated]) -> None:
    clean = [e for e in estimates if e.sample.ladder == "clean"]
    assert len(clean) == len(clean_photos())  # every one detected
    for e in clean:
        assert e.sample.box is not None
        assert max(e.sample.box[2] - e.sample.box[0], e.sample.box[3] - e.sample.box[1]) >= 200, e.sample.face
    rate = np.mean([e.estimate.verdict is Verdict.CLEAN for e in clean])
    assert rate >= 0.95, [(e.sample.face, round(e.estimate.score, 2)) for e in clean if e.estimate.verdict != "clean"]


@calibration
def test_faces_downscaled_by_8_or_more_need_moderate_or_severe(estimates: list[Estimated]) -> None:
    hard = [e for e in estimates if (e.sample.ladder, e.sample.level) in DOWNSCALED_8]
    assert len(hard) >= 16
    assert not [e for e in hard if e.estimate.verdict is Verdict.CLEAN]
    strong = np.mean([e.estimate.verdict in (Verdict.MODERATE, Verdict.SEVERE) for e in hard])
    assert strong >= 0.8, [(e.sample.face, e.sample.ladder, e.sample.level, e.estimate.verdict) for e in hard]


@calibration
def test_small_undegraded_faces_are_not_clean(estimates: list[Estimated]) -> None:
    # a 90-px face, undegraded in its photo, is upscaled ~3x by the alignment: DR2 has detail to add
    small = [e for e in estimates if e.sample.face in ("astronaut", "grace_half") and e.sample.ladder == "downscale"
             and e.sample.level == 1]
    assert len(small) == 2
    for e in small:
        assert e.estimate.verdict is Verdict.MILD, (e.sample.face, e.estimate)
        assert 2.5 < e.estimate.resolution < 6.0


@calibration
def test_resolution_tracks_the_known_factor(estimates: list[Estimated]) -> None:
    # on the down/up-scaling ladder the true factor is (crop pixels per photo pixel) x the downscaling factor
    for e in estimates:
        if e.sample.ladder == "downscale" and e.sample.face == "grace" and 2 <= e.sample.level <= 8:
            true = 1.5 * e.sample.level
            assert 0.6 * true <= e.estimate.resolution <= 1.4 * true, (e.sample.level, e.estimate.resolution)


# --- the estimator's own contract --------------------------------------------------------------------------------


def test_deterministic_and_json_round_trip(grace_crop: np.ndarray) -> None:
    crop = grace_crop
    a, b = estimate_degradation(crop), estimate_degradation(crop.copy())
    assert a == b
    d = a.to_dict()
    assert d["version"] == ESTIMATOR_VERSION and d["verdict"] == a.verdict.value
    back = Degradation.from_dict(d)
    assert back.verdict is a.verdict and abs(back.score - a.score) < 1e-3


def test_thresholds_cut_the_score(grace_crop: np.ndarray) -> None:
    t = DegradationThresholds(clean_max_factor=2.0, mild_max_factor=4.0, moderate_max_factor=8.0)
    assert [t.verdict(s) for s in (1.0, 2.0, 2.1, 4.0, 8.0, 8.1)] == [
        Verdict.CLEAN, Verdict.CLEAN, Verdict.MILD, Verdict.MILD, Verdict.MODERATE, Verdict.SEVERE
    ]
    with pytest.raises(ValueError):
        DegradationThresholds(clean_max_factor=9.0)
    strict = estimate_degradation(grace_crop, DegradationThresholds(clean_max_factor=1.0))
    assert strict.verdict is Verdict.MILD


def test_rejects_wrong_input_and_survives_blank_crops() -> None:
    with pytest.raises(ValueError):
        estimate_degradation(np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(ValueError):
        estimate_degradation(np.zeros((512, 512, 3), np.float32))
    flat = estimate_degradation(np.full((512, 512, 3), 128, np.uint8))  # nothing at all: no detail to keep
    assert flat.verdict is Verdict.SEVERE and flat.resolution == 32.0 and flat.noise == 0.0
    rng = np.random.default_rng(0)
    noise = estimate_degradation(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))  # nothing but noise
    assert noise.verdict is Verdict.SEVERE and np.isfinite(noise.score) and noise.noise > 3.0

