"""Check this implementation against the golden fixtures produced by the official DR2 code.

``verify_fixtures(DIR)`` runs every fixture it finds in ``DIR`` (the layout of ``tests/fixtures/dr2_reference``,
whose README documents each array) through the code paths the pipeline uses, and returns one
:class:`FixtureResult` per compared array:

* ``manifest/*``: full-size state-dict keys and shapes of ``UNetConfig()`` / ``SPARNetConfig()`` vs the official
  models (exact);
* ``unet_small/*``, ``sparnethd_small/*``: the fixture weights written as an official flat ``torch.save``
  checkpoint, imported with :func:`dr2.weights.import_checkpoint`, loaded with :func:`dr2.weights.load_model_dir`,
  run in eval mode (model outputs < 1e-5, the timestep embedding < 2e-5);
* ``resizer/*``: :class:`dr2.lowpass.LowPass` down and Phi_N outputs (< 1e-6), tap weights (1 ulp) and indices
  (exact);
* ``respacing/*``: :class:`dr2.diffusion.SpacedDiffusion` schedule arrays (float64 < 1e-12, float32 1 ulp,
  elementwise), ``timestep_map`` and the omega tables of :func:`dr2.diffusion.default_omega` (exact);
* ``trajectory/*``: :func:`dr2.sampling.dr2_sample` with the recorded noise replayed, every per-step array
  (< 1e-5) and the UNet timesteps (exact).

Errors are ``max|a - ref| / max|ref|`` per array (README section 7) unless the name says elementwise. The
tolerances are the README's. A fixture that cannot be run (missing array, exception) is a failed result with
the reason in ``detail``, never a crash of the whole check.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dr2.diffusion import SpacedDiffusion, default_omega
from dr2.lowpass import LowPass, resize_taps
from dr2.sampling import ReplayNoise, dr2_sample
from dr2.sparnet import SPARNetConfig
from dr2.unet import UNetConfig, timestep_embedding
from dr2.weights import ModelKind, build_model, import_checkpoint, load_model_dir

log = logging.getLogger(__name__)

TOL_MODEL = 1e-5  # UNet / SPARNetHD outputs, every trajectory array
TOL_TEMB = 2e-5  # float32 argument rounding at t = 999
TOL_RESIZER = 1e-6
TOL_ULP32 = float(np.finfo(np.float32).eps)  # 1 ulp, elementwise relative
TOL_F64 = 1e-12
EXACT = 0.0


@dataclass(frozen=True)
class FixtureResult:
    """One compared array: ``passed`` iff ``max_rel_error <= tolerance``."""

    name: str
    max_rel_error: float
    tolerance: float
    passed: bool
    detail: str = ""


def _rel(a: np.ndarray | torch.Tensor, ref: np.ndarray) -> float:
    """max|a - ref| / max|ref| in float64 (inf on a shape mismatch)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.shape != ref.shape:
        return float("inf")
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - ref.astype(np.float64)).max() / scale)


def _rel_elementwise(a: np.ndarray, ref: np.ndarray) -> float:
    """max over elements of |a - ref| / |ref| (|ref| floored at the smallest normal float64)."""
    if a.shape != ref.shape:
        return float("inf")
    den = np.maximum(np.abs(ref.astype(np.float64)), np.finfo(np.float64).tiny)
    return float((np.abs(a.astype(np.float64) - ref.astype(np.float64)) / den).max())


def _result(name: str, err: float, tol: float, detail: str = "") -> FixtureResult:
    return FixtureResult(name, err, tol, bool(err <= tol), detail)


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _load_via_import(weights_npz: Path, kind: ModelKind, config: UNetConfig | SPARNetConfig) -> torch.nn.Module:
    """Fixture weights -> official flat torch.save checkpoint -> import_checkpoint -> load_model_dir."""
    state = {k: torch.from_numpy(v) for k, v in _npz(weights_npz).items()}
    with tempfile.TemporaryDirectory(prefix="dr2-verify-") as tmp:
        ckpt = Path(tmp) / f"{weights_npz.stem}.pth"
        torch.save(state, ckpt)
        out = import_checkpoint(ckpt, kind=kind, out_dir=Path(tmp) / kind.value, config=config)
        model, _ = load_model_dir(out, expected_kind=kind)
    return model


# --- one function per fixture family; each yields results -------------------------------------------------------


def _check_manifest(path: Path, kind: ModelKind) -> Iterator[FixtureResult]:
    manifest = json.loads(path.read_text())
    name = f"manifest/{path.stem.removesuffix('_manifest')}"
    if kind is ModelKind.DDPM:
        config: UNetConfig | SPARNetConfig = UNetConfig.from_dict(manifest["config"])
    else:
        config = SPARNetConfig.from_dict(manifest["config"])
    model = build_model(kind, config, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = {k: list(v) for k, v in manifest["params"].items()}
    missing = [k for k in ref if k not in ours]
    extra = [k for k in ours if k not in ref]
    shapes = [k for k in ref if k in ours and ours[k] != ref[k]]
    ok = not (missing or extra or shapes)
    detail = f"{len(ours)} entries" if ok else f"missing {missing[:3]}, unexpected {extra[:3]}, shapes {shapes[:3]}"
    yield _result(name, 0.0 if ok else float("inf"), EXACT, detail)


def _check_unet(d: Path) -> Iterator[FixtureResult]:
    cfg = UNetConfig.from_dict(json.loads((d / "unet_small_config.json").read_text())["kwargs"])
    model = _load_via_import(d / "unet_small_weights.npz", ModelKind.DDPM, cfg)
    io = _npz(d / "unet_small_io.npz")
    t = torch.from_numpy(io["t"])
    with torch.no_grad():
        out = model(torch.from_numpy(io["x"]), t)
    yield _result("unet_small/out", _rel(out, io["out"]), TOL_MODEL)
    temb = timestep_embedding(t, cfg.model_channels)
    yield _result("unet_small/temb", _rel(temb, io["temb"]), TOL_TEMB)


def _check_sparnethd(d: Path) -> Iterator[FixtureResult]:
    cfg = SPARNetConfig.from_dict(json.loads((d / "sparnethd_small_config.json").read_text())["kwargs"])
    model = _load_via_import(d / "sparnethd_small_weights.npz", ModelKind.SPARNETHD, cfg)
    io = _npz(d / "sparnethd_small_io.npz")
    with torch.no_grad():
        out = model(torch.from_numpy(io["x"]))
    yield _result("sparnethd_small/out", _rel(out, io["out"]), TOL_MODEL)


def _check_resizer(d: Path) -> Iterator[FixtureResult]:
    z = _npz(d / "resizer.npz")
    x = torch.from_numpy(z["x"])
    size = int(x.shape[-1])
    for N in sorted(int(k.removeprefix("lowpass_N")) for k in z if k.startswith("lowpass_N")):
        lp = LowPass(image_size=size, N=N)
        with torch.no_grad():
            yield _result(f"resizer/down_N{N}", _rel(lp.down(x), z[f"down_N{N}"]), TOL_RESIZER)
            yield _result(f"resizer/lowpass_N{N}", _rel(lp(x), z[f"lowpass_N{N}"]), TOL_RESIZER)
        for which, n_in, n_out, scale in (("down", size, size // N, 1 / N), ("up", size // N, size, float(N))):
            w, fov = resize_taps(n_in, n_out, scale, antialiasing=scale < 1)
            for dim in (2, 3):  # square images: both axes use the same taps
                ref_w, ref_fov = z[f"{which}_N{N}_weights_dim{dim}"], z[f"{which}_N{N}_fov_dim{dim}"]
                yield _result(f"resizer/{which}_N{N}_weights_dim{dim} (elementwise)", _ulps(w, ref_w), 1.0, "ulps")
                yield _result(f"resizer/{which}_N{N}_fov_dim{dim}", 0.0 if np.array_equal(fov, ref_fov) else 1.0, EXACT)


def _ulps(a: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference in float32 units in the last place (inf on a shape mismatch)."""
    if a.shape != ref.shape:
        return float("inf")
    spacing = np.spacing(np.abs(ref.astype(np.float32))).astype(np.float64)
    return float((np.abs(a.astype(np.float64) - ref.astype(np.float64)) / spacing).max())


def _check_respacing(d: Path) -> Iterator[FixtureResult]:
    z = _npz(d / "respacing.npz")
    diff = SpacedDiffusion(section=(100,))
    ok = np.array_equal(diff.timestep_map, z["timestep_map"])
    yield _result("respacing/timestep_map", 0.0 if ok else 1.0, EXACT)
    yield _result(
        "respacing/base_betas_f64 (elementwise)", _rel_elementwise(diff.base_betas, z["base_betas_f64"]), TOL_F64
    )
    for key in sorted(k for k in z if k.endswith("_f64") and k != "base_betas_f64"):
        name = key.removesuffix("_f64")
        ours = np.asarray(getattr(diff, name), dtype=np.float64)
        yield _result(f"respacing/{key} (elementwise)", _rel_elementwise(ours, z[key]), TOL_F64)
        if name in z:
            ours32 = ours.astype(np.float32)
            yield _result(f"respacing/{name} (elementwise)", _rel_elementwise(ours32, z[name]), TOL_ULP32)
    for prefix in ("omega", "omega_ext"):
        Ns, taus, table = z[f"{prefix}_N"], z[f"{prefix}_tau"], z[f"{prefix}_table"]
        ours_t = np.array([[default_omega(int(n), int(t)) for t in taus] for n in Ns], dtype=np.int64)
        yield _result(f"respacing/{prefix}_table", 0.0 if np.array_equal(ours_t, table) else 1.0, EXACT)


def _check_trajectory(d: Path) -> Iterator[FixtureResult]:
    params = json.loads((d / "dr2_trajectory.json").read_text())["params"]
    z = _npz(d / "dr2_trajectory.npz")
    cfg = UNetConfig.from_dict(json.loads((d / "unet_small_config.json").read_text())["kwargs"])
    model = _load_via_import(d / "unet_small_weights.npz", ModelKind.DDPM, cfg)
    draws = [torch.from_numpy(z[k]) for k in sorted(k for k in z if k.startswith("noise_"))]
    noise = ReplayNoise(draws)
    diffusion = SpacedDiffusion(section=tuple(params["section"]))
    N, tau, omega = int(params["N"]), int(params["tau"]), int(params["omega"])
    y = torch.from_numpy(z["y"])
    lowpass = LowPass(image_size=int(y.shape[-1]), N=N) if N > 1 else None
    trace: list[dict[str, torch.Tensor]] = []
    out = dr2_sample(model, y, diffusion, N=N, tau=tau, omega=omega, noise=noise, lowpass=lowpass, trace=trace)
    for k, step in enumerate(trace):
        for ours_key, ref_key in (
            ("x_in", "x_in"),
            ("model_out", "model_out"),
            ("pred_xstart", "pred_xstart"),
            ("sample", "sample"),
            ("x_lowpass", "x_lowpass"),
        ):
            ref_name = f"{ref_key}_{k:03d}"
            if ref_name in z:
                if ours_key not in step:
                    yield _result(f"trajectory/{ref_name}", float("inf"), TOL_MODEL, "not produced")
                else:
                    yield _result(f"trajectory/{ref_name}", _rel(step[ours_key], z[ref_name]), TOL_MODEL)
    yield _result("trajectory/out", _rel(out, z["out"]), TOL_MODEL)
    t_model = torch.stack([diffusion.model_timesteps(s["i"])[0] for s in trace]).numpy()
    ok = np.array_equal(t_model, z["t_model"]) and len(trace) == len(z["t_index"])
    yield _result("trajectory/t_model", 0.0 if ok else 1.0, EXACT, f"{len(trace)} steps")
    yield _result("trajectory/noise_consumed", float(noise.remaining), EXACT, f"{len(draws)} draws replayed")


# (family, files that must all exist, checker)
_FIXTURES: list[tuple[str, tuple[str, ...], Callable[[Path], Iterator[FixtureResult]]]] = [
    (
        "manifest/ddpm_unet",
        ("ddpm_unet_manifest.json",),
        lambda d: _check_manifest(d / "ddpm_unet_manifest.json", ModelKind.DDPM),
    ),
    (
        "manifest/sparnethd",
        ("sparnethd_manifest.json",),
        lambda d: _check_manifest(d / "sparnethd_manifest.json", ModelKind.SPARNETHD),
    ),
    ("unet_small", ("unet_small_config.json", "unet_small_weights.npz", "unet_small_io.npz"), _check_unet),
    (
        "sparnethd_small",
        ("sparnethd_small_config.json", "sparnethd_small_weights.npz", "sparnethd_small_io.npz"),
        _check_sparnethd,
    ),
    ("resizer", ("resizer.npz",), _check_resizer),
    ("respacing", ("respacing.npz",), _check_respacing),
    (
        "trajectory",
        ("dr2_trajectory.json", "dr2_trajectory.npz", "unet_small_config.json", "unet_small_weights.npz"),
        _check_trajectory,
    ),
]


def verify_fixtures(dir: Path) -> list[FixtureResult]:
    """Run every golden fixture found in ``dir``; raises FileNotFoundError if there is none."""
    d = Path(dir)
    results: list[FixtureResult] = []
    found = 0
    with torch.no_grad():
        for family, files, check in _FIXTURES:
            if not all((d / f).is_file() for f in files):
                continue
            found += 1
            try:
                results.extend(check(d))
            except Exception as e:  # a broken fixture is a failed check with its reason, not a crash
                log.exception("fixture %s could not be run", family)
                results.append(FixtureResult(family, float("inf"), 0.0, False, f"{type(e).__name__}: {e}"))
    if not found:
        raise FileNotFoundError(f"no DR2 golden fixtures in {d} (expected e.g. unet_small_io.npz, resizer.npz)")
    return results


def format_table(results: list[FixtureResult]) -> str:
    """A fixed-width table, one row per result, and a summary line."""
    rows: list[tuple[str, ...]] = [("fixture", "max rel err", "tolerance", "result", "detail")]
    for r in results:
        rows.append((r.name, f"{r.max_rel_error:.3g}", f"{r.tolerance:.3g}", "ok" if r.passed else "FAIL", r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed}/{len(results)} passed" + (f", {failed} FAILED" if failed else ""))
    return "\n".join(lines)


def summary(results: list[FixtureResult]) -> dict[str, Any]:
    """JSON-able form of the results (for a report file)."""
    return {
        "passed": all(r.passed for r in results),
        "results": [asdict(r) for r in results],
    }


# --- the same fixtures on another device or precision ------------------------------------------------------------

# Bands for the device check, max|a - ref| / max|ref| against the official fp32 CPU arrays. fp32 is the CPU
# tolerance with room for another summation order (GPU kernels); TF32 is switched off for the check.
# bf16/fp16: measured on CPU autocast (torch 2.13), stated in tests/dr2/test_fastpath.py, about 2x margin:
# UNet out bf16 1.35e-2, fp16 1.65e-3; SPARNetHD out bf16 1.20e-2, fp16 1.15e-3; trajectory out (replayed noise)
# bf16 2.7e-3, fp16 4.0e-4. fp32 on CPU: 0, 0, 3e-7.
DEVICE_BANDS: dict[str, dict[str, float]] = {
    "fp32": {"unet": 1e-4, "sparnethd": 1e-4, "trajectory": 1e-4},
    "bf16": {"unet": 3e-2, "sparnethd": 2.5e-2, "trajectory": 1e-2},
    "fp16": {"unet": 4e-3, "sparnethd": 2.5e-3, "trajectory": 1e-3},
}
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def verify_on_device(dir: Path, *, device: torch.device | str, precision: str = "fp32") -> list[FixtureResult]:
    """The model and trajectory fixtures run on ``device`` in ``precision`` (autocast as the restorer uses it,
    attention through SDPA), compared with the official fp32 arrays within :data:`DEVICE_BANDS`."""
    d, dev = Path(dir), torch.device(device)
    bands = DEVICE_BANDS[precision]
    tag = f"{dev.type}/{precision}"
    results: list[FixtureResult] = []

    def autocast() -> Any:
        if precision == "fp32":
            return torch.autocast(dev.type, enabled=False)
        return torch.autocast(dev.type, dtype=_AUTOCAST[precision])

    tf32_off = torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad(), tf32_off:
            cfg = UNetConfig.from_dict(json.loads((d / "unet_small_config.json").read_text())["kwargs"])
            unet = _load_via_import(d / "unet_small_weights.npz", ModelKind.DDPM, cfg).to(dev)
            unet.set_attention("sdpa")  # type: ignore[operator]
            io = _npz(d / "unet_small_io.npz")
            with autocast():
                out = unet(torch.from_numpy(io["x"]).to(dev), torch.from_numpy(io["t"]).to(dev))
            results.append(_result(f"{tag}/unet_small/out", _rel(out.float(), io["out"]), bands["unet"]))

            scfg = SPARNetConfig.from_dict(json.loads((d / "sparnethd_small_config.json").read_text())["kwargs"])
            spar = _load_via_import(d / "sparnethd_small_weights.npz", ModelKind.SPARNETHD, scfg).to(dev)
            sio = _npz(d / "sparnethd_small_io.npz")
            with autocast():
                sout = spar(torch.from_numpy(sio["x"]).to(dev))
            results.append(_result(f"{tag}/sparnethd_small/out", _rel(sout.float(), sio["out"]), bands["sparnethd"]))

            params = json.loads((d / "dr2_trajectory.json").read_text())["params"]
            z = _npz(d / "dr2_trajectory.npz")
            draws = [torch.from_numpy(z[k]).to(dev) for k in sorted(k for k in z if k.startswith("noise_"))]
            y = torch.from_numpy(z["y"]).to(dev)
            N = int(params["N"])
            lowpass = LowPass(image_size=int(y.shape[-1]), N=N).to(dev) if N > 1 else None
            with autocast():
                x0 = dr2_sample(unet, y, SpacedDiffusion(section=tuple(params["section"])), N=N,
                                tau=int(params["tau"]), omega=int(params["omega"]), noise=ReplayNoise(draws),
                                lowpass=lowpass)
            results.append(_result(f"{tag}/trajectory/out", _rel(x0.float(), z["out"]), bands["trajectory"]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return results
