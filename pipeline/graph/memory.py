"""The run's memory budget: what a run may take on one node for decoded pixels and blocks in flight, and how it is
split between the Ray object store, the block size in decoded pixels and the write tasks running at once.

Why a budget and not block bytes: archives hold compressed images. A 48 MP camera JPEG is 5-20 MB on disk and
144 MB of RGB once decoded, so blocks bounded by input bytes (``--block-mb``) say nothing about what a stage holds.
What a run holds, per node:

* the object store: blocks in flight between stages. They carry compressed bytes, face crops (768 KiB each) and
  records, never decoded photos (detection keeps only its faces' crops and affines; the paste-back decodes the
  image bytes again): a local Ray's store gets ``OBJECT_STORE_SHARE`` of the budget (``--object-store-memory``
  wins), and Ray Data holds back the stages feeding it when it fills;
* the decoding workers: every detector actor and every write task holds the photos it is working on, decoded, at
  about ``PEAK_BYTES_PER_PIXEL`` bytes per pixel at its peak (measured on a 48 MP JPEG: decode and MTCNN about 6,
  decode, paste-back and encode about 9; a 16-bit PNG or TIFF takes about twice that). Each holds at most one
  block's worth of decoded pixels at once: detection decodes ``detect_batch_size`` images at a time within the
  block's pixel budget, the paste-back one image at a time.

:func:`plan_memory` gives every decoding slot (the detector pool's largest size plus the write tasks, which it
limits to one per core the stage actors leave: :func:`pipeline.graph.capacity.plan_write_tasks`) its own baseline
(``WORKER_BASELINE_BYTES``: the interpreter, torch, the model) and an equal share of what the object store and the
baselines leave, and sizes blocks so that a block's decoded pixels fit that share:
``block_pixels = (budget - store - slots * WORKER_BASELINE_BYTES) / slots / PEAK_BYTES_PER_PIXEL``. A photo larger
than that travels alone in its block (its worker goes over its share for that photo); one over ``--max-pixels`` is
never decoded and costs nothing.

The budget defaults to ``NODE_SHARE`` of the node's memory (the smallest node's, on a cluster). What comes on top of
it: Ray's own processes (the raylet, the GCS, a few small actors of Ray Data's and ours, about 0.5 GB), the driver
(0.3 GB) and a restorer actor (its model, on the GPU for the most part in production).
``--memory-budget-mb`` sets it, ``--block-megapixels`` sets the block size directly. None of these change an output
byte.

Caveat (ray 2.60): Ray Data merges what one read task yields into blocks of up to 128 MiB of (compressed) bytes, so
the reader's pixel-sized blocks may reach the detector merged; detection then walks the merged block in windows of
the block budget, so the pixels it holds stay bounded all the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from pipeline.graph.capacity import plan_write_tasks

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

MiB = 2**20
NODE_SHARE = 0.125  # of the node's memory, when --memory-budget-mb is not given (3 GiB of a 24 GiB node)
OBJECT_STORE_SHARE = 0.25  # of the budget, for a local Ray's object store
MIN_OBJECT_STORE = 256 * MiB  # a store smaller than this spills blocks of ordinary photos to disk
PEAK_BYTES_PER_PIXEL = 12  # what a decoding worker holds per decoded pixel at its peak (measured ~9; see above)
MIN_BLOCK_PIXELS = 1_000_000  # below this, per-block costs (a Ray call, a staged part) outweigh the work
# a decoding worker's own memory before any photo (the interpreter, torch, OpenCV, pyarrow, Ray's core worker, the
# detector's model): measured 0.34-0.45 GiB PSS in a run (a write worker, the detector). Counted in the budget, once
# per decoding slot, so that what the workers hold in all stays within it.
WORKER_BASELINE_BYTES = 512 * MiB
# Ray Data merges what a task yields into blocks of up to its target_max_block_size (128 MiB by default): a read task
# over a shard of camera JPEGs yields 128 MiB blocks (27 photos of 48 MP) into an object store of a few hundred MiB,
# which then spills, and the executor's back-pressure acts a whole such block late. A run's blocks are held to
# STORE_BLOCKS_SHARE of the store (between MIN_RAY_BLOCK and Ray's default): small enough that the store holds a
# few dozen and the reader is held back in time; our own blocks (a few photos, by pixels) are smaller still.
STORE_BLOCKS_SHARE = 1 / 32
MIN_RAY_BLOCK = 8 * MiB
MAX_RAY_BLOCK = 128 * MiB
# glibc malloc settings for a local Ray's workers (read by glibc when a process starts, so they reach workers only
# through the environment they are started with: see build.init_ray). Two heaps instead of one per thread (8 per
# core): each heap keeps its own freed memory, and Ray's, torch's and OpenCV's threads each allocate. Allocations of
# 32 MiB and more (whole decoded photos: Pillow decodes an image into one block, pipeline/imaging/decode.py) get their
# own mapping, returned to the system when freed; smaller ones stay in the heaps for reuse, and up to 64 MiB freed at a
# heap's top stays there (the stages give it back after each photo or window: release_freed_memory). A lower mapping
# threshold (4 MiB, with glibc's 128 KiB trim threshold) made every tensor of a few MiB a fresh mapping, its pages
# faulted in and zeroed by the kernel at each use: one thread, MTCNN on a 2 MP photo took 373 ms instead of 287, the
# tiny restorer 1.81 s per face instead of 0.99 (benchmarks/bench_malloc.py), while 12 photos of 48 MP peaked at
# 2.67 GiB PSS against 2.78 now (benchmarks/bench_large_photos.py; now with two detectors, capacity.plan_pools).
# Arrow's buffers (the blocks' tables, a write task's parts) go through the same malloc instead of pyarrow's default
# mimalloc, which keeps freed segments for reuse: a worker that had run write tasks on 48 MP photos then sat idle
# holding 0.85 GiB (a 200-photo run; 24 photos: 3.12 GiB at peak with mimalloc, 2.85 with the system pool). A value
# already in the environment wins.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(32 * MiB), "MALLOC_TRIM_THRESHOLD_": str(64 * MiB),
              "ARROW_DEFAULT_MEMORY_POOL": "system"}


@dataclass(frozen=True)
class MemoryPlan:
    """How a run spends its per-node budget (bytes): the object store, the write tasks at once, the block size."""

    budget_bytes: int
    object_store_bytes: int
    write_tasks: int
    block_pixels: int
    # Ray Data's target_max_block_size for the run (ray_block_bytes): the most bytes Ray merges into one block
    ray_block_bytes: int = 128 * MiB

    @property
    def block_megapixels(self) -> float:
        return self.block_pixels / 1e6

    def describe(self) -> str:
        return (f"memory budget {self.budget_bytes // MiB} MiB per node: object store {self.object_store_bytes // MiB}"
                f" MiB, {self.write_tasks} write task(s) at once, blocks of at most {self.block_megapixels:g} decoded "
                f"megapixels, Ray blocks of at most {self.ray_block_bytes // MiB} MiB")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def machine_memory() -> int:
    """This machine's physical memory, in bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def budget_bytes(cfg: PipelineConfig, node_bytes: int) -> int:
    """The per-node budget: ``--memory-budget-mb``, else ``NODE_SHARE`` of ``node_bytes``."""
    if cfg.memory_budget_mb is not None:
        return cfg.memory_budget_mb * MiB
    return int(node_bytes * NODE_SHARE)


def object_store_bytes(cfg: PipelineConfig, node_bytes: int) -> int:
    """A local Ray's object store: ``--object-store-memory``, else ``OBJECT_STORE_SHARE`` of the budget (at least
    ``MIN_OBJECT_STORE``)."""
    if cfg.object_store_memory is not None:
        return cfg.object_store_memory
    return max(MIN_OBJECT_STORE, int(budget_bytes(cfg, node_bytes) * OBJECT_STORE_SHARE))


def plan_memory(cfg: PipelineConfig, *, node_bytes: int, cpus: float, detect_actors: int,
                nodes: int = 1, actor_cores: float = 0.0) -> MemoryPlan:
    """The plan of a run whose smallest node has ``node_bytes`` of memory, on a cluster of ``cpus`` CPUs over
    ``nodes`` nodes with at most ``detect_actors`` detector actors, whose stage actors keep ``actor_cores`` cores
    busy at most (see the module docstring and :func:`pipeline.graph.capacity.plan_write_tasks`)."""
    budget = budget_bytes(cfg, node_bytes)
    store = object_store_bytes(cfg, node_bytes)
    write_tasks = plan_write_tasks(cpus, actor_cores)
    slots_per_node = max(1.0, (detect_actors + write_tasks) / max(1, nodes))
    if cfg.block_megapixels is not None:
        block_pixels = int(cfg.block_megapixels * 1e6)
    else:
        share = max(0.0, budget - store - slots_per_node * WORKER_BASELINE_BYTES) / slots_per_node
        block_pixels = max(MIN_BLOCK_PIXELS, int(share // PEAK_BYTES_PER_PIXEL))
    ray_block = min(MAX_RAY_BLOCK, max(MIN_RAY_BLOCK, int(store * STORE_BLOCKS_SHARE)))
    return MemoryPlan(budget_bytes=budget, object_store_bytes=store, write_tasks=write_tasks, block_pixels=block_pixels,
                      ray_block_bytes=ray_block)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is none (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the memory this process has freed back to the system (glibc's ``malloc_trim(0)``; nothing elsewhere).

    Why: a decoded 48 MP photo goes through many allocations below glibc's mmap threshold (Pillow decodes into 16 MiB
    blocks; MTCNN's image pyramid, the paste-back's regions, the encoder's buffers), and glibc keeps what is freed
    there in its heaps for reuse, one heap per thread that allocated. A worker that decoded photos thus stays
    gigabytes large long after it freed them: an idle Ray worker that had run write tasks held 1.7 GB. Trimming after
    each photo or detection window costs milliseconds next to a decode of about a second; outputs do not change."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
