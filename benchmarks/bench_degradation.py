"""The per-face degradation estimate (``pipeline/imaging/degradation.py``): its cost per face and its calibration table.

    .venv/bin/python benchmarks/bench_degradation.py [--repeats 5] [--measures]

Builds the calibration set of ``tests/pipeline/test_degradation.py`` (real face photos degraded in the photo along
known ladders, detected with the project's MTCNN and aligned as the pipeline does), then prints:

* the estimate's cost per face in ms on one thread (CPU time of the process, and wall time: on a loaded machine
  the wall time also counts other jobs), the best of ``--repeats`` passes over all faces;
* per ladder and face, the score (equivalent low-pass factor at the 512 crop) and verdict at every level
  (C clean, m mild, M moderate, S severe, - not detected), the Spearman correlation between score and level,
  and the Spearman over all faces of the score relative to the face's undegraded score; ``--measures`` adds the
  resolution, noise and blocking readings under each row;
* the clean set (undegraded faces of 200 px and more): each face's readings and the share judged clean;
* the faces downscaled by 8 or more: how many are judged clean, and the share judged moderate or severe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.pipeline

from pipeline.imaging.degradation import ESTIMATOR_VERSION, DegradationThresholds, Verdict, estimate_degradation  # noqa: E402
from tests.pipeline.test_degradation import (  # noqa: E402
    DOWNSCALED_8,
    LADDER_FACES,
    LADDERS,
    calibration_samples,
    pipeline_detector,
    severity_level,
    single_threaded,
    spearman,
)

SHORT = {Verdict.CLEAN: "C", Verdict.MILD: "m", Verdict.MODERATE: "M", Verdict.SEVERE: "S"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes over all faces (the best is reported)")
    ap.add_argument("--measures", action="store_true", help="print resolution / noise / blocking per level")
    ap.add_argument("--mixed", type=int, default=0, metavar="N",
                    help="also run `dr2 restore --preset auto --restorer tiny` over a mixed folder of N photos (clean, "
                    "downscaled x4/x8, noisy, JPEG q15) and print verdicts, faces skipped and the restorer time saved")
    args = ap.parse_args()
    if args.mixed:
        mixed_archive_savings(args.mixed)
        return
    t = DegradationThresholds()
    with single_threaded():
        t0 = time.perf_counter()
        detector, opts = pipeline_detector()
        samples = calibration_samples(detector, opts)
        found = [s for s in samples if s.crop is not None]
        print(f"calibration set: {len(samples)} photos, {len(found)} faces detected and aligned "
              f"({time.perf_counter() - t0:.1f} s)")
        crops = [s.crop for s in found if s.crop is not None]
        cpu, wall = [], []
        for _ in range(args.repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            estimates = [estimate_degradation(c, t) for c in crops]
            cpu.append((time.process_time() - c0) / len(crops) * 1e3)
            wall.append((time.perf_counter() - w0) / len(crops) * 1e3)
    print(f"estimator {ESTIMATOR_VERSION}, thresholds clean <= {t.clean_max_factor}, mild <= {t.mild_max_factor}, "
          f"moderate <= {t.moderate_max_factor}, severe above")
    print(f"cost per face, one thread: {min(cpu):.2f} ms CPU (median {statistics.median(cpu):.2f}), "
          f"{min(wall):.2f} ms wall, over {len(crops)} faces x {args.repeats}")
    by_key = {(s.face, s.ladder, s.level): e for s, e in zip(found, estimates, strict=True)}

    for ladder in LADDERS:
        print(f"\n== {ladder.name} ({ladder.unit}): " + " ".join(f"{lv:>6g}" for lv in ladder.levels))
        rel: list[float] = []
        lv_all: list[float] = []
        for face in LADDER_FACES:
            got = [(lv, by_key.get((face, ladder.name, float(lv)))) for lv in ladder.levels]
            seen = [(lv, e) for lv, e in got if e is not None]
            levels = np.array([severity_level(ladder, lv) for lv, _ in seen])
            rho = spearman(np.array([e.score for _, e in seen]), levels)
            cells = " ".join("     -" if e is None else f"{e.score:5.1f}{SHORT[e.verdict]}" for _, e in got)
            print(f"  {face:13s} {cells}   rho {rho:.3f}")
            if args.measures:
                for name in ("resolution", "noise", "blocking"):
                    vals = " ".join("     -" if e is None else f"{getattr(e, name):6.1f}" for _, e in got)
                    print(f"  {'  ' + name:13s} {vals}")
            base = seen[0][1].score
            rel += [e.score / base for _, e in seen]
            lv_all += [severity_level(ladder, lv) for lv, _ in seen]
        print(f"  all faces, score / undegraded score: rho {spearman(np.array(rel), np.array(lv_all)):.3f}")

    clean = [(s, e) for s, e in zip(found, estimates, strict=True) if s.ladder == "clean"]
    n_photos = sum(s.ladder == "clean" for s in samples)
    print(f"\n== clean set: undegraded faces of 200 px and more ({len(clean)} of {n_photos} detected)")
    for s, e in clean:
        assert s.box is not None
        side = max(s.box[2] - s.box[0], s.box[3] - s.box[1])
        print(f"  {s.face:16s} box {side:4.0f} px  score {e.score:5.2f} {e.verdict.value:8s} resolution "
              f"{e.resolution:5.2f}  noise {e.noise:4.2f}  blocking {e.blocking:4.1f} dB")
    n_clean = sum(e.verdict is Verdict.CLEAN for _, e in clean)
    scores = [e.score for _, e in clean]
    print(f"  judged clean: {n_clean}/{len(clean)} = {n_clean / max(1, len(clean)):.0%}; scores {min(scores):.2f} .. "
          f"{max(scores):.2f} (clean limit {t.clean_max_factor})")

    hard = [(s, e) for s, e in zip(found, estimates, strict=True) if (s.ladder, s.level) in DOWNSCALED_8]
    n_hard_clean = sum(e.verdict is Verdict.CLEAN for _, e in hard)
    strong = sum(e.verdict in (Verdict.MODERATE, Verdict.SEVERE) for _, e in hard)
    print(f"\n== downscaled by 8 or more (downscale 8/12/16, mix 8/16): {len(hard)} faces detected; clean "
          f"{n_hard_clean}; moderate or severe {strong}/{len(hard)} = {strong / max(1, len(hard)):.0%}; lowest score "
          f"{min(e.score for _, e in hard):.1f}")
    missing = [(s.face, s.ladder, s.level) for s in samples if s.crop is None]
    print(f"not detected (not estimated): {missing}")


def mixed_archive_savings(n: int) -> None:
    """A mixed folder through the real job with per-face strength: what the estimate decided and what it saved."""
    import json
    import shutil
    import subprocess
    import tempfile

    import cv2

    from tests.jobs.archive import encode
    from tests.pipeline.photos import degrade, grace_hopper

    root = Path(tempfile.mkdtemp(prefix="bench-degradation-"))
    src = root / "in"
    src.mkdir()
    photo = grace_hopper()
    kinds = ("clean", "x4", "x8", "noise", "jpeg15")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "clean":
            img = photo
        elif kind in ("x4", "x8"):
            img = degrade(photo, int(kind[1:]), seed=i)
        elif kind == "noise":
            rng = np.random.default_rng(i)
            img = np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
        else:
            ok, buf = cv2.imencode(".jpg", photo[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 15])
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
        (src / f"{i:03d}_{kind}.png").write_bytes(encode(np.ascontiguousarray(img), "PNG"))
    dr2 = str(Path(sys.executable).with_name("dr2"))
    t0 = time.perf_counter()
    out = subprocess.run([dr2, "restore", str(src), str(root / "out"), "--preset", "auto", "--restorer", "tiny",
                          "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return
    report = json.loads((root / "out" / "_dr2" / "report" / "report.json").read_text())
    deg = report.get("degradation", {})
    print(f"mixed folder: {n} photos ({', '.join(kinds)} in turn), dr2 restore --preset auto --restorer tiny: "
          f"{wall:.1f} s")
    print(f"  verdicts {deg.get('verdicts')}; faces skipped {deg.get('skipped')}; restorer time saved "
          f"{deg.get('saved_seconds')} s of {report['stage_seconds'].get('restore')} s spent restoring")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
