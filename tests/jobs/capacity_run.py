"""The balance of a GPU node, run on CPUs: ``run_restore`` with the simulated restorer on a simulated Ray cluster
(``ray.cluster_utils.Cluster``, fake GPUs), beside what the capacity model predicted for that shape from the costs
``dr2 estimate`` measured. Prints one JSON line. Used by tests/jobs/test_gpu_scheduling.py and
benchmarks/bench_capacity.py, each in its own process (a test session has its own local Ray):

    python -m tests.jobs.capacity_run SRC DST --cpus 2 --gpus 1 --faces-per-s 4

The cluster: a head with ``--cpus`` CPUs and no GPU (reads, writes, detectors), and one node per fake GPU holding
one CPU, each node with the object store `dr2 restore` gives a local Ray here. Detection stays on the CPUs (a fake
GPU cannot run MTCNN). The restorer actors sleep 1/R seconds per face while holding their (fake) GPU, so they stand
for a GPU that restores R faces/s; the busy fraction they reach says whether the CPU side kept them fed. Block sizes
default to the tests' small ones (benchmarks/bench_capacity.py passes a run's defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import ray
from ray.cluster_utils import Cluster

from jobs.estimate import estimate
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph import memory
from pipeline.graph.capacity import ClusterShape
from pipeline.runner.loop import run_restore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--cpus", type=float, default=2.0, help="CPUs of the head (the CPU side)")
    p.add_argument("--gpus", type=int, default=1, help="fake GPUs, one node each (with one CPU)")
    p.add_argument("--faces-per-s", type=float, default=4.0, help="each simulated GPU's faces/s")
    p.add_argument("--detect-actors", type=int, default=None)
    # small blocks by default, so that the tests' two dozen photos make several blocks to overlap; the benchmark
    # passes the production sizes (PipelineConfig's defaults), whose calls are longer than Ray's per-call cost
    p.add_argument("--rows-per-block", type=int, default=8)
    p.add_argument("--restore-batch-size", type=int, default=4)
    p.add_argument("--faces-per-block", type=int, default=4)
    args = p.parse_args(argv)
    cfg = PipelineConfig(src=args.src, dst=args.dst, restorer=RestorerKind.SIMULATE,
                         simulate_faces_per_s=args.faces_per_s, progress="quiet", report=True,
                         detect_actors=args.detect_actors, rows_per_block=args.rows_per_block,
                         detect_batch_size=4, restore_batch_size=args.restore_batch_size,
                         faces_per_block=args.faces_per_block,
                         gpus_per_detector=0.0)  # a fake GPU cannot run MTCNN: detection stays on the CPUs
    # the model gets the cores there are: the simulated nodes share this machine's
    shape = ClusterShape(cpus=min(args.cpus + args.gpus, float(os.cpu_count() or 1)), gpus=float(args.gpus))
    predicted = estimate(cfg, cluster=shape, sample_units_n=2, sample_images=8)  # before Ray: measured here
    # each node gets the object store `dr2 restore` gives a local Ray on this machine, as a real node has its own:
    # with 200 MiB each, blocks of production size (16 faces of 512x512, twice over after the restorer) stalled on
    # Ray Data's object store budget (restore busy 0.56 steady at 16 faces/s, against 0.95 with this store).
    # CAP_STORE_MB=200 in the environment sets another size, to see that.
    node = {"object_store_memory": int(os.environ.get("CAP_STORE_MB", 0)) * 2**20
            or memory.object_store_bytes(cfg, memory.machine_memory()), "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus, **node})
    for _ in range(args.gpus):
        cluster.add_node(num_cpus=1, num_gpus=1, **node)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        summary = run_restore(dataclasses.replace(cfg, address=cluster.address))
        result = {"samples": summary.samples, "faces": summary.faces, "busy": summary.busy, "pools": summary.pools,
                  "wall_s": summary.seconds, "predicted": {k: predicted[k] for k in (
                      "bottleneck", "busy", "capacity_images_per_s", "cpus_for_restore_busy_0_9", "images",
                      "faces", "stage_ms_per_image")}}
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
