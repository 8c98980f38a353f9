"""Face detection throughput (images/s) of our MTCNN port on real photos at 512^2 and 2048^2.

    .venv/bin/python benchmarks/bench_detect.py [--device cpu] [--threads 2] [--batch 4] [--repeats 3]

The 512^2 photo is ``skimage.data.astronaut()``; the 2048^2 photo is a canvas of six faces at different
sizes (heads 160..480 px), so the cascade has real candidates to refine. Each configuration reports the
best of ``--repeats`` timed runs after one warm-up. ``max_side`` rows detect on a downscaled copy.
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

from pipeline.mtcnn import MTCNNConfig, load_mtcnn  # noqa: E402
from tests.pipeline import photos  # noqa: E402

log = logging.getLogger("bench_detect")


def _images(side: int) -> np.ndarray:
    if side == 512:
        return photos.astronaut()
    canvas, _ = photos.canvas_with_faces(6, seed=0, size=(side, side), min_height=side // 12, max_height=side // 4)
    return canvas


def bench(side: int, config: MTCNNConfig, *, device: str, batch: int, repeats: int) -> tuple[float, int]:
    """-> (images per second, faces found per image)."""
    detector = load_mtcnn(config, device=device)
    image = _images(side)
    images = [image] * batch
    found = len(detector.detect(images)[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        detector.detect(images)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return batch / best, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=4, help="images per detect() call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    rows = [
        (512, MTCNNConfig()),
        (2048, MTCNNConfig()),
        (2048, MTCNNConfig(min_face_size=40)),
        (2048, MTCNNConfig(max_side=1024)),
    ]
    log.info("device=%s threads=%d batch=%d torch=%s", args.device, args.threads, args.batch, torch.__version__)
    log.info("%-6s %-34s %10s %6s", "size", "config", "images/s", "faces")
    for side, cfg in rows:
        ips, faces = bench(side, cfg, device=args.device, batch=args.batch, repeats=args.repeats)
        desc = f"min_face_size={cfg.min_face_size} max_side={cfg.max_side}"
        log.info("%-6s %-34s %10.2f %6d", f"{side}^2", desc, ips, faces)


if __name__ == "__main__":
    main()
