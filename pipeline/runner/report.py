"""The run report: what a person opens after a run, ``DST/_dr2/report/index.html`` with ``report.json`` behind it.

Local paths and ``s3://`` alike (written through ``pipeline.store.storage``). The folder is self-contained: the page
references its images relatively (``faces/...``), loads no font, script or stylesheet from anywhere, and works
offline, so ``report/`` can be copied anywhere (it links back to the output shards with ``../../SHARD``, which
only resolves beside the outputs).

Who writes what:

* workers call :func:`face_sheet_selected` for each restored face (a deterministic sample by key hash) and, for
  the selected ones, :func:`write_face_images` (small JPEG thumbnails under ``report/faces/``; the ``pasted``
  image cut with :func:`pasted_region`) and :func:`face_entry` (the JSON entry, flags and severity included);
* the driver collects counts, timings, units, the per-face entries and the non-ok samples into one dict (the
  schema below) and calls :func:`write_report`, which sorts the faces worst first, bounds the lists and writes
  ``report.json`` and ``index.html`` (:func:`render_html`).

``report.json`` schema (version 1). Every field is optional to the page except ``run``; unknown fields are kept
in the JSON and ignored by the page::

    {
      "version": 1,
      "run": {
        "started": "2026-12-02T16:01:35Z",          # ISO 8601, UTC
        "ended": "2026-12-02T16:31:02Z",
        "wall_seconds": 1767.2,
        "config": {...},                             # the resolved PipelineConfig, as written to _dr2/config.json
        "config_hash": "3f2a...",
        "models": {"ddpm": {"uri": "...", "sha256": "..."}, "enhancer": {...}, "detector": {...}}
      },
      "counts": {
        "samples": {"ok": 930, "no_face": 60, "decode_error": 10, ...},   # samples by status (schema.Status)
        "faces_found": 1400,                         # faces detected and aligned
        "faces_restored": 1398,
        "faces_per_second": 0.79,                    # faces_restored / run.wall_seconds
        "suspect_faces": 12                          # faces with at least one quality flag
      },
      "units": {
        "done": 10, "skipped": 2,                    # skipped: already committed by an earlier run (resume)
        "failed": [{"unit": "shard-007.tar", "reason": "..."}]
      },
      "degradation": {                               # imaging/degradation.py: the estimate on every face pasted back
        "verdicts": {"clean": 300, "mild": 900, "moderate": 180, "severe": 18},
        "skipped": 300, "saved_seconds": 88.2,       # clean faces pasted back unrestored (--skip-clean), time saved
        "adaptive": true, "skip_clean": true, "thresholds": {"clean_max_factor": 2.5, ...}
      },
      "stage_seconds": {"decode": 12.1, "detect": 80.4, "align": 3.2, "restore": 1500.9, "compose": 20.0, ...},
      "quality_thresholds": {"min_lowfreq_psnr": 20.0, ...},   # pipeline.imaging.quality.QualityThresholds, as used
      "faces": [                                     # the contact sheet: a sample, worst first
        {"shard": "shard-000.tar", "key": "img_0001", "face_index": 0,
         "images": {"input": "faces/....jpg", "dr2": "...", "enhanced": "...", "pasted": "..."},  # relative
         "quality": {"lowfreq_psnr": 31.2, "delta_e": 2.1, "sharpness_gain": 7.4, "N": 8},
         "flags": ["colour_shift"], "severity": 0.4,
         "degradation": {"verdict": "mild", "score": 4.1}, "restored": true}  # restored: false = pasted back as is
      ],
      "faces_total": 40,                             # entries before the bound (faces holds at most MAX_FACES)
      "non_ok": [{"shard": "shard-000.tar", "key": "bad", "status": "decode_error", "error": "..."}],
      "non_ok_total": 10                             # non-ok samples in the run (non_ok holds at most MAX_NON_OK)
    }

Faces are sorted worst first: flagged faces by decreasing ``severity`` (``pipeline.imaging.quality.severity``), then
the rest, each group in (shard, key, face_index) order so the page is the same for the same run.
Every string that reaches the page is HTML-escaped (keys and error messages come from the data and may be
hostile); URLs are percent-encoded.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from pipeline.imaging.quality import FaceQuality, QualityThresholds, flags, severity
from pipeline.store.storage import join, write_bytes_atomic

REPORT_VERSION = 1
REPORT_DIR = ("_dr2", "report")  # under DST
FACES_DIR = "faces"
ROLES = ("input", "dr2", "enhanced", "pasted")  # contact-sheet columns, in order
ROLE_TITLES = {"input": "input", "dr2": "DR2", "enhanced": "enhanced", "pasted": "pasted"}
THUMB_SIZE = 160  # px, the longer side of a contact-sheet image
THUMB_QUALITY = 85
MAX_FACES = 500  # contact-sheet entries kept in report.json and on the page
MAX_NON_OK = 500  # non-ok samples listed (non_ok_total still counts all)
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


# --- workers: which faces, and their thumbnails -----------------------------------------------------------


def _key_fraction(face_key: str) -> int:
    """A stable number in [0, 1_000_000) from the key (sha256; the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha256(face_key.encode("utf-8")).digest()[:8], "big") % 1_000_000


def face_sheet_selected(face_key: str, *, limit_per_thousand: int, suspect: bool = False) -> bool:
    """Whether the face ``face_key`` (e.g. ``f"{shard}/{key}/{face_index}"``) goes on the contact sheet.

    A deterministic sample: about ``limit_per_thousand`` faces in 1000, chosen by a hash of the key, so a rerun
    or a retried task picks the same faces. Suspect faces (any quality flag) are always selected: they are what
    the sheet is for; the driver caps the total (:data:`MAX_FACES`).
    """
    if not 0 <= limit_per_thousand <= 1000:
        raise ValueError(f"limit_per_thousand must be in [0, 1000], got {limit_per_thousand}")
    return suspect or _key_fraction(face_key) < limit_per_thousand * 1000


def face_entry_id(shard: str, key: str, face_index: int) -> str:
    """A file-name-safe, unique id for one face: a readable slug of the key plus a hash of (shard, key, index)."""
    digest = hashlib.sha256(f"{shard}\0{key}\0{face_index}".encode()).hexdigest()[:16]
    slug = _SAFE.sub("_", key).strip("_")[:40]
    return f"{slug}-{face_index}-{digest}" if slug else f"{face_index}-{digest}"


def thumbnail_jpeg(rgb: np.ndarray, *, size: int = THUMB_SIZE, quality: int = THUMB_QUALITY) -> bytes:
    """RGB uint8 (H, W, 3) (or gray (H, W)) -> JPEG bytes, the longer side scaled to ``size`` (never up)."""
    img = np.asarray(rgb)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 (H, W[, 3]) image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    scale = min(1.0, size / max(h, w))
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def report_uri(dst: str) -> str:
    """The report folder of a run whose outputs go to ``dst``."""
    return join(dst, *REPORT_DIR)


def write_face_images(report_uri: str, entry_id: str, images: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Write one face's images as small JPEGs under ``report_uri/faces/``; return role -> path relative to the
    report folder (what goes in the face entry's ``images``).

    ``images`` maps roles (:data:`ROLES`: ``input`` the aligned input crop, ``dr2`` the DR2 output, ``enhanced``
    the enhanced output, ``pasted`` the pasted-back region of the full photo) to RGB uint8 arrays; any subset.
    ``entry_id`` should come from :func:`face_entry_id`; anything else is made file-name-safe first.
    """
    unknown = set(images) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown image roles {sorted(unknown)}; expected some of {ROLES}")
    safe_id = _SAFE.sub("_", entry_id)[:120] or "face"
    out: dict[str, str] = {}
    for role in ROLES:
        if role in images:
            rel = f"{FACES_DIR}/{safe_id}_{role}.jpg"
            write_bytes_atomic(join(report_uri, rel), thumbnail_jpeg(images[role]))
            out[role] = rel
    return out


def pasted_region(composed: np.ndarray, box: tuple[float, float, float, float], *, margin: float = 0.25) -> np.ndarray:
    """The face's region of the composed photo (``box`` x1, y1, x2, y2 widened by ``margin`` of its size on each
    side, clipped to the photo): the ``pasted`` image of the contact sheet, where seams would show. A view."""
    left, top, right, bottom = pasted_bounds(composed.shape, box, margin=margin)
    return composed[top:bottom, left:right]


def pasted_bounds(shape: tuple[int, ...], box: tuple[float, float, float, float], *,
                  margin: float = 0.25) -> tuple[int, int, int, int]:
    """(left, top, right, bottom), end exclusive, of :func:`pasted_region` in a photo of ``shape`` (H, W, ...): what
    a caller keeps of a composed photo so that the photo itself need not be kept."""
    h, w = shape[:2]
    x1, y1, x2, y2 = box
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    left, top = max(0, int(x1 - mx)), max(0, int(y1 - my))
    right, bottom = min(w, int(np.ceil(x2 + mx))), min(h, int(np.ceil(y2 + my)))
    if right <= left or bottom <= top:
        raise ValueError(f"box {box} is outside the {w}x{h} photo")
    return left, top, right, bottom


def face_entry(
    *,
    shard: str,
    key: str,
    face_index: int,
    images: Mapping[str, str],
    quality: FaceQuality,
    thresholds: QualityThresholds | None = None,
) -> dict[str, Any]:
    """One ``faces`` entry of report.json, with its flags and severity computed under ``thresholds``."""
    t = thresholds or QualityThresholds()
    return {
        "shard": shard,
        "key": key,
        "face_index": int(face_index),
        "images": dict(images),
        "quality": quality.to_dict(),
        "flags": flags(quality, t),
        "severity": round(severity(quality, t), 4),
    }


# --- driver: the report -----------------------------------------------------------------------------------


def _face_order(face: Mapping[str, Any]) -> tuple[int, float, str, str, int]:
    flagged = bool(face.get("flags"))
    return (
        0 if flagged else 1,
        -float(face.get("severity", 0.0)) if flagged else 0.0,
        str(face.get("shard", "")),
        str(face.get("key", "")),
        int(face.get("face_index", 0)),
    )


def normalise(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with the faces sorted worst first and the lists bounded (totals added where missing)."""
    out = dict(report)
    out.setdefault("version", REPORT_VERSION)
    faces = sorted(report.get("faces", []), key=_face_order)
    out["faces_total"] = int(report.get("faces_total", len(faces)))
    out["faces"] = faces[:MAX_FACES]
    non_ok = list(report.get("non_ok", []))
    out["non_ok_total"] = int(report.get("non_ok_total", len(non_ok)))
    out["non_ok"] = non_ok[:MAX_NON_OK]
    return out


def write_report(dst: str, report: Mapping[str, Any]) -> str:
    """Write ``report.json`` and ``index.html`` under ``DST/_dr2/report/`` (JSON first, the page last, both
    atomically); return the page's URI."""
    folder = report_uri(dst)
    rep = normalise(report)
    write_bytes_atomic(join(folder, "report.json"), (json.dumps(rep, indent=2, sort_keys=True) + "\n").encode())
    page = join(folder, "index.html")
    write_bytes_atomic(page, render_html(rep).encode("utf-8"))
    return page


# --- the page ---------------------------------------------------------------------------------------------


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _url(rel: str) -> str:
    """A relative path as an href/src: percent-encoded per segment, never a scheme (no ``javascript:``)."""
    return "/".join(urllib.parse.quote(seg, safe="") for seg in rel.split("/"))


def _num(x: object, digits: int = 1) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return _e(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:,.{digits}f}"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


_CSS = """
:root { color-scheme: light dark; --fg: #1b1f24; --muted: #5b6470; --bg: #fff; --card: #f5f6f8; --line: #d8dce2;
  --bad: #b42318; --bad-bg: #fde7e4; --ok: #1a7f37; --bar: #3b82f6; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6e8eb; --muted: #9aa4b1; --bg: #111418; --card: #1b2027;
  --line: #2e353f; --bad: #ff8a7a; --bad-bg: #3a1d1a; --ok: #5fd17a; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 12px; font: 15px/1.45 system-ui, -apple-system, "Segoe UI",
  Roboto, sans-serif; color: var(--fg); background: var(--bg); overflow-wrap: anywhere; }
h1 { font-size: 1.4rem; margin: .2rem 0; } h2 { font-size: 1.15rem; margin: 1.6rem 0 .5rem;
  border-bottom: 1px solid var(--line); padding-bottom: .2rem; }
.muted { color: var(--muted); } code, pre { font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
pre { background: var(--card); padding: 8px; overflow-x: auto; max-height: 24rem; white-space: pre-wrap; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px;
  min-width: 9rem; flex: 1 1 9rem; }
.card .n { display: block; font-size: 1.35rem; font-weight: 600; } .card .l { color: var(--muted); font-size: .85rem; }
.card.bad .n { color: var(--bad); }
table { border-collapse: collapse; width: 100%; } td, th { text-align: left; padding: 3px 8px 3px 0;
  border-bottom: 1px solid var(--line); vertical-align: top; } th { color: var(--muted); font-weight: 500; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
.stages td, .stages th { white-space: nowrap; overflow-wrap: normal; } .stages .barcell { width: 100%; }
.bar { background: var(--bar); height: .7rem; min-width: 1px; border-radius: 2px; }
.sheet { display: flex; flex-wrap: wrap; gap: 10px; }
.face { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 6px; flex: 0 1 auto;
  max-width: 100%; }
.face.suspect { border-color: var(--bad); background: var(--bad-bg); }
.strip { display: flex; flex-wrap: wrap; gap: 4px; }
.strip figure { margin: 0; width: 120px; } .strip img { width: 120px; height: auto; display: block;
  border-radius: 3px; background: #888; } .strip figcaption { font-size: .75rem; color: var(--muted); }
.meta { font-size: .8rem; margin-top: 4px; max-width: 500px; }
.flag { display: inline-block; background: var(--bad); color: #fff; border-radius: 3px; padding: 0 5px;
  margin-right: 4px; font-size: .75rem; }
@media (max-width: 600px) { body { padding: 8px; font-size: 14px; } .strip figure, .strip img { width: 72px; } }
"""


def _cards(counts: Mapping[str, Any]) -> str:
    samples = counts.get("samples", {}) or {}
    total = sum(v for v in samples.values() if isinstance(v, int))
    items: list[tuple[str, str, object, bool]] = [("samples", "samples", total, False)]
    for status in sorted(samples, key=lambda st: (st != "ok", -int(samples[st] or 0), st)):  # ok, then most
        items.append((f"samples.{status}", status, samples[status], status != "ok" and bool(samples[status])))
    for name, label in (("faces_found", "faces found"), ("faces_restored", "faces restored"),
                        ("faces_per_second", "faces / s"), ("suspect_faces", "suspect faces")):
        if name in counts:
            items.append((name, label, counts[name], name == "suspect_faces" and bool(counts[name])))
    out = []
    for key, label, value, bad in items:
        digits = 2 if key == "faces_per_second" else 1
        out.append(f'<div class="card{" bad" if bad else ""}"><span class="n" data-count="{_e(key)}">'
                   f'{_num(value, digits)}</span><span class="l">{_e(label)}</span></div>')
    return f'<div class="cards">{"".join(out)}</div>'


def _bar_cell(share: float) -> str:
    """The last cell of a row of the report's bar tables: a bar ``share`` (0..1) of the cell wide."""
    return f'<td class="barcell"><div class="bar" style="width:{100 * share:.1f}%"></div></td>'


def _stages(stage_seconds: Mapping[str, Any]) -> str:
    vals = {k: float(v) for k, v in stage_seconds.items() if isinstance(v, int | float)}
    if not vals:
        return '<p class="muted">no stage timings recorded</p>'
    top = max(vals.values()) or 1.0
    total = sum(vals.values()) or 1.0
    rows = "".join(
        f'<tr><td>{_e(k)}</td><td class="r" data-stage="{_e(k)}">{v:,.1f} s</td><td class="r">{100 * v / total:.0f}%'
        f'</td>{_bar_cell(v / top)}</tr>'
        for k, v in sorted(vals.items(), key=lambda kv: -kv[1])
    )
    head = '<tr><th>stage</th><th class="r">seconds</th><th class="r">share</th><th></th></tr>'
    return (f'<div class="scroll"><table class="stages">{head}{rows}</table></div>'
            '<p class="muted">summed over workers: stages overlap in time, so the sum can exceed the wall time</p>')


def _busy(busy: Mapping[str, Any], pools: Mapping[str, Any]) -> str:
    """The stage-utilisation table: per actor stage, how much of its actors' wall time went to work."""
    rows = []
    for stage in ("restore", "detect"):
        b = busy.get(stage)
        if not isinstance(b, Mapping):
            continue
        frac = float(b.get("fraction", 0.0) or 0.0)
        pool = pools.get(stage) if isinstance(pools.get(stage), Mapping) else {}
        where = f'{pool.get("gpus")} GPU' if pool and pool.get("gpus") else (f'{pool.get("cpus")} CPU' if pool else "")
        w = b.get("waits") if isinstance(b.get("waits"), Mapping) else {}
        waits = (f'{_num(w.get("count"), 0)} (median {_num(w.get("median_ms"), 0)} ms, '
                 f'90% {_num(w.get("p90_ms"), 0)} ms)' if w and w.get("count") else "")
        rows.append(
            f'<tr><td>{_e(stage)}</td><td class="r">{_num(b.get("actors"), 0)}</td><td>{_e(where)}</td>'
            f'<td class="r" data-busy="{_e(stage)}">{100 * frac:.0f}%</td>'
            f'<td class="r">{_num(b.get("busy_s"))} s</td><td class="r">{_num(b.get("wall_s"))} s</td>'
            f'<td class="r">{_e(waits)}</td>{_bar_cell(frac)}</tr>')
    if not rows:
        return '<p class="muted">no actor busy figures recorded</p>'
    head = ('<tr><th>stage</th><th class="r">actors</th><th>each</th><th class="r">busy</th><th class="r">working</th>'
            '<th class="r">actor wall</th><th class="r">waits between blocks</th><th></th></tr>')
    return (f'<div class="scroll"><table class="stages">{head}{"".join(rows)}</table></div>'
            '<p class="muted">busy = time working / time alive (from model loaded to the end of the run), summed over '
            'the stage\'s actors; the rest is waiting for input. A restorer far below 100% means the CPU side '
            '(reading, decoding, detection, writing) does not keep the GPUs fed: see <code>dr2 estimate</code>. '
            'Waits between blocks: many short ones are the cost of handing each block over (larger blocks help); '
            'long ones, an actor starved of input.</p>')


def _units(units: Mapping[str, Any]) -> str:
    failed = list(units.get("failed", []) or [])
    head = (f'<div class="cards"><div class="card"><span class="n" data-count="units.done">{_num(units.get("done", 0))}'
            f'</span><span class="l">done</span></div><div class="card"><span class="n" data-count="units.skipped">'
            f'{_num(units.get("skipped", 0))}</span><span class="l">skipped (already committed)</span></div>'
            f'<div class="card{" bad" if failed else ""}"><span class="n" data-count="units.failed">{len(failed)}'
            '</span><span class="l">failed</span></div></div>')
    if not failed:
        return head
    rows = "".join(f"<tr><td><code>{_e(f.get('unit', ''))}</code></td><td>{_e(f.get('reason', ''))}</td></tr>"
                   for f in failed)
    return f'{head}<div class="scroll"><table><tr><th>unit</th><th>reason</th></tr>{rows}</table></div>'


def _config(run: Mapping[str, Any]) -> str:
    models = run.get("models", {}) or {}
    rows = []
    for name in sorted(models):
        m = models[name]
        if isinstance(m, Mapping):
            rows.append(f"<tr><td>{_e(name)}</td><td><code>{_e(m.get('uri', ''))}</code></td>"
                        f"<td><code>{_e(m.get('sha256', ''))}</code></td></tr>")
        else:
            rows.append(f"<tr><td>{_e(name)}</td><td></td><td><code>{_e(m)}</code></td></tr>")
    table = (f'<div class="scroll"><table><tr><th>model</th><th>from</th><th>sha256</th></tr>{"".join(rows)}'
             "</table></div>") if rows else '<p class="muted">no model checksums recorded</p>'
    cfg = json.dumps(run.get("config", {}), indent=2, sort_keys=True)
    return (f'<p>config hash <code data-config-hash="">{_e(run.get("config_hash", ""))}</code></p>{table}'
            f"<details><summary>resolved config</summary><pre>{_e(cfg)}</pre></details>")


def _degradation(deg: Mapping[str, Any]) -> str:
    """The degradation section: faces per verdict (a bar each), faces skipped as clean and the time that saved."""
    verdicts = {str(k): int(v) for k, v in (deg.get("verdicts", {}) or {}).items() if isinstance(v, int)}
    if not verdicts:
        return '<p class="muted">no degradation estimates recorded</p>'
    total = sum(verdicts.values()) or 1
    top = max(verdicts.values()) or 1
    rows = "".join(
        f'<tr><td>{_e(v)}</td><td class="r" data-verdict="{_e(v)}">{n:,}</td><td class="r">{100 * n / total:.0f}%'
        f'</td>{_bar_cell(n / top)}</tr>'
        for v, n in verdicts.items())
    head = '<tr><th>verdict</th><th class="r">faces</th><th class="r">share</th><th></th></tr>'
    mode = ("per-face N/tau from the verdict (--preset auto)" if deg.get("adaptive") else "one N/tau for all faces")
    skip = (f'<span data-count="skipped">{_num(deg.get("skipped", 0), 0)}</span> clean faces pasted back unrestored, '
            f'~<span data-count="saved_seconds">{_num(deg.get("saved_seconds", 0.0))}</span> s of restorer time saved'
            if deg.get("skip_clean") else "clean faces restored too (no --skip-clean)")
    thr = deg.get("thresholds")
    thr_text = f' · thresholds <code>{_e(json.dumps(thr, sort_keys=True))}</code>' if thr else ""
    return (f'<div class="scroll"><table class="stages">{head}{rows}</table></div>'
            f'<p class="muted">{_e(mode)} · {skip}{thr_text}</p>')


def _face(face: Mapping[str, Any]) -> str:
    shard, key, idx = str(face.get("shard", "")), str(face.get("key", "")), face.get("face_index", 0)
    flags = [str(f) for f in face.get("flags", []) or []]
    images = face.get("images", {}) or {}
    figs = []
    for role in ROLES:
        rel = images.get(role)
        if rel:
            figs.append(f'<figure><img src="{_e(_url(str(rel)))}" alt="{_e(ROLE_TITLES[role])}" loading="lazy">'
                        f"<figcaption>{_e(ROLE_TITLES[role])}</figcaption></figure>")
    q = face.get("quality", {}) or {}
    qtext = []
    for name, label, unit in (("lowfreq_psnr", "low-freq PSNR", " dB"), ("delta_e", "ΔE", ""),
                              ("sharpness_gain", "sharpness ×", "")):
        if isinstance(q.get(name), int | float):
            qtext.append(f"{_e(label)} {q[name]:.2f}{unit}")
    deg = face.get("degradation")
    if isinstance(deg, Mapping):  # the face's degradation verdict, and whether it went to the restorer at all
        unrestored = " · not restored" if face.get("restored") is False else ""
        qtext.insert(0, f'<span data-verdict="{_e(deg.get("verdict", ""))}">{_e(deg.get("verdict", ""))} '
                        f'({_num(deg.get("score"), 1)}){_e(unrestored)}</span>')
    badges = "".join(f'<span class="flag">{_e(f)}</span>' for f in flags)
    where = (f'<a href="../../{_e(_url(shard))}" title="output shard">{_e(shard)}</a> · '
             f"<code>{_e(key)}</code> · face {_e(idx)}")
    cls = "face suspect" if flags else "face"
    return (f'<div class="{cls}" data-flags="{len(flags)}"><div class="strip">{"".join(figs)}</div>'
            f'<div class="meta">{badges}{where}<br><span class="muted">{" · ".join(qtext)}</span></div></div>')


def _non_ok(rows: list[Mapping[str, Any]], total: int) -> str:
    if not total:
        return '<p class="muted">every sample was ok</p>'
    body = "".join(
        f"<tr><td><code>{_e(r.get('shard', ''))}</code></td><td><code>{_e(r.get('key', ''))}</code></td>"
        f"<td>{_e(r.get('status', ''))}</td><td>{_e(r.get('error', ''))}</td></tr>" for r in rows
    )
    more = f'<p class="muted">showing {len(rows)} of {total:,}</p>' if len(rows) < total else ""
    return (f'<div class="scroll"><table><tr><th>shard</th><th>key</th><th>status</th><th>error</th></tr>{body}'
            f"</table></div>{more}")


def render_html(report: Mapping[str, Any]) -> str:
    """The page for a report dict (normalised first: faces worst first, lists bounded). Self-contained HTML."""
    rep = normalise(report)
    run = rep.get("run", {}) or {}
    counts = rep.get("counts", {}) or {}
    faces = rep["faces"]
    n_suspect = sum(1 for f in faces if f.get("flags"))
    sheet = "".join(_face(f) for f in faces) or '<p class="muted">no faces sampled</p>'
    shown = (f'<p class="muted">{len(faces)} of {rep["faces_total"]:,} sampled faces shown, {n_suspect} suspect; '
             "worst first (suspect faces by severity). Columns: aligned input | DR2 | enhanced | pasted back.</p>")
    thresholds = rep.get("quality_thresholds")
    thr = (f'<p class="muted">flag thresholds: <code>{_e(json.dumps(thresholds, sort_keys=True))}</code></p>'
           if thresholds else "")
    title = f"DR2 run report: {_e(run.get('started', ''))}"
    simulated = (f'<p class="card bad" data-simulated=""><strong>SIMULATED RESTORER</strong>: '
                 f'{_e(rep["simulated"])}</p>' if rep.get("simulated") else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>DR2 run report</h1>
<p class="muted">started {_e(run.get("started", "?"))} · ended {_e(run.get("ended", "?"))} ·
wall time <span data-wall="">{_duration(run.get("wall_seconds"))}</span></p>
<h2>Summary</h2>
{_cards(counts)}
{simulated}<h2>Stage utilisation</h2>
{_busy(rep.get("busy", {}) or {}, rep.get("pools", {}) or {})}
<h2>Time per stage</h2>
{_stages(rep.get("stage_seconds", {}) or {})}
<h2>Units</h2>
{_units(rep.get("units", {}) or {})}
<h2>Degradation</h2>
{_degradation(rep.get("degradation", {}) or {})}
<h2>Faces</h2>
{shown}{thr}
<div class="sheet">{sheet}</div>
<h2>Samples that were not ok</h2>
{_non_ok(rep["non_ok"], rep["non_ok_total"])}
<h2>Configuration and models</h2>
{_config(run)}
<p class="muted">report.json holds everything on this page: <a href="report.json">report.json</a></p>
</body></html>
"""
