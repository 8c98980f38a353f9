"""Is ``dr2 estimate`` honest? Its predicted wall time against the measured ``dr2 restore`` command, on this machine.

    .venv/bin/python benchmarks/bench_estimate.py [--shards 4 --images 12] [--restorers passthrough,tiny,simulate]
        [--simulate-faces-per-s 2] [--keep DIR]

Builds an archive of real photos (the demo's public-domain portraits and skimage's astronaut composed onto 1-2 MP
canvases, one to three faces each, degraded at x2..x8, JPEG), then for each restorer runs ``dr2 estimate SRC --json``
and the ``dr2 restore SRC DST`` command (a subprocess, timed from outside: start-up included) and prints the
prediction, the measurement and their ratio (the goal: within +-25%), plus the bottleneck the estimate named and the
busy fractions the run measured. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jobs.demo import degrade, demo_photo, jpeg_bytes  # noqa: E402

FACES = ("astronaut.jpg", "grace_hopper.jpg")


def photo(i: int) -> np.ndarray:
    """A 1-2 MP photo with one to three faces: demo portraits scaled onto a textured canvas."""
    rng = np.random.default_rng(i)
    w = int(rng.integers(1200, 1800))
    h = int(w * rng.uniform(0.66, 0.8))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 80 + 70 * (xx / w) + 50 * (yy / h)
    canvas = np.clip(np.stack([base, base * 0.9 + 15, base * 0.8 + 30], axis=2) + rng.normal(0, 6, (h, w, 3)),
                     0, 255).astype(np.uint8)
    n = 1 + i % 3
    for k in range(n):
        src = demo_photo(FACES[(i + k) % len(FACES)])
        side = int(min(h * 0.8, w / n * 0.9))
        side = int(side * rng.uniform(0.6, 1.0))
        tile = cv2.resize(src, (side, side), interpolation=cv2.INTER_AREA)
        x = int(k * w / n + rng.integers(0, max(1, int(w / n) - side)))
        y = int(rng.integers(0, max(1, h - side)))
        canvas[y:y + side, x:x + side] = tile[: h - y, : w - x]
    return degrade(canvas, (2, 4, 8)[i % 3], seed=i)


def build_archive(root: Path, shards: int, images: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"shard-{s:03d}.tar")) as sink:
            for j in range(images):
                i = s * images + j
                sink.write({"__key__": f"img{i:05d}", "jpg": jpeg_bytes(photo(i), 90), "txt": f"photo {i}".encode()})
    return f"{root}/shard-{{000..{shards - 1:03d}}}.tar"


def dr2() -> list[str]:
    exe = Path(sys.executable).with_name("dr2")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jobs.cli"]


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images", type=int, default=12, help="images per shard")
    p.add_argument("--restorers", default="passthrough,tiny,simulate")
    p.add_argument("--simulate-faces-per-s", type=float, default=2.0)
    p.add_argument("--keep", type=Path, default=None, help="build the archive and outputs here and keep them")
    args = p.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    t0 = time.perf_counter()
    src = build_archive(root / "in", args.shards, args.images)
    print(f"archive: {args.shards} shards x {args.images} photos (1-2 MP, 1-3 faces), "
          f"built in {time.perf_counter() - t0:.0f} s"
          f"; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    rows: list[dict[str, Any]] = []
    for restorer in args.restorers.split(","):
        extra = ["--restorer", restorer]
        if restorer == "simulate":
            extra += ["--simulate-faces-per-s", str(args.simulate_faces_per_s)]
        est_s, text = run([*dr2(), "estimate", src, *extra, "--json"])
        est = json.loads(text.strip().splitlines()[-1])
        dst = root / f"out-{restorer}"
        shutil.rmtree(dst, ignore_errors=True)
        wall, _ = run([*dr2(), "restore", src, str(dst), *extra, "--quiet"])
        report = json.loads((dst / "_dr2" / "report" / "report.json").read_text())
        busy = report.get("busy", {})
        rows.append({"restorer": restorer, "predicted_s": est["predicted_wall_s"], "measured_s": wall,
                     "ratio": est["predicted_wall_s"] / wall, "bottleneck": est["bottleneck"],
                     "images": (est["images"], sum(report["counts"]["samples"].values())),
                     "faces": (est["faces"], report["counts"]["faces_found"]), "estimate_s": est_s,
                     "busy": {k: v.get("fraction") for k, v in busy.items()},
                     "predicted_busy": est["busy"]})
        print(f"  {restorer}: predicted {est['predicted_wall_s']:.1f} s, measured {wall:.1f} s, "
              f"ratio {est['predicted_wall_s'] / wall:.2f}; load {os.getloadavg()[0]:.2f}", flush=True)
    print()
    print("| restorer | images est/real | faces est/real | bottleneck | predicted wall | measured wall | ratio | "
          "busy restore/detect (run) | busy (predicted) | estimate took |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, pb = r["busy"], r["predicted_busy"]
        print(f"| {r['restorer']} | {r['images'][0]}/{r['images'][1]} | {r['faces'][0]}/{r['faces'][1]} | "
              f"{r['bottleneck']} | {r['predicted_s']:.1f} s | {r['measured_s']:.1f} s | {r['ratio']:.2f} | "
              f"{b.get('restore', 0):.2f}/{b.get('detect', 0):.2f} | {pb['restore']:.2f}/{pb['detect']:.2f} | "
              f"{r['estimate_s']:.0f} s |")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
