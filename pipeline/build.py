"""The only module that talks to Ray: starts or joins Ray, and wires the stages into one Ray Data dataset.

Ray's argument names (``map_batches``' ``compute``/``concurrency``, ``ActorPoolStrategy``, remote args)
move between minor releases; this file is written against ray 2.60 (pinned in pyproject.toml), and no
other module sets Ray resources.

The graph, for a list of units (shards or image chunks), every arrow a block of rows (an Arrow table):

    from_items(units) -> map_batches(read_units_batch, CPU tasks)  a unit each; blocks of <= rows_per_block rows
      -> map_batches(DetectStage,  actor pool)      decode, detect, align; re-blocks to <= faces_block faces
      -> map_batches(RestoreStage, actor pool)      DR2 + enhancer, all faces of a block in one call
      -> map_batches(write_block_batch, CPU tasks)  paste back, encode, ONE staged part per block
      -> summary rows (one per part, no image bytes), consumed by the driver as they stream

``batch_size=None`` everywhere after the read: a stage takes the blocks the previous one made, whole, so the
block sizes chosen by the reader (rows, bytes) and by detection (faces) are the sizes every stage sees.

Failure bounds: Ray's defaults retry tasks and restart actors without limit, so a batch that always kills
its actor would loop forever (NOTES.md). Here actors restart at most ``MAX_RESTARTS`` times, and the read and
write tasks are retried at most ``MAX_RETRIES`` times; past that the job stops (an actor's death with one
line naming the stage and the block, :class:`StageDiedError`). A call on a stage actor is retried for as long
as its actor restarts (``max_task_retries=-1``, bounded by ``max_restarts``): a node that leaves the cluster
makes its actors unreachable for the ~15 s the GCS takes to declare it dead, and a bounded retry count is
spent in that window before the actor is restarted elsewhere. Per-image failures never reach Ray: the stages
turn them into row statuses.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import schema as S
from pipeline.config import PipelineConfig
from pipeline.stages import DetectStage, RestoreStage, read_units_batch, write_block_batch
from pipeline.units import Unit

log = logging.getLogger(__name__)

MAX_RESTARTS = 2
MAX_RETRIES = 2


def init_ray(cfg: PipelineConfig) -> None:
    """Join the cluster at ``cfg.address`` / ``RAY_ADDRESS``, else start a local Ray with this machine's cores."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # S3 settings reach workers through the standard chain: a local Ray's workers inherit this process's
    # environment (AWS_ENDPOINT_URL, credentials); cluster nodes use their own (instance roles, env, files).
    # Ray's own progress bars and worker logs stay in Ray's log files unless asked for: the driver prints one
    # progress line of its own (pipeline/progress.py), and workers' row-level warnings are not the job's output.
    if not cfg.ray_logs:
        logging.getLogger("ray").setLevel(logging.ERROR)
        # Ray Data logs a failed run's traceback before raising it to the driver, which says it in one line
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")  # the driver's core worker writes to stderr
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=cfg.ray_logs, logging_level=logging.INFO if cfg.ray_logs
                 else logging.WARNING)
    else:
        log.info("starting a local Ray with %d CPUs", os.cpu_count() or 1)
        # address="local": a new local Ray, never a stale one named by /tmp/ray/ray_current_cluster
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=cfg.object_store_memory,
                 include_dashboard=False, log_to_driver=cfg.ray_logs,
                 logging_level=logging.INFO if cfg.ray_logs else logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray_logs
    ctx.execution_options.preserve_order = False


class StageDiedError(RuntimeError):
    """A stage's actor died (a crash, an OOM kill) more often than Ray restarts it; says on which block."""


@ray.remote(num_cpus=0)
class FlightLog:
    """Which blocks the stage actors started and finished, so that a run whose actor keeps dying can name the block
    it died on: actors run one block at a time, so a block started and never finished was on a dead actor, and the
    one started most often is the one that kills it."""

    def __init__(self) -> None:
        self.started: Counter[tuple[str, str]] = Counter()
        self.finished: set[tuple[str, str]] = set()

    def start(self, stage: str, block: str) -> None:
        self.started[(stage, block)] += 1

    def finish(self, stage: str, block: str) -> None:
        self.finished.add((stage, block))

    def unfinished(self) -> list[tuple[str, str, int]]:
        """(stage, block, times started) of the blocks never finished, most started first."""
        left = [(s, b, n) for (s, b), n in self.started.items() if (s, b) not in self.finished]
        return sorted(left, key=lambda x: -x[2])


def block_label(table: Any) -> str:
    """``shard-001.tar rows 0-255`` for a block (``, `` between units; end rows are not rows)."""
    spans: dict[str, list[int]] = {}
    for unit, index in zip(table.column(S.UNIT).to_pylist(), table.column(S.INDEX).to_pylist(), strict=True):
        if index >= 0:
            span = spans.setdefault(unit, [index, index])
            span[0], span[1] = min(span[0], index), max(span[1], index)
    return ", ".join(f"{u} rows {a}-{b}" for u, (a, b) in spans.items()) or "an end-of-unit block"


class DetectActor(DetectStage):
    """:class:`DetectStage` that reports each block to the run's :class:`FlightLog`."""

    def __init__(self, cfg: PipelineConfig, flight: Any) -> None:
        super().__init__(cfg)
        self.flight = flight

    def __call__(self, batch: Any) -> Iterator[Any]:
        label = block_label(batch)
        ray.get(self.flight.start.remote("detect", label))  # before the work: it may kill this process
        yield from super().__call__(batch)
        self.flight.finish.remote("detect", label)


class RestoreActor(RestoreStage):
    """:class:`RestoreStage` that reports each block to the run's :class:`FlightLog`."""

    def __init__(self, cfg: PipelineConfig, flight: Any) -> None:
        super().__init__(cfg)
        self.flight = flight

    def __call__(self, batch: Any) -> Any:
        label = block_label(batch)
        ray.get(self.flight.start.remote("restore", label))
        out = super().__call__(batch)
        self.flight.finish.remote("restore", label)
        return out


@dataclass
class Graph:
    """A built run: the dataset to iterate and the flight log of its stage actors."""

    ds: ray.data.Dataset
    flight: Any


def build_dataset(units: Sequence[Unit], cfg: PipelineConfig, model_info: dict[str, Any],
                  config_hash: str) -> Graph:
    """The restoration graph over ``units`` (all of one kind); run it with :func:`stream_summaries`."""
    # On the driver's node, which lives as long as the run: a log on a worker node that leaves would take the
    # restarted actors down with it (their first call is to the log).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    flight = FlightLog.options(scheduling_strategy=here).remote()  # type: ignore[attr-defined]
    # Ray 2.60 has no named parameter for retry/restart limits: they go through ``**ray_remote_args``,
    # which 2.60 marks deprecated (to be replaced before 2.64). Revisit here when the pin moves.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return Graph(_build(units, cfg, model_info, config_hash, flight), flight)


def _build(units: Sequence[Unit], cfg: PipelineConfig, model_info: dict[str, Any], config_hash: str,
           flight: Any) -> ray.data.Dataset:
    kinds = {u.kind for u in units}
    if len(kinds) != 1:
        raise ValueError(f"one job runs units of one kind, got {sorted(k.value for k in kinds)}")
    ds: ray.data.Dataset = ray.data.from_items([u.to_item() for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        read_units_batch,  # type: ignore[arg-type]  # cfg comes through fn_kwargs
        fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow", num_cpus=0.25, max_retries=MAX_RETRIES)
    # a call waits out its actor's restarts (see the module docstring); max_restarts bounds them
    actor_args: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": -1}
    ds = ds.map_batches(
        DetectActor,
        fn_constructor_kwargs={"cfg": cfg, "flight": flight},
        batch_size=None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.detect_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_detector or None,
        **actor_args,
    )
    actors, gpus = restore_pool(cfg, float(ray.cluster_resources().get("GPU", 0.0)))
    log.info("restorer pool: %d actor(s), %s GPU each", actors, gpus or 0)
    ds = ds.map_batches(
        RestoreActor,
        fn_constructor_kwargs={"cfg": cfg, "flight": flight},
        # Ray insists on a row count when GPUs are requested: blocks hold at most rows_per_block rows, so this only
        # lets Ray merge small blocks of face rows into one call (the restorer batches faces itself).
        batch_size=cfg.rows_per_block if gpus else None,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=max(1, cfg.restore_prefetch)),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=gpus or None,
        **actor_args,
    )
    ds = ds.map_batches(
        write_block_batch,  # type: ignore[arg-type]  # extra arguments come through fn_kwargs
        fn_kwargs={"cfg": cfg, "model_info": model_info, "config_hash": config_hash, "kind": next(iter(kinds)).value},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=0.25,
        max_retries=MAX_RETRIES,
    )
    return ds


def restore_pool(cfg: PipelineConfig, cluster_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor) of the restorer pool: what the config says, else one actor per whole GPU the
    cluster has (fractional ``gpus_per_restorer`` packs several per GPU), else one CPU actor."""
    gpus = cfg.gpus_per_restorer if cfg.gpus_per_restorer is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if cfg.restore_actors is not None:
        return cfg.restore_actors, gpus
    if gpus > 0 and cluster_gpus > 0:
        return max(1, int(cluster_gpus // gpus)), gpus
    return 1, gpus


def stream_summaries(graph: Graph) -> Iterator[dict[str, Any]]:
    """Run the graph, yielding each part's summary (a few per block) as it completes. An actor that died more often
    than Ray restarts it ends the run with :class:`StageDiedError`, naming the block it died on."""
    ds = graph.ds
    before = _stage_actors()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table: Any = batch  # a pyarrow.Table for batch_format="pyarrow"
            yield from table.to_pylist()
    except BaseException as e:
        shutdown(ds)
        _kill(_stage_actors() - before)  # the pools of THIS run: made after it started, by this driver
        died = _died_on(graph.flight, e)
        if died is not None:
            raise StageDiedError(died) from e
        raise
    finally:
        shutdown(ds)
        ray.kill(graph.flight)


def _died_on(flight: Any, e: BaseException) -> str | None:
    """What to say when ``e`` is a stage actor's death: the stage and the block its actor died on."""
    text = f"{type(e).__name__} {e}"
    if not any(name in text for name in ("ActorDiedError", "RayActorError", "ActorUnavailableError")):
        return None
    try:
        unfinished = ray.get(flight.unfinished.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the log is only a help to say more; the error itself stands
        return None
    if not unfinished:
        return None
    stage, block, times = unfinished[0]
    if "ActorUnavailableError" in text and "ActorDiedError" not in text and "RayActorError" not in text:
        return (f"the {stage} stage's actor stopped answering on the block of {block} and was not restarted in "
                "time (its node left the cluster or its process hangs)")
    deaths = sum(n for s, _, n in unfinished if s == stage)
    return (f"the {stage} stage's actor died {deaths} time(s), {times} of them on the block of {block} (a crash or "
            f"an out-of-memory kill in that process; Ray restarts it {MAX_RESTARTS} times)")


_STAGE_CLASSES = (DetectActor.__name__, RestoreActor.__name__)


def _stage_actors() -> set[str]:
    """Ids of this driver's live stage actors. Ray 2.60's internal state table is used because the public state API
    needs the dashboard, which a local run does not start."""
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return {aid for aid, a in state.actors().items()
            if a.get("State") == "ALIVE" and a.get("JobID") == job
            and any(name in str(a.get("ActorClassName", "")) for name in _STAGE_CLASSES)}


def _kill(actor_ids: set[str]) -> None:
    """Kill actors by id (what ``ray.kill`` does for a handle; the failed pool's handles are out of reach)."""
    core = ray._private.worker.global_worker.core_worker  # type: ignore[attr-defined]
    for aid in actor_ids:
        try:
            core.kill_actor(ray.ActorID.from_hex(aid), True)
        except Exception as e:  # noqa: BLE001 - already gone
            log.debug("actor %s: %s", aid, e)


def shutdown(ds: ray.data.Dataset) -> None:
    """Stop the dataset's executor and kill its actors, however the stream ended. On an error (or an early stop)
    Ray 2.60 only drops its references to the pool's actors and lets reference counting reap them, which a
    traceback can delay indefinitely: the actors keep their CPUs/GPUs and the next run in this process (a nightly
    wave, a retry) waits for resources forever. Ray keeps the executor on the dataset (``_current_executor``,
    ray 2.60) once the first output arrived; force-shutting it is what Ray's own blocking APIs do. A run that fails
    before its first output has no executor there: :func:`stream_summaries` then kills the actors it started."""
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        executor.shutdown(force=True)
        ds._current_executor = None


def remote_call(fn: Any, *args: Any, **kwargs: Any) -> ray.ObjectRef:
    """Run ``fn`` as a small Ray task (shard commits), next to the data rather than on the driver."""
    return ray.remote(num_cpus=0.25, max_retries=MAX_RETRIES)(fn).remote(*args, **kwargs)


def is_ready(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def wait(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    return list(ray.get(list(refs)))
