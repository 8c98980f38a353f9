"""``dr2 demo``: build a small degraded WebDataset archive from public-domain photos shipped with the
package, restore it with the full pipeline on a local Ray, and write pictures a person can look at.

The archive (:func:`build_demo_archive`) holds the shipped face photos degraded at three strengths (x2, x4, x8:
blur, downsample, noise, JPEG), a photo without a face, and broken samples (a cut-off JPEG, a truncated PNG, a
sample without an image), so the output shows every row status a real archive produces.

Two pictures:

* :func:`write_detection_preview` -- what is real without weights: per sample the input photo with the
  detected boxes and five landmarks drawn, the aligned 512x512 crops (warped with the affine stored in the
  sample's ``dr2.json``, as the restorer saw them), and the output photo (with ``--restorer passthrough`` the
  faces pasted back unchanged: it shows alignment and paste-back, not restoration); samples without an image
  get a one-line caption with their status and error.
* :func:`write_preview` -- input | output per sample. With the tiny random DR2 models (``--restorer tiny``)
  every stage runs for real but the pasted faces are NOT restorations; pass ``--ddpm``/``--enhancer`` (see
  the README's "Weights") to see real restorations.
"""

from __future__ import annotations

import io
import json
import logging
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds
from PIL import Image

from dr2.restorer import FACE_SIZE
from pipeline.imaging.decode import ImageError, decode_image
from pipeline.imaging.faces import BORDER_VALUE, FFHQ_TEMPLATE_512, FaceMeta

log = logging.getLogger(__name__)

DEMO_PHOTOS = ("astronaut.jpg", "grace_hopper.jpg", "coffee.jpg")
PREVIEW_MAX_PIXELS = 100_000_000  # the pipeline's default --max-pixels


def degrade(rgb: np.ndarray, factor: int, *, seed: int, jpeg_quality: int = 40) -> np.ndarray:
    """The kind of damage DR2 removes: blur, downsample by ``factor``, Gaussian noise, JPEG; back to full size."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    x = cv2.GaussianBlur(rgb, (0, 0), sigmaX=0.6 * factor)
    x = cv2.resize(x, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    x = np.clip(x.astype(np.float32) + rng.normal(0, 6.0, x.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", x[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    assert ok
    x = np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR))[..., ::-1]
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)


def demo_photo(name: str) -> np.ndarray:
    """One of the public-domain photos shipped in ``jobs/demo_data``, RGB uint8."""
    data = resources.files("jobs").joinpath("demo_data", name).read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


DEMO_STRENGTHS = (2, 4, 8)


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def build_demo_archive(out_dir: Path) -> Path:
    """Write ``out_dir/shard-000.tar`` and ``shard-001.tar``; return the folder.

    shard-000: astronaut_x2, hopper_x4, astronaut_x8, coffee (no face), corrupt (a JPEG cut after 2000 bytes).
    shard-001: hopper_x2, astronaut_x4, hopper_x8, truncated_png (a PNG cut in its pixel data), caption_only
    (no image member). Each sample also carries a ``json`` member that must pass through untouched.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    astronaut, hopper, coffee = (demo_photo(n) for n in DEMO_PHOTOS)
    x2, x4, x8 = DEMO_STRENGTHS
    png = png_bytes(hopper)
    samples = [
        [("astronaut_x2", {"jpg": jpeg_bytes(degrade(astronaut, x2, seed=1))}),
         ("hopper_x4", {"jpg": jpeg_bytes(degrade(hopper, x4, seed=2))}),
         ("astronaut_x8", {"jpg": jpeg_bytes(degrade(astronaut, x8, seed=3))}),
         ("coffee", {"jpg": jpeg_bytes(coffee)}),
         ("corrupt", {"jpg": jpeg_bytes(astronaut)[:2000]})],
        [("hopper_x2", {"jpg": jpeg_bytes(degrade(hopper, x2, seed=4))}),
         ("astronaut_x4", {"jpg": jpeg_bytes(degrade(astronaut, x4, seed=5))}),
         ("hopper_x8", {"jpg": jpeg_bytes(degrade(hopper, x8, seed=6))}),
         ("truncated_png", {"png": png[: len(png) // 2]}),
         ("caption_only", {"txt": b"a sample with no image"})],
    ]
    for i, shard in enumerate(samples):
        with wds.TarWriter(str(out_dir / f"shard-{i:03d}.tar")) as sink:
            for key, members in shard:
                sink.write({"__key__": key, **members, "json": json.dumps({"origin": "dr2 demo"}).encode()})
    return out_dir


def write_preview(src_dir: Path, dst_dir: Path, out_png: Path, *, tile: int = 256, banner: str = "") -> Path:
    """A grid: one row per sample with an image, input on the left, output on the right, status as a caption,
    under an optional ``banner`` line (e.g. that the faces come from tiny random models)."""
    rows: list[np.ndarray] = []
    if banner:
        head = np.zeros((32, 2 * tile, 3), np.uint8)
        cv2.putText(head, banner, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 200, 255), 1, cv2.LINE_AA)
        rows.append(head)
    for shard in sorted(dst_dir.glob("*.tar")):
        before = {s["__key__"]: s for s in wds.WebDataset(str(src_dir / shard.name), shardshuffle=False)}
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(sample["dr2.json"])
            member = meta.get("image_member")
            if not member or member not in sample:
                continue
            pair = []
            for data in (before[sample["__key__"]][member], sample[member]):
                img = _decode(data)
                if img is None:
                    img = np.zeros((tile, tile, 3), np.uint8)
                pair.append(cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA))
            row = np.concatenate(pair, axis=1)
            label = f"{sample['__key__']}: {meta['status']} ({len(meta['faces'])} faces)"
            cv2.putText(row, label, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 2, cv2.LINE_AA)
            rows.append(row)
    if rows:
        cv2.imwrite(str(out_png), np.concatenate(rows, axis=0))
    return out_png


# five landmark colours (BGR): left eye, right eye, nose, left mouth corner, right mouth corner
LANDMARK_COLOURS = ((255, 64, 64), (64, 64, 255), (64, 220, 64), (0, 200, 255), (255, 0, 255))
BOX_COLOUR = (0, 255, 0)


def _fit(img: np.ndarray, tile: int) -> np.ndarray:
    """Letterbox ``img`` (BGR) into a tile x tile black square, aspect kept."""
    h, w = img.shape[:2]
    scale = tile / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    out = np.zeros((tile, tile, 3), np.uint8)
    y, x = (tile - nh) // 2, (tile - nw) // 2
    out[y : y + nh, x : x + nw] = small
    return out


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    """``text`` in white on a darkened band across the top of a copy of ``img``."""
    out = img.copy()
    out[:22] = (out[:22].astype(np.float32) * 0.35).astype(np.uint8)
    cv2.putText(out, text, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def draw_detections(bgr: np.ndarray, faces: list[FaceMeta]) -> np.ndarray:
    """A copy of ``bgr`` with each face's box and five landmarks drawn (sizes scale with the photo)."""
    out = bgr.copy()
    t = max(1, round(max(bgr.shape[:2]) / 250))
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = (int(round(v)) for v in f.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOUR, t, cv2.LINE_AA)
        cv2.putText(out, f"{i}: {f.score:.2f}", (x1, max(12 * t, y1 - 3 * t)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * t,
                    BOX_COLOUR, max(1, t // 2), cv2.LINE_AA)
        r = max(2, round(0.04 * min(x2 - x1, y2 - y1)))  # a landmark dot is 4% of the face box
        for (x, y), colour in zip(f.landmarks, LANDMARK_COLOURS, strict=True):
            cv2.circle(out, (int(round(x)), int(round(y))), r, colour, -1, cv2.LINE_AA)
    return out


def aligned_crop(bgr: np.ndarray, face: FaceMeta) -> np.ndarray:
    """The 512x512 template crop of ``face`` from the input photo, warped as the pipeline warped it, with the
    detected landmarks mapped through the affine (dots) over the FFHQ template points (white rings): where
    they part, the alignment is off."""
    affine = face.affine_matrix()  # (2, 3) photo -> crop
    crop = cv2.warpAffine(bgr, affine, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_VALUE[::-1])
    marks = np.asarray(face.landmarks, np.float64) @ affine[:, :2].T + affine[:, 2]  # (5, 2) in crop pixels
    for (tx, ty), (x, y), colour in zip(FFHQ_TEMPLATE_512, marks, LANDMARK_COLOURS, strict=True):
        cv2.circle(crop, (int(round(tx)), int(round(ty))), 14, (255, 255, 255), 2, cv2.LINE_AA)
        cv2.circle(crop, (int(round(x)), int(round(y))), 8, colour, -1, cv2.LINE_AA)
    return crop


def _decode(data: bytes | None) -> np.ndarray | None:
    """BGR pixels of ``data`` as the pipeline decoded them (orientation applied), or None if it cannot be decoded.

    The pipeline's own decoder (Pillow): OpenCV's would print ``libpng error: ...`` on stderr for the demo's cut-off
    PNG, and a person would take it for a failure of the run."""
    if not data:
        return None
    try:
        return np.ascontiguousarray(decode_image(data, max_pixels=PREVIEW_MAX_PIXELS).rgb[..., ::-1])
    except ImageError:
        return None


def write_detection_preview(
    src_dir: Path, dst_dir: Path, out_png: Path, *, tile: int = 256, max_crops: int = 4
) -> Path:
    """What a run without weights really shows, one row per sample of the restored shards in ``dst_dir``:
    input photo with boxes and five landmarks | output photo | up to ``max_crops`` aligned face crops.

    Boxes, landmarks and affines come from each sample's ``dr2.json`` (``faces``: box, score, landmarks,
    affine); the input bytes from the same-named shard in ``src_dir``. A sample without a decodable image gets
    a caption row with its status and error instead. Rows are padded to the widest; writes ``out_png``
    (BGR PNG) and returns it.
    """
    rows: list[np.ndarray | str] = []  # a picture row, or the caption of a sample without a picture
    for shard in sorted(dst_dir.glob("*.tar")):
        before = {s["__key__"]: s for s in wds.WebDataset(str(src_dir / shard.name), shardshuffle=False)}
        for sample in wds.WebDataset(str(shard), shardshuffle=False):
            key = sample["__key__"]
            meta = json.loads(sample["dr2.json"])
            faces = [FaceMeta.from_json_dict(f) for f in meta.get("faces", [])]
            member = meta.get("image_member") or ""
            inp = _decode(before.get(key, {}).get(member)) if member else None
            status = meta.get("status", "?")
            if inp is None:
                error = str(meta.get("error") or "")
                rows.append(f"{shard.name}/{key}: {status}" + (f" ({error})" if error else ""))
                continue
            out = _decode(sample.get(member))
            tiles = [
                _caption(_fit(draw_detections(inp, faces), tile), f"{key}: {status}, {len(faces)} faces"),
                _caption(_fit(out if out is not None else np.zeros_like(inp), tile), "output"),
            ]
            for i, f in enumerate(faces[:max_crops]):
                tiles.append(_caption(_fit(aligned_crop(inp, f), tile), f"face {i} aligned"))
            rows.append(np.concatenate(tiles, axis=1))
    if not rows:
        raise FileNotFoundError(f"no restored samples under {dst_dir}")
    width = max([r.shape[1] for r in rows if isinstance(r, np.ndarray)], default=2 * tile)
    chars = max(8, (width - 10) // 8)  # FONT_HERSHEY_SIMPLEX at 0.45 is about 8 px a character
    picture = []
    for r in rows:
        if isinstance(r, str):
            r = _caption(np.full((24, width, 3), 40, np.uint8), r if len(r) <= chars else r[: chars - 3] + "...")
        picture.append(np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), np.concatenate(picture, axis=0)):
        raise OSError(f"could not write {out_png}")
    return out_png
