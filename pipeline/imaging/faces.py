"""Faces in a photo: choose detected faces, align them to the FFHQ 512 template, paste restored faces back.

Alignment follows what GFPGAN and CodeFormer do through facexlib's ``FaceRestoreHelper``: a similarity
transform (rotation, uniform scale, translation) from the five detected landmarks to the FFHQ 512x512
five-point template, fitted with ``cv2.estimateAffinePartial2D(method=cv2.LMEDS)``, and ``cv2.warpAffine``
to a 512x512 crop. Paste-back warps the restored crop with the inverse transform and blends it through a
feathered mask (the warped crop footprint, eroded, then Gaussian-blurred, with widths proportional to the
face's size) so that no seam shows. It works on each face's region of the photo only, and gives bit for bit what the
same warps and blend over the whole photo give (see :func:`paste_faces`).

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
from pipeline.imaging.mtcnn import Detection, FaceDetector
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

    Only each face's region is touched (:func:`_warp_face`), and the result is bit for bit what warping crop and
    mask over the whole photo and blending there in float32 gives: faces whose regions overlap are blended one
    after the other in one float32 buffer and rounded once, as the whole-photo blend did.
    """
    if len(affines) != len(restored_crops):
        raise ValueError(f"got {len(affines)} affines for {len(restored_crops)} restored crops")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"the photo must be uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    H, W = rgb.shape[:2]
    pastes: list[_Paste] = []
    for face, crop in zip(affines, restored_crops, strict=True):
        affine = face.affine if isinstance(face, AlignedFace) else np.asarray(face, dtype=np.float64)
        crop = np.asarray(crop)
        if crop.shape != (FACE_SIZE, FACE_SIZE, 3) or crop.dtype != np.uint8:
            raise ValueError(
                f"restored crops must be uint8 ({FACE_SIZE}, {FACE_SIZE}, 3), got {crop.dtype} {crop.shape}"
            )
        paste = _warp_face(crop, cv2.invertAffineTransform(affine), (H, W), interpolation)
        if paste is not None:
            pastes.append(paste)
    out = rgb.copy()
    for group in _overlapping(pastes):
        x0, y0 = min(p.box[0] for p in group), min(p.box[1] for p in group)
        x1, y1 = max(p.box[2] for p in group), max(p.box[3] for p in group)
        acc = out[y0:y1, x0:x1].astype(np.float32)  # (h, w, 3): pixels outside the masks come back unchanged
        for p in group:
            px0, py0, px1, py1 = p.box
            region = acc[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0]
            m = p.mask[:, :, None]
            region[...] = m * p.back.astype(np.float32) + (1.0 - m) * region
        out[y0:y1, x0:x1] = np.clip(np.rint(acc), 0, 255).astype(np.uint8)
    return out


# OpenCV's SIMD loops (warps, filters) end each row with a scalar tail that may round differently from the vector
# lanes. So that a region gives the same pixels as the whole photo, a region's left edge sits on a multiple of this
# many pixels (a row that reaches the photo's right edge then ends in the same tail), and where it stops short of the
# right edge, this many pixels beyond what is blended are computed and dropped.
_SIMD_SPAN = 64


@dataclass(frozen=True)
class _Paste:
    """One face ready to blend: ``box`` (x0, y0, x1, y1) its region of the photo (end exclusive), and over that region
    ``back`` (h, w, 3) uint8 the restored crop warped back and ``mask`` (h, w) float32 in [0, 1] its feathered mask."""

    box: tuple[int, int, int, int]
    back: np.ndarray
    mask: np.ndarray


def _warp_face(crop: np.ndarray, inverse: np.ndarray, shape: tuple[int, int], interpolation: int) -> _Paste | None:
    """Warp ``crop`` and its mask into the face's region of a photo of ``shape`` (H, W); None when the face's crop
    covers no pixel of the photo.

    ``inverse`` (2, 3) maps crop -> photo. The region is the crop's footprint (its bounding box, a pixel wider than
    the nearest-neighbour rounding can reach); outside it the mask is exactly 0, so nothing else changes. Warps are
    computed from the photo's origin (dsize reaching the region's far corner) with the unchanged matrix and then cut:
    OpenCV maps each destination pixel from its own coordinates, and translating the matrix by the region's origin
    instead changes float rounding (INTER_CUBIC: +-1 at about 0.03% of pixels), which would change output bytes.
    """
    H, W = shape
    box = _footprint_box(inverse, shape)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    back = cv2.warpAffine(
        crop, inverse, (min(W, x1 + _SIMD_SPAN), y1), flags=interpolation, borderMode=cv2.BORDER_REPLICATE
    )[y0:y1, x0:x1]  # (h, w, 3) uint8
    return _Paste(box=box, back=back, mask=_soft_mask(inverse, shape, box))


def _footprint_box(inverse: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), end exclusive, clipped to the photo: every pixel whose nearest crop pixel lies in the crop.

    A singular ``inverse`` (OpenCV then maps every pixel to the crop's origin) covers the whole photo.
    """
    H, W = shape
    if not np.isfinite(inverse).all() or inverse[0, 0] * inverse[1, 1] - inverse[0, 1] * inverse[1, 0] == 0:
        return 0, 0, W, H
    # a pixel is in the footprint when its crop coordinates round into [0, 511]: inside [-0.5, 511.5]; one more
    # crop pixel on each side, and a photo pixel, absorb OpenCV's rounding
    lo, hi = -1.0, FACE_SIZE + 1.0
    corners = np.array([[lo, lo], [hi, lo], [lo, hi], [hi, hi]])
    pts = corners @ inverse[:, :2].T + inverse[:, 2]  # (4, 2) photo x, y
    x0, y0 = max(0, int(np.floor(pts[:, 0].min())) - 1), max(0, int(np.floor(pts[:, 1].min())) - 1)
    x1, y1 = min(W, int(np.ceil(pts[:, 0].max())) + 2), min(H, int(np.ceil(pts[:, 1].max())) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _soft_mask(inverse: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """The crop's footprint in the photo, eroded then blurred so its edge fades out inside the crop, over ``box``.

    Widths scale with the face: the edge band is about 1/20 of the footprint's side (facexlib's rule), from the
    footprint's pixel count in the photo. The erosions and the blur run over ``box`` widened by what they reach
    (the footprint is 0 there, as it is everywhere outside ``box``), clipped to the photo, where their borders
    are the photo's own: the values are those of the whole photo's mask.
    """
    H, W = shape
    bx0, by0, bx1, by1 = box
    ones = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    det = abs(float(inverse[0, 0] * inverse[1, 1] - inverse[0, 1] * inverse[1, 0]))
    max_edge = int(np.sqrt(det) * (FACE_SIZE + 2)) // 20 + 1  # the footprint has at most ~det * 514^2 pixels
    while True:
        reach = 2 * max_edge + 2  # the erosions (3, 2 * edge) and the blur (radius edge) see this far
        x0, y0 = max(0, bx0 - reach) // _SIMD_SPAN * _SIMD_SPAN, max(0, by0 - reach)
        x1, y1 = min(W, bx1 + reach + _SIMD_SPAN), min(H, by1 + reach)
        footprint = cv2.warpAffine(ones, inverse, (x1, y1), flags=cv2.INTER_NEAREST, borderValue=0.0)
        footprint = cv2.erode(np.ascontiguousarray(footprint[y0:, x0:]), np.ones((3, 3), np.uint8))
        edge = max(1, int(np.sqrt(float(np.count_nonzero(footprint)))) // 20)  # count: the exact sum of the 0/1 pixels
        if edge <= max_edge:
            break
        max_edge = edge  # not expected (the bound holds); widen and redo rather than cut the blur short
    inner = cv2.erode(footprint, np.ones((2 * edge, 2 * edge), np.uint8))
    mask = cv2.GaussianBlur(inner, (2 * edge + 1, 2 * edge + 1), 0)
    return mask[by0 - y0 : by1 - y0, bx0 - x0 : bx1 - x0]


def _overlapping(pastes: list[_Paste]) -> list[list[_Paste]]:
    """``pastes`` in groups whose regions overlap (directly or through others), each group in paste order."""
    groups: list[list[tuple[int, _Paste]]] = []
    for i, p in enumerate(pastes):
        touching = [g for g in groups if any(_intersect(p.box, q.box) for _, q in g)]
        merged = sorted((item for g in touching for item in g), key=lambda item: item[0]) + [(i, p)]
        groups = [g for g in groups if not any(g is t for t in touching)] + [merged]
    return [[p for _, p in g] for g in groups]


def _intersect(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


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
