"""A small real archive for the job tests: WebDataset shards written by the webdataset library, holding
degraded real face photos, a photo without a face, a PNG with alpha, a corrupt JPEG, a sample without an
image, keys with directory prefixes, extra members of several kinds, and a shard truncated mid-sample."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from tests.pipeline.photos import astronaut, degrade, grace_hopper


def encode(rgb: np.ndarray, fmt: str = "JPEG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def no_face_image(seed: int = 0) -> np.ndarray:
    """Smooth colour gradients with noise: nothing MTCNN should call a face."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320].astype(np.float32)
    img = np.stack([x / 320 * 255, y / 240 * 255, (x + y) / 560 * 255], -1) + rng.normal(0, 8, (240, 320, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def build_archive(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Write shards under ``root``; return {shard name: [(key, expected status), ...]} in order."""
    root.mkdir(parents=True, exist_ok=True)
    astro = degrade(astronaut(), 4, seed=1)
    hopper = degrade(grace_hopper(), 8, seed=2)
    rgba = np.dstack([astronaut()[::2, ::2], np.full((256, 256), 200, np.uint8)])
    shards = {
        "shard-000.tar": [
            ("astronaut_x4", "ok", {"jpg": encode(astro, quality=90), "json": b'{"id": 1}', "cls": b"3"}),
            ("gradient", "no_face", {"png": encode(no_face_image(), "PNG"), "txt": b"no face here"}),
            ("broken", "decode_error", {"jpg": encode(astro)[:1500], "json": b'{"id": 3}'}),
            ("caption_only", "no_image", {"txt": b"just a caption"}),
        ],
        "shard-001.tar": [
            ("people/hopper_x8", "ok", {"jpg": encode(hopper, quality=92), "json": json.dumps({"id": 5}).encode()}),
            ("people/astronaut_rgba", "ok", {"png": encode(rgba, "PNG"), "seg.png": encode(rgba[..., :3], "PNG")}),
        ],
    }
    expected: dict[str, list[tuple[str, str]]] = {}
    for name, samples in shards.items():
        with wds.TarWriter(str(root / name)) as sink:
            for key, _, members in samples:
                sink.write({"__key__": key, **members})
        expected[name] = [(key, status) for key, status, _ in samples]
    # shard-002: two good samples, then the file is cut inside the third sample's image
    with wds.TarWriter(str(root / "shard-002.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"g{i}", "png": encode(no_face_image(i), "PNG"), "txt": f"{i}".encode()})
    data = (root / "shard-002.tar").read_bytes()
    cut = data.rfind(b"g2.png") + 512 + 4000  # past g2.png's header, inside its data
    (root / "shard-002.tar").write_bytes(data[:cut])
    # g1 is complete: g2's header began after it, so no member of g1 can follow. g2's only member is cut: its key
    # is still accounted for, as a "truncated" sample holding no member (its dr2.json says what happened).
    expected["shard-002.tar"] = [("g0", "no_face"), ("g1", "no_face"), ("g2", "truncated")]
    return expected


def assert_shard_matches_input(out: list[dict[str, Any]], inputs: dict[str, dict[str, Any]],
                               want: list[tuple[str, str]], shard: str) -> None:
    """An output shard (read back by webdataset) against its input: same keys in the same order, the expected
    statuses, every member kept byte for byte, images passed through unchanged unless restored."""
    assert [s["__key__"] for s in out] == [k for k, _ in want], shard
    assert [json.loads(s["dr2.json"])["status"] for s in out] == [st for _, st in want], shard
    for sample in out:
        meta = json.loads(sample["dr2.json"])
        original = inputs.get(sample["__key__"])
        if original is None:  # the truncated sample is not readable by webdataset's reader either
            continue
        names = {k for k in original if not k.startswith("__")}
        assert {k for k in sample if not k.startswith("__")} == names | {"dr2.json"}
        for name in names - {meta["image_member"]}:
            assert sample[name] == original[name], (shard, sample["__key__"], name)
        if meta["status"] != "ok" and meta["image_member"]:
            assert sample[meta["image_member"]] == original[meta["image_member"]]  # passed through unchanged
        if meta["status"] == "ok":
            assert meta["faces"] and sample[meta["image_member"]] != original[meta["image_member"]]
