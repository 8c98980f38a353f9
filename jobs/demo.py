"""``dr2 demo``: build a small degraded WebDataset archive from public-domain photos shipped with the
package, restore it with the full pipeline on a local Ray, and write a before/after preview a person can
look at.

Without weights the demo runs the tiny random DR2 models (``--restorer tiny``): every stage runs for
real, but the faces it pastes back are NOT restorations. Pass ``--ddpm``/``--enhancer`` (see the README's
"Weights") to see real restorations.
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

log = logging.getLogger(__name__)

DEMO_PHOTOS = ("astronaut.jpg", "grace_hopper.jpg", "coffee.jpg")


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


def build_demo_archive(out_dir: Path) -> Path:
    """Write ``out_dir/shard-000.tar`` and ``shard-001.tar``; return the folder.

    Besides degraded faces (x4 and x8) it holds a photo without a face, a corrupt JPEG and a sample
    without an image, so the output shows every row status a real archive produces.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    astronaut, hopper, coffee = (demo_photo(n) for n in DEMO_PHOTOS)
    samples = [
        [("astronaut_x4", {"jpg": jpeg_bytes(degrade(astronaut, 4, seed=1))}),
         ("hopper_x8", {"jpg": jpeg_bytes(degrade(hopper, 8, seed=2))}),
         ("coffee", {"jpg": jpeg_bytes(coffee)})],
        [("hopper_x4", {"jpg": jpeg_bytes(degrade(hopper, 4, seed=3))}),
         ("corrupt", {"jpg": jpeg_bytes(astronaut)[:2000]}),
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
                img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
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
