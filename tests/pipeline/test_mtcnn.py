"""MTCNN port: weights found offline, faces found in real photos (clean and degraded), few false alarms."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest
import torch

from pipeline.mtcnn import (
    MTCNN,
    WEIGHTS_INSTALL_HINT,
    Detection,
    MTCNNConfig,
    batched_nms,
    load_mtcnn,
    mtcnn_weights_dir,
    nms,
)
from tests.pipeline import photos


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return load_mtcnn()


def _center(box: np.ndarray | tuple[float, ...]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _inside(point: tuple[float, float], box: tuple[float, ...]) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def test_weights_dir_has_the_three_nets() -> None:
    folder = mtcnn_weights_dir()
    assert sorted(p.name for p in folder.glob("?net.pt")) == ["onet.pt", "pnet.pt", "rnet.pt"]


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dist(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps facenet-pytorch==2.6.0"):
        mtcnn_weights_dir()
    assert WEIGHTS_INSTALL_HINT == "pip install --no-deps facenet-pytorch==2.6.0"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="min_face_size"):
        MTCNNConfig(min_face_size=8)
    with pytest.raises(ValueError, match="scale_factor"):
        MTCNNConfig(scale_factor=1.0)


def test_nms_union_and_min() -> None:
    boxes = torch.tensor([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [2, 2, 6, 6]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # IoU(0, 1) = 81 / 119 = 0.68; box 3 lies inside box 0: IoU 25/100, "min" overlap 1.0
    assert nms(boxes, scores, 0.5).tolist() == [3, 0, 2]
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [3, 2]
    groups = torch.tensor([0, 1, 0, 1])
    assert sorted(batched_nms(boxes, scores, groups, 0.5).tolist()) == [0, 1, 2, 3]
    assert nms(torch.zeros((0, 4)), torch.zeros((0,)), 0.5).numel() == 0


def test_lfw_faces_are_found(detector: MTCNN) -> None:
    found = [len(d) > 0 for d in detector.detect(photos.lfw_for_detection(photos.lfw_faces()))]
    assert sum(found) >= 99, f"missed faces: {[i for i, f in enumerate(found) if not f]}"


def test_lfw_nonfaces_raise_few_false_alarms(detector: MTCNN) -> None:
    hits = [len(d) > 0 for d in detector.detect(photos.lfw_for_detection(photos.lfw_nonfaces()))]
    assert sum(hits) <= 2, f"false detections: {[i for i, h in enumerate(hits) if h]}"


@pytest.mark.parametrize(
    "name,head", [("astronaut", photos.ASTRONAUT_HEAD), ("grace_hopper", photos.GRACE_HOPPER_HEAD)]
)
@pytest.mark.parametrize("factor", [1, 4, 8])
def test_photo_face_found_clean_and_degraded(detector: MTCNN, name: str, head: tuple[int, ...], factor: int) -> None:
    img = getattr(photos, name)()
    if factor > 1:
        img = photos.degrade(img, factor, seed=factor)
    (det,) = detector.detect([img])
    assert len(det) == 1, f"{name} x{factor}: {len(det)} faces, scores {det.scores}"
    assert _inside(_center(det.boxes[0]), head)
    for x, y in det.landmarks[0]:  # landmarks inside the (slightly grown) box
        b = det.boxes[0]
        assert b[0] - 5 <= x <= b[2] + 5 and b[1] - 5 <= y <= b[3] + 5
    le, re, nose, lm, rm = det.landmarks[0]
    assert le[0] < nose[0] < re[0] and lm[0] < rm[0]  # image-left eye first
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])


def test_canvas_with_six_faces_at_different_sizes(detector: MTCNN) -> None:
    canvas, boxes = photos.canvas_with_faces(6, seed=0)
    (det,) = detector.detect([canvas])
    assert len(det) == 6, det.scores
    owners = sorted(next(i for i, b in enumerate(boxes) if _inside(_center(d), b)) for d in det.boxes)
    assert owners == list(range(6))


def test_batch_of_mixed_sizes_matches_one_by_one(detector: MTCNN) -> None:
    a, g = photos.astronaut(), photos.grace_hopper()
    images = [a, g, a[::2, ::2].copy(), np.full((64, 80, 3), 128, np.uint8), g]
    together = detector.detect(images)
    assert [len(d) for d in together] == [1, 1, 1, 0, 1]
    for img, d in zip(images, together, strict=True):
        (alone,) = detector.detect([img])
        np.testing.assert_allclose(d.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(d.landmarks, alone.landmarks, atol=1e-3)
    np.testing.assert_allclose(together[1].boxes, together[4].boxes)
    assert detector.detect([]) == []


def test_max_side_detects_on_a_smaller_copy_but_reports_full_size(detector: MTCNN) -> None:
    a = photos.astronaut()
    (full,) = detector.detect([a])
    (small,) = load_mtcnn(MTCNNConfig(max_side=256)).detect([a])
    assert len(small) == 1
    np.testing.assert_allclose(small.landmarks, full.landmarks, atol=6.0)  # 2 px at the detection scale


def test_rejects_non_rgb_input(detector: MTCNN) -> None:
    with pytest.raises(ValueError, match="uint8"):
        detector.detect([np.zeros((32, 32), np.uint8)])


def test_empty_detection_shapes() -> None:
    e = Detection.empty()
    assert len(e) == 0 and e.boxes.shape == (0, 4) and e.landmarks.shape == (0, 5, 2)


def test_torch_resampler_agrees_with_opencv(detector: MTCNN) -> None:
    """The torch path (what CUDA runs) finds the same faces as the OpenCV path (what CPU runs)."""
    torch_path = load_mtcnn(MTCNNConfig(resampler="torch"))
    canvas, _ = photos.canvas_with_faces(6, seed=0)
    images = [photos.astronaut(), photos.grace_hopper(), canvas]
    for a, b in zip(detector.detect(images), torch_path.detect(images), strict=True):
        assert len(a) == len(b)
        order = np.argsort(a.boxes[:, 0]), np.argsort(b.boxes[:, 0])
        sides = (a.boxes[:, 2] - a.boxes[:, 0])[order[0]]
        err = np.abs(a.landmarks[order[0]] - b.landmarks[order[1]]).max(axis=(1, 2))
        assert (err <= 0.05 * sides).all(), (err, sides)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(detector: MTCNN) -> None:
    gpu = load_mtcnn(device="cuda")
    images = [photos.astronaut(), photos.grace_hopper()]
    torch_cpu = load_mtcnn(MTCNNConfig(resampler="torch"))
    for a, b in zip(torch_cpu.detect(images), gpu.detect(images), strict=True):
        assert len(a) == len(b) == 1
        np.testing.assert_allclose(a.landmarks, b.landmarks, atol=0.5)
