"""The run report, built from real faces (MTCNN on the offline photos), real quality measures and real thumbnails,
written to a local folder and to the real S3 server, and opened in a real headless Chromium."""

from __future__ import annotations

import functools
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.imaging.faces import align_faces, paste_faces
from pipeline.imaging.mtcnn import load_mtcnn
from pipeline.imaging.quality import QualityThresholds, flags, measure_face, severity
from pipeline.runner import report as rp
from tests.pipeline.photos import astronaut, degrade, grace_hopper
from tests.pipeline.test_quality import blur, colour_cast, hue_rotate, noise, unsharp

HOSTILE_KEY = '<script>alert("key")</script>'
HOSTILE_ERROR = "<img src=x onerror=alert(1)> & not an image"


@functools.cache
def _photos_and_faces() -> tuple[tuple[np.ndarray, Any], ...]:
    detector = load_mtcnn()
    photos = [astronaut(), grace_hopper()]
    return tuple((p, align_faces(p, d)[0]) for p, d in zip(photos, detector.detect(photos), strict=True))


# (key, which photo, what the "restorer" did to the face): plausible restorations and visible failures
CASES: list[tuple[str, int, str]] = [
    ("astronaut_x4", 0, "sharpen"),
    ("hopper_x4", 1, "sharpen"),
    ("astronaut_hue", 0, "hue"),
    (HOSTILE_KEY, 1, "noise"),
    ("hopper_cast", 1, "cast"),
    ("astronaut_blur", 0, "blur"),
    ("hopper \"quoted\" ü", 1, "identity"),
]


def _restore(kind: str, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(DR2 output, enhanced output) for one aligned input crop."""
    dr2 = {
        "sharpen": lambda c: blur(c, 0.8),
        "hue": lambda c: hue_rotate(c, 70),
        "noise": lambda c: noise(c, 3),
        "cast": colour_cast,
        "blur": lambda c: blur(c, 5.0),
        "identity": lambda c: c,
    }[kind](crop)
    return dr2, (unsharp(dr2, 0.6) if kind == "sharpen" else dr2)


def build_report(dst: str, *, N: int = 8) -> dict[str, Any]:
    """A report as the driver would assemble it, with every face image and number computed for real."""
    thresholds = QualityThresholds()
    folder = rp.report_uri(dst)
    faces = []
    for i, (key, which, kind) in enumerate(CASES):
        photo, face = _photos_and_faces()[which]
        inp = degrade(face.crop, 4, seed=i) if kind == "sharpen" else face.crop
        dr2, enhanced = _restore(kind, inp)
        composed = paste_faces(photo, [face.affine], [enhanced])
        q = measure_face(inp, enhanced, N=N)
        shard = f"shard-{i % 2:03d}.tar"
        images = rp.write_face_images(
            folder,
            rp.face_entry_id(shard, key, 0),
            {"input": inp, "dr2": dr2, "enhanced": enhanced, "pasted": rp.pasted_region(composed, face.meta.box)},
        )
        entry = rp.face_entry(shard=shard, key=key, face_index=0, images=images, quality=q, thresholds=thresholds)
        assert entry["flags"] == flags(q, thresholds) and entry["severity"] == round(severity(q, thresholds), 4)
        faces.append(entry)
    n_suspect = sum(bool(f["flags"]) for f in faces)
    return {
        "run": {
            "started": "2026-12-02T16:00:00Z", "ended": "2026-12-02T16:02:05Z", "wall_seconds": 125.0,
            "config": {"src": "in/shard-{000..001}.tar", "dst": dst, "N": N, "tau": 35, "restorer": "dr2"},
            "config_hash": "c0ffee" * 4,
            "models": {"ddpm": {"uri": "s3://models/ddpm", "sha256": "ab" * 32}, "enhancer": {"uri": "none"}},
        },
        "counts": {"samples": {"ok": len(CASES), "no_face": 3, "decode_error": 2}, "faces_found": len(CASES) + 1,
                   "faces_restored": len(CASES), "faces_per_second": len(CASES) / 125.0, "suspect_faces": n_suspect},
        "units": {"done": 2, "skipped": 1, "failed": [{"unit": "shard-002.tar", "reason": "truncated tar: <EOF>"}]},
        "stage_seconds": {"decode": 1.5, "detect": 20.25, "align": 0.5, "restore": 95.0, "compose": 3.0},
        "quality_thresholds": {"min_lowfreq_psnr": thresholds.min_lowfreq_psnr, "max_delta_e": thresholds.max_delta_e},
        "faces": faces,
        "non_ok": [{"shard": "shard-001.tar", "key": "corrupt", "status": "decode_error", "error": HOSTILE_ERROR},
                   {"shard": "shard-001.tar", "key": HOSTILE_KEY, "status": "decode_error", "error": "truncated"},
                   {"shard": "shard-000.tar", "key": "coffee", "status": "no_face", "error": ""}],
        "non_ok_total": 5,
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Path]:
    dst = tmp_path_factory.mktemp("report_run")
    report = build_report(str(dst))
    page = rp.write_report(str(dst), report)
    return dst, report, Path(page)


def _imread(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, f"unreadable image {path}"
    return img


# --- selection and thumbnails ---------------------------------------------------------------------------------


def test_face_sheet_selection_is_a_deterministic_bounded_sample() -> None:
    keys = [f"shard-{i % 7:03d}.tar/img_{i:06d}/{i % 3}" for i in range(20000)]
    picked = [k for k in keys if rp.face_sheet_selected(k, limit_per_thousand=10)]
    assert 140 <= len(picked) <= 260  # 1% of 20000 = 200, binomial sd ~14
    assert picked == [k for k in keys if rp.face_sheet_selected(k, limit_per_thousand=10)]
    wider = {k for k in keys if rp.face_sheet_selected(k, limit_per_thousand=50)}
    assert set(picked) <= wider  # a larger budget keeps every face a smaller one picked
    assert not any(rp.face_sheet_selected(k, limit_per_thousand=0) for k in keys[:500])
    assert all(rp.face_sheet_selected(k, limit_per_thousand=1000) for k in keys[:500])
    assert all(rp.face_sheet_selected(k, limit_per_thousand=0, suspect=True) for k in keys[:50])
    with pytest.raises(ValueError):
        rp.face_sheet_selected("k", limit_per_thousand=1001)


def test_pasted_region_widens_the_box_and_clips_to_the_photo() -> None:
    photo = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    assert rp.pasted_region(photo, (40.0, 20.0, 80.0, 60.0)).shape == (60, 60, 3)  # 40 + 2 * 10
    assert np.array_equal(rp.pasted_region(photo, (40.0, 20.0, 80.0, 60.0)), photo[10:70, 30:90])
    assert rp.pasted_region(photo, (-10.0, -10.0, 30.0, 30.0)).shape == (40, 40, 3)  # clipped at 0
    with pytest.raises(ValueError):
        rp.pasted_region(photo, (300.0, 10.0, 340.0, 50.0))


def test_pasted_bounds_are_where_pasted_region_cuts() -> None:
    photo = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    boxes = [(40.0, 20.0, 80.0, 60.0), (-10.5, -3.25, 30.0, 31.7), (150.2, 70.9, 230.0, 140.0), (0.0, 0.0, 1.0, 1.0)]
    for box in boxes:
        left, top, right, bottom = rp.pasted_bounds(photo.shape, box)
        region = rp.pasted_region(photo, box)
        assert np.shares_memory(region, photo) and np.array_equal(region, photo[top:bottom, left:right])
    with pytest.raises(ValueError, match="outside"):
        rp.pasted_bounds(photo.shape, (300.0, 10.0, 340.0, 50.0))


def test_face_images_are_small_jpegs_under_the_report(tmp_path: Path) -> None:
    _, face = _photos_and_faces()[0]
    folder = str(tmp_path / "_dr2" / "report")
    entry = rp.face_entry_id("shard-000.tar", "../../etc/passwd", 0)
    assert "/" not in entry and ".." not in entry
    rel = rp.write_face_images(folder, entry, {"input": face.crop, "pasted": face.crop[:300, :120]})
    assert list(rel) == ["input", "pasted"]
    for role, path in rel.items():
        assert path.startswith("faces/") and path.endswith(f"_{role}.jpg")
        img = cv2.imread(str(Path(folder) / path))
        assert img is not None and max(img.shape[:2]) == rp.THUMB_SIZE
    assert _imread(Path(folder) / rel["pasted"]).shape[:2] == (160, 64)  # aspect kept
    # the thumbnail is the face, not garbage: close to a plain resize of it
    small = cv2.resize(face.crop, (160, 160), interpolation=cv2.INTER_AREA)[..., ::-1]
    assert np.abs(_imread(Path(folder) / rel["input"]).astype(int) - small).mean() < 4
    assert rp.write_face_images(folder, "a/../../b", {"dr2": face.crop})["dr2"] == "faces/a_b_dr2.jpg"
    with pytest.raises(ValueError, match="roles"):
        rp.write_face_images(folder, entry, {"restored": face.crop})
    assert rp.face_entry_id("s", "k", 0) != rp.face_entry_id("s", "k", 1) != rp.face_entry_id("t", "k", 1)


# --- report.json and the page ---------------------------------------------------------------------------------


def test_report_json_sorts_worst_first_and_keeps_everything(written: tuple[Path, dict[str, Any], Path]) -> None:
    dst, report, page = written
    assert page == dst / "_dr2" / "report" / "index.html"
    saved = json.loads((page.parent / "report.json").read_text())
    assert saved["version"] == rp.REPORT_VERSION and saved["run"] == report["run"]
    assert saved["counts"] == report["counts"] and saved["faces_total"] == len(CASES)
    faces = saved["faces"]
    flagged = [f for f in faces if f["flags"]]
    assert faces[: len(flagged)] == flagged, "suspect faces come first"
    assert [f["severity"] for f in flagged] == sorted((f["severity"] for f in flagged), reverse=True)
    by_key = {f["key"]: f for f in faces}
    assert "colour_shift" in by_key["astronaut_hue"]["flags"] and "colour_shift" in by_key["hopper_cast"]["flags"]
    assert "lowfreq_drift" in by_key[HOSTILE_KEY]["flags"] and "sharpness_loss" in by_key["astronaut_blur"]["flags"]
    assert by_key["astronaut_x4"]["flags"] == [] and by_key['hopper "quoted" ü']["flags"] == []
    assert saved["counts"]["suspect_faces"] == len(flagged) == 4
    for f in faces:
        assert set(f["images"]) == set(rp.ROLES)
        for rel in f["images"].values():
            assert (page.parent / rel).is_file()


def test_page_escapes_hostile_keys_and_errors(written: tuple[Path, dict[str, Any], Path]) -> None:
    text = written[2].read_text()
    assert "<script" not in text.lower() and "<img src=x" not in text  # escaped, so they stay text
    assert html.escape(HOSTILE_KEY) in text and html.escape(HOSTILE_ERROR) in text
    assert '<meta name="viewport"' in text
    # nothing external: every src/href is relative (no scheme, no leading slash)
    for url in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert not re.match(r"^[a-z]+:|^/", url, re.I), url


def test_page_bounds_the_non_ok_list(tmp_path: Path) -> None:
    n = rp.MAX_NON_OK + 30
    rep = {"run": {}, "non_ok": [{"shard": "s", "key": f"k{i}", "status": "decode_error", "error": "x"}
                                 for i in range(n)]}
    text = rp.render_html(rep)
    assert text.count("<td>decode_error</td>") == rp.MAX_NON_OK and f"showing {rp.MAX_NON_OK} of {n:,}" in text
    page = rp.write_report(str(tmp_path), rep)
    saved = json.loads(Path(page).with_name("report.json").read_text())
    assert saved["non_ok_total"] == n and len(saved["non_ok"]) == rp.MAX_NON_OK


def test_report_on_s3(s3_bucket: str, s3_server: Any) -> None:
    dst = f"s3://{s3_bucket}/run1"
    _, face = _photos_and_faces()[1]
    rel = rp.write_face_images(rp.report_uri(dst), rp.face_entry_id("s.tar", "k", 0), {"input": face.crop})
    rep = {"run": {"started": "t0"}, "counts": {"samples": {"ok": 1}},
           "faces": [{"shard": "s.tar", "key": "k", "face_index": 0, "images": rel, "flags": []}]}
    assert rp.write_report(dst, rep) == f"{dst}/_dr2/report/index.html"
    client: Any = s3_server.client()
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="run1/")["Contents"]}
    assert listed == {"run1/_dr2/report/index.html", "run1/_dr2/report/report.json", f"run1/_dr2/report/{rel['input']}"}
    body = client.get_object(Bucket=s3_bucket, Key="run1/_dr2/report/report.json")["Body"].read()
    assert json.loads(body)["faces"][0]["images"] == rel


# --- a real browser ---------------------------------------------------------------------------------------------


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (root); skip only where no package manager can."""
    found = shutil.which("chromium")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get is unavailable or not root: apt-get install -y chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run([apt, "install", "-y", "chromium"], capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:  # stale package lists
        subprocess.run([apt, "update"], capture_output=True, timeout=300, env=env)
        r = subprocess.run([apt, "install", "-y", "chromium"], capture_output=True, text=True, env=env, timeout=900)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install chromium failed: {r.stderr[-500:]}")
    return found


def _run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


# Test-only: a copy of the page (same folder, so relative URLs resolve the same) with this script first in
# <head>. It records console errors and failed loads (resource errors reach window in the capture phase), then
# after load every <img>'s decoded width and whether the page overflows the window sideways.
_PROBE = """<script>
window.__errors = [];
const origError = console.error;
console.error = (...a) => { window.__errors.push("console: " + a.join(" ")); origError(...a); };
window.addEventListener("error", e => {
  window.__errors.push("load: " + (e.target && e.target.src ? e.target.getAttribute("src") : e.message)); }, true);
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]);
  const counts = {};
  document.querySelectorAll("[data-count]").forEach(e => { counts[e.dataset.count] = e.textContent; });
  document.documentElement.dataset.probe = JSON.stringify({imgs, counts, errors: window.__errors,
    overflow: document.documentElement.scrollWidth - window.innerWidth});
});
</script>"""


def _probe(browser: str, page: Path, profile: Path, width: int) -> dict[str, Any]:
    probe_page = page.with_name("probe.test.html")
    # lazy loading only defers images below the fold; the probe wants every image fetched now
    probe_page.write_text(page.read_text().replace("<head>", "<head>" + _PROBE, 1).replace(' loading="lazy"', ""))
    try:
        r = _run_chromium(browser, profile, f"--window-size={width},900", "--dump-dom", probe_page.as_uri())
    finally:
        probe_page.unlink()
    m = re.search(r'data-probe="([^"]*)"', r.stdout)
    assert m, f"probe did not run: rc={r.returncode} stderr={r.stderr[-2000:]}"
    return dict(json.loads(html.unescape(m.group(1))))


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.slow  # starts Chromium (and installs it with apt-get where missing)
def test_page_in_headless_chromium(written: tuple[Path, dict[str, Any], Path], tmp_path: Path) -> None:
    browser = _chromium()
    dst, report, page = written
    profile = tmp_path / "profile"

    # the page itself: loads with no console message at all (it has no script; anything logged is an error)
    shot = tmp_path / "report.png"
    r = _run_chromium(browser, profile, "--window-size=1280,2000", f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    assert console == [], console
    assert shot.is_file() and _imread(shot).shape[:2] == (2000, 1280)
    print(f"report screenshot: {shot}")

    for width in (1280, 390):  # a laptop and a phone
        probe = _probe(browser, page, profile, width)
        assert probe["errors"] == []
        assert len(probe["imgs"]) == 4 * len(CASES)
        broken = [src for src, complete, w in probe["imgs"] if not complete or w == 0]
        assert broken == [], broken
        assert probe["overflow"] <= 0, f"page wider than a {width}px window by {probe['overflow']}px"

    # the numbers shown are the numbers in report.json
    saved = json.loads((page.parent / "report.json").read_text())
    counts = probe["counts"]
    for status, n in saved["counts"]["samples"].items():
        assert _number(counts[f"samples.{status}"]) == n
    assert _number(counts["samples"]) == sum(saved["counts"]["samples"].values())
    for name in ("faces_found", "faces_restored", "suspect_faces"):
        assert _number(counts[name]) == saved["counts"][name]
    assert _number(counts["faces_per_second"]) == pytest.approx(saved["counts"]["faces_per_second"], abs=0.005)
    assert _number(counts["units.done"]) == saved["units"]["done"]
    assert _number(counts["units.failed"]) == len(saved["units"]["failed"])


@pytest.mark.slow  # starts Chromium
def test_probe_sees_a_broken_image(tmp_path: Path) -> None:
    """The browser check can fail: a page whose image is missing is caught."""
    browser = _chromium()
    rep = {"run": {}, "faces": [{"shard": "s", "key": "k", "face_index": 0, "images": {"input": "faces/none.jpg"},
                                 "flags": []}]}
    page = Path(rp.write_report(str(tmp_path), rep))
    probe = _probe(browser, page, tmp_path / "profile", 1280)
    assert probe["imgs"] == [["faces/none.jpg", True, 0]] and probe["errors"] == ["load: faces/none.jpg"]
