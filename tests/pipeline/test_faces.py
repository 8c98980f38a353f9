"""Alignment to the FFHQ template and paste-back, on real photos: round trips must be near lossless."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from dr2.restorer import FACE_SIZE, FaceRestorer, PassthroughRestorer
from pipeline.imaging.decode import decode_image, encode_image
from pipeline.imaging.faces import (
    FFHQ_TEMPLATE_512,
    AlignOptions,
    FaceMeta,
    FaceSelect,
    align_faces,
    paste_faces,
    restore_image,
)
from pipeline.imaging.mtcnn import MTCNN, load_mtcnn
from tests.pipeline import photos

MAX_PIXELS = 50_000_000


@pytest.fixture(scope="module")
def detector() -> MTCNN:
    return load_mtcnn()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(a, b, data_range=255))


class InvertRestorer:
    """A real (trivial) restorer: 255 - face. Proves restore_image takes any FaceRestorer."""

    name = "invert"

    def restore(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int) -> np.ndarray:
        return 255 - faces

    def restore_stages(self, faces: np.ndarray, keys: Sequence[str], *, N: int, tau: int) -> dict[str, np.ndarray]:
        out = self.restore(faces, keys, N=N, tau=tau)
        return {"dr2": out, "enhanced": out}

    def describe(self) -> dict[str, Any]:
        return {"restorer": self.name}


REAL_PHOTOS = {
    "astronaut": photos.astronaut,
    "grace_hopper": photos.grace_hopper,
    "astronaut_x4": lambda: photos.degrade(photos.astronaut(), 4, seed=4),
    "astronaut_x8": lambda: photos.degrade(photos.astronaut(), 8, seed=8),
    "grace_hopper_x4": lambda: photos.degrade(photos.grace_hopper(), 4, seed=4),
    "grace_hopper_x8": lambda: photos.degrade(photos.grace_hopper(), 8, seed=8),
    "canvas6": lambda: photos.canvas_with_faces(6, seed=0)[0],
}


@pytest.mark.parametrize("name", list(REAL_PHOTOS))
def test_passthrough_round_trip_is_near_lossless(detector: MTCNN, name: str) -> None:
    img = REAL_PHOTOS[name]()
    out, metas = restore_image(img, detector, PassthroughRestorer(), keys_prefix=name, N=4, tau=10)
    assert len(metas) == (6 if name == "canvas6" else 1)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert _psnr(img, out) >= 40.0


def _round_trip_bytes(detector: MTCNN, data: bytes) -> tuple[Any, Any, list[FaceMeta]]:
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    out, metas = restore_image(decoded.rgb, detector, PassthroughRestorer(), keys_prefix="k", N=4, tau=10)
    return decoded, decode_image(encode_image(decoded, out), max_pixels=MAX_PIXELS), metas


def _png(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_gray_photo_round_trip(detector: MTCNN) -> None:
    src, back, metas = _round_trip_bytes(detector, _png(Image.fromarray(photos.to_gray(photos.grace_hopper()))))
    assert len(metas) == 1 and back.gray and back.mode == "L"
    assert _psnr(src.rgb, back.rgb) >= 40.0


def test_rgba_photo_round_trip_keeps_alpha(detector: MTCNN) -> None:
    rgb = photos.astronaut()
    alpha = np.tile(np.linspace(40, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))
    src, back, metas = _round_trip_bytes(detector, _png(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")))
    assert len(metas) == 1 and back.mode == "RGBA"
    np.testing.assert_array_equal(back.alpha, alpha)
    assert _psnr(src.rgb, back.rgb) >= 40.0


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_round_trip(detector: MTCNN, orientation: int) -> None:
    upright = photos.grace_hopper()  # (600, 512, 3): stored rotated, shown upright through EXIF
    stored = np.rot90(upright, k=1 if orientation == 6 else -1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    src, back, metas = _round_trip_bytes(detector, _png(Image.fromarray(np.ascontiguousarray(stored)), exif=exif))
    np.testing.assert_array_equal(src.rgb, upright)
    assert len(metas) == 1 and back.orientation == 1 and back.rgb.shape == upright.shape
    assert _psnr(src.rgb, back.rgb) >= 40.0


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_redetected_landmarks_on_aligned_crop_match_template(detector: MTCNN, name: str) -> None:
    img = getattr(photos, name)()
    (det,) = detector.detect([img])
    (face,) = align_faces(img, det)
    assert face.crop.shape == (FACE_SIZE, FACE_SIZE, 3) and face.crop.dtype == np.uint8
    (again,) = detector.detect([face.crop])
    assert len(again) == 1
    err = np.abs(again.landmarks[0] - FFHQ_TEMPLATE_512)  # (5, 2) pixels of the 512 crop
    assert err.max() <= 0.03 * FACE_SIZE, err
    # the detector is consistent with the warp: landmarks mapped by the affine are re-found where they went
    mapped = det.landmarks[0] @ face.affine[:, :2].T + face.affine[:, 2]
    assert np.linalg.norm(again.landmarks[0] - mapped, axis=1).max() <= 0.025 * FACE_SIZE  # ~2 O-Net pixels


def test_selection_options(detector: MTCNN) -> None:
    canvas, _ = photos.canvas_with_faces(6, seed=0)
    (det,) = detector.detect([canvas])
    sides = np.minimum(det.boxes[:, 2] - det.boxes[:, 0], det.boxes[:, 3] - det.boxes[:, 1])
    areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    all_faces = align_faces(canvas, det, AlignOptions())
    assert len(all_faces) == 6
    assert [f.meta.box for f in all_faces] == [tuple(float(v) for v in det.boxes[i]) for i in np.argsort(-areas)]
    (largest,) = align_faces(canvas, det, AlignOptions(select=FaceSelect.LARGEST))
    assert largest.meta.box == tuple(float(v) for v in det.boxes[np.argmax(areas)])
    (center,) = align_faces(canvas, det, AlignOptions(select="center"))  # type: ignore[arg-type]
    centres = (det.boxes[:, :2] + det.boxes[:, 2:]) / 2
    nearest = np.argmin(np.hypot(centres[:, 0] - canvas.shape[1] / 2, centres[:, 1] - canvas.shape[0] / 2))
    assert center.meta.box == tuple(float(v) for v in det.boxes[nearest])
    assert len(align_faces(canvas, det, AlignOptions(max_faces=2))) == 2
    threshold = float(np.sort(sides)[3])  # keep the three biggest by shorter side
    assert len(align_faces(canvas, det, AlignOptions(min_face_size=int(np.ceil(threshold))))) <= 3
    assert align_faces(canvas, det, AlignOptions(min_face_size=10_000)) == []
    with pytest.raises(ValueError):
        AlignOptions(max_faces=0)


def test_paste_back_changes_only_the_face(detector: MTCNN) -> None:
    img = photos.astronaut()
    out, metas = restore_image(img, detector, InvertRestorer(), keys_prefix="a", N=4, tau=10)
    assert isinstance(InvertRestorer(), FaceRestorer) and len(metas) == 1
    affine = metas[0].affine_matrix()
    # the template's nose in the photo: fully replaced by the inverted face
    inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))
    nx, ny = (inv @ np.array([*FFHQ_TEMPLATE_512[2], 1.0]))[:2]
    x, y = int(round(nx)), int(round(ny))
    np.testing.assert_allclose(out[y, x].astype(int), 255 - img[y, x].astype(int), atol=12)
    # far from the face (bottom-right corner) nothing changed, bit for bit
    np.testing.assert_array_equal(out[400:, 400:], img[400:, 400:])
    # feathered: no hard seam, neighbouring pixels along a row through the face change gradually
    blend = np.abs(out.astype(int) - img.astype(int)).sum(axis=2)[y]  # how much each pixel changed
    ramp = np.abs(np.diff(blend / np.maximum(np.abs(255 - 2 * img[y].astype(int)).sum(axis=1), 1)))
    assert ramp.max() < 0.5


def test_split_steps_compose_like_restore_image(detector: MTCNN) -> None:
    img = photos.grace_hopper()
    (det,) = detector.detect([img])
    faces = align_faces(img, det)
    restored = InvertRestorer().restore(np.stack([f.crop for f in faces]), ["g/0"], N=4, tau=10)
    by_faces = paste_faces(img, faces, restored)
    by_affines = paste_faces(img, [f.meta.affine_matrix() for f in faces], list(restored))
    whole, _ = restore_image(img, detector, InvertRestorer(), keys_prefix="g", N=4, tau=10)
    np.testing.assert_array_equal(by_faces, whole)
    np.testing.assert_array_equal(by_affines, whole)
    with pytest.raises(ValueError, match="affines"):
        paste_faces(img, faces, restored[:0])


def test_face_meta_is_json_serialisable(detector: MTCNN) -> None:
    img = photos.astronaut()
    _, metas = restore_image(img, detector, PassthroughRestorer(), keys_prefix="a", N=4, tau=10)
    text = json.dumps([m.to_json_dict() for m in metas])
    back = [FaceMeta.from_json_dict(d) for d in json.loads(text)]
    assert back == metas
    d = metas[0].to_json_dict()
    assert len(d["box"]) == 4 and len(d["landmarks"]) == 5 and np.shape(d["affine"]) == (2, 3)


def test_no_face_returns_the_input(detector: MTCNN) -> None:
    flat = np.full((120, 160, 3), 90, np.uint8)
    out, metas = restore_image(flat, detector, PassthroughRestorer(), keys_prefix="f", N=4, tau=10)
    assert out is flat and metas == []


# --- paste-back touches only each face's region, with the whole-photo result bit for bit ---------------------------


def _paste_faces_whole_photo(rgb: np.ndarray, affines: Sequence[np.ndarray], crops: Sequence[np.ndarray], *,
                             interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """The paste-back as it was before it worked on regions (kept as the reference): crop and mask warped over the
    whole photo, blended in float32 over the whole photo, rounded once at the end."""
    H, W = rgb.shape[:2]
    out: np.ndarray = rgb.astype(np.float32)
    for affine, crop in zip(affines, crops, strict=True):
        inverse = cv2.invertAffineTransform(np.asarray(affine, np.float64))
        back = cv2.warpAffine(crop, inverse, (W, H), flags=interpolation, borderMode=cv2.BORDER_REPLICATE)
        ones = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
        footprint = cv2.warpAffine(ones, inverse, (W, H), flags=cv2.INTER_NEAREST, borderValue=0.0)
        footprint = cv2.erode(footprint, np.ones((3, 3), np.uint8))
        edge = max(1, int(np.sqrt(float(footprint.sum()))) // 20)
        inner = cv2.erode(footprint, np.ones((2 * edge, 2 * edge), np.uint8))
        m = cv2.GaussianBlur(inner, (2 * edge + 1, 2 * edge + 1), 0)[:, :, None]
        out = m * back.astype(np.float32) + (1.0 - m) * out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _similarity(angle: float, scale: float, centre: tuple[float, float]) -> np.ndarray:
    """(2, 3) photo -> crop: the face centred at ``centre`` (photo pixels), ``scale`` crop pixels per photo pixel."""
    a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([a, (np.array([256.0, 256.0]) - a @ np.asarray(centre))[:, None]])


def _faces_of(detector: MTCNN, img: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    (det,) = detector.detect([img])
    faces = align_faces(img, det)
    assert faces, "the photo should show a face"
    return [f.affine for f in faces], [255 - f.crop for f in faces]  # a restoration that changes every pixel


def _rotated(img: np.ndarray, degrees: float) -> np.ndarray:
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


PASTE_CASES = {
    "astronaut": photos.astronaut,
    "grace_hopper_2x": lambda: cv2.resize(photos.grace_hopper(), (1024, 1200), interpolation=cv2.INTER_CUBIC),
    "cut_by_left_edge": lambda: np.ascontiguousarray(photos.grace_hopper()[:, 150:]),
    "cut_by_top_edge": lambda: np.ascontiguousarray(photos.grace_hopper()[120:, :]),
    "cut_by_right_bottom": lambda: np.ascontiguousarray(photos.astronaut()[:200, :290]),
    "rotated_25": lambda: _rotated(photos.grace_hopper(), 25),
    "rotated_-40": lambda: _rotated(photos.astronaut(), -40),
    "six_faces": lambda: photos.canvas_with_faces(6, seed=0, size=(900, 1300))[0],
}


@pytest.mark.parametrize("name", list(PASTE_CASES))
def test_paste_on_regions_equals_the_whole_photo_paste(detector: MTCNN, name: str) -> None:
    img = PASTE_CASES[name]()
    affines, crops = _faces_of(detector, img)
    want = _paste_faces_whole_photo(img, affines, crops)
    got = paste_faces(img, affines, crops)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, img)


def test_paste_of_overlapping_faces_blends_them_in_order_like_the_whole_photo(detector: MTCNN) -> None:
    img = cv2.resize(photos.grace_hopper(), (1024, 1200), interpolation=cv2.INTER_CUBIC)
    affines, crops = _faces_of(detector, img)
    shifted = affines[0].copy()
    shifted[:, 2] += (60.0, -45.0)  # the same face 60 crop pixels aside: the two regions overlap
    small = _similarity(0.3, 2.5, (180.0, 900.0))  # and a third one, apart
    all_affines, all_crops = [affines[0], shifted, small], [crops[0], crops[0][:, ::-1].copy(), crops[0]]
    for interpolation in (cv2.INTER_CUBIC, cv2.INTER_LINEAR):
        want = _paste_faces_whole_photo(img, all_affines, all_crops, interpolation=interpolation)
        np.testing.assert_array_equal(paste_faces(img, all_affines, all_crops, interpolation=interpolation), want)
    reverse = _paste_faces_whole_photo(img, all_affines[::-1], all_crops[::-1])
    np.testing.assert_array_equal(paste_faces(img, all_affines[::-1], all_crops[::-1]), reverse)
    assert not np.array_equal(reverse, paste_faces(img, all_affines, all_crops))  # order matters where they overlap


def test_paste_equals_the_whole_photo_paste_for_any_similarity() -> None:
    """Random photo sizes, rotations, scales (faces from 85 to 6000 pixels wide) and positions (partly or wholly
    outside the photo), every interpolation the warps accept: always the whole-photo result, bit for bit."""
    rng = np.random.default_rng(16)
    interpolations = (cv2.INTER_CUBIC, cv2.INTER_LINEAR, cv2.INTER_NEAREST, cv2.INTER_LANCZOS4)
    for case in range(24):
        H, W = int(rng.integers(40, 700)), int(rng.integers(40, 900))
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        affines, crops = [], []
        for _ in range(int(rng.integers(1, 4))):
            centre = (float(rng.uniform(-0.3, 1.3) * W), float(rng.uniform(-0.3, 1.3) * H))
            affines.append(_similarity(rng.uniform(-np.pi, np.pi), float(np.exp(rng.uniform(-2.5, 1.8))), centre))
            crops.append(cv2.GaussianBlur(rng.integers(0, 256, (FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8), (0, 0), 2))
        interpolation = interpolations[case % len(interpolations)]
        want = _paste_faces_whole_photo(img, affines, crops, interpolation=interpolation)
        np.testing.assert_array_equal(paste_faces(img, affines, crops, interpolation=interpolation), want, str(case))


def test_paste_leaves_its_input_alone_and_skips_faces_outside_the_photo() -> None:
    img = photos.astronaut()
    before = img.copy()
    crop = np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8)
    outside = _similarity(0.0, 1.0, (2000.0, 2000.0))  # the crop's footprint misses the photo
    out = paste_faces(img, [outside], [crop])
    assert out is not img and np.array_equal(out, img) and np.array_equal(img, before)
    singular = np.zeros((2, 3))  # OpenCV maps every pixel to the crop's corner: the whole photo, as before
    want = _paste_faces_whole_photo(img, [singular], [crop])
    np.testing.assert_array_equal(paste_faces(img, [singular], [crop]), want)
    with pytest.raises(ValueError, match="uint8"):
        paste_faces(img.astype(np.float32), [outside], [crop])
