"""glibc's malloc settings against the stages' speed: MTCNN on a 2 MP photo and the tiny restorer, one thread, each
setting in a fresh process (glibc reads ``MALLOC_*`` when a process starts, as a Ray worker does).

    .venv/bin/python benchmarks/bench_malloc.py [--repeats 6]

Settings: glibc's defaults; the workers' settings before (``MALLOC_MMAP_THRESHOLD_=4 MiB``, which leaves glibc's
128 KiB trim threshold); the workers' settings now (``pipeline.graph.memory.MALLOC_ENV``). Prints ms per detection
and seconds per restored face. Memory under each is ``benchmarks/bench_large_photos.py``'s to measure. Not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.graph.memory import MALLOC_ENV, MiB  # noqa: E402

CHILD = r"""
import sys, time
import numpy as np, cv2, torch
from skimage import data
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph.memory import release_freed_memory
from pipeline.graph.models import build_detector, pick_device, restorer_from_config
from pipeline.graph.stages import _restore_stages
torch.set_num_threads(1)
cv2.setNumThreads(1)
repeats = int(sys.argv[1])
cpu = pick_device("cpu")
cfg = PipelineConfig(src="x", dst="x", restorer=RestorerKind.TINY, device="cpu")
detector = build_detector(cfg, cpu)
photo = np.ascontiguousarray(cv2.resize(data.astronaut(), (1700, 1200)))  # 2 MP
restorer = restorer_from_config(cfg, cpu)
faces = np.random.default_rng(0).integers(0, 255, (4, 512, 512, 3), dtype=np.uint8)
keys = [f"face{i}" for i in range(4)]
with torch.inference_mode():
    detector.detect([photo]); release_freed_memory()
    t = time.perf_counter()
    for _ in range(repeats):
        detector.detect([photo]); release_freed_memory()  # as the detector does after each window
    detect_ms = 1e3 * (time.perf_counter() - t) / repeats
    _restore_stages(restorer, faces, keys, cfg)
    t = time.perf_counter()
    for _ in range(max(1, repeats // 2)):
        _restore_stages(restorer, faces, keys, cfg)
    face_s = (time.perf_counter() - t) / (4 * max(1, repeats // 2))
print(f"{detect_ms:.0f} {face_s:.3f}")
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args(argv)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    settings = {
        "glibc defaults": {},
        "before: mmap threshold 4 MiB": {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(4 * MiB)},
        "now: memory.MALLOC_ENV": {k: v for k, v in MALLOC_ENV.items() if k.startswith("MALLOC_")},
    }
    print(f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; one thread; MTCNN on a 1700x1200 photo, the tiny "
          "restorer on 4 faces per call\n")
    print("| malloc settings | MTCNN ms per 2 MP photo | tiny restorer s per face |")
    print("|---|---|---|")
    for name, env in settings.items():
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.repeats)], capture_output=True, text=True,
                             cwd=ROOT, env={**base, **env, "PYTHONPATH": str(ROOT)})
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1:]} | |")
            continue
        ms, s = out.stdout.split()
        print(f"| {name} | {ms} | {s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
