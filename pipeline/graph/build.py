"""The only module that talks to Ray: starts or joins Ray, and wires the stages into one Ray Data dataset.

Ray's argument names (``map_batches``' ``compute``/``concurrency``, ``ActorPoolStrategy``, remote args)
move between minor releases; this file is written against ray 2.60 (pinned in pyproject.toml), and no
other module sets Ray resources.

The graph, for a list of units (shards or image chunks), every arrow a block of rows (an Arrow table):

    from_items(groups) -> map_batches(read_units_batch, CPU tasks)  a unit, or a group of small ones, each
      -> repartition(rows_per_block)               blocks of <= rows_per_block rows (see _build)
      -> map_batches(DetectStage,  actor pool)      decode, detect, align; re-blocks to <= faces_block faces
      -> map_batches(RestoreStage, actor pool)      DR2 + enhancer, one call per DR2 setting of a block
      -> map_batches(write_block_batch, CPU tasks)  decode again, paste back, encode, ONE staged part per block
      -> summary rows (one per part, no image bytes), consumed by the driver as they stream

The Python API's :func:`restore_dataset_graph` (``pipeline.api.restore_dataset``) runs the same part from the
repartition on (:func:`_face_stages`: one place for pools, batching and failure bounds), between a user's dataset and
the user's own write:

    user's dataset -> map_batches(rows_from_batch, CPU tasks)   record rows, the user's columns riding along
      -> repartition -> DetectStage -> RestoreStage             as above
      -> map_batches(finish_batch, CPU tasks)                   paste back, encode, dr2.json; the user's columns back

Memory: :func:`cluster_memory` splits the run's per-node budget (``pipeline/graph/memory.py``) into a local Ray's object
store, the write tasks running at once and the decoded pixels per block, which the stages read from the config.

Pools: :func:`pipeline.graph.capacity.plan_pools` sizes them from the cluster (:func:`cluster_pools`); explicit options
win.

``batch_size=None`` after the read: a stage takes the blocks the previous one made, whole. Where a stage asks for GPUs
Ray requires a row count, and bundles blocks up to it before it calls: ``rows_per_block`` for the detectors (read
blocks), ``faces_block`` for the restorers (the slices detection makes). Caveat (ray 2.60): Ray Data merges what one
task or call yields into one output block (up to its target block size), so the reader's blocks are cut again by the
repartition, and detection's ``faces_block`` slices may reach a CPU restorer merged: the restorer pads each call to
its batch size either way.

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

import contextlib
import dataclasses
import logging
import os
import signal
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline import schema as S
from pipeline.config import PipelineConfig
from pipeline.formats.units import Unit, read_groups
from pipeline.graph import memory
from pipeline.graph.capacity import TASK_CPUS, ClusterShape, Pools, StagePool, plan_pools
from pipeline.graph.flight import FlightLog as _FlightLog
from pipeline.graph.stages import DetectStage, RestoreStage, read_units_batch, write_block_batch
from pipeline.procs import process_tree
from pipeline.runner import stopping

log = logging.getLogger(__name__)

MAX_RESTARTS = 2
MAX_RETRIES = 2
# Ray Data's autoscaler (ray 2.60) kills an idle actor of a pool as soon as the pool's utilisation falls to half
# (tasks submitted per slot), and starts a new one once blocks queue again: for a stage actor that is a model load
# each time (torch's import and MTCNN: seconds of CPU on the cores the other stages use). A detector pool of one to
# two on a simulated GPU node started 4 actors over a 384-photo run and the restorer ran 0.74-0.83 busy (steady,
# three runs); never shrinking, 0.77-0.87; a fixed pool of two, 0.88-0.89. A utilisation never at or below this
# threshold keeps what the pool grew to until its input ends.
NEVER_SHRINK = -1.0


def _stop_local_ray() -> None:
    """The CLI's teardown of the local Ray this process started, as it ends, stopped or not
    (pipeline/runner/stopping.py's end_process and hard exit, which ``os._exit`` right after it), in place of Ray's
    shutdown at exit.

    Without touching Ray from this process: its core worker ends the process with status 1 as soon as it finds its
    raylet's object store gone ("The connection to the plasma store is failed. Terminate the process", its log), so
    stopping the raylet first (Ray's own order) turned a 143 into a 1 here every time. Instead, every process
    below the raylet and the other processes ``ray.init`` started (workers, the dashboard and runtime-env agents) is
    killed (SIGKILL: a worker stuck on a GPU would not heed SIGTERM), and those started by this process (raylet,
    GCS, log monitor) die with it: Ray starts them with the kernel's fate sharing (``prctl(PR_SET_PDEATHSIG)``).
    Where there is no fate sharing, they are killed too, the raylet last. Left to the fate sharing alone, the agents
    outlived the run (seen here: reparented to init, alive a minute later). A cluster's processes are not this
    process's to stop (a head sees the driver go); without ``/proc`` (not Linux) Ray's shutdown does it."""
    from ray._private import worker as ray_worker

    node = ray_worker._global_node
    if node is None or not node.head:
        return
    me = os.getpid()
    tree = process_tree(me)
    if tree is None:
        ray.shutdown()
        return
    own = [pid for pid, parent in tree if parent == me]
    order = [pid for pid, parent in reversed(tree) if parent != me]  # the deepest first
    if not node.kernel_fate_share:
        raylets = {i.process.pid for i in node.all_processes.get("raylet", []) if i.process is not None}
        order += sorted(own, key=lambda p: p in raylets)  # the raylet last
    for pid in order:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def init_ray(cfg: PipelineConfig) -> None:
    """Join the cluster at ``cfg.address`` / ``RAY_ADDRESS``, else start a local Ray with this machine's cores."""
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # S3 settings reach workers through the standard chain: a local Ray's workers inherit this process's
    # environment (AWS_ENDPOINT_URL, credentials); cluster nodes use their own (instance roles, env, files).
    # Ray's own lines stay in Ray's log files unless asked for (--ray-logs): the driver prints one progress line of
    # its own (pipeline/runner/progress.py), its warnings and a failed run's one-line error; workers' row-level warnings
    # and Ray's bars are not the job's output. Ray's log levels do not reach all of its lines (Ray 2.60), so they go to
    # one file (pipeline/runner/console.py), moved into this Ray session's log folder once it exists: what the driver's
    # core worker writes to descriptor 2 (C++ log lines, the constructor-argument line of ray-project/ray#53727), Ray's
    # Python loggers (the token-auth notice of ray.init, Ray Data's traceback of a failed run), and the raylet's
    # messages (a worker died, a task is retried) that worker.listen_error_messages prints to stdout regardless of
    # log_to_driver. Token auth itself is left as Ray sets it up.
    diverted = None
    if not cfg.ray_logs:
        from ray._private import worker as ray_worker

        from pipeline.runner import console

        diverted = console.divert_stderr()
        console.log_to(diverted.stream, "ray", "ray.data")
        stream = diverted.stream
        ray_worker.print_to_stdstream = lambda data, ignore_prefix: ray_worker.print_worker_logs(
            data, stream, ignore_prefix)
    # a start that hangs (no Ray at that address: Ray retries for minutes) says where Ray's own messages are
    hint = None
    if diverted is not None:
        import threading

        path = diverted.path
        hint = threading.Timer(60.0, lambda: log.warning(
            "Ray has not %s after 60 s; its own messages are in %s (--ray-logs prints them here)",
            f"connected to {address}" if address else "started", path))
        hint.daemon = True
        hint.start()
    try:
        if address:
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=cfg.ray_logs, logging_level=logging.INFO)
        else:
            store = memory.object_store_bytes(cfg, memory.machine_memory())  # a share of the run's memory budget
            log.info("starting a local Ray with %d CPUs and a %d MiB object store", os.cpu_count() or 1,
                     store // memory.MiB)
            # glibc's malloc settings (memory.MALLOC_ENV) reach the workers only through their environment: the local
            # Ray's raylet, which starts them, is started by ray.init from this process and inherits os.environ, so
            # they are set here, before ray.init (this process's own malloc read its settings at start and stays as
            # it is). A cluster's nodes are started by their own `ray start`: deploy/ sets the same there.
            for name, value in memory.MALLOC_ENV.items():
                os.environ.setdefault(name, value)
            # The workers do this job's work: at the driver's priority, not Ray's default nice 15 (worker_niceness),
            # under which anything else on the machine comes first. Under two busy loops pinning both cores, a
            # 6-shard tiny-restorer run committed 0 of 6 units in 300 s at nice 15 and finished in 85 s at nice 0
            # (40 s idle). The same way in, and a value already in the environment wins.
            os.environ.setdefault("RAY_worker_niceness", "0")
            # address="local": a new local Ray, never a stale one named by /tmp/ray/ray_current_cluster. Its
            # processes start deaf to SIGTERM (the CLI's stop is the driver's to carry out: stopping.py)
            with stopping.children_shielded():
                ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=store,
                         include_dashboard=False, log_to_driver=cfg.ray_logs, logging_level=logging.INFO)
    finally:
        if hint is not None:
            hint.cancel()
    # ray.init put its own SIGTERM handlers in this process (a native one that prints a stack and aborts): the stop
    # handlers of the CLI go back in their place (pipeline/runner/stopping.py)
    stopping.reinstall()
    stopping.add_teardown(_stop_local_ray)
    if diverted is not None:
        node = ray_worker._global_node  # None for a Ray Client driver: the file stays in the temp folder
        where = console.move_diverted(node.get_logs_dir_path()) if node is not None else diverted.path
        log.debug("Ray's own console output goes to %s (--ray-logs prints it here)", where)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray_logs
    ctx.execution_options.preserve_order = False


class StageDiedError(RuntimeError):
    """A stage's actor died (a crash, an OOM kill) more often than Ray restarts it; says on which block."""


# The run's flight log: an actor on the driver's node (build_dataset). Its class lives in pipeline/graph/flight.py,
# which imports nothing but the standard library: its worker starts without importing Ray Data, torch or the stages
# (its process: 0.56 CPU-s to a cheap run's first commit here, 0.96 when it imported this module; the run's processes
# all start at once on the same cores).
FlightLog = ray.remote(num_cpus=0)(_FlightLog)


def block_label(table: Any) -> str:
    """``shard-001.tar rows 0-255`` for a block (``, `` between units; end rows are not rows)."""
    spans: dict[str, list[int]] = {}
    for unit, index in zip(table.column(S.UNIT).to_pylist(), table.column(S.INDEX).to_pylist(), strict=True):
        if index >= 0:
            span = spans.setdefault(unit, [index, index])
            span[0], span[1] = min(span[0], index), max(span[1], index)
    return ", ".join(f"{u} rows {a}-{b}" for u, (a, b) in spans.items()) or "an end-of-unit block"


def _actor_id() -> str:
    return str(ray.get_runtime_context().get_actor_id())


class DetectActor(DetectStage):
    """:class:`DetectStage` that reports each block, and the time it spent on it, to the run's :class:`FlightLog`
    (none for ``pipeline.api.restore_dataset``: nothing there reads it)."""

    def __init__(self, cfg: PipelineConfig, flight: Any) -> None:
        super().__init__(cfg)
        self.flight, self.actor = flight, _actor_id()
        if flight is not None:
            flight.ready.remote("detect", self.actor)

    def __call__(self, batch: Any) -> Iterator[Any]:
        if self.flight is None:
            yield from super().__call__(batch)
            return
        label = block_label(batch)
        ray.get(self.flight.start.remote("detect", label, self.actor))  # before the work: it may kill this process
        busy, t = 0.0, time.perf_counter()
        for out in super().__call__(batch):  # busy: the work between yields, not Ray's handling of each output
            busy += time.perf_counter() - t
            yield out
            t = time.perf_counter()
        busy += time.perf_counter() - t
        self.flight.finish.remote("detect", label, self.actor, busy)


class RestoreActor(RestoreStage):
    """:class:`RestoreStage` that reports each block, and the time it spent on it, to the run's :class:`FlightLog`
    (none for ``pipeline.api.restore_dataset``)."""

    def __init__(self, cfg: PipelineConfig, flight: Any) -> None:
        super().__init__(cfg)
        self.flight, self.actor = flight, _actor_id()
        if flight is not None:
            flight.ready.remote("restore", self.actor)

    def __call__(self, batch: Any) -> Any:
        if self.flight is None:
            return super().__call__(batch)
        label = block_label(batch)
        ray.get(self.flight.start.remote("restore", label, self.actor))
        t = time.perf_counter()
        out = super().__call__(batch)
        self.flight.finish.remote("restore", label, self.actor, time.perf_counter() - t)
        return out


@dataclass
class Graph:
    """A built run: the dataset to iterate, the flight log of its stage actors, its pools and its memory plan."""

    ds: ray.data.Dataset
    flight: Any
    pools: Pools
    memory_plan: memory.MemoryPlan | None = None
    busy: dict[str, dict[str, Any]] = field(default_factory=dict)  # the latest busy snapshot (FlightLog.busy)
    _asked: Any = None

    def poll_busy(self) -> dict[str, dict[str, Any]]:
        """The latest busy snapshot, without waiting: the flight log is asked again once its last answer is in."""
        if self._asked is not None and is_ready(self._asked):
            with contextlib.suppress(Exception):  # the log is gone (the run is ending): keep the last snapshot
                self.busy = ray.get(self._asked)
            self._asked = None
        if self._asked is None:
            self._asked = self.flight.busy.remote()
        return self.busy


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
        pools = cluster_pools(cfg)
        plan = cluster_memory(cfg, pools)
        log.info("%s", plan.describe())
        # Ray Data merges blocks up to this size (memory.STORE_BLOCKS_SHARE): the run's own context, set before the
        # dataset is made (the Python API's restore_dataset leaves the user's context as the user set it)
        ctx = ray.data.DataContext.get_current()
        ctx.target_max_block_size = plan.ray_block_bytes
        # an autoscaling pool grows while blocks queue for it and never shrinks before its input ends (NEVER_SHRINK)
        ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config,
                                                     actor_pool_util_downscaling_threshold=NEVER_SHRINK)
        # the stages read the block budget from the config: resolved here, once, for every stage of the run
        cfg = dataclasses.replace(cfg, block_megapixels=plan.block_megapixels)
        return Graph(_build(units, cfg, model_info, config_hash, flight, pools, plan), flight, pools, plan)


def _build(units: Sequence[Unit], cfg: PipelineConfig, model_info: dict[str, Any], config_hash: str,
           flight: Any, pools: Pools, plan: memory.MemoryPlan) -> ray.data.Dataset:
    kinds = {u.kind for u in units}
    if len(kinds) != 1:
        raise ValueError(f"one job runs units of one kind, got {sorted(k.value for k in kinds)}")
    # Small units share a read task (and blocks): per-task and per-block costs are paid per group, not per unit. A
    # group holds at most an eighth of a block's bytes, so that its rows come soon and groups are read in parallel.
    groups = read_groups(units, max_rows=cfg.rows_per_block, max_bytes=cfg.block_mb * 2**20 // 8)
    ds: ray.data.Dataset = ray.data.from_items([{"units": [u.to_item() for u in g]} for g in groups],
                                               override_num_blocks=max(1, len(groups)))
    ds = ds.map_batches(
        read_units_batch,  # type: ignore[arg-type]  # cfg comes through fn_kwargs
        fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="pyarrow", num_cpus=TASK_CPUS, max_retries=MAX_RETRIES)
    return _face_stages(ds, cfg, flight, pools, plan, write_block_batch,
                        {"cfg": cfg, "model_info": model_info, "config_hash": config_hash,
                         "kind": next(iter(kinds)).value})


def _face_stages(ds: ray.data.Dataset, cfg: PipelineConfig, flight: Any, pools: Pools, plan: memory.MemoryPlan,
                 finish: Any, finish_kwargs: dict[str, Any]) -> ray.data.Dataset:
    """The part of the graph that ``dr2 restore`` and :func:`restore_dataset` share, from blocks of record rows
    (:data:`pipeline.schema.ROW_SCHEMA`, extra columns ride along) on: re-block, detect, restore, then ``finish``
    (compose, then write the run's parts, or give the dataset its columns back) as a CPU task. Pools, batching and
    failure bounds are set here only; ``plan`` (:func:`cluster_memory`) bounds the write tasks at once."""
    # Ray Data merges what one task yields into blocks of up to DataContext.target_max_block_size (128 MiB): a read
    # task's output (a group, or one shard of thousands of rows) would travel as ONE block. Cut back to rows_per_block.
    ds = _repartition_in_the_task(ds, cfg.rows_per_block)
    # a call waits out its actor's restarts (see the module docstring); max_restarts bounds them
    actor_args: dict[str, Any] = {"max_restarts": MAX_RESTARTS, "max_task_retries": -1}
    log.info("pools: %s", pools.describe())
    ds = ds.map_batches(
        DetectActor,
        fn_constructor_kwargs={"cfg": cfg, "flight": flight},
        # Ray insists on a row count when GPUs are requested: blocks hold at most rows_per_block rows, so this only
        # lets Ray merge small blocks into one call
        batch_size=cfg.rows_per_block if pools.detect.gpus else None,
        batch_format="pyarrow",
        compute=_actor_pool(pools.detect),
        num_cpus=pools.detect.cpus,
        num_gpus=pools.detect.gpus or None,
        **actor_args,
    )
    ds = ds.map_batches(
        RestoreActor,
        fn_constructor_kwargs={"cfg": cfg, "flight": flight},
        # Ray insists on a row count here too, and waits until a call's rows are in (it bundles blocks up to
        # batch_size rows): faces_block rows, the most faces detection puts in a block, not rows_per_block. With
        # rows_per_block (256) a GPU restorer waited for 256 faces before its first call and then took them in one:
        # restore busy 0.70 steady on a simulated GPU at 16 faces/s (benchmarks/bench_capacity.py, 384 photos),
        # 0.97 with this (4 runs of 5; 0.88 in the other).
        batch_size=cfg.faces_block if pools.restore.gpus else None,
        batch_format="pyarrow",
        compute=_actor_pool(pools.restore, in_flight=max(1, cfg.restore_prefetch)),
        num_cpus=pools.restore.cpus,
        num_gpus=pools.restore.gpus or None,
        **actor_args,
    )
    ds = ds.map_batches(
        finish,
        fn_kwargs=finish_kwargs,
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=TASK_CPUS,
        # each write task holds a decoded photo while it pastes and encodes: the memory plan bounds how many run
        concurrency=plan.write_tasks,
        max_retries=MAX_RETRIES,
    )
    return ds


def _repartition_in_the_task(ds: ray.data.Dataset, rows: int) -> ray.data.Dataset:
    """``ds.repartition(target_num_rows_per_block=rows)`` run inside the task before it (Ray Data fuses a
    ``map_batches`` and a streaming repartition whose remote arguments agree), not as a task of its own.

    Why: ray 2.60 gives the repartition's own tasks Ray's default of one CPU, and ``Dataset.repartition`` takes no
    remote arguments. On a 2-CPU node whose stage actors hold 0.5 CPU each, a read task (0.25 CPU) held back by
    back-pressure on its outputs left 0.75 CPU free, the repartition task waiting for its 1 CPU could never start,
    and the reader it would have drained never finished: a 200-photo archive of 48 MP photos stood still with both
    cores idle (Ray Data's log: the repartition "backpressured:tasks(ResourceBudget)", the read task holding 220 MiB
    of output). At TASK_CPUS the repartition fuses into the task before it, so no stage waits for a CPU that the
    stage it waits on holds, and each block is cut where it is made instead of travelling once more.

    The argument goes on the logical operator (its ``ray_remote_args``, which the planner hands to the physical
    one); ``tests/jobs/test_memory_budget.py`` checks that the plan fuses, so an upgrade of Ray that changes this fails
    there."""
    from ray.data._internal.logical.operators.map_operator import StreamingRepartition

    ds = ds.repartition(target_num_rows_per_block=rows)
    op = ds._logical_plan.dag
    if not isinstance(op, StreamingRepartition):  # pragma: no cover - a Ray whose repartition plans otherwise
        raise RuntimeError(f"ray {ray.__version__}: repartition planned as {type(op).__name__}")
    op.ray_remote_args.update(num_cpus=TASK_CPUS, max_retries=MAX_RETRIES)
    return ds


def restore_dataset_graph(ds: ray.data.Dataset, cfg: PipelineConfig, model_info: dict[str, Any], *,
                          image_column: str, key_column: str | None, output_column: str,
                          metadata_column: str) -> ray.data.Dataset:
    """A user's dataset through the same stages as ``dr2 restore``: its batches become record rows (its own columns
    riding along), :func:`_face_stages` detects and restores, and the last task composes and gives the rows back with
    the restored image and the metadata added (:mod:`pipeline.graph.dataset`). Lazy, like any Ray Data transform; the
    public face is :func:`pipeline.api.restore_dataset`."""
    from pipeline.graph.dataset import finish_batch, rows_from_batch

    if not ray.is_initialized():  # what Ray Data does on a dataset's first use; the pools need the cluster's shape
        # the cluster at --address / RAY_ADDRESS, else a new local Ray (never a stale one: see init_ray)
        ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS") or "local")
    with warnings.catch_warnings():  # as in build_dataset: the retry/restart limits go through **ray_remote_args
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated", category=DeprecationWarning)
        pools = cluster_pools(cfg)
        plan = cluster_memory(cfg, pools)
        cfg = dataclasses.replace(cfg, block_megapixels=plan.block_megapixels)  # as build_dataset resolves it
        ds = ds.map_batches(
            rows_from_batch,  # type: ignore[arg-type]  # arguments come through fn_kwargs
            fn_kwargs={"image_column": image_column, "key_column": key_column},
            batch_size=cfg.rows_per_block, batch_format="pyarrow", num_cpus=TASK_CPUS, max_retries=MAX_RETRIES)
        return _face_stages(ds, cfg, None, pools, plan, finish_batch,
                            {"cfg": cfg, "model_info": model_info, "image_column": image_column,
                             "output_column": output_column, "metadata_column": metadata_column})


def cluster_pools(cfg: PipelineConfig) -> Pools:
    """The pools of a run on the Ray cluster this process is connected to (the rule: :func:`plan_pools`)."""
    res = ray.cluster_resources()
    return plan_pools(cfg, ClusterShape(cpus=float(res.get("CPU", 0.0)), gpus=float(res.get("GPU", 0.0))))


def cluster_memory(cfg: PipelineConfig, pools: Pools) -> memory.MemoryPlan:
    """The memory plan of a run on the Ray cluster this process is connected to (:func:`memory.plan_memory`). The
    node of a local Ray (no ``--address``, no ``RAY_ADDRESS``: :func:`init_ray` started it) is this machine; on a
    cluster it is the smallest alive node, its memory what Ray may use there (its ``memory`` and
    ``object_store_memory`` resources)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    sizes = [int(n["Resources"].get("memory", 0) + n["Resources"].get("object_store_memory", 0)) for n in nodes]
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
    node_bytes = memory.machine_memory() if local or not sizes else min(sizes)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    return memory.plan_memory(cfg, node_bytes=node_bytes, cpus=cpus, detect_actors=pools.detect.max_actors,
                              nodes=max(1, len(nodes)), actor_cores=pools.actor_cores())


def _actor_pool(pool: StagePool, *, in_flight: int | None = None) -> ray.data.ActorPoolStrategy:
    """A fixed pool, or one that Ray Data scales between min and max actors as input queues up."""
    if pool.fixed:
        return ray.data.ActorPoolStrategy(size=pool.min_actors, max_tasks_in_flight_per_actor=in_flight)
    return ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors,
                                      max_tasks_in_flight_per_actor=in_flight)


def stream_summaries(graph: Graph) -> Iterator[dict[str, Any]]:
    """Run the graph, yielding each part's summary (a few per block) as it completes. An actor that died more often
    than Ray restarts it ends the run with :class:`StageDiedError`, naming the block it died on.

    A stopped run (Ctrl-C, SIGTERM: :func:`pipeline.runner.stopping.requested`) leaves Ray as it is: the process is
    about to exit, which ends its actors and tasks (a local Ray's processes with it, a cluster's job with its driver),
    and the commits under way come first. Any other end cleans up for the next run in this process
    (:func:`shutdown`)."""
    ds = graph.ds
    before = _stage_actors()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table: Any = batch  # a pyarrow.Table for batch_format="pyarrow"
            yield from table.to_pylist()
        _final_busy(graph)
    except BaseException as e:
        if stopping.requested() is not None:
            raise
        shutdown(ds, _stage_actors() - before)  # the pools of THIS run: made after it started, by this driver
        died = _died_on(graph.flight, e)
        if died is not None:
            raise StageDiedError(died) from e
        raise
    finally:
        if stopping.requested() is None:
            shutdown(ds)
            ray.kill(graph.flight)


def _final_busy(graph: Graph) -> None:
    """Stop the actors' wall clocks at the end of the stream and keep the run's busy figures."""
    try:
        graph.flight.end.remote()
        graph.busy = ray.get(graph.flight.busy.remote(), timeout=30)
    except Exception as e:  # noqa: BLE001 - the figures are a help; the run's outputs stand without them
        log.warning("could not read the stage actors' busy time: %s", e)


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


def shutdown(ds: ray.data.Dataset, actors: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Stop the dataset's executor and kill its actors (``actors``: this run's stage actors, by id), however the
    stream ended. On an error (or an early stop) Ray 2.60 only drops its references to the pool's actors and lets
    reference counting reap them, which a traceback can delay indefinitely: the actors keep their CPUs/GPUs and the
    next run in this process (a nightly wave, a retry) waits for resources forever. Ray keeps the executor on the
    dataset (``_current_executor``, ray 2.60) once the first output arrived; force-shutting it is what Ray's own
    blocking APIs do. A run that fails before its first output has no executor there: the actors are killed by id.

    The actors are killed FIRST: a forced shutdown cancels each running task and then waits for it with a
    ``ray.get`` without a timeout (ray 2.60, ``PhysicalOperator._cancel_active_tasks``), and an actor's task cannot
    be force-cancelled (Ray falls back to a polite cancel that a busy actor never sees). A stage actor that never
    answers again (a hung GPU, a failpoint's ``hang``) kept that ``ray.get``, and the driver, waiting forever: what
    made a stopped run hang (issue 19). Once its actor is dead, the task's ``ray.get`` returns at once."""
    _kill(actors)
    executor = getattr(ds, "_current_executor", None)
    if executor is not None:
        executor.shutdown(force=True)
        ds._current_executor = None


_REMOTE: dict[Any, Any] = {}


def remote_call(fn: Any, *args: Any, **kwargs: Any) -> ray.ObjectRef:
    """Run ``fn`` as a small Ray task (shard commits), next to the data rather than on the driver. The remote
    function is made once per ``fn``: making it anew per call costs the driver milliseconds (pickling, export)."""
    remote = _REMOTE.get(fn)
    if remote is None:
        remote = _REMOTE[fn] = ray.remote(num_cpus=TASK_CPUS, max_retries=MAX_RETRIES)(fn)
    return remote.remote(*args, **kwargs)


def is_ready(ref: ray.ObjectRef) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def wait(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    return list(ray.get(list(refs)))
