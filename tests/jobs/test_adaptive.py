"""Per-face strength (issue 17, phase 2): the degradation estimate on every face, ``--preset auto`` (each face's
N/tau/omega from its verdict, one restorer call per setting) and ``--skip-clean`` (clean faces pasted back as they
are), end to end on a local Ray with the tiny random models, over a mixed folder of photos.

The tiny models run the presets' tau 22/35 (and N up to 16: their 64-px DDPM takes N = 16 as a divisor) like the
official ones; their faces are noise, which is all these tests need: settings, flags, counts and bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pytest
import torch

from dr2.restorer import DR2Restorer
from pipeline import schema as S
from pipeline.config import ADAPTIVE_SETTINGS, PipelineConfig, RestorerKind, load_preset
from pipeline.graph import stages
from pipeline.imaging.degradation import DegradationThresholds
from pipeline.runner.loop import RunSummary, run_restore
from tests.jobs.archive import encode, no_face_image
from tests.pipeline import photos

FACE = 512


def _downscaled(rgb: np.ndarray, f: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (round(w / f), round(h / f)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _noisy(rgb: np.ndarray, std: float) -> np.ndarray:
    rng = np.random.default_rng(17)
    return np.clip(rgb.astype(np.float32) + rng.normal(0.0, std, rgb.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder: a clean 200-px face (lossless), the same downscaled x8, with noise std 10, and no face."""
    root = tmp_path_factory.mktemp("mixed")
    g = photos.grace_hopper()
    (root / "a_clean.png").write_bytes(encode(g, "PNG"))
    (root / "b_x8.png").write_bytes(encode(_downscaled(g, 8), "PNG"))
    (root / "c_noisy.png").write_bytes(encode(_noisy(g, 10.0), "PNG"))
    (root / "d_noface.png").write_bytes(encode(no_face_image(), "PNG"))
    return root


def config(src: Path, dst: Path, **kw: Any) -> PipelineConfig:
    # detect_batch_size 1: MTCNN's boxes move by ~1e-5 px with the images batched beside a photo (a property of the
    # detector, not of the restorer), so detection batches are kept equal across the block sizes compared below
    base: dict[str, Any] = {"restorer": RestorerKind.TINY, "detect_batch_size": 1, "restore_batch_size": 4,
                            "images_per_chunk": 4, "overwrite": True, **load_preset("auto")}
    return PipelineConfig(src=str(src), dst=str(dst), **{**base, **kw})


def _manifest(dst: Path) -> dict[str, dict[str, Any]]:
    paths = sorted((dst / "_dr2" / "manifests").glob("*.jsonl"))
    lines = [json.loads(line) for p in paths for line in p.read_text().splitlines()]
    return {m["key"]: m for m in lines}


def _outputs(dst: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dst.glob("*.png"))}


@pytest.fixture(scope="module")
def auto_runs(ray_local: None, mixed: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, RunSummary]]:
    """Two runs of --preset auto on the local Ray: default blocks, and one row / one face per block."""
    out = []
    for kw in ({}, {"rows_per_block": 1, "faces_per_block": 1}):
        dst = tmp_path_factory.mktemp("auto")
        out.append((dst, run_restore(config(mixed, dst, **kw))))
    return out


def test_auto_preset_is_adaptive_and_skips_clean() -> None:
    cfg = PipelineConfig(**load_preset("auto"))
    assert cfg.adaptive and cfg.skips_clean
    assert not PipelineConfig().skips_clean and PipelineConfig(skip_clean=True).skips_clean
    assert cfg.face_setting("severe") == (16, 35, 65) and cfg.face_setting("mild") == (4, 22, 42)
    assert PipelineConfig(N=8, tau=35).face_setting("severe") == (8, 35, 60)  # not adaptive: the run's own
    assert PipelineConfig().degradation_thresholds() == DegradationThresholds()  # one set of defaults
    with pytest.raises(ValueError, match="clean-max-factor"):
        PipelineConfig(clean_max_factor=9.0)
    assert PipelineConfig().output_hash({}) != PipelineConfig(clean_max_factor=3.0).output_hash({})


def test_per_face_settings_follow_the_verdicts(auto_runs: list[tuple[Path, RunSummary]]) -> None:
    dst, summary = auto_runs[0]
    meta = _manifest(dst)
    assert meta["d_noface.png"]["status"] == "no_face" and meta["d_noface.png"]["faces"] == []
    verdicts = {}
    for key in ("a_clean.png", "b_x8.png", "c_noisy.png"):
        m = meta[key]
        assert m["status"] == "ok" and m["adaptive"] is True and len(m["faces"]) == 1, key
        face = m["faces"][0]
        v = face["degradation"]["verdict"]
        verdicts[key] = v
        assert (face["N"], face["tau"]) == ADAPTIVE_SETTINGS[v]
        assert face["omega"] == PipelineConfig(**load_preset("auto")).face_setting(v)[2]
        assert face["restored"] is (v != "clean")
        if v == "clean":
            assert face["reason"].startswith("clean: degradation score ") and face["reason"].endswith("<= 2.5")
            assert face["degradation"]["score"] <= 2.5
        else:
            assert "reason" not in face
    assert verdicts["a_clean.png"] == "clean"
    assert verdicts["b_x8.png"] in ("moderate", "severe")
    assert verdicts["c_noisy.png"] == "mild"
    # the run summary, its table, the stats marker and the report count the same
    assert summary.skipped == 1 and summary.saved_s > 0
    assert summary.verdicts == {"clean": 1, "mild": 1, verdicts["b_x8.png"]: 1}
    assert "skipped (clean)" in summary.table() and "degradation" in summary.table()
    stats = [json.loads(p.read_text()) for p in (dst / "_dr2" / "manifests").glob("*.stats.json")]
    assert sum(s["skipped"] for s in stats) == 1 and sum(s["saved_s"] for s in stats) > 0
    assert sum(sum(s["verdicts"].values()) for s in stats) == 3
    rep = json.loads((dst / "_dr2" / "report" / "report.json").read_text())
    assert rep["degradation"]["skipped"] == 1 and rep["degradation"]["verdicts"]["clean"] == 1
    html = (dst / "_dr2" / "report" / "index.html").read_text()
    assert "<h2>Degradation</h2>" in html and 'data-verdict="clean"' in html


def test_a_skipped_face_is_pasted_back_unchanged(mixed: Path, auto_runs: list[tuple[Path, RunSummary]]) -> None:
    dst, _ = auto_runs[0]
    before = cv2.imread(str(mixed / "a_clean.png"))
    after = cv2.imread(str(dst / "a_clean.png"))
    # pasted back through the same warp: the crop's round trip changes a few levels at most, DR2 would change much
    assert np.abs(before.astype(int) - after.astype(int)).mean() < 1.0
    noisy_in, noisy_out = cv2.imread(str(mixed / "c_noisy.png")), cv2.imread(str(dst / "c_noisy.png"))
    assert np.abs(noisy_in.astype(int) - noisy_out.astype(int)).mean() > 1.0  # restored (tiny models: changed)


def test_outputs_do_not_depend_on_block_sizes(auto_runs: list[tuple[Path, RunSummary]]) -> None:
    (a, _), (b, _) = auto_runs
    assert _outputs(a) == _outputs(b) and len(_outputs(a)) == 4
    assert _manifest(a) == _manifest(b)


@pytest.mark.usefixtures("ray_local")
def test_without_auto_every_face_has_the_run_setting(mixed: Path, tmp_path: Path) -> None:
    summary = run_restore(config(mixed, tmp_path, adaptive=False, N=4, tau=2, restorer=RestorerKind.PASSTHROUGH))
    for key, m in _manifest(tmp_path).items():
        for face in m["faces"]:
            assert (face["N"], face["tau"], face["omega"], face["restored"]) == (4, 2, 22, True), key
            assert face["degradation"]["verdict"] in ("clean", "mild", "moderate", "severe")
    assert summary.skipped == 0 and summary.saved_s == 0.0 and sum(summary.verdicts.values()) == 3


# --------------------------------------------------------------------------------------------- restore_block


class RecordingRestorer:
    """The tiny DR2 restorer, recording each call's (faces, N, tau, omega)."""

    name = "recording"

    def __init__(self, inner: DR2Restorer) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, int, int | None]] = []

    def restore(self, faces: np.ndarray, keys: Any, *, N: int, tau: int, omega: int | None = None) -> np.ndarray:
        self.calls.append((len(keys), N, tau, omega))
        return self.inner.restore(faces, keys, N=N, tau=tau, omega=omega)

    def restore_stages(self, faces: np.ndarray, keys: Any, *, N: int, tau: int,
                       omega: int | None = None) -> dict[str, np.ndarray]:
        self.calls.append((len(keys), N, tau, omega))
        return self.inner.restore_stages(faces, keys, N=N, tau=tau, omega=omega)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def _face(N: int, tau: int, omega: int, restored: bool = True) -> dict[str, Any]:
    return {"box": [0.0, 0.0, 1.0, 1.0], "score": 1.0, "landmarks": [0.0] * 10, "affine": [0.0] * 6,
            "N": N, "tau": tau, "omega": omega, "restored": restored, "reason": "" if restored else "clean"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as the restorer actors run (RestoreStage): on a loaded 2-core machine two threads spin for
    seconds per call."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_restore_block_calls_once_per_setting_and_skips_clean_faces() -> None:
    cfg = PipelineConfig(restorer=RestorerKind.TINY, restore_batch_size=4, **load_preset("auto"))
    rng = np.random.default_rng(0)
    crops = [[rng.integers(0, 256, (FACE, FACE, 3), np.uint8).tobytes() for _ in range(n)] for n in (2, 2, 1)]
    mild, severe = cfg.face_setting("mild"), cfg.face_setting("severe")
    faces = [[_face(*mild), _face(*severe)], [_face(*mild, restored=False), _face(*severe)], [_face(*mild)]]
    table = stages.block_table({S.KEY: ["a", "b", "c"], S.UNIT: ["u"] * 3, S.INDEX: [0, 1, 2],
                                S.STATUS: ["pending"] * 3, S.ERROR: [""] * 3, S.CROPS: crops, S.FACES: faces}, 3)
    rec = RecordingRestorer(DR2Restorer.tiny_random(batch_size=2))
    out = stages.restore_block(table, rec, cfg)
    assert sorted(rec.calls) == [(2, 4, 22, 42), (2, 16, 35, 65)]  # one call per setting, the skipped face in none
    restored = out.column(S.RESTORED).to_pylist()
    assert restored[1][0] == crops[1][0]  # the skipped face: its crop, unchanged
    # batch independence: a face restored beside another of its setting equals itself restored alone
    for (r, j), (N, tau, omega) in {(0, 1): severe}.items():
        alone = rec.inner.restore(np.frombuffer(crops[r][j], np.uint8).reshape(1, FACE, FACE, 3),
                                  [stages.face_key("u", "abc"[r], j)], N=N, tau=tau, omega=omega)
        assert alone[0].tobytes() == restored[r][j], (r, j)
    timings = out.column(S.TIMINGS).to_pylist()
    assert all(t["restore"] > 0 for t in timings)


def test_restore_block_summary_counts() -> None:
    verdicts, skipped, saved = stages._degradation_counts(
        [[{"degradation": {"verdict": "clean"}, "restored": False}, {"degradation": {"verdict": "mild"},
                                                                      "restored": True}], None], 2.0)
    assert dict(verdicts) == {"clean": 1, "mild": 1} and skipped == 1 and saved == 2.0
    assert stages._degradation_counts([[{"restored": False}]], 0.0)[2] == 0.0  # nothing restored: nothing measured
    assert pa.array([_face(4, 22, 42)], S.FACE_TYPE).to_pylist()[0]["N"] == 4
