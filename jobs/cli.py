"""dr2: restore the faces in million-image archives with DR2, as a Ray Data job.

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

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from jobs.configargs import add_dataclass_args, dataclass_from_args
from pipeline import stopping
from pipeline.config import PipelineConfig
from pipeline.console import setup_logging

log = logging.getLogger("dr2")

PRESETS = ("mild", "moderate", "severe", "auto")
PRESET_HELP = (
    "N/tau from the official demo's three settings: mild (N=4, tau=22), moderate (N=8, tau=35), "
    "severe (N=16, tau=35). Explicit --N/--tau win. auto (--adaptive): each face gets the setting of its "
    "degradation verdict (pipeline/degradation.py), and clean faces are pasted back unrestored (--skip-clean)."
)


def load_preset(name: str) -> dict[str, Any]:
    """A preset's config fields (jobs/presets/NAME.json): N and tau, or for auto ``adaptive``."""
    data: dict[str, Any] = json.loads(resources.files("jobs").joinpath("presets", f"{name}.json").read_text())
    return data


# --------------------------------------------------------------------------------------------- parser


def build_parser(preset_defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The parser; ``preset_defaults`` (from --preset) become the restore command's defaults."""
    p = argparse.ArgumentParser(prog="dr2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and full tracebacks on errors")
    p.add_argument("--version", action="version", version=f"dr2-pipeline {_version()}")
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

    from jobs.bench import add_arguments as add_bench_arguments

    add_bench_arguments(sub.add_parser("bench", help="measure the DR2 path's speed (one table)",
                                       description="One table: UNet forwards/s and TFLOP/s, restorer faces/s, "
                                       "end-to-end pipeline faces/s, the batch-1 baseline and MFU. See jobs/bench.py."))

    from jobs import submit as submit_mod  # stdlib-only at import; Ray is imported when a job is submitted

    js = sub.add_parser("submit", help="run restore or nightly on a Ray cluster (Ray Jobs)",
                        description=submit_mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit_mod.add_submit_args(js)
    return p


# --------------------------------------------------------------------------------------------- commands


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dr2-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


def cmd_restore(args: argparse.Namespace) -> int:
    from jobs.restore import plan_units, run_restore, select_todo
    from pipeline.models import model_identity

    overrides: dict[str, Any] = {"src": args.src, "dst": args.dst}
    if args.quiet:
        overrides["progress"] = "quiet"
        logging.getLogger().setLevel(logging.WARNING)
    cfg = dataclass_from_args(PipelineConfig, args, **overrides)
    if args.dry_run:
        units = plan_units(cfg)
        todo = select_todo(units, cfg, cfg.output_hash(model_identity(cfg)))
        todo = todo[: cfg.limit] if cfg.limit is not None else todo
        print(f"{len(units)} unit(s) in {cfg.src}: {len(units) - len(todo)} already done at {cfg.dst}, "
              f"{len(todo)} to do (dry run: nothing written)")
        for u in todo[:20]:
            print(f"  {u.name}  <- {u.source}" + (f"  ({len(u.images)} images)" if u.images else ""))
        if len(todo) > 20:
            print(f"  ... and {len(todo) - 20} more")
        return 0
    with stopping.handling("restore", grace_s=cfg.stop_grace):  # Ctrl-C, SIGTERM: pipeline/stopping.py
        summary = run_restore(cfg)
    print(summary.table())
    print(f"output: {cfg.dst}")
    if summary.report:
        print(f"report: {summary.report}")
    if cfg.restorer.value == "passthrough" and summary.faces:
        print("(passthrough: faces were detected, aligned and pasted back unchanged; nothing was restored)")
    if summary.failed:
        print(f"dr2 restore: {len(summary.failed)} unit(s) failed (listed above); the others are committed. "
              "Rerun the same command to retry them.", file=sys.stderr)
        return 1
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from jobs import nightly_state as ns

    if args.history:
        print(ns.format_history(ns.NightlyState(args.history), last=args.last))
        return 0
    if not (args.src and args.dst and args.state):
        raise ValueError("dr2 nightly needs SRC DST --state STATE_URI (or --history STATE_URI)")
    from jobs.nightly import run_nightly_job

    cfg = dataclass_from_args(PipelineConfig, args, src=args.src, dst=args.dst)
    with stopping.handling("nightly", grace_s=cfg.stop_grace):  # Ctrl-C, SIGTERM: pipeline/stopping.py
        record = run_nightly_job(cfg, args.state, max_attempts=args.max_attempts,
                                 retry_quarantined=args.retry_quarantined, wave=args.wave)
    print(ns.summary_line(record, args.state))
    return ns.exit_code(record)


def cmd_check_output(args: argparse.Namespace) -> int:
    from jobs.check import check_output, format_checks
    from pipeline.storage import StorageOptions

    checks = check_output(args.dst, options=StorageOptions(endpoint_url=args.endpoint_url))
    print(format_checks(checks))
    return 0 if checks and all(c.ok for c in checks) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import build_demo_archive, write_detection_preview, write_preview
    from jobs.restore import run_restore
    from pipeline.config import RestorerKind

    archive = build_demo_archive(args.out / "archive")
    real = bool(args.ddpm)
    kind = RestorerKind.DR2 if real else (RestorerKind.TINY if args.tiny else RestorerKind.PASSTHROUGH)
    cfg = PipelineConfig(
        src=str(archive / "shard-{000..001}.tar"),
        dst=str(args.out / "restored"),
        restorer=kind,
        ddpm=args.ddpm,
        enhancer=args.enhancer or ("none" if real else ""),
        overwrite=True,
        progress="quiet" if args.quiet else "auto",
        **load_preset(args.preset),
    )
    if kind is RestorerKind.PASSTHROUGH:
        print("dr2 demo: no DR2 weights given (--ddpm), so faces are detected, aligned and pasted back UNCHANGED "
              "(--restorer passthrough): every stage but DR2 runs for real. To restore faces, import the official "
              "weights (`dr2 weights import`, see README 'Weights') and pass --ddpm/--enhancer; --tiny runs tiny "
              "RANDOM models through every stage instead (a full-stage check; their faces are noise).")
    elif kind is RestorerKind.TINY:
        print("dr2 demo: --tiny: TINY RANDOM models run through every stage; the pasted faces are noise, not "
              "restorations.")
    summary = run_restore(cfg)
    banner = {RestorerKind.DR2: "", RestorerKind.TINY: "TINY RANDOM MODELS: a full-stage check, faces are noise",
              RestorerKind.PASSTHROUGH: "no weights: faces detected, aligned and pasted back unchanged"}[kind]
    detections = write_detection_preview(archive, Path(cfg.dst), args.out / "detections.png")
    preview = write_preview(archive, Path(cfg.dst), args.out / "preview.png", banner=banner)
    print(summary.table())
    print(f"input shards:   {archive}/shard-*.tar")
    print(f"output shards:  {cfg.dst}/shard-*.tar (+ .stats.json, _dr2/config.json)")
    print(f"detections:     {detections} (boxes, landmarks and aligned crops per photo)")
    print(f"preview:        {preview} (input | output per sample)")
    print(f"report:         {summary.report} (open it in a browser)")
    return 0


def cmd_restore_faces(args: argparse.Namespace) -> int:
    from jobs.faces_folder import restore_folder

    n = restore_folder(args.in_dir, args.out_dir, ddpm=args.ddpm, enhancer=args.enhancer, tiny=args.tiny, N=args.N,
                       tau=args.tau, seed=args.seed, batch_size=args.batch_size, device=args.device,
                       precision=args.precision)
    print(f"restored {n} faces into {args.out_dir}")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from dr2.sparnet import SPARNetConfig
    from dr2.unet import UNetConfig
    from dr2.weights import ModelKind, import_checkpoint

    kind = ModelKind(args.kind)
    config = None
    if args.config:
        kwargs = json.loads(args.config.read_text())
        kwargs = kwargs.get("kwargs", kwargs)
        config = UNetConfig.from_dict(kwargs) if kind is ModelKind.DDPM else SPARNetConfig.from_dict(kwargs)
    out = import_checkpoint(args.file, kind=kind, out_dir=args.out, config=config)
    meta = json.loads((out / "config.json").read_text()) if out.is_dir() else {}
    print(f"imported {args.file} -> {out} (sha256 {meta.get('sha256', '?')})")
    return 0


def default_fixture_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dr2_reference"


def cmd_verify(args: argparse.Namespace) -> int:
    from dr2.verify import format_table, verify_fixtures

    folder = args.dir or default_fixture_dir()
    if not folder.is_dir():
        print(f"no fixture folder at {folder}", file=sys.stderr)
        return 2
    results = verify_fixtures(folder)
    print(format_table(results))
    return 0 if results and all(r.passed for r in results) else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.submit import cmd_submit as submit_job

    return submit_job(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from jobs.bench import cmd_bench

    return cmd_bench(args)


COMMANDS = {"restore": cmd_restore, "demo": cmd_demo, "restore-faces": cmd_restore_faces, "weights": cmd_weights,
            "verify-fixtures": cmd_verify, "bench": _cmd_bench}
COMMANDS["submit"] = cmd_submit  # jobs/submit.py
COMMANDS["nightly"] = cmd_nightly
COMMANDS["check-output"] = cmd_check_output


def cmd_estimate(args: argparse.Namespace) -> int:
    from jobs.estimate import DEFAULT_MFU, estimate, format_estimate, to_json
    from pipeline.capacity import ClusterShape

    logging.getLogger().setLevel(logging.WARNING)  # the sample's per-row warnings are not the estimate
    cfg = dataclass_from_args(PipelineConfig, args, src=args.src, dst=args.dst)
    cluster = None
    if args.cpus is not None or args.gpus is not None:
        import os

        cluster = ClusterShape(cpus=args.cpus if args.cpus is not None else float(os.cpu_count() or 1),
                               gpus=args.gpus or 0.0)
    result = estimate(cfg, cluster=cluster, gpu_type=args.gpu_type, mfu=args.mfu or DEFAULT_MFU,
                      restorer_faces_per_s=args.restorer_faces_per_s, sample_units_n=args.sample_units,
                      sample_images=args.sample_images, seed=args.sample_seed)
    print(to_json(result) if args.json else format_estimate(result))
    return 0


COMMANDS["estimate"] = cmd_estimate


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(prog="dr2", add_help=False)
    pre.add_argument("--preset")  # no choices here: an unknown preset is refused by the command's own parser
    known, _ = pre.parse_known_args(argv)
    # the restore and nightly commands take these defaults (explicit --N/--tau still win)
    preset = load_preset(known.preset) if known.preset in PRESETS else None
    args = build_parser(preset).parse_args(argv)
    # our records one line each (``dr2: warning: ...``), other libraries' from WARNING up; -v: everything, timestamped
    setup_logging(verbose=args.verbose, quiet=bool(getattr(args, "quiet", False)))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (pipeline/stopping.py): one line, 130 or 143
        print(stopping.final_line(args.command), file=sys.stderr)
        sys.stderr.flush()
        stopping.said()
        return stopping.exit_code()
    except Exception as e:  # noqa: BLE001 - the CLI's job: one line a person can act on (-v for the traceback)
        if args.verbose:
            raise
        print(f"dr2 {args.command}: error: {explain(e)}", file=sys.stderr)
        return 2


def explain(e: BaseException) -> str:
    """One line for an error, with what to do about it where we know."""
    import errno

    from jobs.restore import one_line
    from pipeline.leases import LeaseHeld

    if isinstance(e, LeaseHeld):
        return f"{e} (pass --wait SECONDS to wait for it)"
    if type(e).__name__ == "StageDiedError":  # pipeline.build's, named so that an error does not import Ray
        return (f"{e}. Units committed before are intact; a rerun resumes. To see why it died, rerun with "
                "-v --ray-logs (and check the memory of the machine: dmesg | grep -i oom).")
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
        where = getattr(e, "filename", None) or "the output"
        return (f"no space left on device ({where}): free space or choose another DST; committed units are intact "
                "and a rerun resumes")
    if isinstance(e, NotADirectoryError | FileExistsError):
        return f"{e}: DST (or a folder on its path) is a file; choose a folder"
    text = one_line(e)
    if "RayActorError" in text or "ActorDiedError" in text or "ActorUnavailable" in text:
        return (f"{text}. A stage's actor kept dying (out of memory? a crash in a model?); units committed before "
                "are intact. Rerun with -v --ray-logs to see its logs.")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
