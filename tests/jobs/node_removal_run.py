"""Run ``run_restore`` on a simulated Ray cluster (``ray.cluster_utils.Cluster``) and remove its worker node while
that node holds work; prints one JSON line with what happened. Run by tests/jobs/test_node_removal.py in its own
process (the test session has its own local Ray): ``python -m tests.jobs.node_removal_run SRC DST FAILPOINT_DIR``.

The head has no CPU, so every stage actor and task starts on the one worker. Failpoints (pipeline/failpoints.py)
hold work there: the detector hangs on its second block and the writer on its first, so when both have said so
the detector actor is inside a call, a write task is running and the restorer actor holds a block's output in
that node's object store. A second worker then joins and the first is killed with all its processes (a spot node
reclaimed while the autoscaler brings another). Ray must restart the actors and rerun the lost work on the new
node; the failpoints fire only on their first arrival, so the retries go through.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner.loop import run_restore

NODE: dict[str, Any] = {"object_store_memory": 150 * 2**20, "include_dashboard": False}
ACTORS = ("DetectActor", "RestoreActor", "FlightLog")
HANGS = {"detect.batch": 2, "write.block": 1}  # failpoint: the arrival that hangs
HANG_TIMEOUT_S = 600.0  # cold workers load torch and MTCNN: seconds idle, minutes on a loaded 2-core machine
JOB_TIMEOUT_S = 600.0  # after the removal: restarted actors load their models again on the new node


def pipeline_actors() -> list[dict[str, Any]]:
    """The run's actors: class, state, node, restarts (Ray 2.60's internal table: the cluster has no dashboard)."""
    from ray._private import state

    out = []
    for a in state.actors().values():
        name = next((c for c in ACTORS if c in str(a.get("ActorClassName", ""))), None)
        if name:
            out.append({"class": name, "state": a.get("State"), "node": (a.get("Address") or {}).get("NodeID"),
                        "restarts": a.get("NumRestarts")})
    return sorted(out, key=lambda a: a["class"])


def main(src: str, dst: str, failpoint_dir: str) -> None:
    # armed before the nodes start: their raylets and workers inherit this process's environment
    os.environ.update({"DR2_FAILPOINTS": ";".join(f"{p}=hang@{n}" for p, n in HANGS.items()),
                       "DR2_FAILPOINTS_DIR": failpoint_dir})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **NODE})
    worker = cluster.add_node(num_cpus=2, **NODE)
    cluster.wait_for_nodes()
    cfg = PipelineConfig(src=src, dst=dst, address=cluster.address, restorer=RestorerKind.PASSTHROUGH,
                         progress="quiet", report=False, detect_batch_size=1, rows_per_block=2)
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["summary"] = run_restore(cfg)
        except BaseException as e:  # noqa: BLE001 - reported below, with what the cluster went through
            result["error"] = f"{type(e).__name__}: {e}"

    # The job runs in a thread: Cluster.add_node installs signal handlers, which only the main thread may do.
    runner = threading.Thread(target=job, daemon=True)
    seen: dict[str, Any] = {"worker": worker.node_id, "removed": False}
    try:
        runner.start()
        hung = [Path(failpoint_dir, f"{p}.hung") for p in HANGS]
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while not all(h.exists() for h in hung) and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        seen["hung"] = sorted(h.name for h in hung if h.exists())
        if len(seen["hung"]) == len(hung):
            seen["actors_at_removal"] = pipeline_actors()
            cluster.add_node(num_cpus=2, **NODE)
            cluster.wait_for_nodes()
            cluster.remove_node(worker, allow_graceful=False)
            seen["removed"] = True
            print(json.dumps({"removed": seen}), flush=True)  # in the log even if the job then hangs
        runner.join(timeout=JOB_TIMEOUT_S)
        if runner.is_alive():
            seen["job"] = f"still running {JOB_TIMEOUT_S:.0f} s after the node removal"
        elif "error" in result:
            seen["job"] = result["error"]
        else:
            summary = result["summary"]
            seen.update({"job": "done", "units_done": summary.units_done, "failed": summary.failed,
                         "samples": summary.samples, "statuses": dict(summary.statuses)})
        seen["actors_after"] = pipeline_actors()
        print(json.dumps(seen), flush=True)
    finally:
        if not runner.is_alive():
            ray.shutdown()
            cluster.shutdown()  # else the test kills this process group and every process of its Ray temp dir


if __name__ == "__main__":
    main(*sys.argv[1:4])
