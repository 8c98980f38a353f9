"""Capacity: how big each stage's pool is on a given cluster, and how fast a run goes there.

Two pure pieces (no Ray, no torch), so that ``pipeline/graph/build.py`` (which applies the pools), ``dr2 estimate``
(which predicts a run) and the tests share one rule and one model:

1. **The pool rule** (:func:`plan_pools`), from the cluster's CPUs and GPUs; an explicit option always wins.

   * Restorers: one actor per GPU (``gpus_per_restorer`` < 1 packs several on one GPU); on a CPU-only cluster one
     actor (a CPU restorer is a test or a check, not production).
   * Detectors, when the cluster has GPUs: on the GPUs too, ``GPU_DETECTOR_SHARE`` of a GPU each, an autoscaling
     pool of one to ``DETECTORS_PER_GPU`` per GPU; the restorer then takes what is left of its GPU (0.8). Why a
     fraction and not detection fused into the restorer actor: the detector actor also decodes and aligns (CPU
     work, ~30 ms per photo), and in the restorer's process that time would leave the GPU idle; two actors on one
     GPU overlap it, and the detector's MTCNN (a few GFLOP per photo) costs the restorer's GPU little.
   * Detectors on the CPUs (a CPU-only cluster, or ``--gpus-per-detector 0``): an autoscaling pool of one to
     ``DETECT_CPU_SHARE`` of the cores the restorers leave (half a core counts as one). Detection is most of a
     photo's CPU work (``benchmarks/bench_photo.py``, one thread: 320 of 412 ms for a 2 MP one-face photo; reads,
     compose and writes, the rest, run as Ray tasks). The pool's top is a ceiling, not a reservation: Ray Data adds a
     detector only while blocks queue for one. A restorer that computes nothing (passthrough, simulate) leaves its
     core to them: on two cores a passthrough run may detect on both.
   * Reads and writes are Ray tasks of ``TASK_CPUS`` each: Ray runs as many at once as the free CPUs allow, so they
     follow the cluster without a pool size.

2. **The capacity model** (:func:`predict`): per-image stage costs (measured: ``dr2 estimate`` runs the CPU
   stages on sampled units) and the restorer's seconds per face give each stage's capacity in images/s; the
   smallest is the bottleneck, the run's throughput. The restorers' busy fraction is throughput / restore
   capacity, and :func:`cpus_needed` is the CPU count at which the CPU side keeps up with the GPUs (the model
   searched, so that the two never disagree).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import RestorerKind

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

GPU_DETECTOR_SHARE = 0.1  # GPU per detector actor when detection runs on the restorers' GPUs
DETECTORS_PER_GPU = 2  # at most this many detector actors per GPU (their decode/align is CPU work)
GPU_RESTORER_WITH_DETECTORS = round(1.0 - DETECTORS_PER_GPU * GPU_DETECTOR_SHARE, 3)  # 0.8: the rest of its GPU
DETECT_CPU_SHARE = 0.75  # of the cores the restorers leave, what CPU detectors may take at most (see plan_pools)
TASK_CPUS = 0.25  # CPUs reserved per read/write/commit task
TASK_S = 0.03  # a Ray task's own cost (scheduling, a worker's call, the block in and out; 2-core machine)
ACTOR_CALL_S = 0.02  # a stage actor's time per call outside its work (Ray's call, the block in and out; 2-core machine)


@dataclass(frozen=True)
class ClusterShape:
    """What a run has: CPUs and GPUs over all nodes (``ray.cluster_resources()``), and how many nodes hold GPUs."""

    cpus: float
    gpus: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class StagePool:
    """An actor pool: between ``min_actors`` and ``max_actors`` actors (equal: a fixed pool), each reserving
    ``cpus`` and ``gpus``; ``work_cores``: the cores one actor keeps busy where that is not what :attr:`cores` says
    (0 for a restorer that computes nothing: passthrough, simulate)."""

    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    work_cores: float | None = None

    @property
    def fixed(self) -> bool:
        return self.min_actors == self.max_actors

    @property
    def cores(self) -> float:
        """Cores the pool keeps busy at most: an actor working on the CPU takes a whole core whatever it reserves
        (``--cpus-per-actor`` is a fraction so that reads and writes keep running); one feeding a GPU, what it
        reserves; ``work_cores`` where it is given."""
        each = self.work_cores if self.work_cores is not None else self.cpus if self.gpus else max(1.0, self.cpus)
        return self.max_actors * each

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Pools:
    detect: StagePool
    restore: StagePool

    def to_dict(self) -> dict[str, Any]:
        return {"detect": self.detect.to_dict(), "restore": self.restore.to_dict()}

    def actor_cores(self) -> float:
        """Cores the stage actors keep busy at most (:attr:`StagePool.cores`); the write tasks get the rest."""
        return self.detect.cores + self.restore.cores

    def describe(self) -> str:
        def one(name: str, p: StagePool) -> str:
            n = str(p.min_actors) if p.fixed else f"{p.min_actors}-{p.max_actors}"
            where = f"{p.gpus:g} GPU" if p.gpus else f"{p.cpus:g} CPU"
            return f"{name} {n} actor(s) x {where}"

        return f"{one('detect', self.detect)}, {one('restore', self.restore)}"


def _per_gpu(gpus_each: float) -> float:
    """Actors one GPU holds (fractions pack; an actor of 2 GPUs counts as half an actor per GPU)."""
    return math.floor(1.0 / gpus_each + 1e-9) if gpus_each <= 1.0 else 1.0 / math.ceil(gpus_each)


def plan_pools(cfg: PipelineConfig, cluster: ClusterShape) -> Pools:
    """The pools of a run on ``cluster`` under ``cfg`` (explicit options win; see the module docstring)."""
    has_gpus = cluster.gpus >= 1.0
    gpus_d = cfg.gpus_per_detector if cfg.gpus_per_detector is not None else (GPU_DETECTOR_SHARE if has_gpus else 0.0)
    if cfg.gpus_per_restorer is not None:
        gpus_r = cfg.gpus_per_restorer
    elif has_gpus:
        gpus_r = GPU_RESTORER_WITH_DETECTORS if gpus_d > 0 else 1.0
    else:
        gpus_r = 0.0
    if cfg.restore_actors is not None:
        restorers = cfg.restore_actors
    elif gpus_r > 0 and cluster.gpus > 0:
        restorers = max(1, int(math.floor(cluster.gpus + 1e-9) * _per_gpu(gpus_r)))
    else:
        restorers = 1
    # a restorer that hands faces back (or sleeps) keeps no core busy, whatever Ray reserves for it
    idle = cfg.restorer in (RestorerKind.PASSTHROUGH, RestorerKind.SIMULATE)
    restore = StagePool(restorers, restorers, cfg.cpus_per_actor, gpus_r, work_cores=0.0 if idle else None)
    if cfg.detect_actors is not None:
        lo = hi = cfg.detect_actors
    elif gpus_d > 0 and cluster.gpus > 0:
        whole = max(1, int(math.floor(cluster.gpus + 1e-9)))
        lo, hi = whole, whole * DETECTORS_PER_GPU
    else:  # of the cores the restorers leave (StagePool.cores: a CPU restorer works a core; one on a GPU, its share)
        lo, hi = 1, max(1, _round_half_up(DETECT_CPU_SHARE * (cluster.cpus - restore.cores)))
    return Pools(detect=StagePool(lo, max(lo, hi), cfg.cpus_per_actor, gpus_d), restore=restore)


def plan_write_tasks(cpus: float, actor_cores: float) -> int:
    """Write tasks at once: one per core that the stage actors leave (:meth:`Pools.actor_cores`; half a core counts as
    one), at least one.

    Compose (decode again, paste back, encode) is CPU work and each task holds a decoded photo. A task beyond the
    free cores adds no throughput: it takes CPU from the detectors, which feed every later stage, and holds one more
    photo. Measured on this 2-core machine (12 photos of 48 MP, passthrough, one detector): two write tasks 37.2 s
    and 3.07 GiB at peak, one write task 33.3 s and 2.83 GiB (``benchmarks/bench_large_photos.py``)."""
    return max(1, _round_half_up(cpus - actor_cores))


def _round_half_up(x: float) -> int:
    """The pools' counts: half a core left over counts as one (an actor or task beyond it shares a core; one fewer
    would leave half a core idle). Both the detectors and the write tasks round so, which keeps the two in step."""
    return math.floor(x + 0.5 + 1e-9)


# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class StageCosts:
    """What one image costs, in seconds of one core (or, for ``restore_s_per_face``, of one restorer actor).

    ``detect_s`` is the detector's own time (MTCNN) on the device it runs on; ``decode_s``/``align_s`` are CPU time
    inside the detector actor; ``read_s``/``compose_s``/``write_s`` CPU time in Ray tasks. ``faces_per_image`` is
    the faces that reach the restorer per image.
    """

    read_s: float
    decode_s: float
    detect_s: float
    align_s: float
    compose_s: float
    write_s: float
    faces_per_image: float
    restore_s_per_face: float
    restore_on_cpu: bool = False  # a CPU restorer's time also takes a core
    # per face, the restorer actor's time outside its work: Ray's call and the block's hand-over (ACTOR_CALL_S
    # shared by the faces of one call); it limits the restorers' rate but is not busy time
    restore_overhead_s_per_face: float = 0.0
    # per image, Ray's per-block costs on the CPUs: read and write tasks (TASK_S each) and detector and restorer calls
    # (ACTOR_CALL_S each), shared by a block's images; and of them, the detector calls' share (detector actor time)
    block_overhead_s: float = 0.0
    detect_call_s: float = 0.0

    @property
    def detect_actor_s(self) -> float:
        """Seconds a detector actor spends per image (decode, detect, align run there one after another)."""
        return self.decode_s + self.detect_s + self.align_s + self.detect_call_s

    @property
    def task_s(self) -> float:
        """CPU seconds per image in read and write tasks."""
        return self.read_s + self.compose_s + self.write_s

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """Capacities (images/s) per stage, the bottleneck, and what follows from it."""

    capacity: dict[str, float]  # detect, restore, write, cpu (all the CPU work of a photo on the cluster's cores)
    bottleneck: str
    images_per_s: float
    restore_busy: float  # the restorers' predicted busy fraction, steady state
    detect_busy: float

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_images_per_s": {k: _round(v) for k, v in self.capacity.items()},
                "bottleneck": self.bottleneck, "images_per_s": _round(self.images_per_s),
                "busy": {"restore": round(self.restore_busy, 3), "detect": round(self.detect_busy, 3)}}


def _round(v: float) -> float | None:
    return None if math.isinf(v) else round(v, 3)


CPU_EFFICIENCY = 0.85  # of a cluster's cores, what the stages get (Ray's own processes, scheduling, serialisation)


def cpu_seconds_per_image(costs: StageCosts, *, detect_on_gpu: bool) -> float:
    """All the CPU time one image costs, over every stage (what the cluster's cores must supply)."""
    cpu = costs.task_s + costs.decode_s + costs.align_s + (0.0 if detect_on_gpu else costs.detect_s)
    cpu += costs.block_overhead_s
    if costs.restore_on_cpu:
        cpu += costs.restore_s_per_face * costs.faces_per_image
    return cpu


def predict(costs: StageCosts, pools: Pools, cluster: ClusterShape) -> Prediction:
    """Steady-state throughput of a run: each stage's capacity in images/s, the smallest one wins.

    * detect: the pool's largest size, each actor one image per ``detect_actor_s``;
    * restore: the restorers' actors, each a face per ``restore_s_per_face``;
    * write: the write tasks at once (:func:`plan_write_tasks`), each an image per ``compose_s + write_s``;
    * cpu: the cluster's cores (times :data:`CPU_EFFICIENCY`) over all the CPU time of an image, since on a real
      node the stages share the cores.
    """
    detect_on_gpu = pools.detect.gpus > 0
    inf = float("inf")
    detect = pools.detect.max_actors / costs.detect_actor_s if costs.detect_actor_s > 0 else inf
    work = costs.restore_s_per_face * costs.faces_per_image
    per_image_restore = work + costs.restore_overhead_s_per_face * costs.faces_per_image
    restore = pools.restore.max_actors / per_image_restore if per_image_restore > 0 else inf
    cpu_s = cpu_seconds_per_image(costs, detect_on_gpu=detect_on_gpu)
    cpu = cluster.cpus * CPU_EFFICIENCY / cpu_s if cpu_s > 0 else inf
    compose_s = costs.compose_s + costs.write_s
    write = plan_write_tasks(cluster.cpus, pools.actor_cores()) / compose_s if compose_s > 0 else inf
    capacity = {"detect": detect, "restore": restore, "write": write, "cpu": cpu}
    bottleneck = min(capacity, key=lambda k: capacity[k])
    rate = capacity[bottleneck]
    finite = rate != inf
    return Prediction(capacity=capacity, bottleneck=bottleneck, images_per_s=rate,
                      restore_busy=min(1.0, rate * work / pools.restore.max_actors) if finite else 0.0,
                      detect_busy=min(1.0, rate / detect) if detect != inf and finite else 0.0)


def cpus_needed(cfg: PipelineConfig, costs: StageCosts, gpus: float, *, target: float = 0.9) -> float:
    """The fewest CPUs (within 0.01) at which the restorers run at ``target`` of their capacity (Ray's per-call time
    included, so that 1.0 is reachable), on a cluster of ``gpus`` GPUs whose pools the rule gives
    (:func:`plan_pools`: detectors sized by the CPUs grow with them, a fixed pool does not, and the write tasks get
    the cores the actors leave); inf where no CPU count gets there (a fixed detector pool too small) or the
    restorers cost nothing.

    :func:`predict` itself, searched (its throughput only grows with the CPUs): the CPU count it names always makes
    the model call the restorers the bottleneck, whichever CPU stage limits first. (A closed form over the CPU time
    alone said 8 CPUs where 64 fixed detectors left the write tasks one core: a test under load found the write
    stage the bottleneck at 1.3 times the CPUs it named.)"""
    inf = float("inf")

    def enough(cpus: float) -> bool:
        shape = ClusterShape(cpus=cpus, gpus=gpus)
        pred = predict(costs, plan_pools(cfg, shape), shape)
        return pred.images_per_s >= target * pred.capacity["restore"] * (1 - 1e-9)

    if predict(costs, plan_pools(cfg, ClusterShape(1.0, gpus)), ClusterShape(1.0, gpus)).capacity["restore"] == inf:
        return inf
    lo, hi = 0.0, 1.0
    while not enough(hi):
        lo, hi = hi, 2 * hi
        if hi > 2**24:  # no cluster: a limit that CPUs do not lift
            return inf
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def recommend(cfg: PipelineConfig, costs: StageCosts, cluster: ClusterShape) -> dict[str, Any]:
    """The pools to run with on ``cluster``: the rule's restorers, and the detectors that keep up with them (as many
    as the restorers' rate needs, within the cores the cluster has), with the ``dr2 restore`` options that set them."""
    pools = plan_pools(cfg, cluster)
    per_image_restore = costs.restore_s_per_face * costs.faces_per_image
    detectors = pools.detect.max_actors
    if cfg.detect_actors is None and per_image_restore > 0 and costs.detect_actor_s > 0:
        want = math.ceil(pools.restore.max_actors / per_image_restore * costs.detect_actor_s)
        cores = max(1, int(cluster.cpus * CPU_EFFICIENCY))
        detectors = max(1, min(want, cores))
    d, r = pools.detect, pools.restore
    chosen = Pools(detect=StagePool(detectors, detectors, d.cpus, d.gpus), restore=r)
    out = chosen.to_dict()
    out["write_tasks"] = plan_write_tasks(cluster.cpus, chosen.actor_cores())  # what the run derives from them
    out["flags"] = (f"--detect-actors {detectors} --gpus-per-detector {d.gpus:g} --restore-actors {r.max_actors} "
                    f"--gpus-per-restorer {r.gpus:g}")
    return out
