"""The only module that talks to Ray: starts or joins Ray, and wires the stages into one Ray Data dataset.

Ray's argument names (``map_batches``' ``compute``/``concurrency``, ``ActorPoolStrategy``, remote args)
move between minor releases; this file is written against ray 2.60 (pinned in pyproject.toml), and no
other module sets Ray resources.

The graph, for a list of work units (shards or image chunks):

    from_items(units) -> flat_map(read_source)                      CPU tasks, one unit each, streaming rows
      -> repartition(target_num_rows_per_block=detect_batch_size)   small blocks, so the stages overlap
      -> map_batches(DetectStage,  actor pool, cpus/gpus per actor)  decode, detect, align
      -> map_batches(RestoreStage, actor pool, cpus/gpus per actor)  DR2 + enhancer across images
      -> map_batches(compose_and_write_batch, CPU tasks)            paste back, encode, write staged parts
      -> summary rows (no image bytes), consumed by the driver as they stream

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
from pipeline.stages import DetectStage, RestoreStage, WorkUnit, compose_and_write_batch, read_source

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
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting a local Ray with %d CPUs", os.cpu_count() or 1)
        ray.init(num_cpus=os.cpu_count(), object_store_memory=cfg.object_store_memory, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.execution_options.preserve_order = False


def build_dataset(units: Sequence[WorkUnit], cfg: PipelineConfig, model_info: dict[str, Any],
                  *, images_mode: bool) -> ray.data.Dataset:
    """The restoration graph over ``units``; iterate it to run it."""
    # Ray 2.60 has no named parameter for retry/restart limits: they go through ``**ray_remote_args``,
    # which 2.60 marks deprecated (to be replaced before 2.64). Revisit here when the pin moves.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        return _build(units, cfg, model_info, images_mode=images_mode)


def _build(units: Sequence[WorkUnit], cfg: PipelineConfig, model_info: dict[str, Any],
           *, images_mode: bool) -> ray.data.Dataset:
    ds: ray.data.Dataset = ray.data.from_items([u.to_item() for u in units], override_num_blocks=max(1, len(units)))
    ds = ds.flat_map(read_source, num_cpus=0.25, max_retries=MAX_RETRIES)
    # A read task's rows would otherwise leave it as ONE block (Ray packs a task's output up to
    # DataContext.target_max_block_size, 128 MiB), and every later stage hands a block on only when its
    # task is done: a whole shard would pass each stage in one piece and the stages would barely overlap.
    # Blocks of one detector batch let detection, restoration and writing run side by side.
    ds = ds.repartition(target_num_rows_per_block=max(1, cfg.detect_batch_size))
    actor_args: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_RETRIES}
    ds = ds.map_batches(
        DetectStage,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.detect_batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.detect_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_detector or None,
        **actor_args,
    )
    ds = ds.map_batches(
        RestoreStage,
        fn_constructor_kwargs={"cfg": cfg},
        # a batch of images; its faces are restored restore_batch_size at a time
        batch_size=max(1, cfg.restore_batch_size),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.restore_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_restorer or None,
        **actor_args,
    )
    ds = ds.map_batches(
        compose_and_write_batch,  # type: ignore[arg-type]  # extra arguments come through fn_kwargs
        fn_kwargs={"cfg": cfg, "model_info": model_info, "images_mode": images_mode},
        batch_size=cfg.detect_batch_size,
        batch_format="pyarrow",
        num_cpus=0.25,
        max_retries=MAX_RETRIES,
    )
    return ds


def stream_summaries(ds: ray.data.Dataset) -> Iterator[dict[str, Any]]:
    """Run the graph, yielding each row's summary as it completes."""
    yield from ds.iter_rows()


def remote_call(fn: Any, *args: Any, **kwargs: Any) -> ray.ObjectRef:
    """Run ``fn`` as a small Ray task (shard commits), next to the data rather than on the driver."""
    return ray.remote(num_cpus=0.25, max_retries=MAX_RETRIES)(fn).remote(*args, **kwargs)


def wait(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    return list(ray.get(list(refs)))
