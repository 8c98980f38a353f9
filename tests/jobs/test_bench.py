"""``dr2 bench`` (jobs/bench.py): FLOP counts against the issue's figures, the table, the archive it builds, one
tiny bare run on CPU, the per-device defaults and the busy fractions read from a run report. Speeds are printed
by the bench, never asserted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from dr2.sparnet import SPARNetConfig
from dr2.unet import UNetConfig
from jobs.bench import (
    BenchOptions,
    _count_faces,
    build_archive,
    busy_fractions,
    count_flops,
    markdown,
    options_from_args,
    run_bench,
    spec_peak,
)
from jobs.parser import add_bench_arguments, build_parser


def test_full_size_flops_match_the_issue() -> None:
    unet, enhancer = count_flops(UNetConfig(), SPARNetConfig())
    assert round(unet / 1e9, 1) == 387.9  # per UNet call at 256 px
    assert round(enhancer / 1e9, 1) == 1447.1  # per SPARNetHD pass at 512 px
    assert round((26 * unet + enhancer) / 1e12, 2) == 11.53  # N=8, tau=35: omega=60, 26 calls


def test_spec_peaks_and_stats_markers() -> None:
    assert spec_peak(torch.device("cpu"), "bf16")[1] is None
    assert _count_faces({"faces": 3, "samples": 5}) == 3
    assert _count_faces({"counts": {"faces": 7}}) == 7 and _count_faces({}) == 0


def test_archive_holds_degraded_photos(tmp_path: Path) -> None:
    root = build_archive(tmp_path / "a", 3)
    keys = [s["__key__"] for p in sorted(root.glob("*.tar")) for s in wds.WebDataset(str(p), shardshuffle=False)]
    assert keys == ["face_0000", "face_0001", "face_0002"]


@pytest.mark.slow  # a real (tiny) benchmark run: UNet forwards, the restorer and the batch-1 baseline
def test_tiny_bare_run_and_table(tmp_path: Path) -> None:
    opts = BenchOptions(device="cpu", precisions=("fp32",), batch_sizes=(2,), skip_pipeline=True, N=1, tau=94,
                        repeats=1, baseline_faces=1)
    result = run_bench(opts)
    (row,) = result["rows"]
    assert row["batch"] == 2 and row["restorer_faces_per_s"] > 0 and row["unet_tflops"] > 0
    assert row["mfu_spec"] is None and 0 < row["mfu_measured"]
    assert result["header"]["UNet calls per face"] == 6  # N=1: omega = tau + 5
    md = markdown(result)
    assert "| fp32 | 2 |" in md and "n/a" in md
    json.dumps(result, default=str)


def test_cli_registers_bench() -> None:
    args = build_parser().parse_args(["bench", "--device", "cpu", "--precision", "fp32,bf16", "--batch-size", "1,8",
                                      "--skip-pipeline", "--out", "x"])
    assert args.command == "bench" and args.precision == "fp32,bf16" and args.skip_pipeline


def _options(*argv: str) -> BenchOptions:
    return options_from_args(build_parser().parse_args(["bench", *argv]))


def test_cpu_default_is_small_and_full_brings_the_matrix_back() -> None:
    small = _options("--device", "cpu")
    assert (small.precisions, small.batch_sizes, small.repeats) == (("fp32",), (1, 4), 1)
    assert (small.pipeline_images, small.pipeline_rows, small.baseline_faces) == (4, "last", 2)
    for full in (_options("--device", "cpu", "--full"), _options("--device", "cuda")):
        assert (full.precisions, full.batch_sizes, full.repeats) == (("fp32", "bf16"), (1, 4, 8), 2)
        assert (full.pipeline_images, full.pipeline_rows, full.baseline_faces) == (0, "every", 4)
    explicit = _options("--device", "cpu", "--batch-size", "2,8", "--repeats", "3")
    assert (explicit.precisions, explicit.batch_sizes, explicit.repeats, explicit.pipeline_rows) == (
        ("fp32", "bf16"), (2, 8), 3, "every")
    assert _options("--device", "cpu", "--precision", "bf16", "--pipeline-images", "6").pipeline_images == 6
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    help_text = parser.format_help()
    assert "CPU (a few minutes): --precision fp32 --batch-size 1,4" in " ".join(help_text.split())


def test_busy_fractions_from_the_run_report(tmp_path: Path) -> None:
    assert busy_fractions(tmp_path) == {"restore": None, "detect": None}  # no report: n/a
    folder = tmp_path / "_dr2" / "report"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"run": {}}))
    assert busy_fractions(tmp_path) == {"restore": None, "detect": None}  # a report from before "busy"
    busy = {"restore": {"actors": 1, "busy_s": 9.0, "wall_s": 12.0, "fraction": 0.75},
            "detect": {"actors": 2, "busy_s": 3.0, "wall_s": 24.0, "fraction": 0.125}}
    (folder / "report.json").write_text(json.dumps({"run": {}, "busy": busy}))
    assert busy_fractions(tmp_path) == {"restore": 0.75, "detect": 0.125}
    head = {k: "" for k in ("device", "card", "models", "torch", "N/tau/omega", "UNet calls per face",
                            "GFLOP per UNet call", "GFLOP per enhancer pass", "TFLOP per face",
                            "measured peak TFLOP/s", "spec peak TFLOP/s", "compile", "pipeline", "baseline")}
    rows = [{"precision": "fp32", "batch": 1}, {"precision": "fp32", "batch": 4, "pipeline_restore_busy": 0.75,
                                                  "pipeline_detect_busy": 0.125}]
    md = markdown({"header": head, "rows": rows}).splitlines()
    header = [c.strip() for c in md[-4].split("|")]
    first, second = ([c.strip() for c in line.split("|")] for line in md[-2:])
    assert (first[header.index("restore busy")], first[header.index("detect busy")]) == ("n/a", "n/a")
    assert (second[header.index("restore busy")], second[header.index("detect busy")]) == ("75%", "12%")
