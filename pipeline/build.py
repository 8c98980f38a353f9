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
its actor would loop forever (NOTES.md). Here actors restart at most ``MAX_RESTARTS`` times and a batch
is retried at most ``MAX_RETRIES`` times; past that the job stops with Ray's error. Per-image failures
never reach Ray: the stages turn them into row statuses.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import ray
import ray.data

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
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
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


def build_dataset(units: Sequence[Unit], cfg: PipelineConfig, model_info: dict[str, Any],
                  config_hash: str) -> ray.data.Dataset:
    """The restoration graph over ``units`` (all of one kind); iterate it to run it."""
    # Ray 2.60 has no named parameter for retry/restart limits: they go through ``**ray_remote_args``,
    # which 2.60 marks deprecated (to be replaced before 2.64). Revisit here when the pin moves.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return _build(units, cfg, model_info, config_hash)


def _build(units: Sequence[Unit], cfg: PipelineConfig, model_info: dict[str, Any],
           config_hash: str) -> ray.data.Dataset:
    kinds = {u.kind for u in units}
    if len(kinds) != 1:
        raise ValueError(f"one job runs units of one kind, got {sorted(k.value for k in kinds)}")
    ds: ray.data.Dataset = ray.data.from_items([u.to_item() for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        read_units_batch,  # type: ignore[arg-type]  # cfg comes through fn_kwargs
        fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow", num_cpus=0.25, max_retries=MAX_RETRIES)
    actor_args: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_RETRIES}
    ds = ds.map_batches(
        DetectStage,
        fn_constructor_kwargs={"cfg": cfg},
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
        RestoreStage,
        fn_constructor_kwargs={"cfg": cfg},
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


def stream_summaries(ds: ray.data.Dataset) -> Iterator[dict[str, Any]]:
    """Run the graph, yielding each part's summary (a few per block) as it completes."""
    before = _stage_actors()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table: Any = batch  # a pyarrow.Table for batch_format="pyarrow"
            yield from table.to_pylist()
    except BaseException:
        shutdown(ds)
        _kill(_stage_actors() - before)  # the pools of THIS run: made after it started, by this driver
        raise
    finally:
        shutdown(ds)


_STAGE_CLASSES = (DetectStage.__name__, RestoreStage.__name__)


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
