"""Face quality measures on real aligned faces (astronaut, Grace Hopper, LFW), under plausible restorations and
plausible failures. ``python -m tests.pipeline.test_quality`` prints the calibration table the default
thresholds in ``pipeline/imaging/quality.py`` were chosen from."""

from __future__ import annotations

import functools
import itertools
import time

import cv2
import numpy as np
import pytest
import torch

from pipeline.imaging.faces import align_faces
from pipeline.imaging.mtcnn import load_mtcnn
from pipeline.imaging.quality import (
    FLAG_COLOUR,
    FLAG_LOWFREQ,
    FLAG_SHARPNESS_EXCESS,
    FLAG_SHARPNESS_LOSS,
    FaceQuality,
    QualityThresholds,
    flags,
    measure_face,
    severity,
)
from tests.pipeline.photos import astronaut, degrade, grace_hopper, jpeg, lfw_faces, lfw_for_detection


@functools.cache
def _aligned(n_lfw: int) -> tuple[np.ndarray, ...]:
    """Aligned (512, 512, 3) crops: astronaut, Grace Hopper, then up to ``n_lfw`` LFW faces MTCNN finds."""
    detector = load_mtcnn()
    photos = [astronaut(), grace_hopper(), *lfw_for_detection(lfw_faces()[:n_lfw])]
    crops = []
    for photo, det in zip(photos, detector.detect(photos), strict=True):
        faces = align_faces(photo, det)
        if faces:
            crops.append(faces[0].crop)
    return tuple(crops)


def aligned_faces() -> tuple[np.ndarray, ...]:
    return _aligned(0)


# --- plausible restorations and failures, each (input, output) from one clean aligned face -------------------


def blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma)


def unsharp(x: np.ndarray, amount: float = 1.0, sigma: float = 2.0) -> np.ndarray:
    f = x.astype(np.float32)
    return np.clip(f + amount * (f - cv2.GaussianBlur(f, (0, 0), sigmaX=sigma)), 0, 255).astype(np.uint8)


def hue_rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate the hue in OpenCV's 8-bit HSV (hue in [0, 180), 2 degrees a step)."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(degrees / 2))) % 180).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def colour_cast(x: np.ndarray, gains: tuple[float, float, float] = (1.25, 1.0, 0.75)) -> np.ndarray:
    return np.clip(x.astype(np.float32) * np.array(gains, np.float32), 0, 255).astype(np.uint8)


def noise(x: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, x.shape, dtype=np.uint8)


def restorations(c: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Outputs a good restorer could give: the clean face for its degraded input, or mild edits of it."""
    return {
        "identity": (c, c),
        "clean_for_x2": (degrade(c, 2, seed=1), c),
        "clean_for_x4": (degrade(c, 4, seed=2), c),
        "clean_for_x8": (degrade(c, 8, seed=3), c),
        "blur_s1": (c, blur(c, 1.0)),
        "unsharp": (c, unsharp(c)),
        "jpeg_q30": (c, jpeg(c, 30)),
    }


def failures(c: np.ndarray, other: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "hue_40": (c, hue_rotate(c, 40)),
        "hue_90": (c, hue_rotate(c, 90)),
        "cast": (c, colour_cast(c)),
        "noise": (c, noise(c, 0)),
        "other_face": (c, other),
        "blur_s4": (c, blur(c, 4.0)),
    }


# --- tests ------------------------------------------------------------------------------------------------


def test_unchanged_face_is_not_flagged() -> None:
    for c in aligned_faces():
        for N in (1, 4, 8):
            q = measure_face(c, c, N=N)
            assert q.lowfreq_psnr == 100.0 and q.delta_e == 0.0 and q.sharpness_gain == pytest.approx(1.0)
            assert flags(q) == [] and severity(q) == 0.0


@pytest.mark.parametrize("degrees", [40, 90, 180])
def test_hue_rotated_face_is_flagged_for_colour(degrees: int) -> None:
    for c in aligned_faces():
        q = measure_face(c, hue_rotate(c, degrees), N=8)
        assert FLAG_COLOUR in flags(q), q
        assert severity(q) > 0


def test_colour_cast_is_flagged() -> None:
    for c in aligned_faces():
        assert FLAG_COLOUR in flags(measure_face(c, colour_cast(c), N=4))


def test_blur_lowers_and_sharpening_raises_sharpness_gain() -> None:
    for c in aligned_faces():
        blurred = measure_face(c, blur(c, 1.5), N=8)
        sharpened = measure_face(c, unsharp(c), N=8)
        assert blurred.sharpness_gain < 1 < sharpened.sharpness_gain
        assert FLAG_SHARPNESS_LOSS in flags(measure_face(c, blur(c, 4.0), N=8))


@pytest.mark.parametrize("N", [1, 2, 4, 8, 16])
def test_noise_fails_lowfreq_psnr(N: int) -> None:
    for c in aligned_faces():
        q = measure_face(c, noise(c, N), N=N)
        assert q.lowfreq_psnr < QualityThresholds().min_lowfreq_psnr
        assert FLAG_LOWFREQ in flags(q)
    # noise pasted over the (clean, sharp) astronaut is also far "too sharp"
    assert FLAG_SHARPNESS_EXCESS in flags(measure_face(aligned_faces()[0], noise(c, 0), N=N))


def test_lowfreq_psnr_rises_with_the_low_pass_factor() -> None:
    """A larger N keeps less of the image, so the same difference (fine detail removed) costs less PSNR; N = 1
    is a plain PSNR."""
    c = aligned_faces()[0]
    b = blur(c, 2.0)
    psnr = [measure_face(c, b, N=N).lowfreq_psnr for N in (1, 2, 4, 8, 16)]
    assert psnr == sorted(psnr) and psnr[-1] - psnr[0] > 10, psnr
    mse = np.mean((c.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2)
    assert psnr[0] == pytest.approx(-10 * np.log10(mse), abs=1e-3)


def test_plausible_restorations_pass_on_real_faces() -> None:
    crops = aligned_faces()
    for c, N in itertools.product(crops, (4, 8)):
        for name, (i, o) in restorations(c).items():
            q = measure_face(i, o, N=N)
            assert flags(q) == [], (name, N, q)


def test_ddpm_size_maps_the_factor_to_the_same_cut_at_512() -> None:
    """DR2 filters at the DDPM's size: N = 8 at 256 is the factor-16 filter at 512."""
    c = aligned_faces()[0]
    o = blur(c, 2.0)
    at_256 = measure_face(c, o, N=8, ddpm_size=256)
    assert at_256.N == 16 and at_256 == measure_face(c, o, N=16)
    assert at_256.lowfreq_psnr > measure_face(c, o, N=8).lowfreq_psnr
    with pytest.raises(ValueError):
        measure_face(c, o, N=5, ddpm_size=256)


def test_measures_are_deterministic_and_serialisable() -> None:
    c = aligned_faces()[1]
    a = measure_face(c, unsharp(c), N=4)
    assert a == measure_face(c.copy(), unsharp(c), N=4)
    d = a.to_dict()
    assert set(d) == {"lowfreq_psnr", "delta_e", "sharpness_gain", "N"} and d["N"] == 4
    assert FaceQuality.from_dict(d).lowfreq_psnr == pytest.approx(a.lowfreq_psnr, abs=1e-4)


def test_bad_inputs_raise() -> None:
    c = aligned_faces()[0]
    with pytest.raises(ValueError, match="uint8"):
        measure_face(c, c[:256], N=4)
    with pytest.raises(ValueError, match="divisor"):
        measure_face(c, c, N=3)
    with pytest.raises(ValueError):
        QualityThresholds(min_sharpness_gain=2.0, max_sharpness_gain=1.0)


def test_cost_per_face_is_small() -> None:
    """CPU time per face on one thread (a worker's share), best of 15 calls: the machine is shared, so wall time
    measures the neighbours too; it is printed beside."""
    c = aligned_faces()[0]
    o = unsharp(c)
    measure_face(c, o, N=8)  # build the filter once, as a worker would
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for N in (1, 8):
            cpu, wall = [], []
            for _ in range(15):
                t0, c0 = time.perf_counter(), time.process_time()
                measure_face(c, o, N=N)
                cpu.append((time.process_time() - c0) * 1000)
                wall.append((time.perf_counter() - t0) * 1000)
            print(f"measure_face cost, N={N}, 1 thread: CPU best {min(cpu):.1f} ms, median {np.median(cpu):.1f} ms; "
                  f"wall median {np.median(wall):.1f} ms per face")
            assert min(cpu) < 50
    finally:
        torch.set_num_threads(threads)


# --- calibration table ------------------------------------------------------------------------------------


def calibration_table(n_lfw: int = 40) -> None:
    crops = _aligned(n_lfw)
    print(f"{len(crops)} aligned faces (astronaut, Grace Hopper, {len(crops) - 2} LFW)")
    rows: dict[tuple[str, str, int], list[FaceQuality]] = {}
    for k, c in enumerate(crops):
        other = crops[(k + 1) % len(crops)]
        for kind, cases in (("ok", restorations(c)), ("fail", failures(c, other))):
            for name, (i, o) in cases.items():
                for N in (1, 4, 8, 16):
                    rows.setdefault((kind, name, N), []).append(measure_face(i, o, N=N))
    print(f"{'kind':5} {'case':13} {'N':>2}  {'lowfreq_psnr min/med':>21}  {'delta_e med/max':>16}  "
          f"{'sharp_gain min/med/max':>24}  flagged")
    for (kind, name, N), qs in rows.items():
        p = np.array([q.lowfreq_psnr for q in qs])
        e = np.array([q.delta_e for q in qs])
        g = np.array([q.sharpness_gain for q in qs])
        n_flagged = sum(bool(flags(q)) for q in qs)
        print(f"{kind:5} {name:13} {N:>2}  {p.min():9.1f} {np.median(p):9.1f}    {np.median(e):7.2f} {e.max():7.2f}  "
              f"{g.min():8.2f} {np.median(g):7.2f} {g.max():8.1f}  {n_flagged}/{len(qs)}")


if __name__ == "__main__":
    calibration_table()
