"""The balance of a GPU node, run on CPUs: the busy fraction a simulated GPU reaches against what the capacity
model predicted, at several GPU speeds (faces/s) for one CPU side.

    .venv/bin/python benchmarks/bench_capacity.py [--rates 2,4,8,16,64] [--cpus 2] [--gpus 1] [--shards 3 --images 8]
        [--rows-per-block 256 --restore-batch-size 8 --faces-per-block 0] [--detect-actors N]

Each rate is one ``run_restore`` with ``--restorer simulate`` on a simulated Ray cluster (tests/jobs/capacity_run.py:
a head with ``--cpus`` CPUs, a node per fake GPU) over small one-face photos. Printed per rate: the model's
bottleneck, predicted restorer busy fraction and the CPUs it says the restorers need, and the measured busy
fractions (whole run from each actor's ready time, and steady: first block to last) with the actors' waits between
blocks (how the time not busy was spent: many short waits, or a few long ones). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import PipelineConfig  # noqa: E402
from tests.jobs.test_gpu_scheduling import face_archive  # noqa: E402


def waits(stage: dict[str, Any]) -> str:
    """A stage's waits between blocks (pipeline.graph.flight.busy_table): count, median and 90th percentile."""
    w = stage.get("waits") or {}
    return f"{w['count']}, {w['median_ms']:.0f} ms, {w['p90_ms']:.0f} ms" if w.get("count") else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="2,4,8,16,64", help="simulated GPU faces/s, comma-separated")
    p.add_argument("--cpus", default="2")
    p.add_argument("--gpus", default="1")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--images", type=int, default=8)
    # the block sizes a run gets by default (PipelineConfig); tests/jobs/capacity_run.py's own defaults are the
    # tests' small ones, whose calls are short enough for Ray's per-call cost to show
    p.add_argument("--rows-per-block", type=int, default=PipelineConfig.rows_per_block)
    p.add_argument("--restore-batch-size", type=int, default=PipelineConfig.restore_batch_size)
    p.add_argument("--faces-per-block", type=int, default=PipelineConfig.faces_per_block,
                   help="0 (default): 2 x --restore-batch-size, as PipelineConfig.faces_block resolves it")
    p.add_argument("--detect-actors", default=None, help="a fixed detector pool (default: the pool rule's)")
    args = p.parse_args(argv)
    blocks = ["--rows-per-block", str(args.rows_per_block), "--restore-batch-size", str(args.restore_batch_size),
              "--faces-per-block", str(args.faces_per_block)]
    if args.detect_actors:
        blocks += ["--detect-actors", args.detect_actors]
    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    src = face_archive(tmp / "in", args.shards, args.images)
    print(f"{os.cpu_count()} cores here; simulated cluster: head {args.cpus} CPUs + {args.gpus} fake GPU node(s); "
          f"{args.shards * args.images} one-face photos; blocks: {' '.join(blocks)}; load {os.getloadavg()[0]:.2f}\n")
    print("| GPU faces/s | model bottleneck | model restore busy | CPUs needed (90%) | measured restore busy (whole / "
          "steady) | restore waits: n, median, p90 | detect busy | detect waits: n, median, p90 | wall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, rate in enumerate(args.rates.split(",")):
        out = subprocess.run([sys.executable, "-m", "tests.jobs.capacity_run", src, str(tmp / f"out-{i}-{rate}"),
                              "--cpus", args.cpus, "--gpus", args.gpus, "--faces-per-s", rate, *blocks],
                             capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {rate} | run failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(line[len("RESULT "):])
        pr, b = r["predicted"], r["busy"]
        rb, db = b.get("restore", {}), b.get("detect", {})
        print(f"| {rate} | {pr['bottleneck']} | {pr['busy']['restore']:.2f} | {pr['cpus_for_restore_busy_0_9']} | "
              f"{rb.get('fraction', 0):.2f} / {rb.get('steady_fraction', 0):.2f} | {waits(rb)} | "
              f"{db.get('fraction', 0):.2f} | {waits(db)} | {r['wall_s']:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
