"""The ``dr2`` command line's parser: every command, its options (restore's generated from PipelineConfig) and its
help. Apart from the commands' code (``jobs/cli.py``), so that ``dr2 submit`` can check a job line with the real
parser without importing the CLI that imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jobs import submit as submit_mod  # stdlib-only at import; Ray is imported when a job is submitted
from jobs.configargs import add_dataclass_args
from pipeline.config import PRESET_HELP, PRESETS, PipelineConfig

OVERVIEW = """dr2: restore the faces in million-image archives with DR2, as a Ray Data job.

    dr2 demo                      build a degraded demo archive and restore it (local Ray, local files)
    dr2 restore SRC DST           restore the faces in an archive (WebDataset shards or plain images; local or s3://)
    dr2 nightly SRC DST --state S restore what is new or changed since the last run; retries, quarantine, history
    dr2 estimate SRC              what an archive will cost: faces, bottleneck, wall time, GPU-hours, pools
    dr2 check-output DST          verify a finished destination against its markers (sizes, sha256, counts)
    dr2 restore-faces IN OUT      restore a folder of aligned faces, as the official demo does, batched
    dr2 weights import FILE       convert an official checkpoint to model.safetensors + config.json
    dr2 verify-fixtures DIR       check this install reproduces the official DR2 numbers
    dr2 bench                     measure UNet, restorer and pipeline speed, MFU, and the speed-up over batch 1
    dr2 submit -- restore ...     run restore (or nightly) on a Ray cluster through Ray Jobs

Run `dr2 COMMAND --help` for each command's options. Without weights, try
`dr2 restore SRC DST --restorer passthrough` (detection, alignment and paste-back, no DR2) or `--restorer tiny`.
"""

# --------------------------------------------------------------------------------------------- parser


def build_parser(preset_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser; ``preset_defaults`` (from --preset) become the restore command's defaults."""
    p = argparse.ArgumentParser(prog="dr2", description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"dr2-pipeline {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("restore", help="restore the faces in an archive", description=(
        "Restore every face in SRC and write the result to DST: one output .tar per input shard (same keys, "
        "same order, every member kept, the image restored, a dr2.json per sample, a <shard>.stats.json commit "
        "marker), or for plain images a mirrored tree with per-chunk manifests. Reruns skip finished shards."))
    r.add_argument("src", help="input: .tar shards (path, glob, {000..009} braces, s3://) or a folder/prefix of images")
    r.add_argument("dst", help="output folder or s3:// prefix")
    r.add_argument("--preset", choices=PRESETS, help=PRESET_HELP)
    r.add_argument("--dry-run", action="store_true", help="plan only: list what would be done, write nothing")
    r.add_argument("--quiet", action="store_true", help="no progress line, only warnings and the final summary")
    add_dataclass_args(r, PipelineConfig)
    if preset_defaults:
        r.set_defaults(**preset_defaults)

    n = sub.add_parser("nightly", help="restore what is new or changed since the last run (cron-friendly)",
                       description=(
        "Each run lists SRC, restores the units not yet committed at DST under this config and those whose input "
        "changed since (size + ETag/mtime), retries failed units on later runs up to --max-attempts, then "
        "quarantines them, and appends a run record to the history at --state (local or s3://). Runs started at "
        "once on the same --state split the work. Prints one summary line; exit 0 all done, 1 some units failed "
        "or are quarantined, 2 the run could not start. `dr2 nightly --history STATE` prints the last runs."))
    n.add_argument("src", nargs="?", help="input, as for `dr2 restore`")
    n.add_argument("dst", nargs="?", help="output, as for `dr2 restore`")
    n.add_argument("--state", help="where the nightly state and history live (folder or s3:// prefix)")
    n.add_argument("--history", metavar="STATE", help="print the last runs recorded at STATE and exit")
    n.add_argument("--last", type=int, default=10, help="runs shown by --history (default 10)")
    n.add_argument("--max-attempts", type=int, default=3, help="runs that may fail a unit before it is quarantined")
    n.add_argument("--retry-quarantined", action="store_true", help="give quarantined units a fresh set of attempts")
    n.add_argument("--wave", type=int, default=256, help="units claimed at a time (concurrent runs split by waves)")
    n.add_argument("--preset", choices=PRESETS, help=PRESET_HELP)
    add_dataclass_args(n, PipelineConfig)
    n.set_defaults(wait=3600.0, progress="plain", **(preset_defaults or {}))

    e = sub.add_parser("estimate", help="what an archive will cost: images, faces, bottleneck, wall time, GPU-hours",
                       description=(
        "Lists SRC, samples a few units (seeded) and runs the CPU stages on them for real (read, decode, detect, "
        "align, compose, write into a temporary folder), takes the restorer's cost per face (measured here for "
        "passthrough/tiny, stated for simulate, --restorer-faces-per-s from `dr2 bench`, else the FLOP model at "
        "--mfu of --gpu-type's peak), and prints for the cluster shape given (default: this machine, local Ray): "
        "images and faces expected, each stage's capacity, the bottleneck, throughput, the `dr2 restore` command's "
        "wall time (start-up included), GPU-hours and the pools to run with. Takes `dr2 restore`'s options."))
    e.add_argument("src", help="input, as for `dr2 restore`")
    e.add_argument("dst", nargs="?", default="", help="output, as for `dr2 restore` (optional: only checked)")
    e.add_argument("--preset", choices=PRESETS, help=PRESET_HELP)
    e.add_argument("--cpus", type=float, default=None, help="CPUs of the cluster, all nodes (default: this machine's)")
    e.add_argument("--gpus", type=float, default=None, help="GPUs of the cluster (default 0: this machine)")
    e.add_argument("--gpu-type", default="H100", help="GPU model for the FLOP model: H100, H200, H100-PCIE, A100, "
                   "L40S, A10G (default H100)")
    e.add_argument("--mfu", type=float, default=None, help="share of the GPU's bf16 peak DR2 reaches (default 0.35)")
    e.add_argument("--restorer-faces-per-s", type=float, default=None,
                   help="one restorer's faces/s as `dr2 bench` measured it on your GPU (overrides the FLOP model)")
    e.add_argument("--sample-units", type=int, default=3, help="units sampled (default 3)")
    e.add_argument("--sample-images", type=int, default=48, help="images run through the stages at most (default 48)")
    e.add_argument("--sample-seed", type=int, default=0, help="which units are sampled (default 0)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_dataclass_args(e, PipelineConfig)
    e.set_defaults(progress="quiet", **(preset_defaults or {}))

    c = sub.add_parser("check-output", help="verify a finished destination against its markers", description=(
        "Checks every unit marker under DST: the output exists with the recorded size and sha256, the tar holds "
        "the recorded number of samples, and no staging is left. Prints a table; exit 1 on any mismatch."))
    c.add_argument("dst", help="output folder or s3:// prefix of a finished run")
    c.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")

    d = sub.add_parser("demo", help="build a demo archive and restore it on a local Ray", description=(
        "Builds demo/archive (real public-domain photos degraded at three strengths, a face-less photo, broken "
        "files, a sample without an image), runs the job into demo/restored, writes the run report "
        "(demo/restored/_dr2/report/index.html), demo/detections.png (boxes, landmarks, aligned crops) and "
        "demo/preview.png (before | after). Without --ddpm it runs --restorer passthrough: every stage but DR2 is "
        "real and faces are pasted back unchanged; --tiny runs tiny random models through every stage instead."))
    d.add_argument("--tiny", action="store_true", help="tiny RANDOM models through every stage (faces become noise)")
    d.add_argument("--quiet", action="store_true", help="no progress line")
    d.add_argument("--out", type=Path, default=Path("demo"), help="demo folder (default: demo)")
    d.add_argument("--ddpm", default="", help="DDPM model dir (from `dr2 weights import`) for real restorations")
    d.add_argument("--enhancer", default="", help="SPARNetHD model dir, or 'none'")
    d.add_argument("--preset", choices=PRESETS, default="mild", help=PRESET_HELP)

    f = sub.add_parser("restore-faces", help="restore a folder of aligned face images", description=(
        "What the official demo does for a folder of aligned faces (any size; resized to 512), batched: "
        "DR2 then the enhancer. Writes PNGs with the same names to OUT_DIR."))
    f.add_argument("in_dir", type=Path)
    f.add_argument("out_dir", type=Path)
    f.add_argument("--ddpm", default="", help="DDPM model dir or s3:// URI (required unless --tiny)")
    f.add_argument("--enhancer", default="", help="SPARNetHD model dir or s3:// URI, or 'none' for bicubic")
    f.add_argument("--tiny", action="store_true", help="tiny random models (testing the path; not a restoration)")
    f.add_argument("--N", type=int, default=8, help="low-pass factor N (default 8)")
    f.add_argument("--tau", type=int, default=0, help="output step tau (default 0)")
    f.add_argument("--seed", type=int, default=0, help="noise seed base (default 0)")
    f.add_argument("--batch-size", type=int, default=4, help="faces per forward pass (default 4)")
    f.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    f.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))

    w = sub.add_parser("weights", help="manage model weights")
    wsub = w.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    wi = wsub.add_parser("import", help="import an official checkpoint", description=(
        "Reads an official checkpoint (DR2_FFHQ.pkl: --kind ddpm; SPARNetHD_FFHQ_DR2aug.pth: --kind sparnethd) "
        "without executing any pickled code, checks every key and shape, and writes DIR/model.safetensors and "
        "DIR/config.json (architecture and sha256)."))
    wi.add_argument("file", type=Path)
    wi.add_argument("--kind", required=True, choices=("ddpm", "sparnethd"))
    wi.add_argument("--out", type=Path, required=True, help="output model directory")
    wi.add_argument("--config", type=Path, default=None, help=(
        "JSON file with the architecture's constructor arguments (or an object with them under 'kwargs'), for "
        "checkpoints other than the official full-size models"))

    v = sub.add_parser("verify-fixtures", help="check this install against the official DR2 golden fixtures")
    v.add_argument("dir", type=Path, nargs="?", default=None,
                   help="fixture folder (default: the copy shipped in tests/fixtures/dr2_reference)")

    add_bench_arguments(sub.add_parser("bench", help="measure the DR2 path's speed (one table)",
                                       description="One table: UNet forwards/s and TFLOP/s, restorer faces/s, "
                                       "end-to-end pipeline faces/s, the batch-1 baseline and MFU. See jobs/bench.py."))

    js = sub.add_parser("submit", help="run restore or nightly on a Ray cluster (Ray Jobs)",
                        description=submit_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit_mod.add_submit_args(js)
    return p


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dr2-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


BENCH_DEFAULTS_HELP = (
    "Defaults per device. CUDA: --precision fp32,bf16 --batch-size 1,4,8 --repeats 2, a `dr2 restore` pipeline run "
    "of 48 photos for every row, a 4-face baseline. CPU (a few minutes): --precision fp32 --batch-size 1,4 "
    "--repeats 1, one pipeline run of 4 photos at the last row (batch 4), a 2-face baseline. On CPU, --full (or an "
    "explicit --precision or --batch-size) runs the CUDA matrix instead, with 8 pipeline photos per row: expect "
    "20 minutes or more."
)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """``dr2 bench``'s options (jobs/bench.py); here, so that the parser does not import torch."""
    p.epilog = BENCH_DEFAULTS_HELP
    p.add_argument("--device", default="auto",
                   help="cpu (tiny models) or cuda (full-size models); auto (default): cuda if available")
    p.add_argument("--full", action="store_true",
                   help="on CPU, the full matrix that CUDA runs by default (fp32,bf16 x 1,4,8, a pipeline run per row)")
    p.add_argument("--precision", default=None,
                   help="comma-separated: fp32,bf16,fp16 (default fp32,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", default=None,
                   help="comma-separated restore batch sizes (default 1,4,8 on CUDA, 1,4 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks (cost reported)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--skip-pipeline", action="store_true", help="leave out the end-to-end `dr2 restore` row")
    p.add_argument("--N", type=int, default=8, help="low-pass factor (default 8, preset moderate)")
    p.add_argument("--tau", type=int, default=35, help="output step (default 35, preset moderate)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per measurement, median (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--pipeline-images", type=int, default=None,
                   help="images in the generated archive (default 48 on CUDA, 4 on CPU, 8 with --full)")
    p.add_argument("--verify-fixtures", action="store_true",
                   help="first check the golden fixtures on --device in each --precision; stop on a failure")
    p.add_argument("--out", type=Path, default=None, help="also write bench.md and bench.json (and verify.txt) here")
