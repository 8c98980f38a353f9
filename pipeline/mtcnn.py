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
clipped and stretched, which keeps the aspect ratio of faces cut by the border. On CPU the area resampling
(pyramid levels, crops) is done by OpenCV on uint8, about 10x faster than torch's ``area`` mode; results
differ slightly from the torch path used on CUDA (``MTCNNConfig.resampler`` picks either; a test bounds it).

We only read the weight files from the installed wheel and never import ``facenet_pytorch`` (it needs
torchvision). NMS is plain torch (no torchvision). The cascade runs on CPU or CUDA.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from collections.abc import Sequence
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
    """Greedy non-maximum suppression; indices kept, highest score first.

    boxes (N, 4) x1, y1, x2, y2 in MTCNN's inclusive-pixel convention (areas use ``+ 1``). ``mode="min"``
    divides the intersection by the smaller area (O-Net's last step), ``"union"`` by the union (IoU).
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = torch.argsort(scores, descending=True)
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
    return torch.stack(keep)


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
        shrink = [self._shrink_factor(img) for img in images]
        arrays: list[np.ndarray] = []  # per image (h, w, 3) uint8, C-contiguous
        tensors: list[torch.Tensor] = []  # per image (3, h, w) float32 on device, in 0..255
        for img, s in zip(images, shrink, strict=True):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"images must be uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
            if s != 1.0:
                size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            img = np.ascontiguousarray(img) if img.flags.writeable else img.copy()
            arrays.append(img)
            tensors.append(torch.from_numpy(img).to(self.device).permute(2, 0, 1).float())

        boxes, image_ids = self._propose(arrays, tensors)  # (N, 4), (N,)
        boxes, image_ids, _ = self._refine(arrays, tensors, boxes, image_ids)
        boxes, image_ids, scores, points = self._output(arrays, tensors, boxes, image_ids)

        out: list[Detection] = []
        for i, s in enumerate(shrink):
            sel = image_ids == i
            b = (boxes[sel] / s).cpu().numpy().astype(np.float32)
            p = (points[sel] / s).cpu().numpy().astype(np.float32)
            c = scores[sel].cpu().numpy().astype(np.float32)
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

    def _propose(self, arrays: list[np.ndarray], tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over each image's pyramid -> square candidate boxes (N, 4) and their image index (N,).

        Pyramid levels are area-resampled: with OpenCV on uint8 on CPU (about 10x faster than torch's
        ``area`` mode, which dominated CPU time on large photos), with torch on other devices.
        """
        cfg = self.config
        use_opencv = self._use_opencv()
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            by_shape.setdefault((t.shape[1], t.shape[2]), []).append(i)
        all_boxes: list[torch.Tensor] = []  # (n, 9): x1 y1 x2 y2 score reg(4)
        all_ids: list[torch.Tensor] = []
        for (h, w), ids in by_shape.items():
            batch = torch.stack([tensors[i] for i in ids]) if not use_opencv else torch.empty(0)  # (B, 3, h, w)
            id_map = torch.tensor(ids, device=self.device)
            m = 12.0 / cfg.min_face_size
            scale = m
            while min(h, w) * scale >= 12:
                size = (int(h * scale + 1), int(w * scale + 1))
                if use_opencv:
                    level = np.stack([cv2.resize(arrays[i], size[::-1], interpolation=cv2.INTER_AREA) for i in ids])
                    level_t = torch.from_numpy(level).to(self.device).permute(0, 3, 1, 2).float()  # (B, 3, h', w')
                else:
                    level_t = F.interpolate(batch, size=size, mode="area")
                reg, prob = self.pnet(_normalise(level_t))
                cand, local = _pnet_boxes(reg, prob, scale, cfg.thresholds[0])
                keep = batched_nms(cand[:, :4], cand[:, 4], local, cfg.nms_thresholds[0])
                all_boxes.append(cand[keep])
                all_ids.append(id_map[local[keep]])
                scale *= cfg.scale_factor
        if not all_boxes:
            return torch.zeros((0, 4), device=self.device), torch.zeros((0,), dtype=torch.long, device=self.device)
        cand = torch.cat(all_boxes)
        image_ids = torch.cat(all_ids)
        keep = batched_nms(cand[:, :4], cand[:, 4], image_ids, cfg.nms_thresholds[1])
        cand, image_ids = cand[keep], image_ids[keep]
        return _square(_regress(cand[:, :4], cand[:, 5:9])), image_ids

    def _refine(
        self, arrays: list[np.ndarray], tensors: list[torch.Tensor], boxes: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R-Net over 24x24 crops of all images' candidates."""
        cfg = self.config
        if boxes.shape[0] == 0:
            return boxes, image_ids, boxes.new_zeros((0,))
        reg, prob = self.rnet(_normalise(_crops(arrays, tensors, boxes, image_ids, 24, self._use_opencv())))
        ok = prob > cfg.thresholds[1]
        boxes, image_ids, reg, prob = boxes[ok], image_ids[ok], reg[ok], prob[ok]
        keep = batched_nms(boxes, prob, image_ids, cfg.nms_thresholds[2])
        return _square(_regress(boxes[keep], reg[keep])), image_ids[keep], prob[keep]

    def _output(
        self, arrays: list[np.ndarray], tensors: list[torch.Tensor], boxes: torch.Tensor, image_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net over 48x48 crops -> final boxes (K, 4), image ids (K,), scores (K,), landmarks (K, 5, 2)."""
        cfg = self.config
        if boxes.shape[0] == 0:
            return boxes, image_ids, boxes.new_zeros((0,)), boxes.new_zeros((0, 5, 2))
        reg, marks, prob = self.onet(_normalise(_crops(arrays, tensors, boxes, image_ids, 48, self._use_opencv())))
        ok = prob > cfg.thresholds[2]
        boxes, image_ids, reg, marks, prob = boxes[ok], image_ids[ok], reg[ok], marks[ok], prob[ok]
        w = boxes[:, 2:3] - boxes[:, 0:1] + 1
        h = boxes[:, 3:4] - boxes[:, 1:2] + 1
        points = torch.stack([boxes[:, 0:1] + w * marks[:, :5] - 1, boxes[:, 1:2] + h * marks[:, 5:] - 1], dim=2)
        boxes = _regress(boxes, reg)
        keep = batched_nms(boxes, prob, image_ids, cfg.nms_thresholds[3], mode="min")
        return boxes[keep], image_ids[keep], prob[keep], points[keep]


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


def _crops(
    arrays: list[np.ndarray],
    tensors: list[torch.Tensor],
    boxes: torch.Tensor,
    image_ids: torch.Tensor,
    size: int,
    use_opencv: bool,
) -> torch.Tensor:
    """Crop each box (N, 4) from its image, zero-padding outside the image, resampled to (N, 3, size, size).

    With ``use_opencv`` the crops are cut and area-resampled by OpenCV from the uint8 ``arrays`` (torch's
    ``area`` mode is slow on CPU for the large crops of big faces), else by torch from ``tensors``.
    """
    out_np: list[np.ndarray] = []
    out_t: list[torch.Tensor] = []
    for box, i in zip(boxes.tolist(), image_ids.tolist(), strict=True):
        H, W = arrays[i].shape[:2]
        x1, y1 = math.trunc(box[0]) - 1, math.trunc(box[1]) - 1  # MTCNN's 1-based inclusive boxes
        x2, y2 = math.trunc(box[2]), math.trunc(box[3])
        x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), max(min(x2, W), 0), max(min(y2, H), 0)
        left, right, top, bottom = max(-x1, 0), max(x2 - W, 0), max(-y1, 0), max(y2 - H, 0)
        empty = cx2 <= cx1 or cy2 <= cy1
        if use_opencv:
            if empty:
                out_np.append(np.zeros((size, size, 3), np.uint8))
                continue
            patch = arrays[i][cy1:cy2, cx1:cx2]
            if left or right or top or bottom:
                patch = cv2.copyMakeBorder(patch, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            out_np.append(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA))
        else:
            if empty:
                out_t.append(tensors[i].new_zeros((1, 3, size, size)))
                continue
            patch_t = F.pad(tensors[i][:, cy1:cy2, cx1:cx2], (left, right, top, bottom))
            out_t.append(F.interpolate(patch_t[None], size=(size, size), mode="area"))
    if use_opencv:
        return torch.from_numpy(np.stack(out_np)).to(tensors[0].device).permute(0, 3, 1, 2).float()  # (N, 3, s, s)
    return torch.cat(out_t)


def load_mtcnn(config: MTCNNConfig | None = None, *, device: str | torch.device = "cpu") -> MTCNN:
    """Build MTCNN, load the facenet-pytorch weights (``weights_only=True``), move to ``device``, eval mode."""
    model = MTCNN(config)
    folder = mtcnn_weights_dir()
    for name in ("pnet", "rnet", "onet"):
        state = torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=True)
        getattr(model, name).load_state_dict(state, strict=True)
    return model.to(device).eval()
