"""``dr2 bench``: how fast the DR2 face path runs here, in one table measured in one run.

Per (precision, batch size) row:

* bare UNet forwards/s (batches) and the TFLOP/s they achieve;
* bare restorer faces/s (:class:`dr2.restorer.DR2Restorer.restore` at ``N``/``tau``, default the "moderate"
  preset N=8, tau=35: 26 UNet calls and one enhancer pass per face);
* end-to-end pipeline faces/s: ``dr2 restore`` run as a SUBPROCESS on a generated WebDataset archive of
  degraded face photos (wall time of the whole command, Ray start included; faces from the ``*.stats.json``
  markers), and pipeline efficiency = end-to-end / bare restorer;
* the official-style baseline (batch 1, fp32, explicit attention, same weights, each face written as a PNG
  inside the loop, as ``dr2e.py`` does) and the row's speed-up over it;
* MFU against a peak measured here (a large matmul in the row's dtype) and against the card's datasheet
  (dense tensor-core peaks of H100/H200/A100; "n/a" on CPU and unknown cards).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors (convolutions, matmuls and
attention, 2 FLOPs per multiply-add): full size 387.9 GFLOP per UNet call, 1447.1 GFLOP per SPARNetHD pass.

On CPU the tiny config runs (``DR2Restorer.tiny_random``); on CUDA the full-size architecture with random
weights (speed does not depend on the values). Not a test: nothing here asserts a speed.

What a plain ``dr2 bench`` measures depends on the device (:data:`DEFAULT_MATRIX`): on CUDA the full matrix
(fp32 and bf16 x batch 1, 4, 8, a pipeline run per row); on CPU a small one that ends in a few minutes (fp32 x
batch 1 and 4, one timed repeat after the warm-up, one pipeline run of 4 photos at the last row's batch), since
the full matrix there (six ``dr2 restore`` subprocesses, bf16 emulated on CPU) took over 18 minutes on a loaded
machine. ``--full``, or an explicit ``--precision`` / ``--batch-size``, gives CPU the full matrix.

The pipeline row also shows how busy the run's restore and detect actors were (busy seconds / wall seconds,
summed over the stage's actors), read from the run report's ``busy`` object (``DST/_dr2/report/report.json``);
"n/a" where the report has none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from dr2.diffusion import default_omega
from dr2.memory import Precision, bytes_per_face
from dr2.restorer import DR2Restorer
from dr2.sparnet import SPARNetConfig, SPARNetHD
from dr2.unet import UNetConfig, UNetModel
from dr2.verify import format_table, verify_on_device
from dr2.weights import ModelKind, save_model_dir
from jobs.parser import add_bench_arguments

log = logging.getLogger(__name__)

# Datasheet dense (no sparsity) peaks, TFLOP/s. "fp32" is TF32 tensor-core math: cuDNN runs fp32 convolutions
# in TF32 unless torch.backends.cudnn.allow_tf32 is off (PyTorch's default is on).
SPEC_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


PipelineRows = Literal["every", "last"]  # a `dr2 restore` run for every (precision, batch) row, or the last only


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchOptions:
    device: str = "cpu"
    precisions: tuple[str, ...] = ("fp32", "bf16")
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    compile: bool = False
    compile_mode: str | None = None
    skip_pipeline: bool = False
    out: Path | None = None
    N: int = 8
    tau: int = 35
    repeats: int = 2
    baseline_faces: int = 4
    pipeline_images: int = 0  # 0: 8 on CPU, 48 on CUDA
    pipeline_rows: PipelineRows = "every"
    verify: bool = False


# What a plain `dr2 bench` runs: "full" on CUDA (and on CPU with --full), "small" on CPU, because the full matrix
# there took over 18 minutes on a loaded 2-core machine (module docstring).
DEFAULT_MATRIX: dict[Literal["full", "small"], dict[str, Any]] = {
    "full": {"precisions": ("fp32", "bf16"), "batch_sizes": (1, 4, 8), "repeats": 2, "baseline_faces": 4,
             "pipeline_images": 0, "pipeline_rows": "every"},
    "small": {"precisions": ("fp32",), "batch_sizes": (1, 4), "repeats": 1, "baseline_faces": 2,
              "pipeline_images": 4, "pipeline_rows": "last"},
}


def device_defaults(device: str, *, full: bool) -> dict[str, Any]:
    """The :class:`BenchOptions` fields a plain run uses on ``device`` ("cpu" or "cuda"): small on CPU unless
    ``full``."""
    return dict(DEFAULT_MATRIX["small" if device == "cpu" and not full else "full"])


# --------------------------------------------------------------------------------------------- measurements


def spec_peak(device: torch.device, precision: str) -> tuple[str, float | None]:
    """(card name, datasheet dense peak TFLOP/s for ``precision``) or (name, None) when unknown / on CPU."""
    if device.type != "cuda":
        return platform.processor() or "cpu", None
    name = torch.cuda.get_device_name(device)
    for card, peaks in SPEC_PEAKS.items():  # "H100 PCIe" before "H100"
        if all(word in name for word in card.split()):
            return name, peaks.get(precision)
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device: torch.device, warmup: int = 1, repeats: int = 2) -> float:
    """Median wall seconds of ``fn`` after ``warmup`` calls, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measured_peak_tflops(device: torch.device, precision: str) -> float:
    """TFLOP/s of a large square matmul in ``precision``, best of 8 (fp32 follows torch's TF32 setting for
    matmuls). The best, not the median: a peak is what the chip can do when nothing else runs."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=_DTYPES[precision])
    b = torch.randn(n, n, device=device, dtype=_DTYPES[precision])
    a @ b
    best = float("inf")
    for _ in range(8):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def count_flops(unet_config: UNetConfig, enhancer_config: SPARNetConfig | None) -> tuple[float, float]:
    """(FLOPs of one UNet call, of one enhancer pass) for one face, on meta tensors."""
    with torch.device("meta"):
        unet = UNetModel(unet_config).eval()
        enh = SPARNetHD(enhancer_config).eval() if enhancer_config is not None else None
    s = unet_config.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        unet(torch.empty(1, 3, s, s, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"))
    unet_flops = float(c.get_total_flops())
    enh_flops = 0.0
    if enh is not None and enhancer_config is not None:
        e = enhancer_config.size
        with torch.no_grad(), FlopCounterMode(display=False) as c:
            enh(torch.empty(1, 3, e, e, device="meta"))
        enh_flops = float(c.get_total_flops())
    return unet_flops, enh_flops


# --------------------------------------------------------------------------------------------- models


def build_models(device: torch.device) -> tuple[UNetModel, SPARNetHD, str]:
    """Tiny random models on CPU, full-size random models elsewhere; the weights are the same for every row."""
    if device.type == "cpu":
        r = DR2Restorer.tiny_random(weights_seed=0)
        assert r.enhancer is not None
        return r.unet, r.enhancer, "tiny (DR2Restorer.tiny_random)"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNetModel(UNetConfig()).eval()
    return unet, SPARNetHD.random(SPARNetConfig(), seed=0), "full size (UNetConfig(), SPARNetConfig()), random weights"


def make_restorer(unet: UNetModel, enhancer: SPARNetHD, device: torch.device, **kw: Any) -> DR2Restorer:
    return DR2Restorer(unet=unet, enhancer=enhancer, device=device, seed=0, **kw)


def bench_faces(batch: int, seed: int = 0) -> np.ndarray:
    """``batch`` aligned-face-sized uint8 images (smooth noise; speed does not depend on content)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 8, axis=1), 8, axis=2))


def baseline_faces_per_s(unet: UNetModel, enhancer: SPARNetHD, device: torch.device, opts: BenchOptions,
                         tmp: Path) -> float:
    """The official demo's way: one face at a time, fp32, explicit attention, a PNG written inside the loop."""
    r = make_restorer(unet, enhancer, device, precision="fp32", batch_size=1, attention="math", channels_last=False)
    faces = bench_faces(opts.baseline_faces, seed=1)
    r.restore(faces[:1], ["warm"], N=opts.N, tau=opts.tau)
    out = tmp / "baseline"
    out.mkdir(parents=True, exist_ok=True)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(len(faces)):
        face = r.restore(faces[i : i + 1], [f"baseline/{i}"], N=opts.N, tau=opts.tau)
        Image.fromarray(face[0]).save(out / f"{i:04d}.png")
    return len(faces) / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- the pipeline row


def build_archive(root: Path, n_images: int) -> Path:
    """``n_images`` degraded face photos (astronaut, Grace Hopper; x4 and x8) in two WebDataset shards."""
    import webdataset as wds

    from jobs.demo import degrade, demo_photo, jpeg_bytes

    root.mkdir(parents=True, exist_ok=True)
    photos = [demo_photo("astronaut.jpg"), demo_photo("grace_hopper.jpg")]
    per_shard = (n_images + 1) // 2
    for shard in range(2):
        with wds.TarWriter(str(root / f"shard-{shard:03d}.tar")) as sink:
            for i in range(shard * per_shard, min(n_images, (shard + 1) * per_shard)):
                img = degrade(photos[i % 2], 4 if i % 4 < 2 else 8, seed=i)
                sink.write({"__key__": f"face_{i:04d}", "jpg": jpeg_bytes(img)})
    return root


def write_model_dirs(unet: UNetModel, enhancer: SPARNetHD, root: Path) -> tuple[Path, Path]:
    """The bench's random models as model dirs (model.safetensors + config.json, as `dr2 weights import`)."""
    ddpm = save_model_dir(unet.cpu(), kind=ModelKind.DDPM, out_dir=root / "ddpm", source="dr2 bench (random)")
    enh = save_model_dir(enhancer.cpu(), kind=ModelKind.SPARNETHD, out_dir=root / "sparnethd",
                         source="dr2 bench (random)")
    return ddpm, enh


def _dr2_command() -> list[str]:
    script = Path(sys.executable).with_name("dr2")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "jobs.cli"]


def _count_faces(stats: Any) -> int:
    """The ``faces`` count of a stats marker (top level, else the first nested dict that has one)."""
    if isinstance(stats, dict):
        if isinstance(stats.get("faces"), int):
            return int(stats["faces"])
        for v in stats.values():
            n = _count_faces(v)
            if n:
                return n
    return 0


BUSY_STAGES = ("restore", "detect")


def busy_fractions(dst: Path) -> dict[str, float | None]:
    """Per stage, the run's busy fraction (busy seconds / wall seconds, summed over the stage's actors) from the
    run report's ``busy`` object (``DST/_dr2/report/report.json``); None where the report or the figure is absent.
    """
    path = dst.joinpath("_dr2", "report", "report.json")
    try:
        busy = json.loads(path.read_text()).get("busy")
    except (OSError, ValueError, AttributeError):
        busy = None
    out: dict[str, float | None] = dict.fromkeys(BUSY_STAGES)
    for stage in BUSY_STAGES:
        entry = busy.get(stage) if isinstance(busy, dict) else None
        fraction = entry.get("fraction") if isinstance(entry, dict) else None
        out[stage] = float(fraction) if isinstance(fraction, int | float) else None
    return out


def pipeline_faces_per_s(src: Path, dst: Path, *, device: torch.device, precision: str, batch: int,
                         opts: BenchOptions, model_dirs: tuple[Path, Path] | None) -> tuple[float, int, float]:
    """Run ``dr2 restore`` in a subprocess; (faces/s over the command's wall time, faces, seconds).
    The run's outputs (its report included) stay in ``dst``."""
    cmd = [*_dr2_command(), "restore", str(src / "shard-{000..001}.tar"), str(dst), "--overwrite",
           "--N", str(opts.N), "--tau", str(opts.tau), "--precision", precision, "--restore-batch-size", str(batch),
           "--device", device.type]
    if model_dirs is None:
        cmd += ["--restorer", "tiny"]
    else:
        cmd += ["--restorer", "dr2", "--ddpm", str(model_dirs[0]), "--enhancer", str(model_dirs[1]),
                "--gpus-per-restorer", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    faces = sum(_count_faces(json.loads(p.read_text())) for p in sorted(dst.glob("*.stats.json")))
    return faces / seconds, faces, seconds


# --------------------------------------------------------------------------------------------- the table


def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    return format(v, spec) if isinstance(v, float) else str(v)


COLUMNS = [
    ("precision", "precision", "s"),
    ("batch", "batch", "s"),
    ("unet_batches_per_s", "UNet fwd/s", ".3g"),
    ("unet_tflops", "UNet TFLOP/s", ".3g"),
    ("restorer_faces_per_s", "restorer faces/s", ".3g"),
    ("pipeline_faces_per_s", "pipeline faces/s", ".3g"),
    ("pipeline_efficiency", "pipeline eff.", ".0%"),
    ("pipeline_restore_busy", "restore busy", ".0%"),
    ("pipeline_detect_busy", "detect busy", ".0%"),
    ("baseline_faces_per_s", "baseline faces/s", ".3g"),
    ("speedup", "speed-up", ".3g"),
    ("mfu_measured", "MFU (measured peak)", ".1%"),
    ("mfu_spec", "MFU (spec)", ".1%"),
    ("peak_mem_gib_per_face", "GiB/face (est.)", ".3g"),
]


def markdown(result: dict[str, Any]) -> str:
    """The header as a list, then one table row per (precision, batch)."""
    head = result["header"]
    lines = [f"# dr2 bench: {head['device']} ({head['card']}), {head['models']}", ""]
    for k in ("torch", "N/tau/omega", "UNet calls per face", "GFLOP per UNet call", "GFLOP per enhancer pass",
              "TFLOP per face", "measured peak TFLOP/s", "spec peak TFLOP/s", "compile", "pipeline",
              "baseline"):
        lines.append(f"- {k}: {head[k]}")
    lines += ["", "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(key), spec) for key, _, spec in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def bench_row(r: DR2Restorer, opts: BenchOptions, *, unet_flops: float, face_flops: float,
              peak: float) -> dict[str, Any]:
    """The bare measurements of one restorer: UNet forwards, restore, MFU, memory per face."""
    device, batch, precision = r.device, r.batch_size or 1, r.precision
    s = r.ddpm_size
    x = torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), 500, dtype=torch.long, device=device)
    unet_s = timed(lambda: r.denoise(x, t), device=device, warmup=2, repeats=max(3, opts.repeats))
    faces = bench_faces(batch)
    keys = [f"bench/{i}" for i in range(batch)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    face_s = timed(lambda: r.restore(faces, keys, N=opts.N, tau=opts.tau), device=device, warmup=1,
                   repeats=opts.repeats)
    fps = batch / face_s
    _, spec = spec_peak(device, precision)
    row: dict[str, Any] = {
        "precision": precision,
        "batch": batch,
        "unet_batches_per_s": 1 / unet_s,
        "unet_tflops": unet_flops * batch / unet_s / 1e12,
        "restorer_faces_per_s": fps,
        "mfu_measured": face_flops * fps / 1e12 / peak,
        "mfu_spec": face_flops * fps / 1e12 / spec if spec else None,
        "peak_mem_gib_per_face": bytes_per_face(r.unet.config, r.enhancer.config if r.enhancer else None,
                                                precision) / 2**30,
    }
    if device.type == "cuda":
        row["measured_peak_mem_gib_per_face"] = torch.cuda.max_memory_allocated(device) / 2**30 / batch
    return row


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    device = torch.device(opts.device)
    unet, enhancer, models = build_models(device)
    omega = default_omega(opts.N, opts.tau)
    steps = omega - opts.tau + 1
    unet_flops, enh_flops = count_flops(unet.config, enhancer.config)
    face_flops = steps * unet_flops + enh_flops
    peaks = {p: measured_peak_tflops(device, p) for p in opts.precisions}
    card, _ = spec_peak(device, "bf16")
    tmp = Path(tempfile.mkdtemp(prefix="dr2-bench-"))
    rows: list[dict[str, Any]] = []
    compile_notes: list[str] = []
    try:
        baseline = baseline_faces_per_s(unet, enhancer, device, opts, tmp)
        archive = model_dirs = None
        if not opts.skip_pipeline:
            n_images = opts.pipeline_images or (8 if device.type == "cpu" else 48)
            archive = build_archive(tmp / "archive", n_images)
            if device.type != "cpu":
                model_dirs = write_model_dirs(unet, enhancer, tmp / "models")
                unet, enhancer = unet.to(device), enhancer.to(device)
        last = (opts.precisions[-1], opts.batch_sizes[-1]) if opts.precisions and opts.batch_sizes else None
        for precision in opts.precisions:
            for batch in opts.batch_sizes:
                log.info("bench: %s, batch %d", precision, batch)
                r = make_restorer(unet, enhancer, device, precision=precision, batch_size=batch,
                                  compile=opts.compile, compile_mode=opts.compile_mode)
                if opts.compile:
                    compile_notes.append(f"{precision}/b{batch}: {r.warmup(N=opts.N, tau=opts.tau):.1f} s")
                row = bench_row(r, opts, unet_flops=unet_flops, face_flops=face_flops, peak=peaks[precision])
                row["baseline_faces_per_s"] = baseline
                row["speedup"] = row["restorer_faces_per_s"] / baseline
                restorer_fps = row["restorer_faces_per_s"]
                if archive is not None and (opts.pipeline_rows == "every" or (precision, batch) == last):
                    dst = tmp / f"restored-{precision}-{batch}"
                    try:
                        fps, n_faces, secs = pipeline_faces_per_s(archive, dst, device=device, precision=precision,
                                                                  batch=batch, opts=opts, model_dirs=model_dirs)
                    except RuntimeError as e:  # shown in the table and the exit status, never dropped
                        log.error("pipeline row %s/b%d failed: %s", precision, batch, e)
                        row["pipeline_faces_per_s"] = row["pipeline_efficiency"] = "FAILED"
                        row["pipeline_error"] = str(e).strip().splitlines()[-1][:300]
                    else:
                        busy = busy_fractions(dst)
                        row.update(pipeline_faces_per_s=fps, pipeline_faces=n_faces, pipeline_seconds=secs,
                                   pipeline_efficiency=fps / restorer_fps, pipeline_restore_busy=busy["restore"],
                                   pipeline_detect_busy=busy["detect"])
                    shutil.rmtree(dst, ignore_errors=True)
                rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = {
        "device": str(device),
        "card": card,
        "models": models,
        "torch": f"{torch.__version__}, {torch.get_num_threads()} CPU threads, cudnn.allow_tf32="
        f"{torch.backends.cudnn.allow_tf32}",
        "N/tau/omega": f"{opts.N}/{opts.tau}/{omega}",
        "UNet calls per face": steps,
        "GFLOP per UNet call": round(unet_flops / 1e9, 3),
        "GFLOP per enhancer pass": round(enh_flops / 1e9, 3),
        "TFLOP per face": round(face_flops / 1e12, 4),
        "measured peak TFLOP/s": {p: round(v, 3) for p, v in peaks.items()},
        "spec peak TFLOP/s": {p: spec_peak(device, p)[1] for p in opts.precisions},
        "compile": ("; ".join(compile_notes) + " (first batch incl. compile)") if opts.compile else "off",
        "pipeline": "skipped" if opts.skip_pipeline else
        f"`dr2 restore` subprocess on {opts.pipeline_images or (8 if device.type == 'cpu' else 48)} degraded photos "
        "(faces counted from its *.stats.json), wall time incl. Ray start and detection; no compile; "
        + ("one per row" if opts.pipeline_rows == "every" else "the last row only")
        + "; busy = the run report's busy seconds / wall seconds of the stage's actors",
        "baseline": f"batch 1, fp32, explicit attention, PNG per face in the loop, {opts.baseline_faces} faces",
    }
    return {"header": header, "rows": rows, "options": {k: str(v) for k, v in dataclasses.asdict(opts).items()}}


def precision_of(name: str) -> Precision:
    if name not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {name!r}")
    return name  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- the command


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """The options of a command line: the device's defaults (:func:`device_defaults`), then what was given."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    full = args.full or args.precision is not None or args.batch_size is not None
    chosen = device_defaults(torch.device(device).type, full=full)
    if args.precision is not None:
        chosen["precisions"] = tuple(precision_of(p.strip()) for p in args.precision.split(",") if p.strip())
    if args.batch_size is not None:
        chosen["batch_sizes"] = tuple(int(b) for b in args.batch_size.split(",") if b.strip())
    if args.repeats is not None:
        chosen["repeats"] = args.repeats
    if args.pipeline_images is not None:
        chosen["pipeline_images"] = args.pipeline_images
    return BenchOptions(
        device=device,
        compile=args.compile,
        compile_mode=args.compile_mode,
        skip_pipeline=args.skip_pipeline,
        out=args.out,
        N=args.N,
        tau=args.tau,
        verify=args.verify_fixtures,
        **chosen,
    )


def cmd_bench(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.out is not None:
        opts.out.mkdir(parents=True, exist_ok=True)
    if opts.verify:
        fixtures = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dr2_reference"
        results = [r for p in opts.precisions for r in verify_on_device(fixtures, device=opts.device, precision=p)]
        table = format_table(results)
        print(table)
        if opts.out is not None:
            (opts.out / "verify.txt").write_text(table + "\n")
        if not all(r.passed for r in results):
            return 1
    result = run_bench(opts)
    md = markdown(result)
    print(md)
    if opts.out is not None:
        (opts.out / "bench.md").write_text(md)
        (opts.out / "bench.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    failed = [f"{r['precision']}/b{r['batch']}: {r['pipeline_error']}" for r in result["rows"] if "pipeline_error" in r]
    if failed:
        print("pipeline rows FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dr2 bench", description=__doc__.split("\n\n")[0])
    add_bench_arguments(p)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cmd_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
