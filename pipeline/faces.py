"""Faces in a photo: choose detected faces, align them to the FFHQ 512 template, paste restored faces back.

Alignment follows what GFPGAN and CodeFormer do through facexlib's ``FaceRestoreHelper``: a similarity
transform (rotation, uniform scale, translation) from the five detected landmarks to the FFHQ 512x512
five-point template, fitted with ``cv2.estimateAffinePartial2D(method=cv2.LMEDS)``, and ``cv2.warpAffine``
to a 512x512 crop. Paste-back warps the restored crop with the inverse transform and blends it through a
feathered mask (the warped crop footprint, eroded, then Gaussian-blurred, with widths proportional to the
face's size) so that no seam shows.

The split steps (:func:`align_faces`, :func:`paste_faces`) exist so that the Ray pipeline can batch the
restorer across images; :func:`restore_image` composes them for one image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from dr2.restorer import FACE_SIZE, FaceRestorer
from pipeline.mtcnn import Detection, FaceDetector
from pipeline.schema import FaceSelect

# facexlib's FFHQ 512 template (x, y): left eye, right eye, nose, left mouth corner, right mouth corner.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float32,
)
BORDER_VALUE = (135, 133, 132)  # facexlib's fill for crop pixels outside the photo


@dataclass(frozen=True, kw_only=True)
class AlignOptions:
    """Which faces to align, and how."""

    select: FaceSelect = FaceSelect.ALL
    max_faces: int = 16  # at most this many faces per image (the largest ones)
    min_face_size: int = 24  # skip faces whose box's shorter side is smaller (pixels of the photo)
    interpolation: int = cv2.INTER_CUBIC  # warpAffine flag both ways (facexlib: linear; cubic round-trips better)

    def __post_init__(self) -> None:
        object.__setattr__(self, "select", FaceSelect(self.select))
        if self.max_faces < 1:
            raise ValueError(f"max_faces must be >= 1, got {self.max_faces}")
        if self.min_face_size < 0:
            raise ValueError(f"min_face_size must be >= 0, got {self.min_face_size}")


@dataclass(frozen=True)
class FaceMeta:
    """One face as detected and aligned, in the photo's pixel coordinates.

    ``box`` x1, y1, x2, y2; ``landmarks`` five (x, y) (left eye, right eye, nose, left/right mouth corner);
    ``affine`` the 2x3 matrix that maps photo coordinates to the 512x512 aligned crop.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    affine: tuple[tuple[float, float, float], tuple[float, float, float]]

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
            "affine": [[float(v) for v in row] for row in self.affine],
        }

    @staticmethod
    def from_json_dict(d: dict[str, Any]) -> FaceMeta:
        box = tuple(float(v) for v in d["box"])
        rows = [tuple(float(v) for v in row) for row in d["affine"]]
        return FaceMeta(
            box=(box[0], box[1], box[2], box[3]),
            score=float(d["score"]),
            landmarks=tuple((float(x), float(y)) for x, y in d["landmarks"]),
            affine=((rows[0][0], rows[0][1], rows[0][2]), (rows[1][0], rows[1][1], rows[1][2])),
        )

    def affine_matrix(self) -> np.ndarray:
        """(2, 3) float64."""
        return np.array(self.affine, dtype=np.float64)


@dataclass(frozen=True)
class AlignedFace:
    """A face warped to the template: ``crop`` uint8 (512, 512, 3) RGB, ``affine`` (2, 3) photo -> crop."""

    crop: np.ndarray
    affine: np.ndarray
    meta: FaceMeta


def select_faces(detection: Detection, image_shape: tuple[int, ...], options: AlignOptions) -> list[int]:
    """Indices into ``detection`` of the faces to align, in the order they will be restored."""
    if len(detection) == 0:
        return []
    boxes = detection.boxes.astype(np.float64)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    big_enough = np.minimum(w, h) >= options.min_face_size
    candidates = np.nonzero(big_enough)[0]
    if candidates.size == 0:
        return []
    area = w * h
    if options.select is FaceSelect.CENTER:
        cy, cx = image_shape[0] / 2.0, image_shape[1] / 2.0
        dist = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - cx, (boxes[:, 1] + boxes[:, 3]) / 2 - cy)
        return [int(candidates[np.argmin(dist[candidates])])]
    by_size = candidates[np.argsort(-area[candidates], kind="stable")]
    if options.select is FaceSelect.LARGEST:
        return [int(by_size[0])]
    return [int(i) for i in by_size[: options.max_faces]]


def estimate_affine(landmarks: np.ndarray) -> np.ndarray:
    """Similarity transform (2, 3) float64 taking five landmarks (5, 2) onto the FFHQ 512 template."""
    affine, _ = cv2.estimateAffinePartial2D(
        landmarks.astype(np.float32).reshape(5, 2), FFHQ_TEMPLATE_512, method=cv2.LMEDS
    )
    if affine is None:  # degenerate landmarks (all on one point): LMEDS finds no model
        raise ValueError(f"cannot fit a similarity transform to landmarks {landmarks.tolist()}")
    return affine.astype(np.float64)


def align_faces(rgb: np.ndarray, detection: Detection, options: AlignOptions | None = None) -> list[AlignedFace]:
    """Warp the selected faces of ``rgb`` (H, W, 3) uint8 to 512x512 template crops."""
    options = options or AlignOptions()
    faces: list[AlignedFace] = []
    for i in select_faces(detection, rgb.shape, options):
        marks = detection.landmarks[i]
        try:
            affine = estimate_affine(marks)
        except ValueError:
            continue  # a degenerate face is skipped, not fatal for the image
        crop = cv2.warpAffine(
            rgb,
            affine,
            (FACE_SIZE, FACE_SIZE),
            flags=options.interpolation,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=BORDER_VALUE,
        )  # (512, 512, 3) uint8
        box = detection.boxes[i]
        meta = FaceMeta(
            box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            score=float(detection.scores[i]),
            landmarks=tuple((float(x), float(y)) for x, y in marks),
            affine=(
                (float(affine[0, 0]), float(affine[0, 1]), float(affine[0, 2])),
                (float(affine[1, 0]), float(affine[1, 1]), float(affine[1, 2])),
            ),
        )
        faces.append(AlignedFace(crop=crop, affine=affine, meta=meta))
    return faces


def paste_faces(
    rgb: np.ndarray,
    affines: Sequence[np.ndarray] | Sequence[AlignedFace],
    restored_crops: np.ndarray | Sequence[np.ndarray],
    *,
    interpolation: int = cv2.INTER_CUBIC,
) -> np.ndarray:
    """Blend restored 512x512 crops back into a copy of ``rgb`` (H, W, 3) uint8 through feathered masks.

    ``affines`` are the photo -> crop transforms (or the AlignedFace objects that carry them), one per crop,
    applied in order (a later face is blended over an earlier one where they overlap).
    """
    if len(affines) != len(restored_crops):
        raise ValueError(f"got {len(affines)} affines for {len(restored_crops)} restored crops")
    H, W = rgb.shape[:2]
    out: np.ndarray = rgb.astype(np.float32)  # (H, W, 3)
    for face, crop in zip(affines, restored_crops, strict=True):
        affine = face.affine if isinstance(face, AlignedFace) else np.asarray(face, dtype=np.float64)
        crop = np.asarray(crop)
        if crop.shape != (FACE_SIZE, FACE_SIZE, 3) or crop.dtype != np.uint8:
            raise ValueError(
                f"restored crops must be uint8 ({FACE_SIZE}, {FACE_SIZE}, 3), got {crop.dtype} {crop.shape}"
            )
        inverse = cv2.invertAffineTransform(affine)
        back = cv2.warpAffine(crop, inverse, (W, H), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
        mask = _soft_mask(inverse, (H, W))  # (H, W) float32 in [0, 1]
        m = mask[:, :, None]
        out = m * back.astype(np.float32) + (1.0 - m) * out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _soft_mask(inverse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The crop's footprint in the photo, eroded then blurred so its edge fades out inside the crop.

    Widths scale with the face: the edge band is about 1/20 of the footprint's side (facexlib's rule).
    """
    H, W = shape
    ones = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    footprint = cv2.warpAffine(ones, inverse, (W, H), flags=cv2.INTER_NEAREST, borderValue=0.0)
    footprint = cv2.erode(footprint, np.ones((3, 3), np.uint8))  # drop the half-covered border pixels
    edge = max(1, int(np.sqrt(float(footprint.sum()))) // 20)
    inner = cv2.erode(footprint, np.ones((2 * edge, 2 * edge), np.uint8))
    return cv2.GaussianBlur(inner, (2 * edge + 1, 2 * edge + 1), 0)


def restore_image(
    rgb: np.ndarray,
    detector: FaceDetector,
    restorer: FaceRestorer,
    *,
    keys_prefix: str,
    N: int,
    tau: int,
    options: AlignOptions | None = None,
) -> tuple[np.ndarray, list[FaceMeta]]:
    """Detect, align, restore and paste back the faces of one RGB uint8 (H, W, 3) photo.

    Returns the composed photo (a copy; ``rgb`` itself when no face was restored) and one FaceMeta per
    restored face. Face ``i`` is restored under the key ``f"{keys_prefix}/{i}"``; ``N`` and ``tau`` are DR2's
    low-pass factor and output step, passed to the restorer.
    """
    options = options or AlignOptions()
    (detection,) = detector.detect([rgb])
    faces = align_faces(rgb, detection, options)
    if not faces:
        return rgb, []
    crops = np.stack([f.crop for f in faces])  # (F, 512, 512, 3)
    keys = [f"{keys_prefix}/{i}" for i in range(len(faces))]
    restored = restorer.restore(crops, keys, N=N, tau=tau)
    return paste_faces(rgb, faces, restored, interpolation=options.interpolation), [f.meta for f in faces]
