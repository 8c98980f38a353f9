"""Pipeline efficiency: faces/s of the full ``run_restore`` Ray job against a bare Python loop doing the same work.

    .venv/bin/python benchmarks/bench_pipeline.py [--shards 2] [--images 8] [--restorer tiny] [--N 4] [--tau 22]
        [--detect-batch-size 8] [--restore-batch-size 8] [--detect-actors 1] [--restore-actors 1] [--keep DIR]

1. Builds (or takes, with ``--src``) an archive of ``--shards`` WebDataset shards x ``--images`` real photos: the
   public-domain portraits shipped in ``jobs/demo_data`` (astronaut, Grace Hopper), each degraded by
   ``jobs.demo.degrade`` with its own seed and a factor of 4 or 8, so every image holds one real face.
2. Bare loop, in this process, models loaded before the clock starts and one batch of warm-up: for every image,
   in the same batches as the pipeline, decode -> detect (``--detect-batch-size`` images at a time) -> align ->
   restore (``--restore-batch-size`` faces per call, across images) -> paste back -> encode. No Ray, no tar
   writing, no row bookkeeping: the work a pipeline cannot avoid.
3. The full job, ``jobs.restore.run_restore``, on a fresh local Ray (``pipeline.build.init_ray``). Reported:
   Ray start-up; ``run_restore`` wall time (plans, starts actors and loads their models, streams, commits);
   and the steady-state rate from the first summary row the driver sees to the end of ``run_restore``, over
   the faces of the rows after that first block (the first block's faces were restored before the clock).

The efficiency is pipeline faces/s over bare faces/s; the goal is >= 0.9. On a machine with few cores read it
with care: Ray's own processes (GCS, raylet, the driver's streaming executor, idle workers) take CPU from the
same cores the models use, and the actors run with fewer torch threads than the bare loop unless told
otherwise. The table prints the CPU count and load average so the figure can be judged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jobs.restore as restore_job  # noqa: E402
from jobs.demo import degrade, demo_photo, jpeg_bytes  # noqa: E402
from pipeline import schema as S  # noqa: E402
from pipeline.build import init_ray  # noqa: E402
from pipeline.config import PipelineConfig, RestorerKind  # noqa: E402
from pipeline.decode import decode_image, encode_image  # noqa: E402
from pipeline.faces import align_faces, paste_faces  # noqa: E402
from pipeline.models import build_detector, build_restorer, pick_device  # noqa: E402
from pipeline.shards import iter_tar_samples, pick_image_member  # noqa: E402
from pipeline.stages import align_options  # noqa: E402
from pipeline.storage import expand_sources  # noqa: E402

log = logging.getLogger("bench_pipeline")

FACE_PHOTOS = ("astronaut.jpg", "grace_hopper.jpg")  # one frontal face each, public domain (jobs/demo_data)


# --------------------------------------------------------------------------------------------- archive


def build_archive(root: Path, shards: int, images: int) -> str:
    """``root/bench-{000..S-1}.tar``, each with ``images`` degraded face photos; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    photos = [demo_photo(n) for n in FACE_PHOTOS]
    for s in range(shards):
        with wds.TarWriter(str(root / f"bench-{s:03d}.tar")) as sink:
            for i in range(images):
                n = s * images + i
                rgb = degrade(photos[n % len(photos)], 4 if (n // len(photos)) % 2 == 0 else 8, seed=n)
                sink.write({"__key__": f"img{n:06d}", "jpg": jpeg_bytes(rgb), "json": json.dumps({"n": n}).encode()})
    return str(root / f"bench-{{000..{shards - 1:03d}}}.tar")


def read_images(src: str) -> list[tuple[str, bytes]]:
    """(``shard/key``, image bytes) of every sample with an image, in order."""
    out = []
    for uri in expand_sources(src):
        for sample in iter_tar_samples(uri):
            member = pick_image_member(sample.members)
            data = next((d for name, d in sample.members if name == member), None)
            if data is not None:
                out.append((f"{uri.rsplit('/', 1)[-1]}/{sample.key}", data))
    return out


# --------------------------------------------------------------------------------------------- bare loop


@dataclass
class Measured:
    images: int
    faces: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.faces / self.seconds if self.seconds > 0 else 0.0


def bare_loop(items: list[tuple[str, bytes]], cfg: PipelineConfig) -> tuple[Measured, dict[str, float]]:
    """Decode, detect, align, restore, paste back and encode every image with plain calls; per-step seconds."""
    device = pick_device(cfg.device)
    detector = build_detector(cfg, device)
    restorer = build_restorer(cfg, device)
    opts = align_options(cfg)
    _bare_pass(items[: cfg.detect_batch_size], detector, restorer, cfg, opts, {})  # warm-up, not timed
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    faces = _bare_pass(items, detector, restorer, cfg, opts, steps)
    return Measured(len(items), faces, time.perf_counter() - t0), steps


def _bare_pass(items: list[tuple[str, bytes]], detector: Any, restorer: Any, cfg: PipelineConfig, opts: Any,
               steps: dict[str, float]) -> int:
    def tick(name: str, t: float) -> float:
        now = time.perf_counter()
        steps[name] = steps.get(name, 0.0) + now - t
        return now

    faces_done = 0
    bs = cfg.detect_batch_size
    with torch.inference_mode():
        for start in range(0, len(items), bs):
            batch = items[start : start + bs]
            t = time.perf_counter()
            decoded = [decode_image(data, max_pixels=cfg.max_pixels) for _, data in batch]
            t = tick("decode", t)
            detections = detector.detect([d.rgb for d in decoded])
            t = tick("detect", t)
            aligned = [align_faces(d.rgb, det, opts) for d, det in zip(decoded, detections, strict=True)]
            t = tick("align", t)
            crops = [(k, i, f.crop) for (k, _), fs in zip(batch, aligned, strict=True) for i, f in enumerate(fs)]
            restored: list[np.ndarray] = []
            for c in range(0, len(crops), cfg.restore_batch_size):
                chunk = crops[c : c + cfg.restore_batch_size]
                out = restorer.restore(np.stack([crop for _, _, crop in chunk]), [f"{k}/{i}" for k, i, _ in chunk],
                                       N=cfg.N, tau=cfg.tau)  # (B, 512, 512, 3) uint8
                restored.extend(out)
            t = tick("restore", t)
            pos = 0
            for d, fs in zip(decoded, aligned, strict=True):
                if fs:
                    rgb = paste_faces(d.rgb, fs, restored[pos : pos + len(fs)])
                    encode_image(d, rgb, jpeg_quality=cfg.jpeg_quality)
                    pos += len(fs)
            tick("compose", t)
            faces_done += len(crops)
    return faces_done


# --------------------------------------------------------------------------------------------- pipeline


@dataclass
class PipelineMeasured:
    ray_start: float
    run_wall: float
    first_row_at: float  # seconds after run_restore began
    steady: Measured  # from the first row to the end, faces after the first block
    total: Measured  # the whole run_restore call
    stage_seconds: dict[str, float]


def run_pipeline(cfg: PipelineConfig) -> PipelineMeasured:
    """``run_restore`` on a fresh local Ray, with the arrival time of every summary row recorded."""
    import ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t0

    arrivals: list[tuple[float, int]] = []  # (time, faces) per summary row
    stream = restore_job.stream_summaries

    def timed_stream(ds: Any) -> Iterator[dict[str, Any]]:
        for row in stream(ds):
            if not S.is_marker(row):
                ok = row[S.STATUS] == S.Status.OK.value
                arrivals.append((time.perf_counter(), len(json.loads(row[S.FACES])) if ok else 0))
            yield row

    # run_restore looks stream_summaries up in its own module: wrap it there, for this run only
    restore_job.stream_summaries = timed_stream  # type: ignore[assignment]
    try:
        t1 = time.perf_counter()
        summary = restore_job.run_restore(cfg)
        t_end = time.perf_counter()
    finally:
        restore_job.stream_summaries = stream  # type: ignore[assignment]
    if not arrivals:
        raise RuntimeError("the pipeline produced no rows")
    t_first = arrivals[0][0]
    # rows of one block arrive together; the first block's faces were done before the clock started
    later = [f for t, f in arrivals if t > t_first + 0.005]
    stage_seconds: dict[str, float] = {}
    for stats_file in Path(cfg.dst).glob("*.stats.json"):
        for k, v in json.loads(stats_file.read_text())["seconds"].items():
            stage_seconds[k] = stage_seconds.get(k, 0.0) + v
    ray.shutdown()
    return PipelineMeasured(
        ray_start=ray_start,
        run_wall=t_end - t1,
        first_row_at=t_first - t1,
        steady=Measured(len(later), sum(later), t_end - t_first),
        total=Measured(summary.samples, summary.faces, t_end - t1),
        stage_seconds=stage_seconds,
    )


# --------------------------------------------------------------------------------------------- report


def report(args: argparse.Namespace, bare: Measured, bare_steps: dict[str, float], pipe: PipelineMeasured) -> str:
    load = os.getloadavg()
    with_start = Measured(pipe.total.images, pipe.total.faces, pipe.total.seconds + pipe.ray_start)
    lines = [
        f"cpus={os.cpu_count()} load average={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} torch threads (bare)="
        f"{torch.get_num_threads()} restorer={args.restorer} N={args.N} tau={args.tau} "
        f"detect_bs={args.detect_batch_size} restore_bs={args.restore_batch_size} "
        f"actors={args.detect_actors}+{args.restore_actors} cpus/actor={args.cpus_per_actor}",
        "",
        f"{'':<44}{'images':>8}{'faces':>8}{'seconds':>10}{'faces/s':>10}",
        f"{'bare loop (models loaded, warmed up)':<44}{bare.images:>8}{bare.faces:>8}{bare.seconds:>10.2f}"
        f"{bare.rate:>10.3f}",
        f"{'pipeline, first row -> end':<44}{pipe.steady.images:>8}{pipe.steady.faces:>8}"
        f"{pipe.steady.seconds:>10.2f}{pipe.steady.rate:>10.3f}",
        f"{'pipeline, run_restore wall (Ray up)':<44}{pipe.total.images:>8}{pipe.total.faces:>8}"
        f"{pipe.total.seconds:>10.2f}{pipe.total.rate:>10.3f}",
        f"{'pipeline, incl. Ray start-up':<44}{pipe.total.images:>8}{pipe.total.faces:>8}"
        f"{with_start.seconds:>10.2f}{with_start.rate:>10.3f}",
        "",
        f"Ray start-up {pipe.ray_start:.2f} s; first row reached the driver {pipe.first_row_at:.2f} s into run_restore",
        f"efficiency (first row -> end) = {pipe.steady.rate / bare.rate:.2f}   "
        f"(run_restore wall: {pipe.total.rate / bare.rate:.2f}; incl. Ray start: "
        f"{with_start.rate / bare.rate:.2f})   goal >= 0.9",
        "",
        "seconds per step, summed over images: bare loop | pipeline (per-row timings in the stats markers; "
        "summed over concurrent actors)",
    ]
    for k in sorted(set(bare_steps) | set(pipe.stage_seconds)):
        lines.append(f"  {k:<10}{bare_steps.get(k, 0.0):>10.2f} | {pipe.stage_seconds.get(k, 0.0):>10.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="existing shards (path, glob or braces) instead of building an archive")
    p.add_argument("--shards", type=int, default=2, help="shards to build (default 2)")
    p.add_argument("--images", type=int, default=8, help="images per shard (default 8)")
    p.add_argument("--restorer", choices=("tiny", "passthrough"), default="tiny")
    p.add_argument("--N", type=int, default=4, help="DR2 low-pass factor (default 4)")
    p.add_argument("--tau", type=int, default=22, help="DR2 output step (default 22, the 'mild' preset)")
    p.add_argument("--detect-batch-size", type=int, default=8, help="images per detector batch (default 8)")
    p.add_argument("--restore-batch-size", type=int, default=8,
                   help="faces per restorer call (default 8; DR2Restorer pads every call to 8 faces)")
    p.add_argument("--detect-actors", type=int, default=1)
    p.add_argument("--restore-actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the bare loop (default: torch's)")
    p.add_argument("--keep", type=Path, help="write archive and outputs here and keep them (default: a temp dir)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jobs").setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = args.keep or Path(tmp)
        src = args.src or build_archive(work / "archive", args.shards, args.images)
        dst = work / f"out-{time.strftime('%H%M%S')}"
        cfg = PipelineConfig(
            src=src, dst=str(dst), restorer=RestorerKind(args.restorer), N=args.N, tau=args.tau,
            detect_batch_size=args.detect_batch_size, restore_batch_size=args.restore_batch_size,
            detect_actors=args.detect_actors, restore_actors=args.restore_actors, cpus_per_actor=args.cpus_per_actor,
            record_timings=True, device="cpu",
        )
        items = read_images(src)
        log.info("archive %s: %d images", src, len(items))
        log.info("bare loop ...")
        bare, steps = bare_loop(items, cfg)
        log.info("bare loop: %d faces in %.2f s", bare.faces, bare.seconds)
        log.info("pipeline ...")
        pipe = run_pipeline(cfg)
        print(report(args, bare, steps, pipe))


if __name__ == "__main__":
    main()
