"""Benchmark the DR2 face path: UNet forwards/s, faces/s, FLOPs per face and achieved TFLOP/s.

The full table (pipeline row, batch-1 baseline, MFU, several precisions and batch sizes) is ``dr2 bench``
(jobs/bench.py); this script stays for quick single-configuration runs and for real model directories.

Not a test: a script that prints one table. Models are seeded random (``--config tiny|full``) unless model
directories from ``dr2 weights import`` are given (``--ddpm-dir``, ``--enhancer-dir``); speed does not depend
on the weight values.

    python benchmarks/bench_dr2.py --config tiny --device cpu --batch-size 4 --N 4 --tau 60
    python benchmarks/bench_dr2.py --config full --device cuda --dtype bf16 --batch-size 16 --N 4 --tau 22

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, 2 FLOPs per
multiply-add; resizes, norms and pointwise ops are not counted) over one restore of the batch. A face costs
``omega - tau + 1`` UNet forwards at the DDPM size plus one enhancer forward, with omega from the official rule.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dr2.diffusion import default_omega
from dr2.restorer import FACE_SIZE, DR2Restorer
from dr2.sparnet import SPARNetConfig, SPARNetHD
from dr2.unet import UNetConfig, UNetModel


def build_restorer(args: argparse.Namespace) -> DR2Restorer:
    kw = {"device": args.device, "precision": args.dtype, "batch_size": args.batch_size}
    if args.ddpm_dir is not None:
        return DR2Restorer.from_dirs(args.ddpm_dir, args.enhancer_dir, seed=0, **kw)
    if args.config == "tiny":
        return DR2Restorer.tiny_random(weights_seed=0, enhancer=not args.no_enhancer, **kw)
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig())
    enhancer = None if args.no_enhancer else SPARNetHD.random(SPARNetConfig(), seed=0)
    return DR2Restorer(unet=unet, enhancer=enhancer, seed=0, **kw)  # type: ignore[arg-type]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=["tiny", "full"], default="tiny")
    p.add_argument("--ddpm-dir", type=Path, default=None, help="model dir of the DDPM (overrides --config)")
    p.add_argument("--enhancer-dir", type=Path, default=None, help="model dir of SPARNetHD (with --ddpm-dir)")
    p.add_argument("--no-enhancer", action="store_true", help="bicubic up to 512 instead of SPARNetHD")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--N", type=int, default=4)
    p.add_argument("--tau", type=int, default=22)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    restorer = build_restorer(args)
    B = args.batch_size
    omega = default_omega(args.N, args.tau)
    steps = omega - args.tau + 1
    S = restorer.ddpm_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, S, S, generator=g).to(device)
    t = torch.full((B,), 500, dtype=torch.long, device=device)
    faces = np.random.default_rng(0).integers(0, 256, (B, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    keys = [f"bench/{i}" for i in range(B)]

    def unet_forward() -> None:
        restorer.denoise(x, t)

    def restore() -> None:
        restorer.restore(faces, keys, N=args.N, tau=args.tau)

    unet_s = timed(unet_forward, device=device, warmup=args.warmup, repeats=args.repeats)
    face_s = timed(restore, device=device, warmup=args.warmup, repeats=args.repeats)
    unet_flops = count_flops(unet_forward) / B
    face_flops = count_flops(restore) / B
    faces_per_s = B / face_s

    rows = [
        ("config", args.config if args.ddpm_dir is None else str(args.ddpm_dir)),
        (
            "device / dtype",
            f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
            f"/ {args.dtype}, {torch.get_num_threads()} CPU threads",
        ),
        ("DDPM / enhancer size", f"{S} / {restorer.enhancer_size if restorer.enhancer is not None else 'none'}"),
        ("batch, N, tau, omega", f"{B}, {args.N}, {args.tau}, {omega} ({steps} UNet forwards per face)"),
        ("UNet forward (batch)", f"{unet_s * 1e3:.1f} ms"),
        ("UNet forwards/s (batches)", f"{1 / unet_s:.2f}"),
        ("UNet images/s", f"{B / unet_s:.2f}"),
        ("UNet GFLOP per image", f"{unet_flops / 1e9:.3f}"),
        ("restore (batch)", f"{face_s:.3f} s"),
        ("faces/s", f"{faces_per_s:.3f}"),
        ("GFLOP per face", f"{face_flops / 1e9:.3f}"),
        ("achieved TFLOP/s (UNet)", f"{unet_flops * B / unet_s / 1e12:.4f}"),
        ("achieved TFLOP/s (face path)", f"{face_flops * faces_per_s / 1e12:.4f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
