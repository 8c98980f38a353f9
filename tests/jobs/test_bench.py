"""``dr2 bench`` (jobs/bench.py): FLOP counts against the issue's figures, the table, the archive it builds, and
one tiny bare run on CPU. Speeds are printed by the bench, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import webdataset as wds

from dr2.sparnet import SPARNetConfig
from dr2.unet import UNetConfig
from jobs.bench import BenchOptions, _count_faces, build_archive, count_flops, markdown, run_bench, spec_peak
from jobs.cli import build_parser


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
