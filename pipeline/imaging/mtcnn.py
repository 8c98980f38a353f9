"""MTCNN face detector with five landmarks: our own torch port, offline, batched over images of any size.

The method is Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded Convolutional
Networks" (IEEE SPL 2016): an image pyramid scanned by P-Net (12x12 window, stride 2), candidates refined by
R-Net (24x24 crops) and O-Net (48x48 crops, which also regresses the five landmarks), with bounding-box
regression and non-maximum suppression between stages.

What this port keeps: the weights and layer layout of facenet-pytorch 2.6.0 (``facenet_pytorch/data/
{pnet,rnet,onet}.pt``, plain state dicts converted from the authors' Caffe models, MIT licence), and that
package's pre-processing (``(x - 127.5) / 128`` on RGB, ``area`` resampling, the ``(0, 3, 2, 1)`` permute
before the dense layers) and cascade constants (pyramid ``m = 12 / min_face_size``, factor 0.709, NMS 0.5 per
scale, 0.7 across scales and after R-Net, 0.7 "Min" after O-Net). One deliberate difference: boxes that reach
past the image border are zero-padded before resampling (as the original MATLAB code does) instead of being
clipped and stretched, which keeps the aspect ratio of faces cut by the border.

Two resamplers (``MTCNNConfig.resampler``, one class each) do the ``area`` resampling of the pyramid levels and
the R-Net/O-Net crops. :class:`OpenCVResampler`, the CPU default: ``cv2.INTER_AREA`` on the host's uint8 arrays,
about 10x faster on CPU than torch's ``area`` mode. :class:`TorchResampler`, what CUDA runs (``auto``) and what
CPU runs with ``resampler="torch"``, so that the CPU tests exercise the GPU's code: each image is uploaded once
as uint8 and everything stays on the device, one ``F.interpolate`` per pyramid level per group of same-sized
images and all crops of all images in one gather from summed-area tables (equal to a per-box ``F.interpolate``
to float32 rounding). NMS loops on the host on either device (one transfer instead of a round trip per kept box),
and on CUDA the nets run in full fp32 (cuDNN's TF32 off), so the GPU computes what the same code does on CPU.

The stated tolerance between the two resamplers, asserted by ``tests/pipeline/test_mtcnn.py`` on real photos
(astronaut, Grace Hopper, degraded x4 and x8, a 768x1024 canvas of six faces, a 1200x1600 (2 MP) canvas of
four, also shrunk by ``max_side``): the same faces, box corners within 8% of the face's box side, landmarks
within 5%, scores within 0.01 (:data:`RESAMPLER_TOLERANCE`; measured 5.3%, 3.0%, 0.003; at most 13 px, on the
2 MP canvas with ``max_side=1024``, where the shrink itself differs: OpenCV's on the host, torch's on the
device). On LFW's 200 tiny gray crops upscaled 6x, face / no face agrees on at least 199 (one borderline face
flips) and boxes and landmarks of faces found by both are within 10%, scores 0.05
(:data:`LFW_RESAMPLER_TOLERANCE`; measured 7.1%, 7.8%, 0.04). The torch path on CUDA against the same path on
CPU: the same faces, boxes and landmarks within 2%, scores 0.005 (:data:`DEVICE_TOLERANCE`: float sums in
another order can move a crop window by a pixel), checked by ``scripts/gpu_check.sh``.

We only read the weight files from the installed wheel and never import ``facenet_pytorch`` (it needs
torchvision). NMS is plain torch (no torchvision). The cascade runs on CPU or CUDA.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "facenet_pytorch"
WEIGHTS_INSTALL_HINT = "pip install --no-deps facenet-pytorch==2.6.0"  # what scripts/setup.sh runs


@dataclass(frozen=True, kw_only=True)
class MTCNNConfig:
    """Cascade settings. Defaults are facenet-pytorch's, except ``thresholds[2]`` (0.9 instead of 0.7)."""

    min_face_size: int = 20  # smallest face the pyramid looks for, in pixels of the (possibly downscaled) image
    scale_factor: float = 0.709  # ratio between pyramid levels
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.9)  # P-Net, R-Net, O-Net face scores
    nms_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7)  # per scale, pyramid, R-Net, O-Net
    max_side: int | None = None  # detect on a copy whose longer side is at most this (speed); results in full size
    # area resampling of pyramid levels and crops: OpenCV on uint8 (fast on CPU), torch on the device; auto
    # picks OpenCV on CPU and torch elsewhere (CUDA), so images never leave the GPU there
    resampler: Literal["auto", "opencv", "torch"] = "auto"

    def __post_init__(self) -> None:
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 (P-Net's window), got {self.min_face_size}")
        if not 0.1 <= self.scale_factor < 1.0:
            raise ValueError(f"scale_factor must be in [0.1, 1), got {self.scale_factor}")
        if self.max_side is not None and self.max_side < 12:
            raise ValueError(f"max_side must be >= 12, got {self.max_side}")


@dataclass(frozen=True)
class Detection:
    """Faces found in one image, sorted by score (highest first), in that image's pixel coordinates.

    ``boxes`` (K, 4) float32 x1, y1, x2, y2; ``scores`` (K,) float32 in [0, 1]; ``landmarks`` (K, 5, 2) float32
    x, y of: left eye, right eye, nose, left mouth corner, right mouth corner ("left" = the image's left).
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detection:
        return Detection(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


@dataclass(frozen=True)
class DetectionTolerance:
    """Largest differences allowed between two detections of one image (see :class:`DetectionGap`)."""

    box: float  # box corners, as a fraction of the face's box side
    landmarks: float  # landmarks, as a fraction of the face's box side
    score: float  # face scores, absolute


# The stated bounds (module docstring), asserted by tests/pipeline/test_mtcnn.py and printed by scripts/gpu_check.sh.
RESAMPLER_TOLERANCE = DetectionTolerance(box=0.08, landmarks=0.05, score=0.01)  # OpenCV vs torch path, photos
LFW_RESAMPLER_TOLERANCE = DetectionTolerance(box=0.10, landmarks=0.10, score=0.05)  # the same on tiny LFW crops
DEVICE_TOLERANCE = DetectionTolerance(box=0.02, landmarks=0.02, score=0.005)  # torch path: CUDA vs CPU


@dataclass(frozen=True)
class DetectionGap:
    """How far apart two detections of the same image are (e.g. two resamplers, or CPU and GPU).

    Faces are paired by nearest box centre; ``box`` and ``landmarks`` are the largest coordinate difference
    over the pairs, as a fraction of the first detection's box side (so 0.02 is 2 px on a 100 px face),
    ``score`` the largest score difference, ``pixels`` the largest coordinate difference in pixels.
    """

    faces: tuple[int, int]
    box: float
    landmarks: float
    score: float
    pixels: float

    def within(self, tolerance: DetectionTolerance) -> bool:
        """The same number of faces, and every difference at most ``tolerance``'s."""
        return (
            self.faces[0] == self.faces[1]
            and self.box <= tolerance.box
            and self.landmarks <= tolerance.landmarks
            and self.score <= tolerance.score
        )

    @staticmethod
    def between(a: Detection, b: Detection) -> DetectionGap:
        if len(a) == 0 or len(b) == 0:
            return DetectionGap((len(a), len(b)), 0.0, 0.0, 0.0, 0.0)
        ca, cb = (a.boxes[:, :2] + a.boxes[:, 2:]) / 2, (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
        pair = np.linalg.norm(ca[:, None] - cb[None], axis=2).argmin(axis=1)  # (Ka,) nearest face of b
        side = np.maximum(a.boxes[:, 2] - a.boxes[:, 0], a.boxes[:, 3] - a.boxes[:, 1])  # (Ka,)
        box_px = np.abs(a.boxes - b.boxes[pair]).max(axis=1)
        mark_px = np.abs(a.landmarks - b.landmarks[pair]).max(axis=(1, 2))
        return DetectionGap(
            faces=(len(a), len(b)),
            box=float((box_px / side).max()),
            landmarks=float((mark_px / side).max()),
            score=float(np.abs(a.scores - b.scores[pair]).max()),
            pixels=float(max(box_px.max(), mark_px.max())),
        )


class FaceDetector(Protocol):
    """What the face stage needs from a detector: RGB uint8 (H, W, 3) images in, one Detection each out."""

    def detect(self, images: Sequence[np.ndarray]) -> list[Detection]: ...


# --------------------------------------------------------------------------------------------- weights


def mtcnn_weights_dir() -> Path:
    """Folder holding pnet.pt, rnet.pt, onet.pt from the installed facenet-pytorch wheel (not imported)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    folders: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p) / "data" for p in spec.submodule_search_locations]
    try:  # fall back to the distribution's file list (e.g. an unusual install layout)
        dist = importlib.metadata.distribution("facenet-pytorch")
        folders += [Path(str(dist.locate_file(f))).parent for f in dist.files or [] if f.name == "pnet.pt"]
    except importlib.metadata.PackageNotFoundError:
        pass
    for folder in folders:
        if all((folder / f"{name}.pt").is_file() for name in ("pnet", "rnet", "onet")):
            return folder
    raise FileNotFoundError(
        "MTCNN weights not found: they ship in the facenet-pytorch wheel. Install them with "
        f"`{WEIGHTS_INSTALL_HINT}` (scripts/setup.sh does this); the package is never imported."
    )


# --------------------------------------------------------------------------------------------- networks


class PNet(nn.Module):
    """Proposal net: fully convolutional, a 12x12 window per output cell (stride 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, 3, H, W) normalised -> reg (B, 4, h, w), face probability (B, h, w)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement net on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (N, 3, 24, 24) -> reg (N, 4), face probability (N,)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)  # the Caffe models' (W, H) flattening order
        x = self.prelu4(self.dense4(x))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net on 48x48 crops: box regression, five landmarks, face score."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: (N, 3, 48, 48) -> reg (N, 4), landmarks (N, 10) as 5 x then 5 y in box units, probability (N,)
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)[:, 1]


# --------------------------------------------------------------------------------------------- box helpers


def nms(
    boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: Literal["union", "min"] = "union"
) -> torch.Tensor:
    """Greedy non-maximum suppression; indices kept (on ``boxes``' device), highest score first.

    boxes (N, 4) x1, y1, x2, y2 in MTCNN's inclusive-pixel convention (areas use ``+ 1``). ``mode="min"``
    divides the intersection by the smaller area (O-Net's last step), ``"union"`` by the union (IoU).
    The greedy loop runs on the host whatever the device: each kept box is one step that needs the previous
    one's answer, which on a GPU would be a host round trip per kept box (hundreds per batch); moving the
    (N, 4) boxes once costs one. The arithmetic is the same IEEE float32 either way.
    """
    device = boxes.device
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=device)
    x1, y1, x2, y2 = boxes.cpu().unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    keep: list[torch.Tensor] = []
    while order.numel() > 0:  # one iteration per kept box, each vectorised over the rest
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        denom = torch.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return torch.stack(keep).to(device)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    groups: torch.Tensor,
    threshold: float,
    mode: Literal["union", "min"] = "union",
) -> torch.Tensor:
    """NMS within each group (image) at once: groups are moved apart so that their boxes never overlap."""
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    offset = groups.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 2)
    return nms(boxes + offset, scores, threshold, mode)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply box regression (N, 4), in units of the box's width/height, to boxes (N, 4)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + reg * torch.stack([w, h, w, h], dim=1)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow boxes (N, 4) to squares around their centres (the nets' crops are square)."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


# --------------------------------------------------------------------------------------------- the cascade


class MTCNN(nn.Module):
    """The three nets and the cascade. Build with :func:`load_mtcnn`; call :meth:`detect`."""

    def __init__(self, config: MTCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or MTCNNConfig()
        self.pnet = PNet()
        self.rnet = RNet()
        self.onet = ONet()

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.inference_mode()
    def detect(self, images: Sequence[np.ndarray]) -> list[Detection]:
        """Find faces in each RGB uint8 (H, W, 3) image; images may differ in size.

        P-Net runs once per pyramid level for each group of same-sized images; R-Net and O-Net run once
        over the candidates of all images together.
        """
        if len(images) == 0:
            return []
        for img in images:
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"images must be uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
        shrink = [self._shrink_factor(img) for img in images]
        resampler = OpenCVResampler if self._use_opencv() else TorchResampler
        source = resampler(images, shrink, self.device)
        with _ieee_fp32(self.device):
            boxes, image_ids = self._propose(source)  # (N, 4), (N,)
            boxes, image_ids, _ = self._refine(source, boxes, image_ids)
            boxes, image_ids, scores, points = self._output(source, boxes, image_ids)

        ids = image_ids.cpu().numpy()  # the (K, ...) results reach the host here, once
        boxes_np = boxes.cpu().numpy().astype(np.float32)
        points_np = points.cpu().numpy().astype(np.float32)
        scores_np = scores.cpu().numpy().astype(np.float32)
        out: list[Detection] = []
        for i, s in enumerate(shrink):
            sel = ids == i
            b, p, c = boxes_np[sel] / np.float32(s), points_np[sel] / np.float32(s), scores_np[sel]
            order = np.argsort(-c, kind="stable")
            out.append(Detection(b[order], c[order], p[order]))
        return out

    def _use_opencv(self) -> bool:
        if self.config.resampler == "auto":
            return self.device.type == "cpu"
        return self.config.resampler == "opencv"

    def _shrink_factor(self, img: np.ndarray) -> float:
        side = max(img.shape[0], img.shape[1])
        max_side = self.config.max_side
        return 1.0 if max_side is None or side <= max_side else max_side / side

    def _propose(self, source: Resampler) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over each image's pyramid -> square candidate boxes (N, 4) and their image index (N,)."""
        cfg = self.config
        all_boxes: list[torch.Tensor] = []  # (n, 9): x1 y1 x2 y2 score reg(4)
        all_ids: list[torch.Tensor] = []
        for group, ids in enumerate(source.groups):
            h, w = source.sizes[ids[0]]
            id_map = torch.tensor(ids, device=self.device)
            scales: list[float] = []
            scale = 12.0 / cfg.min_face_size
            while min(h, w) * scale >= 12:
                scales.append(scale)
                scale *= cfg.scale_factor
            sizes = [(int(h * s + 1), int(w * s + 1)) for s in scales]
            for scale, level in zip(scales, source.pyramid(group, sizes), strict=True):  # (B, 3, h', w')
                reg, prob = self.pnet(_normalise(level))
                cand, local = _pnet_boxes(reg, prob, scale, cfg.thresholds[0])
                keep = batched_nms(cand[:, :4], cand[:, 4], local, cfg.nms_thresholds[0])
                all_boxes.append(cand[keep])
                all_ids.append(id_map[local[keep]])
        if not all_boxes:
            return torch.zeros((0, 4), device=self.device), torch.zeros((0,), dtype=torch.long, device=self.device)
        cand = torch.cat(all_boxes)
        image_ids = torch.cat(all_ids)
        keep = batched_nms(cand[:, :4], cand[:, 4], image_ids, cfg.nms_thresholds[1])
        cand, image_ids = cand[keep], image_ids[keep]
        return _square(_regress(cand[:, :4], cand[:, 5:9])), image_ids

    def _refine(
        self, source: Resampler, boxes: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R-Net over 24x24 crops of all images' candidates."""
        cfg = self.config
        if boxes.shape[0] == 0:
            return boxes, image_ids, boxes.new_zeros((0,))
        reg, prob = self.rnet(_normalise(source.crops(boxes, image_ids, 24)))
        ok = prob > cfg.thresholds[1]
        boxes, image_ids, reg, prob = boxes[ok], image_ids[ok], reg[ok], prob[ok]
        keep = batched_nms(boxes, prob, image_ids, cfg.nms_thresholds[2])
        return _square(_regress(boxes[keep], reg[keep])), image_ids[keep], prob[keep]

    def _output(
        self, source: Resampler, boxes: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net over 48x48 crops -> final boxes (K, 4), image ids (K,), scores (K,), landmarks (K, 5, 2)."""
        cfg = self.config
        if boxes.shape[0] == 0:
            return boxes, image_ids, boxes.new_zeros((0,)), boxes.new_zeros((0, 5, 2))
        reg, marks, prob = self.onet(_normalise(source.crops(boxes, image_ids, 48)))
        ok = prob > cfg.thresholds[2]
        boxes, image_ids, reg, marks, prob = boxes[ok], image_ids[ok], reg[ok], marks[ok], prob[ok]
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = torch.stack([boxes[:, 0:1] + w * marks[:, :5] - 1, boxes[:, 1:2] + h * marks[:, 5:] - 1], dim=2)
        boxes = _regress(boxes, reg)
        keep = batched_nms(boxes, prob, image_ids, cfg.nms_thresholds[3], mode="min")
        return boxes[keep], image_ids[keep], prob[keep], points[keep]


def _ieee_fp32(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """On CUDA, cuDNN convolutions in full fp32 (no TF32) for the cascade, so that GPU scores match the CPU's.

    PyTorch lets cuDNN run fp32 convolutions in TF32 by default (a 10-bit mantissa): scores near a
    threshold could then keep or drop a face on one device and not the other. The nets are small; the
    flags are restored on exit (the other cuDNN flags are passed through unchanged).
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def _pnet_boxes(
    reg: torch.Tensor, prob: torch.Tensor, scale: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """P-Net output cells over ``threshold`` -> boxes (n, 9) in image pixels (x1 y1 x2 y2 score reg) and batch index."""
    stride, cell = 2, 12
    idx = (prob >= threshold).nonzero()  # (n, 3): b, y, x
    score = prob[idx[:, 0], idx[:, 1], idx[:, 2]]
    r = reg.permute(0, 2, 3, 1)[idx[:, 0], idx[:, 1], idx[:, 2]]  # (n, 4)
    xy = idx[:, [2, 1]].to(reg.dtype)
    q1 = torch.floor((stride * xy + 1) / scale)
    q2 = torch.floor((stride * xy + cell) / scale)
    return torch.cat([q1, q2, score[:, None], r], dim=1), idx[:, 0]


# --------------------------------------------------------------------------------------------- area resampling


def _crop_windows(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (N, 4) float in MTCNN's 1-based inclusive convention -> integer crop windows (N, 4) x1, y1, x2, y2,
    0-based, end exclusive, at least one pixel wide; they may reach past the image (zero padding there)."""
    b = torch.trunc(boxes).long()
    x1, y1 = b[:, 0] - 1, b[:, 1] - 1
    x2, y2 = torch.maximum(b[:, 2], x1 + 1), torch.maximum(b[:, 3], y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=1)


class Resampler(Protocol):
    """Where the cascade gets its pixels: pyramid levels and box crops, area-resampled, as float (0..255)."""

    sizes: list[tuple[int, int]]  # (h, w) of each image as detected on (after the max_side shrink)
    groups: list[list[int]]  # indices of same-sized images, each group's P-Net runs as one batch

    def pyramid(self, group: int, sizes: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        """The images of ``groups[group]`` at each (h', w') of ``sizes`` in turn: (B, 3, h', w') on the device."""
        ...

    def crops(self, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        """Each box (N, 4) from its image, zero-padded outside it, resampled to (N, 3, size, size)."""
        ...


def _same_size_groups(sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        by_size.setdefault(hw, []).append(i)
    return list(by_size.values())


class OpenCVResampler:
    """``cv2.INTER_AREA`` on the host's uint8 arrays (the CPU default): about 10x faster on CPU than torch's
    ``area`` mode, which dominated CPU time on large photos. Each level / crop batch is then sent to the device."""

    def __init__(self, images: Sequence[np.ndarray], shrink: Sequence[float], device: torch.device) -> None:
        self.device = device
        self.arrays: list[np.ndarray] = []  # per image (h, w, 3) uint8, C-contiguous
        for img, s in zip(images, shrink, strict=True):
            if s != 1.0:
                size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            self.arrays.append(np.ascontiguousarray(img))
        self.sizes = [(a.shape[0], a.shape[1]) for a in self.arrays]
        self.groups = _same_size_groups(self.sizes)

    def pyramid(self, group: int, sizes: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        ids = self.groups[group]
        for h, w in sizes:
            level = np.stack([cv2.resize(self.arrays[i], (w, h), interpolation=cv2.INTER_AREA) for i in ids])
            yield torch.from_numpy(level).to(self.device).permute(0, 3, 1, 2).float()  # (B, 3, h, w)

    def crops(self, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        out: list[np.ndarray] = []
        for (x1, y1, x2, y2), i in zip(_crop_windows(boxes).tolist(), image_ids.tolist(), strict=True):
            H, W = self.arrays[i].shape[:2]
            cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), max(min(x2, W), 0), max(min(y2, H), 0)
            if cx2 <= cx1 or cy2 <= cy1:
                out.append(np.zeros((size, size, 3), np.uint8))
                continue
            patch = self.arrays[i][cy1:cy2, cx1:cx2]
            left, right, top, bottom = max(-x1, 0), max(x2 - W, 0), max(-y1, 0), max(y2 - H, 0)
            if left or right or top or bottom:
                patch = cv2.copyMakeBorder(patch, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            out.append(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA))
        return torch.from_numpy(np.stack(out)).to(self.device).permute(0, 3, 1, 2).float()  # (N, 3, s, s)


class TorchResampler:
    """torch's ``area`` resampling (``adaptive_avg_pool2d``, facenet-pytorch's choice) on the device: what CUDA
    runs, and CPU with ``resampler="torch"``, so that CPU tests exercise the GPU's code.

    Each image is uploaded once, as uint8, shrunk there if it is over ``max_side``, and kept as a uint8 batch
    per group of same-sized images. Pyramid levels: one ``F.interpolate`` per level over a group, in float.
    Crops: every box of every image at once, as box sums on a summed-area table of each group (int32, or int64
    past 8.4 MP): the crop's output cell (i, j) averages the input rows ``[floor(i*h/s), ceil((i+1)*h/s))`` and
    likewise the columns, which is exactly ``adaptive_avg_pool2d``'s window, and sums of uint8 pixels are exact
    integers, so the numbers equal a per-box ``F.interpolate`` (to float32 rounding) without a launch per box.
    """

    CHUNK = 1 << 22  # output values per gather (bounds the int64 index tensors to 4 x 32 MiB)

    def __init__(self, images: Sequence[np.ndarray], shrink: Sequence[float], device: torch.device) -> None:
        self.device = device
        uploaded: list[torch.Tensor] = []  # per image (h, w, 3) uint8 on the device
        for img, s in zip(images, shrink, strict=True):
            t = torch.from_numpy(np.ascontiguousarray(img) if img.flags.writeable else img.copy()).to(device)
            if s != 1.0:
                size = (max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s)))
                x = F.interpolate(t.permute(2, 0, 1)[None].float(), size=size, mode="area")  # (1, 3, h, w)
                t = x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)
            uploaded.append(t)
        self.sizes = [(t.shape[0], t.shape[1]) for t in uploaded]
        self.groups = _same_size_groups(self.sizes)
        self.batches = [torch.stack([uploaded[i] for i in ids]) for ids in self.groups]  # (B, h, w, 3) uint8
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def pyramid(self, group: int, sizes: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
        batch = self.batches[group].permute(0, 3, 1, 2).float()  # (B, 3, h, w) in 0..255
        for size in sizes:
            yield F.interpolate(batch, size=size, mode="area")

    def _integral(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every image's summed-area table in one flat tensor, and per image: where its table starts, its
        height and width + 1. Image k's table is S (h+1, w+1, 3) with ``S[y, x, c] = img[:y, :x, c].sum()``."""
        if self._table is None:
            dtype = torch.int32 if max(h * w for h, w in self.sizes) * 255 < 2**31 else torch.int64
            numel = [(h + 1) * (w + 1) * 3 for h, w in self.sizes]
            table = torch.zeros(sum(numel), dtype=dtype, device=self.device)
            starts = [0] * len(self.sizes)
            at = 0
            for ids, batch in zip(self.groups, self.batches, strict=True):
                b, h, w, _ = batch.shape
                slab = table[at : at + b * numel[ids[0]]].view(b, h + 1, w + 1, 3)
                slab[:, 1:, 1:] = batch.cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
                for k, i in enumerate(ids):
                    starts[i] = at + k * numel[i]
                at += b * numel[ids[0]]
            self._table = (
                table,
                torch.tensor(starts, device=self.device),
                torch.tensor([h for h, _ in self.sizes], device=self.device),
                torch.tensor([w + 1 for _, w in self.sizes], device=self.device),
            )
        return self._table

    def crops(self, boxes: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        win = _crop_windows(boxes)  # (N, 4) int64
        step = max(1, self.CHUNK // (3 * size * size))
        parts = [self._crop_chunk(win[k : k + step], image_ids[k : k + step], size) for k in range(0, len(win), step)]
        return torch.cat(parts) if parts else torch.zeros((0, 3, size, size), device=self.device)

    def _crop_chunk(self, win: torch.Tensor, image_ids: torch.Tensor, size: int) -> torch.Tensor:
        table, starts, heights, widths = self._integral()
        i = torch.arange(size, device=self.device)

        def cells(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Window [a, b) (n,) -> each output cell's input range [lo, hi) (n, s), as adaptive_avg_pool2d."""
            n = (b - a)[:, None]
            return a[:, None] + i * n // size, a[:, None] + ((i + 1) * n + size - 1) // size

        y0, y1 = cells(win[:, 1], win[:, 3])
        x0, x1 = cells(win[:, 0], win[:, 2])
        count = ((y1 - y0)[:, :, None] * (x1 - x0)[:, None, :]).float()  # (n, s, s), padding pixels included
        h, w1, base = heights[image_ids][:, None], widths[image_ids][:, None], starts[image_ids][:, None]
        row0, row1 = (base + y.clamp(min=0).minimum(h) * w1 * 3 for y in (y0, y1))  # (n, s) offsets in table
        col0, col1 = (x.clamp(min=0).minimum(w1 - 1) * 3 for x in (x0, x1))  # outside the image: sums of zero
        rgb = torch.arange(3, device=self.device)

        def at(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            return table[(row[:, :, None] + col[:, None, :])[..., None] + rgb]  # (n, s, s, 3)

        sums = at(row1, col1) - at(row0, col1) - at(row1, col0) + at(row0, col0)  # exact integers
        return (sums.float() / count[..., None]).permute(0, 3, 1, 2)  # (n, 3, s, s) in 0..255


def load_mtcnn(config: MTCNNConfig | None = None, *, device: str | torch.device = "cpu") -> MTCNN:
    """Build MTCNN, load the facenet-pytorch weights (``weights_only=True``), move to ``device``, eval mode."""
    model = MTCNN(config)
    folder = mtcnn_weights_dir()
    for name in ("pnet", "rnet", "onet"):
        state = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
        getattr(model, name).load_state_dict(state, strict=True)
    return model.to(device).eval()
