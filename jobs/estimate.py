"""``dr2 estimate SRC``: what an archive will cost, before it runs.

1. Lists SRC as ``dr2 restore`` does (:func:`pipeline.runner.loop.plan_units`).
2. Samples a few units (seeded) and, in this process and one thread (as a Ray worker runs them), runs the CPU stages on
   up to ``--sample-images`` of their images for real: read, decode, detect (MTCNN), align, the restorer where it
   runs here (passthrough, the tiny models), compose (paste back, quality measures, report thumbnails) and write
   (into a temporary folder). Per-stage seconds come from the rows' own ``timings``, as in ``--record-timings``.
3. The restorer's seconds per face: measured here (tiny, passthrough), stated (simulate: 1 / --simulate-faces-per-s),
   or, for DR2, ``--restorer-faces-per-s`` (what ``dr2 bench`` measured on your GPU) else the FLOP model
   (UNet calls x 387.9 GFLOP + SPARNetHD 1447.1 GFLOP per face) over the named GPU's datasheet peak x ``--mfu``.
4. The capacity model (:mod:`pipeline.graph.capacity`) for the cluster shape given
(``--cpus``/``--gpus``/``--gpu-type``;
   default: this machine, local Ray): each stage's capacity, the bottleneck, throughput, the whole ``dr2 restore``
   command's wall time (start-up included), GPU-hours, and the pools it recommends.

Start-up and per-unit costs are constants measured on this project's 2-core machine (local Ray start, actor start,
pipeline fill; the per-unit commit); they are stated in the output. Images in shards are counted from the sampled
shards' images per byte, times the listed bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import schema as S
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.units import Unit, UnitKind
from pipeline.graph.capacity import (
    ACTOR_CALL_S,
    CPU_EFFICIENCY,
    TASK_CPUS,
    TASK_S,
    ClusterShape,
    StageCosts,
    cpu_seconds_per_image,
    cpus_needed,
    plan_pools,
    predict,
    recommend,
)
from pipeline.runner.loop import plan_units

# --- the FLOP model of full-size DR2 (jobs/bench.py counts them with torch's FlopCounterMode on meta tensors) ---
UNET_GFLOP = 387.9  # one call of the 256x256 FFHQ DDPM UNet, one face
SPARNET_GFLOP = 1447.1  # one SPARNetHD pass at 512, one face
# dense datasheet peaks, TFLOP/s (bf16; the GPU setting), as in jobs/bench.py
GPU_PEAKS = {"H200": 989.4, "H100": 989.4, "H100-PCIE": 756.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
DEFAULT_MFU = 0.35  # the share of the peak full-size DR2 reaches with bf16, SDPA and batch 8 (stated; see dr2 bench)
GPU_DETECT_SPEEDUP = 10.0  # MTCNN on a GPU vs one CPU core of this machine (stated until scripts/gpu_check.sh says)

# --- start-up and per-unit costs, measured on the project's 2-core machine (benchmarks/bench_estimate.py) ---
COMMAND_S = 2.0  # the command itself: Python, imports, the report, shutting Ray down
LOCAL_RAY_START_S = 5.0  # ray.init of a local Ray, to the graph being built
CLUSTER_JOIN_S = 2.0  # ray.init joining a running cluster
ACTOR_START_S = 4.0  # a stage actor's process: Python, torch, its model (the pools start in parallel)
PER_UNIT_S = 0.05  # per unit: its read task, its summaries, its commit task and marker (overlapped with the work)
PLAN_S_PER_UNIT = 0.001  # listing and planning


@dataclass
class Sampled:
    """What the sample showed: per-image stage seconds, faces, and how many images per input byte."""

    images: int = 0
    faces: int = 0
    rows: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(S.STAGES, 0.0))
    input_bytes: int = 0
    units: list[str] = dataclasses.field(default_factory=list)
    restore_measured: bool = False
    wall_s: float = 0.0
    faces_each: list[int] = dataclasses.field(default_factory=list)  # faces per image, in order (pending rows)
    call_faces: list[int] = dataclasses.field(default_factory=list)  # faces per restorer call made in the sample

    def per_image(self, stage: str) -> float:
        return self.seconds[stage] / self.images if self.images else 0.0


def sample_units(units: Sequence[Unit], k: int, seed: int) -> list[Unit]:
    """``k`` units chosen by ``seed`` (the same ones every time), in listing order."""
    if len(units) <= k:
        return list(units)
    picked = sorted(random.Random(seed).sample(range(len(units)), k))
    return [units[i] for i in picked]


def _capped(unit: Unit, cfg: PipelineConfig, max_rows: int) -> Iterator[Any]:
    """The unit's blocks (``read_unit``), stopping after about ``max_rows`` rows."""
    from pipeline.graph.stages import read_unit

    if unit.kind is UnitKind.IMAGES and len(unit.images) > max_rows:
        rng = random.Random(unit.name)
        unit = dataclasses.replace(unit, images=tuple(sorted(rng.sample(list(unit.images), max_rows))))
    rows = 0
    for block in read_unit(unit, cfg):
        yield block
        rows += block.num_rows
        if rows >= max_rows:
            return


def measure_sample(cfg: PipelineConfig, units: Sequence[Unit], max_images: int) -> Sampled:
    """Run the CPU stages on the sampled units, in this process, one thread; see the module docstring."""
    import cv2
    import torch

    from pipeline.graph.models import build_detector, pick_device, restorer_from_config
    from pipeline.graph.stages import detect_block, restore_block, write_block

    torch.set_num_threads(1)  # as a Ray worker with one CPU
    cv2.setNumThreads(1)
    out = Sampled()
    runs_here = cfg.restorer in (RestorerKind.PASSTHROUGH, RestorerKind.TINY)
    # simulate and DR2 are not run here (their time is stated or modelled); faces are passed through to compose
    run_cfg = cfg if runs_here else dataclasses.replace(cfg, restorer=RestorerKind.PASSTHROUGH)
    out.restore_measured = runs_here
    device = pick_device("cpu")
    detector = build_detector(run_cfg, device)
    restorer = restorer_from_config(run_cfg, device)
    with tempfile.TemporaryDirectory(prefix="dr2-estimate-") as tmp:
        wcfg = dataclasses.replace(run_cfg, dst=tmp, report_faces_per_thousand=run_cfg.report_faces_per_thousand or 5)
        from pipeline.graph.models import model_identity

        info = model_identity(wcfg)
        # one untimed pass over a few rows first: imports, kernel selection and first-call costs are paid once per
        # worker in a run, not per image
        for block in _capped(units[0], wcfg, 2):
            with torch.inference_mode():
                for detected in detect_block(block, detector, wcfg):
                    write_block(restore_block(detected, restorer, wcfg), wcfg, info, "0" * 64, units[0].kind)
        t_all = time.perf_counter()
        per_unit = max(1, math.ceil(max_images / max(1, len(units))))
        warmed = False
        for unit in units:
            out.units.append(unit.name)
            unit_rows, unit_bytes = 0, 0
            blocks = _capped(unit, wcfg, per_unit)
            while True:
                t0 = time.perf_counter()
                block = next(blocks, None)
                out.seconds["read"] += time.perf_counter() - t0  # the reader's time, also for a unit cut short
                if block is None:
                    break
                with torch.inference_mode():
                    for detected in detect_block(block, detector, wcfg):
                        if not warmed and cfg.restorer is RestorerKind.TINY:  # the first call builds kernels
                            restore_block(detected, restorer, wcfg)
                            warmed = True
                        crops = detected.column(S.CROPS).to_pylist()
                        out.call_faces.append(sum(len(c or []) for c in crops))
                        out.faces_each.extend(len(c or []) for i, c in enumerate(crops)
                                              if detected.column(S.INDEX)[i].as_py() >= 0)
                        summaries = write_block(restore_block(detected, restorer, wcfg), wcfg, info, "0" * 64,
                                                unit.kind)
                        _add(out, summaries.to_pylist())
                unit_rows += int((block.column(S.INDEX).to_numpy() >= 0).sum())
                unit_bytes += _tar_bytes(block)
            if unit.kind is not UnitKind.IMAGES and unit_rows:  # files (tars, parquet): rows per input byte
                out.input_bytes += unit_bytes
                out.rows += unit_rows
        out.wall_s = time.perf_counter() - t_all
    return out


def _tar_bytes(block: Any) -> int:
    """The bytes a block's samples take in a tar: a 512-byte header per member, data padded to 512."""
    total = 0
    pad = lambda n: 512 + -(-n // 512) * 512  # noqa: E731
    images = block.column(S.IMAGE).to_pylist()
    for i, data in enumerate(block.column(S.MEMBER_DATA).to_pylist()):
        members = [len(d) for d in data or []]
        image = len(images[i] or b"")
        total += sum(pad(n) for n in members if n) + pad(image) if (members or image) else 0
    return total


def _add(out: Sampled, summaries: list[dict[str, Any]]) -> None:
    """Count the images, faces and stage seconds of a written block from its part summaries (the rows' timings,
    summed by ``write_block``); the read time is measured around the reader instead."""
    for part in summaries:
        if part["first"] < 0:
            continue
        out.images += part["last"] - part["first"] + 1
        out.faces += int(part["faces_found"] or 0)
        for k, v in (part["seconds"] or {}).items():
            if k != "read" and v:
                out.seconds[k] += float(v)


def padded(faces: Sequence[int], batch: int) -> int:
    """Faces the networks run for these restorer calls: each call in full batches (short ones padded)."""
    return sum(-(-f // batch) * batch for f in faces if f)


SIM_UNITS = 20  # typical units over which the stages' slicing is simulated


def restore_calls(cfg: PipelineConfig, faces_each: Sequence[int], images_per_unit: float,
                  units: int = SIM_UNITS) -> list[int]:
    """Faces per restorer call over ``units`` typical units, following the stages' slicing: a unit is read in blocks
    of ``rows_per_block`` rows, detected ``detect_batch_size`` images at a time, and a slice goes to the restorer once
    it holds ``faces_block`` faces (the rest of a block goes as one last slice). Face counts repeat the sample's."""
    if not faces_each:
        return []
    calls: list[int] = []
    n_img = max(1, round(images_per_unit))
    k = 0
    for _ in range(units):
        for start in range(0, n_img, cfg.rows_per_block):
            rows = min(cfg.rows_per_block, n_img - start)
            acc = 0
            for b in range(0, rows, cfg.detect_batch_size):
                for _ in range(min(cfg.detect_batch_size, rows - b)):
                    acc += faces_each[k % len(faces_each)]
                    k += 1
                if acc >= cfg.faces_block and b + cfg.detect_batch_size < rows:
                    calls.append(acc)
                    acc = 0
            calls.append(acc)
    return calls


def _ratio(a: float, b: float) -> float:
    return a / b if b else 1.0


def _pad(factor: float) -> str:
    return f"; x{factor:.2f} for batch padding" if factor > 1.005 else ""


def restore_cost(cfg: PipelineConfig, sampled: Sampled, cluster: ClusterShape, *, gpu_type: str, mfu: float,
                 faces_per_s: float | None, slices: Sequence[int]) -> tuple[float, str, bool]:
    """(one restorer actor's seconds per face, where the figure comes from, whether it takes a CPU core).
    ``slices``: faces per restorer call of a typical run (:func:`restore_calls`)."""
    on_cpu = cluster.gpus < 1 and cfg.restorer is not RestorerKind.SIMULATE  # a simulated restorer only sleeps
    # the networks run full batches: what a face costs includes its share of the padding, as the stages slice
    bs = cfg.restore_batch_size
    run_pad = _ratio(padded(slices, bs), sum(slices))
    if faces_per_s:
        return run_pad / faces_per_s, f"given: {faces_per_s:g} faces/s per restorer{_pad(run_pad)}", on_cpu
    if cfg.restorer is RestorerKind.SIMULATE:
        return (run_pad / cfg.simulate_faces_per_s, f"simulated: {cfg.simulate_faces_per_s:g} faces/s per restorer "
                f"(it sleeps, holding its GPU){_pad(run_pad)}", False)
    if sampled.restore_measured:
        sample_pad = _ratio(padded(sampled.call_faces, bs), sum(sampled.call_faces))
        per_face = sampled.seconds["restore"] / sampled.faces / sample_pad * run_pad if sampled.faces else 0.0
        return per_face, f"measured here: {cfg.restorer.value} restorer on one CPU thread{_pad(run_pad)}", on_cpu
    calls = cfg.resolved_omega - cfg.tau + 1
    gflop = calls * UNET_GFLOP + (0.0 if cfg.enhancer == "none" else SPARNET_GFLOP)
    gflop *= run_pad
    if not on_cpu:
        peak = GPU_PEAKS[gpu_type]
        return (gflop / (peak * 1e3 * mfu), f"FLOP model: {calls} UNet calls + enhancer = {gflop / 1e3:.2f} TFLOP "
                f"per face at {mfu:.0%} of the {gpu_type}'s {peak:g} TFLOP/s (bf16)", False)
    import torch

    from jobs.bench import measured_peak_tflops

    peak = measured_peak_tflops(torch.device("cpu"), "fp32")
    return (gflop / (peak * 1e3 * mfu), f"FLOP model: {gflop / 1e3:.2f} TFLOP per face at {mfu:.0%} of this CPU's "
            f"measured {peak:.2f} TFLOP/s (fp32)", True)


def estimate(cfg: PipelineConfig, *, cluster: ClusterShape | None = None, gpu_type: str = "H100",
             mfu: float = DEFAULT_MFU, restorer_faces_per_s: float | None = None, sample_units_n: int = 3,
             sample_images: int = 48, seed: int = 0, sampled: Sampled | None = None) -> dict[str, Any]:
    """The estimate of ``dr2 restore cfg.src cfg.dst`` on ``cluster`` (default: this machine, a local Ray).
    ``sampled``: a measurement to reuse (``estimate(...)["measured"]`` of an earlier call on the same SRC)."""
    if gpu_type not in GPU_PEAKS:
        raise ValueError(f"--gpu-type: unknown GPU {gpu_type!r}; choose from {', '.join(GPU_PEAKS)}, or give "
                         "--restorer-faces-per-s (from `dr2 bench` on your GPU)")
    local = cluster is None
    shape = cluster or ClusterShape(cpus=float(os.cpu_count() or 1), gpus=0.0)
    t0 = time.perf_counter()
    with _scratch_dst(cfg) as cfg:
        units = plan_units(cfg)
    list_s = time.perf_counter() - t0
    if not units:
        raise FileNotFoundError(f"nothing to restore in {cfg.src!r}")
    if sampled is None:
        sampled = measure_sample(cfg, sample_units(units, sample_units_n, seed), sample_images)
    if not sampled.images:
        raise ValueError(f"the sampled units ({', '.join(sampled.units)}) hold no images: nothing to estimate from")
    if units[0].kind is UnitKind.IMAGES:
        images = float(sum(len(u.images) for u in units))
    else:
        per_byte = sampled.rows / sampled.input_bytes if sampled.input_bytes else 0.0
        images = sum(u.size_hint[0] or 0 for u in units) * per_byte
    fpi = sampled.faces / sampled.images
    per_unit = max(1, round(images / len(units)))
    slices = restore_calls(cfg, sampled.faces_each, per_unit, units=SIM_UNITS)  # one restorer call and write each
    per_face, restore_source, restore_on_cpu = restore_cost(cfg, sampled, shape, gpu_type=gpu_type, mfu=mfu,
                                                            faces_per_s=restorer_faces_per_s, slices=slices)
    calls = [c for c in slices if c]
    call_overhead = ACTOR_CALL_S * len(calls) / sum(calls) if calls else 0.0
    blocks_per_image = math.ceil(per_unit / cfg.rows_per_block) / per_unit  # read tasks and detector calls
    slices_per_image = len(slices) / (SIM_UNITS * per_unit) if slices else blocks_per_image
    block_overhead = (TASK_S + ACTOR_CALL_S) * (blocks_per_image + slices_per_image)
    pools = plan_pools(cfg, shape)
    detect_s = sampled.per_image("detect")
    if pools.detect.gpus > 0:
        detect_s /= GPU_DETECT_SPEEDUP
    costs = StageCosts(read_s=sampled.per_image("read"), decode_s=sampled.per_image("decode"), detect_s=detect_s,
                       align_s=sampled.per_image("align"), compose_s=sampled.per_image("compose"),
                       write_s=sampled.per_image("write"), faces_per_image=fpi, restore_s_per_face=per_face,
                       restore_on_cpu=restore_on_cpu, restore_overhead_s_per_face=call_overhead,
                       block_overhead_s=block_overhead, detect_call_s=ACTOR_CALL_S * blocks_per_image)
    pred = predict(costs, pools, shape)
    n_units = len(units)
    startup = COMMAND_S + (LOCAL_RAY_START_S if local else CLUSTER_JOIN_S) + ACTOR_START_S
    # a pipeline: the first block crosses every stage (its latency), the rest follow at the bottleneck's rate
    block = min(images, cfg.rows_per_block, max(1.0, cfg.faces_block / fpi if fpi else cfg.rows_per_block))
    fill = block * (costs.detect_actor_s + per_face * fpi + costs.task_s)
    cpu_work = (images - block) * cpu_seconds_per_image(costs, detect_on_gpu=pools.detect.gpus > 0) \
        + n_units * PER_UNIT_S
    steady = max((images - block) / pred.images_per_s if pred.images_per_s else 0.0,
                 cpu_work / (shape.cpus * CPU_EFFICIENCY) if shape.cpus else float("inf"))
    plan = max(list_s, PLAN_S_PER_UNIT * n_units)
    wall = plan + startup + fill + steady
    faces = images * fpi
    need = cpus_needed(cfg, costs, shape.gpus, target=0.9)
    return {
        "src": cfg.src,
        "restorer": cfg.restorer.value,
        "units": n_units,
        "images": round(images),
        "faces": round(faces),
        "faces_per_image": round(fpi, 3),
        "sampled": {"units": sampled.units, "images": sampled.images, "faces": sampled.faces,
                    "seconds": round(sampled.wall_s, 2), "images_counted": "listed" if units[0].kind is UnitKind.IMAGES
                    else f"from the sample's images per byte ({sampled.rows} images in {sampled.input_bytes} bytes)"},
        "stage_ms_per_image": {k: round(1e3 * sampled.per_image(k), 2) for k in S.STAGES if k != "restore"},
        "restore": {"seconds_per_face": round(per_face, 6), "source": restore_source, "on_cpu": restore_on_cpu,
                    "call_overhead_s_per_face": round(call_overhead, 6)},
        "ray_overhead_ms_per_image": round(1e3 * block_overhead, 2),
        "cluster": {**shape.to_dict(), "gpu_type": gpu_type if shape.gpus else None,
                    "ray": "local (started by the run)" if local else "a running cluster"},
        **pred.to_dict(),
        "faces_per_s": round(pred.images_per_s * fpi, 3),
        "predicted_wall_s": round(wall, 1),
        "wall_breakdown_s": {"plan": round(plan, 2), "startup": round(startup, 2), "fill": round(fill, 2),
                             "steady": round(steady, 2)},
        "gpu_hours": round(wall * shape.gpus / 3600, 6),
        "gpu_hours_restoring": round(faces * per_face / 3600, 6) if shape.gpus else 0.0,
        "cpus_for_restore_busy_0_9": None if math.isinf(need) else math.ceil(need * 10 - 1e-6) / 10,  # enough
        "pools": pools.to_dict(),
        "recommended": recommend(cfg, costs, shape),
        "measured": sampled,  # dropped by to_json
        "assumptions": {"command_s": COMMAND_S, "cpu_efficiency": CPU_EFFICIENCY,
                        "local_ray_start_s": LOCAL_RAY_START_S,
                        "cluster_join_s": CLUSTER_JOIN_S, "actor_start_s": ACTOR_START_S, "per_unit_s": PER_UNIT_S,
                        "gpu_detect_speedup": GPU_DETECT_SPEEDUP, "actor_call_s": ACTOR_CALL_S, "task_s": TASK_S,
                        "task_cpus": TASK_CPUS,
                        "mfu": mfu if cfg.restorer is RestorerKind.DR2 and not restorer_faces_per_s else None},
    }


@contextlib.contextmanager
def _scratch_dst(cfg: PipelineConfig) -> Iterator[PipelineConfig]:
    """Planning needs a DST (it refuses one inside SRC); without one, a temporary folder stands in."""
    if cfg.dst:
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix="dr2-estimate-dst-") as tmp:
        yield dataclasses.replace(cfg, dst=tmp)


def format_estimate(e: dict[str, Any]) -> str:
    """The estimate as a person reads it."""
    cl = e["cluster"]
    shape = f"{cl['cpus']:g} CPUs" + (f", {cl['gpus']:g} x {cl['gpu_type']}" if cl["gpus"] else ", no GPU")
    cap = e["capacity_images_per_s"]
    rec = e["recommended"]
    lines = [
        f"dr2 estimate: {e['src']}  (restorer {e['restorer']}; cluster: {shape}, {cl['ray']})",
        f"{'units':<26}{e['units']}",
        f"{'images':<26}{e['images']:,}  ({e['sampled']['images_counted']})",
        f"{'faces':<26}{e['faces']:,}  ({e['faces_per_image']:.2f} per image in the sample of "
        f"{e['sampled']['images']} images from {len(e['sampled']['units'])} unit(s))",
        "CPU ms per image         " + ", ".join(f"{k} {v:.1f}" for k, v in e["stage_ms_per_image"].items()),
        f"{'restorer':<26}{e['restore']['seconds_per_face'] * 1e3:.1f} ms per face ({e['restore']['source']})",
        "capacity (images/s)      " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in cap.items()),
        f"{'bottleneck':<26}{e['bottleneck']}",
        f"{'throughput':<26}{e['images_per_s']:.2f} images/s, {e['faces_per_s']:.2f} faces/s",
        f"{'predicted busy':<26}restore {e['busy']['restore']:.0%}, detect {e['busy']['detect']:.0%}",
        f"{'predicted wall time':<26}{_hms(e['predicted_wall_s'])} (" + ", ".join(
            f"{k} {v:.1f} s" for k, v in e["wall_breakdown_s"].items()) + ")",
    ]
    if cl["gpus"]:
        lines.append(f"{'GPU-hours':<26}{e['gpu_hours']:.3f} paid, {e['gpu_hours_restoring']:.3f} restoring")
    if e["cpus_for_restore_busy_0_9"] is not None:
        lines.append(f"{'CPUs for restorers at 90%':<34}{e['cpus_for_restore_busy_0_9']:g}")
    lines.append(f"{'recommended pools':<26}detect {_pool(rec['detect'])}, restore {_pool(rec['restore'])}, "
                 f"{rec['write_tasks']} write task(s) at once")
    lines.append(f"{'':<26}dr2 restore ... {rec['flags']}")
    if e["restorer"] == "simulate":
        lines.append("(simulate: a capacity tool; its outputs are faces passed through unchanged, not restorations)")
    return "\n".join(lines)


def _pool(p: dict[str, Any]) -> str:
    each = f"{p['gpus']:g} GPU" if p["gpus"] else f"{p['cpus']:g} CPU"
    return f"{p['max_actors']} x {each}"


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d} ({seconds:,.0f} s)" if h else f"{m}:{s:02d} ({seconds:,.1f} s)"


def to_json(e: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in e.items() if k != "measured"}, sort_keys=True)
