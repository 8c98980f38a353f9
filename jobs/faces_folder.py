"""``dr2 restore-faces``: the official demo's job (a folder of aligned faces -> DR2 -> enhancer), batched.

Inputs of any size are resized to 512x512 (the aligned-face size the restorer takes); outputs are PNGs
with the input's stem, so nothing is lost to a second JPEG encoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from dr2.restorer import FACE_SIZE
from pipeline.config import RestorerKind
from pipeline.graph.models import WEIGHTS_HELP, build_restorer, pick_device
from pipeline.store.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

def restore_folder(in_dir: Path, out_dir: Path, *, ddpm: str, enhancer: str, tiny: bool, N: int, tau: int, seed: int,
                   batch_size: int, device: str, precision: str) -> int:
    files = sorted(p for p in in_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {in_dir}")
    if not tiny and not ddpm:
        raise ValueError(f"--ddpm is required (or --tiny). {WEIGHTS_HELP}")
    # the same builder as `dr2 restore`: s3:// model dirs are fetched once per node and checksum-verified
    restorer = build_restorer(kind=RestorerKind.TINY if tiny else RestorerKind.DR2, ddpm=ddpm, enhancer=enhancer,
                              device=pick_device(device), precision=precision, seed=seed, batch_size=batch_size,
                              omega=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(files), unit="face", desc="restore-faces") as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            faces = np.stack([_load_face(p) for p in chunk])  # (B, 512, 512, 3) uint8
            out = restorer.restore(faces, [p.name for p in chunk], N=N, tau=tau)
            for p, face in zip(chunk, out, strict=True):
                Image.fromarray(face).save(out_dir / f"{p.stem}.png")
            bar.update(len(chunk))
    return len(files)


def _load_face(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if img.size != (FACE_SIZE, FACE_SIZE):
        img = img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(img)
