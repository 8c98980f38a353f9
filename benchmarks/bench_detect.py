"""Face detection throughput (images/s) of our MTCNN port on real photos at 512^2 and 2048^2, and the device check.

    .venv/bin/python benchmarks/bench_detect.py [--device cpu] [--threads 2] [--batch 4] [--repeats 3]
                                                [--resampler auto|opencv|torch]
    .venv/bin/python benchmarks/bench_detect.py --check --device cuda [--batches 8,32]

The 512^2 photo is ``skimage.data.astronaut()``; the 2048^2 photo is a canvas of six faces at different
sizes (heads 160..480 px), so the cascade has real candidates to refine. Each configuration reports the
best of ``--repeats`` timed runs after one warm-up. ``max_side`` rows detect on a downscaled copy.

``--check`` (what ``scripts/gpu_check.sh`` runs): detection on ``--device`` (the torch path, what CUDA runs)
against the same code on CPU and against the CPU default (OpenCV) on the same photos, 512 px to 2 MP; prints the
largest differences next to the stated tolerances (``pipeline.imaging.mtcnn.DEVICE_TOLERANCE``,
``RESAMPLER_TOLERANCE``), then ``--device``'s images/s on batches of 2 MP photos. Exit status 1 when a difference is out
of tolerance.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.pipeline.photos

from pipeline.imaging.mtcnn import (  # noqa: E402
    DEVICE_TOLERANCE,
    MTCNN,
    RESAMPLER_TOLERANCE,
    DetectionGap,
    DetectionTolerance,
    MTCNNConfig,
    load_mtcnn,
)
from tests.pipeline import photos  # noqa: E402

log = logging.getLogger("bench_detect")


def _images(side: int) -> np.ndarray:
    if side == 512:
        return photos.astronaut()
    canvas, _ = photos.canvas_with_faces(6, seed=0, size=(side, side), min_height=side // 12, max_height=side // 4)
    return canvas


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def images_per_s(detector: MTCNN, images: list[np.ndarray], *, repeats: int) -> tuple[float, int]:
    """-> (images per second, best of ``repeats`` after one warm-up; faces found in the first image)."""
    device = str(detector.device)
    found = len(detector.detect(images)[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        detector.detect(images)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best, found


def bench(side: int, config: MTCNNConfig, *, device: str, batch: int, repeats: int) -> tuple[float, int]:
    """-> (images per second, faces found per image)."""
    return images_per_s(load_mtcnn(config, device=device), [_images(side)] * batch, repeats=repeats)


def check_photos() -> dict[str, np.ndarray]:
    """The photos of tests/pipeline/test_mtcnn.py's tolerance test: 512 px to 2 MP, clean and degraded."""
    a, g = photos.astronaut(), photos.grace_hopper()
    canvas, _ = photos.canvas_with_faces(6, seed=0)
    return {"astronaut": a, "grace_hopper": g, "astronaut_x4": photos.degrade(a, 4, seed=4),
            "grace_hopper_x8": photos.degrade(g, 8, seed=8), "canvas_768x1024": canvas, "canvas_2mp": two_mp(1)}


def two_mp(seed: int) -> np.ndarray:
    """A 1200 x 1600 photo with four faces, heads 100..400 px."""
    return photos.canvas_with_faces(4, seed=seed, size=(1200, 1600), min_height=100, max_height=400)[0]


def _report(name: str, gaps: list[DetectionGap], tolerance: DetectionTolerance) -> bool:
    same = all(g.faces[0] == g.faces[1] for g in gaps)
    ok = all(g.within(tolerance) for g in gaps)
    log.info("%-28s faces %-5s box %.4f  landmarks %.4f  (of the face's side; max %.2f px)  score %.2e  %s",
             name, "same" if same else "DIFF", max(g.box for g in gaps), max(g.landmarks for g in gaps),
             max(g.pixels for g in gaps), max(g.score for g in gaps), "ok" if ok else f"OUT OF {tolerance}")
    return ok


def check(device: str, batches: list[int], repeats: int) -> bool:
    """Detections on ``device`` against the CPU paths, then images/s on 2 MP photos; True when within tolerance."""
    images = check_photos()
    on_device = load_mtcnn(MTCNNConfig(resampler="torch"), device=device)
    t0 = time.perf_counter()
    got = on_device.detect(list(images.values()))
    log.info("detect on %s: %s faces (first call %.2f s)", device, [len(d) for d in got], time.perf_counter() - t0)
    ok = True
    for name, config, tolerance in (("vs CPU, same (torch) path", MTCNNConfig(resampler="torch"), DEVICE_TOLERANCE),
                                    ("vs CPU default (OpenCV)", MTCNNConfig(), RESAMPLER_TOLERANCE)):
        want = load_mtcnn(config).detect(list(images.values()))
        ok &= _report(name, [DetectionGap.between(w, g) for w, g in zip(want, got, strict=True)], tolerance)
    pool = [two_mp(seed) for seed in range(8)]
    for batch in batches:
        ips, _ = images_per_s(on_device, [pool[i % len(pool)] for i in range(batch)], repeats=repeats)
        peak = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
        log.info("detect on %s, batch %d of 2 MP photos: %.1f images/s%s", device, batch, ips, peak)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=4, help="images per detect() call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resampler", default="auto", choices=("auto", "opencv", "torch"))
    parser.add_argument("--check", action="store_true", help="the device check (module docstring)")
    parser.add_argument("--batches", default="8,32", help="--check: batch sizes of 2 MP photos to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    log.info("device=%s threads=%d torch=%s", args.device, args.threads, torch.__version__)
    if args.check:
        return 0 if check(args.device, [int(b) for b in args.batches.split(",")], args.repeats) else 1
    rows = [
        (512, MTCNNConfig(resampler=args.resampler)),
        (2048, MTCNNConfig(resampler=args.resampler)),
        (2048, MTCNNConfig(min_face_size=40, resampler=args.resampler)),
        (2048, MTCNNConfig(max_side=1024, resampler=args.resampler)),
    ]
    log.info("batch=%d resampler=%s", args.batch, args.resampler)
    log.info("%-6s %-34s %10s %6s", "size", "config", "images/s", "faces")
    for side, cfg in rows:
        ips, faces = bench(side, cfg, device=args.device, batch=args.batch, repeats=args.repeats)
        desc = f"min_face_size={cfg.min_face_size} max_side={cfg.max_side}"
        log.info("%-6s %-34s %10.2f %6d", f"{side}^2", desc, ips, faces)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
