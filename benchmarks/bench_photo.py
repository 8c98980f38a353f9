"""CPU cost of one web photo outside DR2: what each CPU stage of the pipeline pays per image, in one thread.

    .venv/bin/python benchmarks/bench_photo.py [--images 3] [--repeats 3] [--no-report] [--profile-detect]

Builds real photos of 1, 2 and 3 MP (``jobs/demo_data``: Grace Hopper and the astronaut, upscaled onto an
upscaled coffee-cup background with a little grain) with one face, and a 2 MP one with three faces; encodes
each as a JPEG (quality 92) into a tar shard of ``--images`` samples, and runs the pipeline's own stage
functions on it exactly as the workers do: :func:`~pipeline.graph.stages.read_unit`,
:func:`~pipeline.graph.stages.detect_block` (decode, MTCNN with the default ``detect_max_side`` 2048, align),
:func:`~pipeline.graph.stages.restore_block` with the passthrough restorer, and
:func:`~pipeline.graph.stages.write_block` into a temporary DST (compose: paste back and encode; quality measures and
report thumbnails as ``_judge_faces`` does, every face selected for the contact sheet as in a small run; dr2.json, the
tar part, staging). Torch and OpenCV run on one thread, as in a Ray worker.

Figures are CPU milliseconds per image (``time.process_time``, so other load on the machine does not count),
the minimum over ``--repeats`` runs after one warm-up. The split inside a stage comes from timers wrapped around
the functions the stage calls (``paste_faces``, ``encode_image``, ``measure_face``, ...). ``goal`` sums what
issue 16 bounds: read + decode + align + compose + write (quality and thumbnails included), i.e. all but
detection and restoration. Nothing is asserted; the last column is a digest of everything written (the staged
tar part and the report thumbnails), to compare outputs between two versions of the code.

``--profile-detect`` adds where MTCNN's time goes on each photo (pyramid resampling, P-Net per level, R-Net and
O-Net crops and forwards).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pipeline.formats.shards  # noqa: E402
import pipeline.graph.stages as stages  # noqa: E402
import pipeline.imaging.decode  # noqa: E402
import pipeline.imaging.faces  # noqa: E402
import pipeline.imaging.mtcnn  # noqa: E402
import pipeline.imaging.quality  # noqa: E402
import pipeline.runner.report  # noqa: E402
from jobs.demo import demo_photo, jpeg_bytes  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.config import PipelineConfig, RestorerKind  # noqa: E402
from pipeline.formats.units import Unit, UnitKind  # noqa: E402
from pipeline.graph.models import build_detector, restorer_from_config  # noqa: E402

log = logging.getLogger("bench_photo")


# --------------------------------------------------------------------------------------------- photos


@dataclass(frozen=True)
class Face:
    photo: str  # a jobs/demo_data photo with one face
    height: float  # pasted height, a fraction of the canvas height
    x: float  # left edge, a fraction of the canvas width
    y: float  # top edge, a fraction of the canvas height
    mirror: bool = False


@dataclass(frozen=True)
class PhotoSpec:
    name: str
    size: tuple[int, int]  # (H, W)
    faces: tuple[Face, ...]


ONE_FACE = (Face("grace_hopper.jpg", 0.7, 0.3, 0.15),)
THREE_FACES = (
    Face("astronaut.jpg", 0.45, 0.02, 0.3),
    Face("grace_hopper.jpg", 0.5, 0.36, 0.1, mirror=True),
    Face("grace_hopper.jpg", 0.35, 0.7, 0.4),
)
SPECS = (
    PhotoSpec("1MP 1 face", (864, 1152), ONE_FACE),
    PhotoSpec("2MP 1 face", (1224, 1632), ONE_FACE),
    PhotoSpec("3MP 1 face", (1500, 2000), ONE_FACE),
    PhotoSpec("2MP 3 faces", (1224, 1632), THREE_FACES),
)


def build_photo(spec: PhotoSpec, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the coffee photo upscaled as background, the face photos upscaled onto it, then a
    little Gaussian grain (sigma 2), so that JPEG coding costs what it costs on a camera photo, not on a smooth one."""
    H, W = spec.size
    canvas = cv2.resize(demo_photo("coffee.jpg"), (W, H), interpolation=cv2.INTER_CUBIC)
    for face in spec.faces:
        src = demo_photo(face.photo)
        h = int(round(face.height * H))
        w = int(round(src.shape[1] * h / src.shape[0]))
        patch = cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)
        if face.mirror:
            patch = patch[:, ::-1]
        x, y = int(face.x * W), int(face.y * H)
        h, w = min(h, H - y), min(w, W - x)
        canvas[y : y + h, x : x + w] = patch[:h, :w]
    grain = np.random.default_rng(seed).normal(0.0, 2.0, canvas.shape)
    return np.clip(canvas + grain, 0, 255).astype(np.uint8)


def write_shard(path: Path, data: bytes, images: int) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            sink.write({"__key__": f"photo{i:03d}", "jpg": data, "json": json.dumps({"n": i}).encode()})


# --------------------------------------------------------------------------------------------- timers


class CpuTimers:
    """CPU seconds spent inside named functions, by wrapping them in place (restored on exit)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds

    @contextlib.contextmanager
    def wrapping(self, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
        """``targets``: (object, attribute, label); attributes that do not exist are skipped."""
        saved = []
        for obj, attr, label in targets:
            fn = getattr(obj, attr, None)
            if fn is None:
                continue
            saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
            setattr(obj, attr, self._timed(fn, label))
        try:
            yield
        finally:
            for obj, attr, old in reversed(saved):
                if old is _MISSING:
                    delattr(obj, attr)
                else:
                    setattr(obj, attr, old)

    def _timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.process_time() - t0

        return timed


_MISSING = object()


def _targets(detector: Any) -> list[tuple[Any, str, str]]:
    return [
        (stages, "decode_image", "decode"),
        (detector, "detect", "detect"),
        (pipeline.imaging.faces, "paste_faces", "paste"),
        (pipeline.imaging.decode, "encode_image", "encode"),
        (stages, "compose_block", "compose"),
        (pipeline.imaging.quality, "measure_face", "quality"),
        (pipeline.runner.report, "write_face_images", "thumbs"),
        (pipeline.runner.report, "pasted_region", "thumbs"),  # _judge_faces called it before issue 16
        (stages, "encode_tar_part", "tar"),
        (pipeline.formats.shards, "write_part", "stage_part"),
    ]


# --------------------------------------------------------------------------------------------- one run


COLUMNS = ("read", "decode", "detect", "align", "restore", "paste", "encode", "compose+", "quality", "thumbs",
           "tar+json", "write+")
GOAL = ("read", "decode", "align", "paste", "encode", "compose+", "quality", "thumbs", "tar+json", "write+")


def run_once(shard: Path, cfg: PipelineConfig, detector: Any, restorer: Any, images: int) -> tuple[dict[str, float],
                                                                                                   str, int]:
    """One pass of the CPU stages over ``shard`` -> (CPU ms per image per column, digest of outputs, faces)."""
    timers = CpuTimers()
    unit = Unit(name=shard.name, kind=UnitKind.SHARD, source=str(shard))
    with timers.wrapping(_targets(detector)):
        t0 = time.process_time()
        blocks = list(stages.read_unit(unit, cfg))
        timers.add("read", time.process_time() - t0)
        t0 = time.process_time()
        detected = [out for block in blocks for out in stages.detect_block(block, detector, cfg)]
        timers.add("detect_block", time.process_time() - t0)
        detect_decode = timers.seconds["decode"]  # the paste-back decodes again: its share is counted under compose
        t0 = time.process_time()
        restored = [stages.restore_block(block, restorer, cfg) for block in detected]
        timers.add("restore", time.process_time() - t0)
        t0 = time.process_time()
        summaries = [stages.write_block(block, cfg, {}, "bench", UnitKind.SHARD) for block in restored]
        timers.add("write_block", time.process_time() - t0)
    rows = [r for s in summaries for r in s.to_pylist()]
    statuses = {k: v for r in rows for k, v in (r["statuses"] or [])}
    if set(statuses) != {S.Status.OK.value}:
        raise RuntimeError(f"expected every photo restored, got statuses {statuses}")
    faces = sum(r["faces"] for r in rows) // images
    s = timers.seconds
    composed = s["compose"]
    judged = s["quality"] + s["thumbs"]
    cols = {
        "read": s["read"],
        "decode": s["decode"],  # both decodes: detection's and the paste-back's
        "detect": s["detect"],
        "align": s["detect_block"] - detect_decode - s["detect"],
        "restore": s["restore"],
        "paste": s["paste"],
        "encode": s["encode"],
        "compose+": composed - s["paste"] - s["encode"] - (s["decode"] - detect_decode),  # the report's regions
        "quality": s["quality"],
        "thumbs": s["thumbs"],
        "tar+json": s["tar"] + s["stage_part"],
        "write+": s["write_block"] - composed - judged - s["tar"] - s["stage_part"],  # dr2.json, bookkeeping
    }
    return {k: 1000.0 * v / images for k, v in cols.items()}, _digest(Path(cfg.dst)), faces


def _digest(dst: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in dst.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(dst)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def bench(spec: PhotoSpec, detector: Any, restorer: Any, *, images: int, repeats: int,
          report: bool) -> tuple[dict[str, float], str, int, int]:
    """-> (min CPU ms per image per column, output digest, faces per image, JPEG bytes)."""
    data = jpeg_bytes(build_photo(spec))
    best: dict[str, float] = {}
    digests = set()
    with tempfile.TemporaryDirectory(prefix="bench_photo_") as tmp:
        shard = Path(tmp) / "photos.tar"
        write_shard(shard, data, images)
        for rep in range(repeats):
            cfg = PipelineConfig(src=str(shard), dst=f"{tmp}/dst{rep}", restorer=RestorerKind.PASSTHROUGH,
                                 device="cpu", report=report)
            cols, digest, faces = run_once(shard, cfg, detector, restorer, images)
            digests.add(digest)
            best = {k: min(v, best.get(k, v)) for k, v in cols.items()}
    if len(digests) != 1:
        raise RuntimeError(f"outputs differ between repeats: {digests}")
    return best, digests.pop(), faces, len(data)


# --------------------------------------------------------------------------------------------- detection


def _detect_once(detector: Any, rgb: np.ndarray) -> tuple[dict[str, float], list[tuple[int, int]], int]:
    """One timed ``detect`` -> (CPU seconds per part, pyramid level sizes, faces found)."""
    timers = CpuTimers()
    sizes: list[tuple[int, int]] = []
    resize = cv2.resize

    def timed_resize(img: np.ndarray, size: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        t0 = time.process_time()
        out = resize(img, size, *args, **kwargs)
        crop = out.shape[:2] in ((24, 24), (48, 48))  # R-Net / O-Net inputs; anything else is a pyramid level
        if not crop:
            sizes.append(out.shape[:2])
        timers.add("resize (crops)" if crop else "resize (pyramid)", time.process_time() - t0)
        return out

    targets = [(detector.pnet, "forward", "P-Net"), (detector.rnet, "forward", "R-Net"),
               (detector.onet, "forward", "O-Net"), (pipeline.imaging.mtcnn, "batched_nms", "nms"),
               (pipeline.imaging.mtcnn, "_pnet_boxes", "P-Net boxes")]
    with timers.wrapping(targets):
        setattr(cv2, "resize", timed_resize)  # noqa: B010 - patched for the timing only
        try:
            t0 = time.process_time()
            (det,) = detector.detect([rgb])
            timers.add("total", time.process_time() - t0)
        finally:
            setattr(cv2, "resize", resize)  # noqa: B010
    s = dict(timers.seconds)
    s["other"] = s["total"] - sum(v for k, v in s.items() if k != "total")
    return s, sizes, len(det)


def profile_detect(spec: PhotoSpec, detector: Any, repeats: int) -> None:
    """Where MTCNN's CPU time goes on ``spec``'s photo (decoded as the pipeline does), min over repeats."""
    rgb = pipeline.imaging.decode.decode_image(jpeg_bytes(build_photo(spec)), max_pixels=10**9).rgb
    best: dict[str, float] = {}
    for _ in range(repeats):
        s, levels, found = _detect_once(detector, rgb)
        best = {k: min(v, best.get(k, v)) for k, v in s.items()}
    log.info("detect %s (%dx%d, %d faces), CPU ms: %s", spec.name, rgb.shape[1], rgb.shape[0], found,
             "  ".join(f"{k} {1000 * v:.0f}" for k, v in sorted(best.items(), key=lambda kv: -kv[1])))
    log.info("  %d pyramid levels (h x w): %s", len(levels), " ".join(f"{h}x{w}" for h, w in levels))


# --------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="samples per shard (the same photo)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per photo; the minimum is shown")
    parser.add_argument("--no-report", action="store_true", help="no contact sheet (no report thumbnails)")
    parser.add_argument("--profile-detect", action="store_true", help="also split MTCNN's time per photo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    base = PipelineConfig(restorer=RestorerKind.PASSTHROUGH, device="cpu")
    detector = build_detector(base, torch.device("cpu"))
    restorer = restorer_from_config(base, torch.device("cpu"))
    bench(SPECS[0], detector, restorer, images=1, repeats=1, report=not args.no_report)  # warm-up: imports, caches

    log.info("CPU ms per image, one thread, min of %d runs of %d images; report thumbnails %s; torch %s, cv2 %s",
             args.repeats, args.images, "off" if args.no_report else "on (every face)", torch.__version__,
             cv2.__version__)
    head = f"{'photo':<12} {'faces':>5} {'KB':>5} " + " ".join(f"{c:>8}" for c in COLUMNS) + f" {'goal':>6}  digest"
    log.info(head)
    for spec in SPECS:
        ms, digest, faces, size = bench(spec, detector, restorer, images=args.images, repeats=args.repeats,
                                        report=not args.no_report)
        goal = sum(ms[c] for c in GOAL)
        log.info(f"{spec.name:<12} {faces:>5} {size // 1024:>5} " + " ".join(f"{ms[c]:>8.1f}" for c in COLUMNS)
                 + f" {goal:>6.1f}  {digest}")
    log.info("goal = all but detect and restore (target <= 150 ms for a 2 MP one-face photo)")
    if args.profile_detect:
        for spec in SPECS:
            profile_detect(spec, detector, args.repeats)


if __name__ == "__main__":
    main()
