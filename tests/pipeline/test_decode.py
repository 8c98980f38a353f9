"""Decoding what archives hold and writing it back: every format and case checks pixels or the status."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage.metrics import peak_signal_noise_ratio

from pipeline.imaging.decode import DecodedImage, ImageError, ImageFormat, decode_image, encode_image
from pipeline.schema import Status
from tests.pipeline import photos

LIMIT = 10_000_000


def _save(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb() -> np.ndarray:
    return photos.astronaut()[::2, ::2].copy()  # (256, 256, 3): real content, small


def _changed(decoded: DecodedImage) -> tuple[np.ndarray, np.ndarray]:
    """A copy of decoded.rgb with a block changed (as a pasted face would) and the block's mask."""
    rgb = decoded.rgb.copy()
    mask = np.zeros(rgb.shape[:2], bool)
    mask[10:40, 20:60] = True
    rgb[mask] = 255 - rgb[mask]
    return rgb, mask


def _decode(data: bytes) -> DecodedImage:
    return decode_image(data, max_pixels=LIMIT)


def _status(data: bytes, max_pixels: int = LIMIT) -> Status:
    with pytest.raises(ImageError) as e:
        decode_image(data, max_pixels=max_pixels)
    return e.value.status


# --------------------------------------------------------------------------------------------- JPEG


def test_jpeg_baseline_real_photo() -> None:
    data = photos.grace_hopper_bytes()
    d = _decode(data)
    assert d.format is ImageFormat.JPEG and d.rgb.shape == (600, 512, 3) and not d.gray and d.alpha is None
    np.testing.assert_array_equal(d.rgb, photos.grace_hopper())
    assert encode_image(d, d.rgb.copy()) is d.data  # nothing changed: the original bytes
    rgb, mask = _changed(d)
    out = _decode(encode_image(d, rgb))
    assert out.format is ImageFormat.JPEG and out.rgb.shape == d.rgb.shape
    assert peak_signal_noise_ratio(rgb, out.rgb) > 35


def test_jpeg_quality_is_configurable() -> None:
    d = _decode(photos.grace_hopper_bytes())
    rgb, _ = _changed(d)
    assert len(encode_image(d, rgb, jpeg_quality=50)) < len(encode_image(d, rgb, jpeg_quality=95))


def test_jpeg_progressive() -> None:
    data = _save(Image.fromarray(_rgb()), "JPEG", quality=90, progressive=True)
    d = _decode(data)
    assert d.progressive
    np.testing.assert_array_equal(d.rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    rgb, _ = _changed(d)
    assert _decode(encode_image(d, rgb)).progressive


def test_jpeg_cmyk() -> None:
    rgb = _rgb()
    data = _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    d = _decode(data)
    assert d.mode == "CMYK" and d.rgb.shape == rgb.shape
    assert peak_signal_noise_ratio(rgb, d.rgb) > 30
    changed, _ = _changed(d)
    out = _decode(encode_image(d, changed))
    assert out.format is ImageFormat.JPEG and out.mode == "RGB"
    assert peak_signal_noise_ratio(changed, out.rgb) > 35


def test_jpeg_gray_stays_gray() -> None:
    gray = photos.to_gray(_rgb())
    d = _decode(_save(Image.fromarray(gray), "JPEG", quality=95))
    assert d.gray and np.array_equal(d.rgb[:, :, 0], d.rgb[:, :, 2])
    rgb, _ = _changed(d)
    assert _decode(encode_image(d, rgb)).mode == "L"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    rgb = _rgb()[:, :200]  # not square, so rotations show in the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _save(Image.fromarray(rgb), "JPEG", quality=90, exif=exif)
    d = _decode(data)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(d.rgb, expected)
    changed, _ = _changed(d)
    out = _decode(encode_image(d, changed))  # written upright, orientation reset
    assert out.orientation == 1 and out.rgb.shape == d.rgb.shape


# --------------------------------------------------------------------------------------------- PNG


def _check_untouched_exact(d: DecodedImage, fmt: str) -> DecodedImage:
    rgb, mask = _changed(d)
    out = _decode(encode_image(d, rgb))
    assert out.format.value == fmt and out.rgb.shape == d.rgb.shape
    np.testing.assert_array_equal(out.rgb[~mask], d.rgb[~mask])
    return out


def test_png_rgb_lossless() -> None:
    d = _decode(_save(Image.fromarray(_rgb()), "PNG"))
    np.testing.assert_array_equal(d.rgb, _rgb())
    out = _check_untouched_exact(d, "PNG")
    rgb, _ = _changed(d)
    np.testing.assert_array_equal(out.rgb, rgb)


@pytest.mark.parametrize("transparent", [False, True])
def test_png_palette(transparent: bool) -> None:
    pal = Image.fromarray(_rgb()).quantize(64)
    kw = {"transparency": 0} if transparent else {}
    data = _save(pal, "PNG", **kw)
    d = _decode(data)
    assert d.mode == "P"
    expected = Image.open(io.BytesIO(data)).convert("RGBA")
    np.testing.assert_array_equal(d.rgb, np.asarray(expected)[:, :, :3])
    if transparent:
        np.testing.assert_array_equal(d.alpha, np.asarray(expected)[:, :, 3])
        assert d.alpha is not None and bool((d.alpha == 0).any())
    else:
        assert d.alpha is None
    out = _check_untouched_exact(d, "PNG")
    if transparent:
        np.testing.assert_array_equal(out.alpha, d.alpha)


def test_png_gray() -> None:
    gray = photos.to_gray(_rgb())
    d = _decode(_save(Image.fromarray(gray), "PNG"))
    assert d.gray and d.alpha is None
    np.testing.assert_array_equal(d.rgb, np.repeat(gray[:, :, None], 3, axis=2))
    out = _check_untouched_exact(d, "PNG")
    assert out.mode == "L"


def test_png_gray_alpha() -> None:
    gray = photos.to_gray(_rgb())
    alpha = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    d = _decode(_save(Image.fromarray(np.dstack([gray, alpha]), mode="LA"), "PNG"))
    assert d.gray and d.mode == "LA"
    np.testing.assert_array_equal(d.rgb[:, :, 1], gray)
    np.testing.assert_array_equal(d.alpha, alpha)
    out = _check_untouched_exact(d, "PNG")
    assert out.mode == "LA"
    np.testing.assert_array_equal(out.alpha, alpha)


def test_png_rgba() -> None:
    rgb = _rgb()
    alpha = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 256))
    d = _decode(_save(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(d.rgb, rgb)
    np.testing.assert_array_equal(d.alpha, alpha)
    out = _check_untouched_exact(d, "PNG")
    np.testing.assert_array_equal(out.alpha, alpha)


def _rgb16() -> np.ndarray:
    """(256, 256, 3) uint16 with low bits that an 8-bit round trip would lose."""
    rgb = _rgb().astype(np.uint16) * 257
    return rgb + np.random.default_rng(0).integers(0, 200, rgb.shape, dtype=np.uint16)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
@pytest.mark.parametrize("layout", ["rgb", "gray", "rgba"])
def test_16_bit_kept_exact_where_untouched(ext: str, layout: str) -> None:
    rgb16 = _rgb16()
    if layout == "gray":
        arr = rgb16[:, :, 1]
    elif layout == "rgba":
        alpha16 = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
        arr = np.dstack([rgb16[:, :, ::-1], alpha16])  # OpenCV order BGRA
    else:
        arr = rgb16[:, :, ::-1]
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    data = buf.tobytes()
    d = _decode(data)
    assert d.pixels16 is not None and d.format is (ImageFormat.PNG if ext == ".png" else ImageFormat.TIFF)
    expected16 = rgb16[:, :, 1] if layout == "gray" else rgb16
    np.testing.assert_array_equal(d.pixels16, expected16)
    np.testing.assert_array_equal(d.rgb[:, :, 1], np.rint(rgb16[:, :, 1] / 257).astype(np.uint8))
    assert encode_image(d, d.rgb.copy()) is data  # unchanged -> original bytes
    rgb, mask = _changed(d)
    decoded_out = cv2.imdecode(np.frombuffer(encode_image(d, rgb), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded_out is not None
    out: np.ndarray = decoded_out
    assert out.dtype == np.uint16
    if layout == "gray":
        out_px = out if out.ndim == 2 else out[:, :, 0]
        np.testing.assert_array_equal(out_px[~mask], expected16[~mask])
        np.testing.assert_array_equal(out_px[mask], photos.to_gray(rgb)[mask].astype(np.uint16) * 257)
    else:
        out_rgb = out[:, :, 2::-1]
        np.testing.assert_array_equal(out_rgb[~mask], rgb16[~mask])
        np.testing.assert_array_equal(out_rgb[mask], rgb[mask].astype(np.uint16) * 257)
    if layout == "rgba":
        np.testing.assert_array_equal(out[:, :, 3], alpha16)


def test_png_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = _rgb()[:, :200]
    d = _decode(_save(Image.fromarray(stored), "PNG", exif=exif))
    np.testing.assert_array_equal(d.rgb, np.rot90(stored, k=-1))


# --------------------------------------------------------------------------------------------- WebP, BMP, TIFF


def test_webp_lossy_and_lossless() -> None:
    rgb = _rgb()
    lossy = _decode(_save(Image.fromarray(rgb), "WEBP", quality=90))
    assert lossy.format is ImageFormat.WEBP and not lossy.lossless
    assert peak_signal_noise_ratio(rgb, lossy.rgb) > 30
    lossless = _decode(_save(Image.fromarray(rgb), "WEBP", lossless=True))
    assert lossless.lossless
    np.testing.assert_array_equal(lossless.rgb, rgb)
    out = _check_untouched_exact(lossless, "WEBP")
    assert out.lossless


def test_webp_with_alpha() -> None:
    rgb = _rgb()
    alpha = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    d = _decode(_save(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), "WEBP", lossless=True))
    np.testing.assert_array_equal(d.alpha, alpha)
    out = _check_untouched_exact(d, "WEBP")
    np.testing.assert_array_equal(out.alpha, alpha)


def test_bmp() -> None:
    d = _decode(_save(Image.fromarray(_rgb()), "BMP"))
    assert d.format is ImageFormat.BMP
    np.testing.assert_array_equal(d.rgb, _rgb())
    _check_untouched_exact(d, "BMP")


@pytest.mark.parametrize("compression", ["raw", "tiff_lzw"])
def test_tiff_8_bit(compression: str) -> None:
    d = _decode(_save(Image.fromarray(_rgb()), "TIFF", compression=compression))
    assert d.format is ImageFormat.TIFF and d.tiff_compression == compression
    np.testing.assert_array_equal(d.rgb, _rgb())
    out = _check_untouched_exact(d, "TIFF")
    assert out.tiff_compression == compression


# --------------------------------------------------------------------------------------------- statuses


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR announcing width x height RGB, then one tiny IDAT and IEND: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    tracemalloc.start()
    try:
        assert _status(_png_header_only(60_000, 60_000), max_pixels=LIMIT) is Status.TOO_LARGE
        assert _status(_png_header_only(5_000, 4_000), max_pixels=LIMIT) is Status.TOO_LARGE  # under Pillow's own limit
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # a decoded 5000x4000 RGB would need 60 MB
    assert _status(_save(Image.fromarray(_rgb()), "PNG"), max_pixels=256 * 256 - 1) is Status.TOO_LARGE
    assert _decode(_save(Image.fromarray(_rgb()), "PNG")).rgb.shape == (256, 256, 3)  # at the limit: fine


def test_corrupt_and_truncated_bytes_are_decode_errors() -> None:
    jpeg = photos.grace_hopper_bytes()
    png = _save(Image.fromarray(_rgb()), "PNG")
    assert _status(b"") is Status.DECODE_ERROR
    assert _status(b"this is not an image at all") is Status.DECODE_ERROR
    assert _status(jpeg[: len(jpeg) // 2]) is Status.DECODE_ERROR
    assert _status(png[: len(png) // 2]) is Status.DECODE_ERROR
    assert _status(jpeg[:20]) is Status.DECODE_ERROR
    broken = bytearray(png)
    broken[100:400] = bytes(300)  # zeroed compressed data: CRC / zlib errors
    assert _status(bytes(broken)) is Status.DECODE_ERROR
    ok, buf16 = cv2.imencode(".png", _rgb16())
    assert _status(buf16.tobytes()[: len(buf16) // 2]) is Status.DECODE_ERROR


def test_unsupported_and_multi_frame_are_decode_errors() -> None:
    frames = [Image.fromarray(_rgb()), Image.fromarray(255 - _rgb())]
    assert _status(_save(frames[0], "GIF")) is Status.DECODE_ERROR
    assert _status(_save(frames[0], "WEBP", save_all=True, append_images=frames[1:])) is Status.DECODE_ERROR
    assert _status(_save(frames[0], "TIFF", save_all=True, append_images=frames[1:])) is Status.DECODE_ERROR


def test_encode_refuses_another_size() -> None:
    d = _decode(_save(Image.fromarray(_rgb()), "PNG"))
    with pytest.raises(ValueError, match="decoded size"):
        encode_image(d, np.zeros((512, 512, 3), np.uint8))


def test_mpo_camera_jpeg_reads_its_first_picture() -> None:
    frames = [Image.fromarray(_rgb()), Image.fromarray(255 - _rgb())]
    data = _save(frames[0], "MPO", save_all=True, append_images=frames[1:], quality=95)
    assert Image.open(io.BytesIO(data)).format == "MPO"
    d = _decode(data)
    assert d.format is ImageFormat.JPEG
    assert peak_signal_noise_ratio(_rgb(), d.rgb) > 35
    rgb, _ = _changed(d)
    assert Image.open(io.BytesIO(encode_image(d, rgb))).format == "JPEG"


def test_broken_exif_does_not_break_the_image() -> None:
    data = _save(Image.fromarray(_rgb()), "JPEG", quality=90, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    d = _decode(data)
    assert d.rgb.shape == (256, 256, 3) and d.orientation == 1


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_pixels_read_in_place_equal_pillows_array_and_the_copying_path(mode: str) -> None:
    """Decoded pixels come from Pillow's storage read in place (decode._storage_view): the same pixels as
    ``np.asarray`` on the image, for a photo larger than Pillow's default 16 MiB block (which needed the block size
    decode.py sets) and for a small one, and the same as the copying path taken where the view is refused."""
    from pipeline.imaging import decode

    rng = np.random.default_rng(7)
    for w, h in ((2600, 1800), (97, 61)):  # 4.7 MP (18 MiB as Pillow's RGBX) and a few thousand pixels
        rgb = cv2.resize(photos.astronaut(), (w, h), interpolation=cv2.INTER_LINEAR)
        alpha = rng.integers(0, 256, (h, w), np.uint8)
        im = Image.fromarray(rgb).convert(mode) if mode != "RGBA" else Image.fromarray(np.dstack([rgb, alpha]))
        data = _save(im, "PNG")
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            assert decode._storage_view(opened) is not None  # read in place, not through the copying path
            want = np.asarray(opened)
        got = decode_image(data, max_pixels=LIMIT)
        if mode == "L":
            assert got.gray and np.array_equal(got.rgb, np.repeat(want[:, :, None], 3, axis=2))
        else:
            assert np.array_equal(got.rgb, want[:, :, :3]) and got.rgb.flags.c_contiguous and got.rgb.flags.writeable
        if mode == "RGBA":
            assert got.alpha is not None and np.array_equal(got.alpha, want[:, :, 3])
        blocks = Image.core.get_block_size()
        Image.core.set_block_size(1 << 24)  # Pillow's default: a large image spans blocks, the view is refused
        try:
            again = decode_image(data, max_pixels=LIMIT)
        finally:
            Image.core.set_block_size(blocks)
        assert np.array_equal(again.rgb, got.rgb)
        assert (again.alpha is None) == (got.alpha is None)
        assert again.alpha is None or np.array_equal(again.alpha, got.alpha)


def test_unchanged_pixels_are_found_band_by_band_as_array_equal_finds_them() -> None:
    from pipeline.imaging.decode import _same_pixels

    a = _rgb()
    for y in (None, 0, 127, 255):  # unchanged, then one pixel changed in the first, a middle and the last row
        b = a.copy()
        if y is not None:
            b[y, 200, 1] ^= 1
        for chunk in (1, 3000, 2**20):  # a row per band (at least one), a few rows, the whole photo
            assert _same_pixels(a, b, chunk) == np.array_equal(a, b) == (y is None)
