"""Pipeline efficiency: the full ``dr2 restore`` Ray job against a bare Python loop doing the same work, on
the same archive, in one run, for two kinds of rows:

    .venv/bin/python benchmarks/bench_pipeline.py [--cheap-shards 20 --cheap-images 500] [--shards 4 --images 8]
        [--png-shards 32 --png-images 100] [--small 2000x5 --large 100x100] [--synthetic-rows 0] [--plan-s3 0]
        [--skip cheap,tiny,png,small] [--keep DIR]

(a) cheap rows: ``--cheap-shards`` x ``--cheap-images`` JPEGs of 64x64 without a face, ``--restorer passthrough``.
    The bare loop reads each tar, decodes and runs MTCNN in batches of ``detect_batch_size``, one thread: the
    work every row needs. Reported: rows/s of both and their ratio (goal >= 0.9).
(b) tiny DR2: ``--shards`` x ``--images`` real degraded face photos (``jobs/demo_data``), ``--restorer tiny``. The
    bare loop decodes, detects, aligns, restores (``restore_batch_size`` faces per call), pastes back and encodes,
    models loaded before the clock and one batch of warm-up. Reported: faces/s of both, steady-state (from
    the first part summary the driver sees to the end, over the faces after the first block) and whole run.

(e) cheap PNG rows measured from outside: ``--png-shards`` x ``--png-images`` no-face 96x80 PNGs (3,200 rows by
    default), ``dr2 restore --restorer passthrough`` run as a SUBPROCESS while a thread polls DST for the
    ``*.stats.json`` markers (every 50 ms): first commit = the first marker seen, after the command started;
    steady = the rows of the markers after the first one over the time from the first marker to the last;
    whole run = all rows over the command's wall time (Python, Ray start-up and planning included). Both against
    the bare loop of (a) on the same tars (goals: steady >= 0.9, whole >= 0.6, first commit <= 10 s), and against
    the same loop detecting one image per MTCNN call, as the pipeline does: a batch's neighbours move a face's box
    (~1e-5 px, so the output bytes would depend on how Ray cut the blocks), and on images this small the per-call
    cost is most of MTCNN's time (here 3.0 ms per image alone, 1.25 ms in batches of 8).
(f) many small shards: the same rows (cheap 96x80 PNGs) as ``--small`` (2000x5: shards x rows) and as ``--large``
    (100x100), each a ``dr2 restore`` subprocess as in (e); reported: both wall times and their ratio (goal <= 2).

For (a) and (b): Ray start-up, time from ``run_restore`` to the first committed unit, and the driver's peak RSS
growth during the run (sampled every 50 ms). ``--synthetic-rows N`` adds a run over N samples without images
(read, write, commit only) to show that the driver's memory does not grow with the number of rows;
``--plan-s3 N`` plans N shards on a fresh SeaweedFS (tests/s3server.py) and times ``plan_units`` +
``select_todo`` (one paged listing of SRC and one of DST).

On a machine with few cores read the figures with care: Ray's own processes (GCS, raylet, the streaming
executor) take CPU from the same cores the stages use. The table prints the CPU count and load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pipeline.runner.loop as restore_job  # noqa: E402
from jobs.demo import degrade, demo_photo, jpeg_bytes  # noqa: E402
from pipeline.config import PipelineConfig, RestorerKind  # noqa: E402
from pipeline.formats.wds import iter_tar_samples, pick_image_member  # noqa: E402
from pipeline.graph.build import init_ray  # noqa: E402
from pipeline.graph.models import build_detector, pick_device, restorer_from_config  # noqa: E402
from pipeline.imaging.decode import decode_image, encode_image  # noqa: E402
from pipeline.imaging.faces import AlignOptions, align_faces, paste_faces  # noqa: E402
from pipeline.store.sources import expand_sources  # noqa: E402

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
    restorer = restorer_from_config(cfg, device)
    opts = AlignOptions(select=cfg.select, max_faces=cfg.max_faces, min_face_size=cfg.min_face_size)
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


def build_cheap_archive(root: Path, shards: int, images: int) -> str:
    """``root/cheap-*.tar``: 64x64 JPEGs of smooth noise (no face), one JSON each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(root / f"cheap-{s:03d}.tar")) as sink:
            for i in range(images):
                img = np.clip(rng.normal(128, 40, (8, 8, 3)), 0, 255).astype(np.uint8).repeat(8, 0).repeat(8, 1)
                sink.write({"__key__": f"c{s:03d}_{i:05d}", "jpg": jpeg_bytes(img), "json": b"{}"})
    return str(root / f"cheap-{{000..{shards - 1:03d}}}.tar")


def bare_cheap(src: str, cfg: PipelineConfig, *, one_by_one: bool = False) -> Measured:
    """Read each tar, decode, MTCNN-detect in batches (``one_by_one``: an image per call, as the pipeline's detector
    does so that a face's box never depends on its batch: pipeline/graph/stages.py, detect_block): one thread, no
    bookkeeping."""
    detector = build_detector(cfg, pick_device("cpu"))
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for uri in expand_sources(src):
            batch: list[np.ndarray] = []
            for sample in iter_tar_samples(uri):
                member = pick_image_member(sample.members)
                data = next(d for name, d in sample.members if name == member)
                batch.append(decode_image(data, max_pixels=cfg.max_pixels).rgb)
                n += 1
                if len(batch) == (1 if one_by_one else cfg.detect_batch_size):
                    detector.detect(batch)
                    batch = []
            if batch:
                detector.detect(batch)
    return Measured(n, 0, time.perf_counter() - t0)


def build_png_archive(root: Path, shards: int, images: int, *, width: int = 96, height: int = 80) -> str:
    """``root/png-*.tar``: ``width`` x ``height`` PNGs of smooth noise (no face), one JSON each; the brace pattern."""
    import cv2

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    digits = max(3, len(str(shards - 1)))
    for s in range(shards):
        with wds.TarWriter(str(root / f"png-{s:0{digits}d}.tar")) as sink:
            for i in range(images):
                small = np.clip(rng.normal(128, 40, (height // 8, width // 8, 3)), 0, 255).astype(np.uint8)
                ok, png = cv2.imencode(".png", small.repeat(8, 0).repeat(8, 1))
                assert ok
                sink.write({"__key__": f"p{s:05d}_{i:05d}", "png": png.tobytes(), "json": b"{}"})
    return str(root / f"png-{{{0:0{digits}d}..{shards - 1:0{digits}d}}}.tar")


# --------------------------------------------------------------------------------------------- pipeline


class RssSampler:
    """Peak resident memory of this process above its level at start, sampled every 50 ms in a thread."""

    def __init__(self) -> None:
        import threading

        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.start) / 2**20


@dataclass
class PipelineMeasured:
    ray_start: float
    first_part_at: float  # seconds after run_restore began
    first_commit_at: float
    steady: Measured  # from the first part summary to the end, rows/faces after the first block
    total: Measured  # the whole run_restore call
    driver_mb: float  # peak RSS growth of the driver during run_restore
    stage_seconds: dict[str, float]


def run_pipeline(cfg: PipelineConfig) -> PipelineMeasured:
    """``run_restore`` on a fresh local Ray, with the arrival time of every part summary recorded."""
    import ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_start = time.perf_counter() - t0
    arrivals: list[tuple[float, int, int]] = []  # (time, rows, faces) per part

    def on_part(part: dict[str, Any], _: Any) -> None:
        if part["first"] >= 0:
            arrivals.append((time.perf_counter(), part["last"] - part["first"] + 1, int(part["faces"])))

    rss = RssSampler()
    t1 = time.perf_counter()
    summary = restore_job.run_restore(cfg, on_part=on_part)
    t_end = time.perf_counter()
    driver_mb = rss.stop()
    ray.shutdown()
    if not arrivals:
        raise RuntimeError("the pipeline produced no parts")
    t_first = arrivals[0][0]
    later = [(r, f) for t, r, f in arrivals[1:]]
    return PipelineMeasured(
        ray_start=ray_start,
        first_part_at=t_first - t1,
        first_commit_at=summary.first_commit_seconds or float("nan"),
        steady=Measured(sum(r for r, _ in later), sum(f for _, f in later), t_end - t_first),
        total=Measured(summary.samples, summary.faces, t_end - t1),
        driver_mb=driver_mb,
        stage_seconds=dict(summary.stage_seconds),
    )


@dataclass
class OutsideMeasured:
    """A ``dr2 restore`` subprocess seen from outside: its wall time and when each marker appeared in DST."""

    seconds: float
    commits: list[tuple[float, int]]  # (seconds after the command started, samples), in order seen
    rc: int

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.commits)

    @property
    def first_commit(self) -> float:
        return self.commits[0][0] if self.commits else float("nan")

    def steady(self) -> Measured:
        """Rows committed after the first commit, over the time from the first marker to the last."""
        if len(self.commits) < 2:
            return Measured(0, 0, float("nan"))
        return Measured(sum(n for _, n in self.commits[1:]), 0, self.commits[-1][0] - self.commits[0][0])

    def whole(self) -> Measured:
        return Measured(self.rows, 0, self.seconds)


def run_cli(src: str, dst: Path, *extra: str) -> OutsideMeasured:
    """``dr2 restore SRC DST --restorer passthrough --quiet`` as a subprocess, polling DST for commit markers."""
    import subprocess
    import threading

    seen: dict[str, tuple[float, int]] = {}
    stop = threading.Event()
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def poll() -> None:
        while True:
            done = stop.is_set()
            for path in dst.glob("*.stats.json"):  # atomic writes: a marker seen is whole
                if path.name not in seen:
                    now = time.perf_counter() - t0
                    seen[path.name] = (now, int(json.loads(path.read_bytes())["count"]))
            if done:
                return
            stop.wait(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    # `python -m jobs.cli` is what the `dr2` script runs (jobs.cli.entry: the CLI's own teardown of Ray at the end).
    # Calling jobs.cli.main instead left Ray's shutdown at exit to end the run: it sends SIGTERM to processes that
    # the CLI starts deaf to it, and waits on each (6.4 s of the whole run here, after the summary was out).
    cmd = [sys.executable, "-m", "jobs.cli", "restore", src, str(dst),
           "--restorer", "passthrough", "--device", "cpu", "--quiet", *extra]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    watcher.start()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    if proc.returncode != 0:
        log.warning("dr2 restore exited %d:\n%s", proc.returncode, proc.stderr[-3000:])
    return OutsideMeasured(seconds, sorted(seen.values()), proc.returncode)


def report_outside(title: str, bare: Measured, m: OutsideMeasured, one_by_one: Measured | None = None) -> list[str]:
    steady, whole = m.steady(), m.whole()

    def rate(x: Measured) -> float:
        return x.images / x.seconds if x.seconds > 0 else 0.0

    lines = [
        title,
        f"{'':<46}{'rows':>8}{'faces':>8}{'seconds':>10}{'rate':>10}",
        _row("bare loop, one thread", bare, "rows"),
    ]
    if one_by_one is not None:
        lines.append(_row("bare loop, one image per MTCNN call", one_by_one, "rows"))
    lines += [
        _row("dr2 restore, first commit -> last (steady)", steady, "rows"),
        _row("dr2 restore, whole command", whole, "rows"),
        f"efficiency: steady {rate(steady) / rate(bare):.2f}, whole run {rate(whole) / rate(bare):.2f}; first commit "
        f"{m.first_commit:.1f} s after the command started; {len(m.commits)} commits seen; load {_load()}",
    ]
    if one_by_one is not None:
        lines.append(f"against the bare loop detecting one image per call: steady {rate(steady) / rate(one_by_one):.2f}"
                     f", whole run {rate(whole) / rate(one_by_one):.2f}")
    return [*lines, ""]


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _shape(text: str) -> tuple[int, int]:
    shards, _, rows = text.partition("x")
    return int(shards), int(rows)


def plan_on_s3(n: int) -> str:
    """Plan ``n`` shards on a fresh S3 server: listing SRC and DST, once each."""
    from tests.s3server import S3Server

    server = S3Server.start()
    try:
        for k, v in server.env().items():
            os.environ[k] = v
        bucket = server.make_bucket()
        from concurrent.futures import ThreadPoolExecutor

        from pipeline.store import storage

        storage.reset_clients()
        client = storage.s3_client()
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"in/s-{i:06d}.tar", Body=b"x"), range(n)))
        cfg = PipelineConfig(src=f"s3://{bucket}/in/", dst=f"s3://{bucket}/out/", restorer=RestorerKind.PASSTHROUGH)
        t0 = time.perf_counter()
        units = restore_job.plan_units(cfg)
        todo = restore_job.select_todo(units, cfg, "h" * 64)
        return f"planning {len(units)} shards on S3 ({len(todo)} to do): {time.perf_counter() - t0:.2f} s"
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------- report


def _row(name: str, m: Measured, unit: str) -> str:
    n = m.images if unit == "rows" else m.faces
    rate = n / m.seconds if m.seconds > 0 else 0.0
    return f"{name:<46}{m.images:>8}{m.faces:>8}{m.seconds:>10.2f}{rate:>10.2f} {unit}/s"


def report_pair(title: str, bare: Measured, pipe: PipelineMeasured, unit: str) -> list[str]:
    def rate(m: Measured) -> float:
        n = m.images if unit == "rows" else m.faces
        return n / m.seconds if m.seconds > 0 else 0.0

    with_start = Measured(pipe.total.images, pipe.total.faces, pipe.total.seconds + pipe.ray_start)
    lines = [
        title,
        f"{'':<46}{'rows':>8}{'faces':>8}{'seconds':>10}{'rate':>10}",
        _row("bare loop, one thread", bare, unit),
        _row("pipeline, first part -> end (steady)", pipe.steady, unit),
        _row("pipeline, run_restore wall (Ray up)", pipe.total, unit),
        _row("pipeline, incl. Ray start-up", with_start, unit),
        f"efficiency: steady {rate(pipe.steady) / rate(bare):.2f}, whole run {rate(pipe.total) / rate(bare):.2f}, "
        f"incl. Ray start {rate(with_start) / rate(bare):.2f}",
        f"Ray start-up {pipe.ray_start:.1f} s; first part at {pipe.first_part_at:.1f} s, first unit committed at "
        f"{pipe.first_commit_at:.1f} s after run_restore began; driver peak RSS growth {pipe.driver_mb:.0f} MiB",
        "pipeline seconds per stage (summed over rows): "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(pipe.stage_seconds.items()) if v),
        "",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cheap-shards", type=int, default=20)
    p.add_argument("--cheap-images", type=int, default=500)
    p.add_argument("--shards", type=int, default=4, help="face shards for the tiny-DR2 case (default 4)")
    p.add_argument("--images", type=int, default=8, help="face images per shard (default 8)")
    p.add_argument("--N", type=int, default=4, help="DR2 low-pass factor (default 4)")
    p.add_argument("--tau", type=int, default=22, help="DR2 output step (default 22, the 'mild' preset)")
    p.add_argument("--detect-batch-size", type=int, default=8)
    p.add_argument("--restore-batch-size", type=int, default=8)
    p.add_argument("--png-shards", type=int, default=32, help="(e) shards of 96x80 PNGs (default 32)")
    p.add_argument("--png-images", type=int, default=100, help="(e) PNGs per shard (default 100: 3,200 rows)")
    p.add_argument("--small", default="2000x5", help="(f) many small shards, SHARDSxROWS (default 2000x5)")
    p.add_argument("--large", default="100x100", help="(f) the same rows in big shards, SHARDSxROWS (default 100x100)")
    p.add_argument("--synthetic-rows", type=int, default=0, help="also run N image-less rows (driver memory)")
    p.add_argument("--plan-s3", type=int, default=0, help="also plan N shards on a local S3 server")
    p.add_argument("--skip", default="", help="comma list of cases to skip: cheap, tiny, png, small")
    p.add_argument("--bare-threads", type=int, default=1,
                   help="torch threads of the bare loops (default 1: the one-thread loop; the pipeline's stage "
                        "actors run torch with one thread each, see RestoreStage)")
    p.add_argument("--keep", type=Path, help="write archives and outputs here and keep them (default: a temp dir)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jobs").setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(args.bare_threads)
    load = os.getloadavg()
    out = [f"cpus={os.cpu_count()} load average={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}; bare loops: one Python "
           f"thread, torch {args.bare_threads} thread(s)", ""]

    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        work = args.keep or Path(tmp)
        common = {"detect_batch_size": args.detect_batch_size, "restore_batch_size": args.restore_batch_size,
                  "device": "cpu"}
        if "cheap" not in skip:
            src = build_cheap_archive(work / "cheap", args.cheap_shards, args.cheap_images)
            cfg = PipelineConfig(src=src, dst=str(work / "out-cheap"), restorer=RestorerKind.PASSTHROUGH, **common)
            log.info("cheap rows: bare loop ...")
            bare = bare_cheap(src, cfg)
            log.info("cheap rows: pipeline ...")
            out += report_pair(f"(a) cheap rows: {args.cheap_shards} shards x {args.cheap_images} no-face 64x64 JPEGs, "
                               "passthrough", bare, run_pipeline(cfg), "rows")
        if "tiny" not in skip:
            src = build_archive(work / "faces", args.shards, args.images)
            cfg = PipelineConfig(src=src, dst=str(work / "out-tiny"), restorer=RestorerKind.TINY, N=args.N,
                                 tau=args.tau, **common)
            log.info("tiny DR2: bare loop ...")
            bare, _ = bare_loop(read_images(src), cfg)
            log.info("tiny DR2: pipeline ...")
            out += report_pair(f"(b) tiny DR2: {args.shards} shards x {args.images} face photos, N={args.N} "
                               f"tau={args.tau}", bare, run_pipeline(cfg), "faces")
        if "png" not in skip:
            src = build_png_archive(work / "png", args.png_shards, args.png_images)
            cfg = PipelineConfig(src=src, dst=str(work / "out-png"), restorer=RestorerKind.PASSTHROUGH, **common)
            log.info("cheap 96x80 PNGs: bare loop ...")
            bare = bare_cheap(src, cfg)
            one = bare_cheap(src, cfg, one_by_one=True)
            log.info("cheap 96x80 PNGs: dr2 restore, measured from outside ...")
            m = run_cli(src, work / "out-png")
            out += report_outside(f"(e) cheap rows from outside: {args.png_shards} shards x {args.png_images} no-face "
                                  "96x80 PNGs, passthrough", bare, m, one)
        if "small" not in skip:
            walls = []
            for label, (shards, rows) in (("small", _shape(args.small)), ("large", _shape(args.large))):
                src = build_png_archive(work / f"png-{label}", shards, rows)
                log.info("many small shards: %d x %d ...", shards, rows)
                m = run_cli(src, work / f"out-{label}")
                walls.append((shards, rows, m))
            (s1, r1, small), (s2, r2, large) = walls
            out += ["(f) many small shards: the same cheap 96x80 PNG rows in shards of every size",
                    f"{s1} shards x {r1} rows: {small.seconds:.1f} s ({small.rows} rows committed, first commit "
                    f"{small.first_commit:.1f} s)",
                    f"{s2} shards x {r2} rows: {large.seconds:.1f} s ({large.rows} rows committed, first commit "
                    f"{large.first_commit:.1f} s)",
                    f"ratio {small.seconds / large.seconds:.2f} (goal <= 2); per extra unit "
                    f"{(small.seconds - large.seconds) / max(1, s1 - s2) * 1000:.0f} ms; load {_load()}", ""]
        if args.synthetic_rows:
            root = work / "synthetic"
            root.mkdir(parents=True, exist_ok=True)
            per = 10_000
            for s in range(0, args.synthetic_rows, per):
                with wds.TarWriter(str(root / f"syn-{s // per:04d}.tar")) as sink:
                    for i in range(s, min(s + per, args.synthetic_rows)):
                        sink.write({"__key__": f"r{i:07d}", "txt": b"x"})
            cfg = PipelineConfig(src=str(root), dst=str(work / "out-syn"), restorer=RestorerKind.PASSTHROUGH, **common)
            m = run_pipeline(cfg)
            out.append(f"(c) synthetic: {m.total.images} image-less rows in {m.total.seconds:.1f} s "
                       f"({m.total.images / m.total.seconds:.0f} rows/s); driver peak RSS growth {m.driver_mb:.0f} MiB")
        if args.plan_s3:
            out.append("(d) " + plan_on_s3(args.plan_s3))
    print("\n".join(out))


if __name__ == "__main__":
    main()
