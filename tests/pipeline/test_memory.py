"""Memory bounded by a budget (issue 19): sizes from image headers, blocks closed by decoded pixels, detection and
the paste-back holding one window / one photo decoded at a time, and the plan that splits a run's budget.

Real images, the real MTCNN detector and the real stage functions; no Ray (the end-to-end run with a tiny budget is
in ``tests/jobs/test_memory_budget.py``).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dr2.restorer import PassthroughRestorer
from pipeline import schema as S
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.graph import memory, stages
from pipeline.graph.models import build_detector
from pipeline.imaging.decode import ImageError, decode_image, decoded_pixels, read_header
from tests.jobs.corpus import png_header_bomb
from tests.pipeline.photos import astronaut
from tests.pipeline.test_stages import write_shard

BUDGET = 12_000  # decoded pixels per block in these tests


def jpeg(w: int, h: int, *, orientation: int = 1, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=80, exif=exif.tobytes())
    return buf.getvalue()


def claims(data: bytes, w: int, h: int) -> bytes:
    """A baseline JPEG whose frame header (SOF0) announces ``w`` x ``h``: a 150 MP photo's header in a few bytes."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", h, w) + data[at + 9 :]


def cfg_for(tmp_path: Path, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {"src": str(tmp_path / "in"), "dst": str(tmp_path / "out"),
                            "restorer": RestorerKind.PASSTHROUGH, "block_megapixels": BUDGET / 1e6}
    return PipelineConfig(**{**base, **kw})


def test_header_gives_the_displayed_size_without_decoding() -> None:
    assert read_header(jpeg(40, 30)) == read_header(jpeg(40, 30, orientation=3))
    rotated = read_header(jpeg(40, 30, orientation=6))  # a quarter turn on display, as decode_image applies it
    assert rotated is not None and (rotated.width, rotated.height) == (30, 40)
    assert decode_image(jpeg(40, 30, orientation=6), max_pixels=10**6).rgb.shape[:2] == (40, 30)
    huge = claims(jpeg(16, 16), 15000, 10000)
    header = read_header(huge)
    assert header is not None and header.pixels == 150_000_000
    assert decoded_pixels(huge, max_pixels=100_000_000) == 0  # over the limit: never decoded, costs nothing
    with pytest.raises(ImageError) as e:
        decode_image(huge, max_pixels=100_000_000)
    assert e.value.status is S.Status.TOO_LARGE
    bomb = png_header_bomb(30000, 30000)  # past Pillow's own bomb limit: decode_image refuses it at any max_pixels
    assert decoded_pixels(bomb, max_pixels=100_000_000) == decoded_pixels(bomb, max_pixels=10**10) == 0
    for bad in (b"", b"\xff\xd8 not a jpeg", b"<html>"):
        assert read_header(bad) is None and decoded_pixels(bad, max_pixels=10**8) == 0


def _image_pixels(block: pa.Table, max_pixels: int) -> list[int]:
    return [decoded_pixels(d, max_pixels=max_pixels) if d else 0 for d in block.column(S.IMAGE).to_pylist()]


def test_blocks_hold_at_most_the_pixel_budget_except_one_larger_photo_alone(tmp_path: Path) -> None:
    sizes = [(64, 64), (100, 60), (50, 80), (200, 150), (10, 10), (90, 90), (40, 40), (120, 100), (30, 30)]
    samples = [(f"p{i}", {"jpg": jpeg(w, h, seed=i), "txt": b"caption"}) for i, (w, h) in enumerate(sizes)]
    samples.insert(4, ("huge", {"jpg": claims(jpeg(16, 16), 15000, 10000)}))  # 150 MP: over --max-pixels
    samples.insert(6, ("bad", {"jpg": b"\xff\xd8 not a jpeg"}))
    unit = write_shard(tmp_path / "in" / "s.tar", samples)
    cfg = cfg_for(tmp_path)
    blocks = list(stages.read_unit(unit, cfg))
    held = [_image_pixels(b, cfg.max_pixels) for b in blocks]
    for pixels in held:
        assert sum(pixels) <= BUDGET or sum(p > 0 for p in pixels) == 1 and len(pixels) == 1, held
    # a block closes only when the next photo would not fit: each block plus the next photo is over the budget
    for pixels, following in zip(held, held[1:], strict=False):
        assert sum(pixels) + following[0] > BUDGET or len(pixels) >= cfg.rows_per_block, held
    # p0+p1 (10096 px: p2 would not fit), p2, p3 (30000 px, alone), huge (0: never decoded) + p4 + bad (0) + p5 + p6
    # (9800 px), p7 (12000 px: exactly the budget, full), p8 + the end row
    assert [len(b) for b in held] == [2, 1, 1, 5, 1, 2]
    table = pa.concat_tables(blocks)
    assert table.column(S.KEY).to_pylist()[:-1] == [k for k, _ in samples]  # every row, in order, once
    assert table.column(S.UNIT_SIZE).to_pylist()[-1] == len(samples)


@pytest.fixture(scope="module")
def detector() -> Any:
    return build_detector(PipelineConfig(), torch.device("cpu"))


def _watch_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap ``stages.decode_image``: after each decode, record the pixels of the decoded images alive, this one
    included."""
    alive: dict[int, int] = {}
    seen: list[int] = []
    real = stages.decode_image

    def decode(data: bytes, max_pixels: int) -> Any:
        img = real(data, max_pixels)
        key = id(img)
        alive[key] = img.height * img.width
        weakref.finalize(img, alive.pop, key, None)
        seen.append(sum(alive.values()))
        return img

    monkeypatch.setattr(stages, "decode_image", decode)
    return seen


def test_detection_and_paste_back_hold_one_window_of_decoded_pixels(tmp_path: Path, detector: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    face = astronaut()  # 512 x 512 = 262144 pixels, a real face
    buf = io.BytesIO()
    Image.fromarray(face).save(buf, "JPEG", quality=90)
    photo = buf.getvalue()
    samples = [(f"f{i}", {"jpg": photo}) for i in range(5)]
    samples.insert(2, ("huge", {"jpg": claims(jpeg(16, 16), 15000, 10000)}))
    samples.insert(3, ("small", {"jpg": jpeg(100, 80)}))
    unit = write_shard(tmp_path / "in" / "f.tar", samples)
    budget = 600_000  # two faces' photos fit a window, a third does not
    cfg = cfg_for(tmp_path, block_megapixels=budget / 1e6, detect_batch_size=8)
    block = pa.concat_tables(list(stages.read_unit(unit, dataclasses.replace(cfg, block_megapixels=100.0))))
    seen = _watch_decodes(monkeypatch)
    detected = pa.concat_tables(list(stages.detect_block(block, detector, cfg)))
    status = dict(zip(detected.column(S.KEY).to_pylist(), detected.column(S.STATUS).to_pylist(), strict=True))
    assert status["huge"] == "too_large" and status["small"] == "no_face"
    assert [status[f"f{i}"] for i in range(5)] == ["pending"] * 5
    # the decoded images held at once fit the window: f0 + f1 (+ small), then f2 + f3, then f4
    assert seen == [262144, 524288, 532288, 262144, 524288, 262144]
    seen.clear()
    restored = stages.restore_block(detected, PassthroughRestorer(), cfg)
    composed = stages.compose_block(restored, cfg)
    assert composed.status.count("ok") == 5
    assert seen == [262144] * 5  # the paste-back decodes one photo at a time and lets it go before the next


def test_pixel_windows_close_before_the_budget_and_keep_a_larger_row_alone() -> None:
    px = {0: 5, 1: 5, 2: 20, 3: 1, 4: 9, 5: 1, 6: 0, 7: 0}
    windows = list(stages._pixel_windows(list(px), 3, 10, px.__getitem__))
    assert windows == [[0, 1], [2], [3, 4], [5, 6, 7]]
    assert list(stages._pixel_windows([], 3, 10, px.__getitem__)) == []


def test_plan_splits_the_budget_between_the_store_and_the_decoding_slots() -> None:
    gib = 2**30
    plan = memory.plan_memory(PipelineConfig(), node_bytes=24 * gib, cpus=2, detect_actors=1)
    assert plan.budget_bytes == 3 * gib  # an eighth of the node
    assert plan.object_store_bytes == 768 * memory.MiB and plan.write_tasks == 2
    # three decoding slots (one detector, two write tasks) share what the store and their baselines leave, at 12
    # bytes per pixel
    assert plan.block_pixels == int((2.25 * gib - 3 * memory.WORKER_BASELINE_BYTES) / 3 // memory.PEAK_BYTES_PER_PIXEL)
    assert plan.ray_block_bytes == 24 * memory.MiB  # Ray merges at most 1/32 of the store into a block
    small = memory.plan_memory(PipelineConfig(memory_budget_mb=512), node_bytes=24 * gib, cpus=16, detect_actors=7,
                               actor_cores=8)
    assert small.budget_bytes == 512 * memory.MiB and small.object_store_bytes == memory.MIN_OBJECT_STORE
    # 7 detectors and 8 write tasks: their baselines take more than the store leaves, blocks are the smallest
    assert small.write_tasks == 8 and small.block_pixels == memory.MIN_BLOCK_PIXELS  # a 48 MP photo goes alone
    assert small.ray_block_bytes == memory.MIN_RAY_BLOCK
    assert memory.plan_memory(PipelineConfig(), node_bytes=2**40, cpus=64, detect_actors=8).ray_block_bytes == (
        memory.MAX_RAY_BLOCK)  # Ray's own default on a large node
    explicit = memory.plan_memory(PipelineConfig(block_megapixels=2.5, object_store_memory=gib), node_bytes=8 * gib,
                                  cpus=4, detect_actors=2, nodes=2)
    assert explicit.block_pixels == 2_500_000 and explicit.object_store_bytes == gib
    assert PipelineConfig(block_megapixels=2.5).block_pixels == 2_500_000
    # the write tasks take the cores the stage actors leave, at least one
    on_two = memory.plan_memory(PipelineConfig(), node_bytes=24 * gib, cpus=2, detect_actors=1, actor_cores=2)
    assert on_two.write_tasks == 1 and on_two.block_pixels == int(1.25 * gib / 2 // memory.PEAK_BYTES_PER_PIXEL)
    assert 48_000_000 < on_two.block_pixels < 2 * 48_000_000  # one 48 MP photo per block on this 24 GiB machine
    assert PipelineConfig().block_pixels == PipelineConfig().max_pixels  # unresolved: one photo at the limit
    with pytest.raises(ValueError, match="memory-budget-mb"):
        PipelineConfig(memory_budget_mb=0)


RSS_AFTER_FREE = """
import sys
from pipeline.graph import memory

def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB in 64 KiB blocks: below the mmap threshold, a heap
keep = bytearray(64 * 1024)  # one block above them keeps the heap's top in use: glibc cannot shrink it on free
del blocks
before = rss_mib()
memory.release_freed_memory()
print(before, rss_mib())
"""


@pytest.mark.skipif(memory._malloc_trim() is None, reason="glibc's malloc_trim only")
@pytest.mark.parametrize("settings", ["glibc defaults", "the workers' MALLOC_ENV"])
def test_release_freed_memory_gives_a_heap_back_that_glibc_keeps(settings: str) -> None:
    """What a worker that decoded photos looks like to glibc: freed blocks below the heap's top stay in the process
    (an idle write worker held 1.7 GB) until ``malloc_trim``. Run in a fresh interpreter with glibc's defaults, and
    with the settings a local Ray's workers start with (their 64 MiB trim threshold keeps more at a heap's top: the
    trim must still give it back)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if settings != "glibc defaults":
        env.update(memory.MALLOC_ENV)
    out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    before, after = map(float, out.stdout.split())
    assert before > 200, before  # glibc kept the freed 250 MiB
    assert after < before - 200, (before, after)  # and gave it back when asked
