"""The ``dr2`` command line's commands: each parses nothing itself (``jobs/parser.py`` builds the parser and
holds the overview ``dr2 --help`` prints) and turns what the library returns into lines and exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from jobs.configargs import dataclass_from_args
from jobs.parser import build_parser
from pipeline.config import PRESETS, PipelineConfig, load_preset
from pipeline.runner import stopping
from pipeline.runner.console import setup_logging

log = logging.getLogger("dr2")

# --------------------------------------------------------------------------------------------- commands


def cmd_restore(args: argparse.Namespace) -> int:
    from pipeline.graph.models import model_identity
    from pipeline.runner.loop import plan_units, run_restore, select_todo

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
    with stopping.handling("restore", grace_s=cfg.stop_grace):  # Ctrl-C, SIGTERM: pipeline/runner/stopping.py
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
    from pipeline.runner import nightly_state as ns

    if args.history:
        print(ns.format_history(ns.NightlyState(args.history), last=args.last))
        return 0
    if not (args.src and args.dst and args.state):
        raise ValueError("dr2 nightly needs SRC DST --state STATE_URI (or --history STATE_URI)")
    from pipeline.runner.nightly import run_nightly_job

    cfg = dataclass_from_args(PipelineConfig, args, src=args.src, dst=args.dst)
    with stopping.handling("nightly", grace_s=cfg.stop_grace):  # Ctrl-C, SIGTERM: pipeline/runner/stopping.py
        record = run_nightly_job(cfg, args.state, max_attempts=args.max_attempts,
                                 retry_quarantined=args.retry_quarantined, wave=args.wave)
    print(ns.summary_line(record, args.state))
    return ns.exit_code(record)


def cmd_check_output(args: argparse.Namespace) -> int:
    from jobs.check import check_output, format_checks
    from pipeline.store.storage import StorageOptions

    checks = check_output(args.dst, options=StorageOptions(endpoint_url=args.endpoint_url))
    print(format_checks(checks))
    return 0 if checks and all(c.ok for c in checks) else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import build_demo_archive, write_detection_preview, write_preview
    from pipeline.config import RestorerKind
    from pipeline.runner.loop import run_restore

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

    return submit_job(args, build_parser())


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
    from pipeline.graph.capacity import ClusterShape

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
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (pipeline/runner/stopping.py): one line, 130 or 143
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

    from pipeline.runner.loop import one_line
    from pipeline.store.leases import LeaseHeld

    if isinstance(e, LeaseHeld):
        return f"{e} (pass --wait SECONDS to wait for it)"
    if type(e).__name__ == "StageDiedError":  # pipeline.graph.build's, named so that an error does not import Ray
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


def entry() -> None:
    """The ``dr2`` command (and ``python -m jobs.cli``): :func:`main`, then the process ends with its status through
    :func:`pipeline.runner.stopping.end_process`: a command that used Ray ends with its own teardown of Ray, not
    Ray's shutdown at exit (2.8 s of every run, and it could turn a stopped run's 130/143 into 1)."""
    stopping.end_process(main())


if __name__ == "__main__":
    entry()
