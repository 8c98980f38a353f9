"""Image bytes in, RGB pixels out, and back to bytes in the input's own format.

What archives hold: JPEG (also CMYK and progressive), PNG (palette, gray, gray+alpha, RGBA, 16-bit), WebP,
BMP and TIFF. :func:`decode_image` turns any of them into an RGB uint8 (H, W, 3) array in display
orientation (EXIF orientation applied) for detection and restoration, and keeps what re-encoding needs:
alpha, the full 16-bit pixels, gray-ness, ICC profile, EXIF. :func:`encode_image` writes the composed RGB
back in the input's format and size:

* nothing changed -> the ORIGINAL bytes, untouched (lossless whatever the format);
* 16-bit input -> 16-bit output in which every pixel the restorer did not touch keeps its exact value;
* alpha is carried over; gray stays gray; a lossless WebP stays lossless; JPEG quality is configurable.

Two row statuses come from here (see ``pipeline.schema.Status``): ``TOO_LARGE`` when the header announces
more pixels than allowed (checked before any pixel is decoded, so a decompression bomb allocates nothing),
``DECODE_ERROR`` for bytes that are not a readable image of a supported kind (corrupt, truncated,
animated/multi-page, unknown format such as GIF). An MPO (a camera JPEG carrying extra pictures) is read as
its first picture and written back as a plain JPEG. Encoding failures raise ``ENCODE_ERROR``.

:func:`read_header` / :func:`decoded_pixels` say how many pixels an image will decode to from its header alone: the
reader sizes blocks by them (``pipeline/graph/memory.py``), and detection bounds the pixels it holds at once. Decoded
pixels never travel between stages: detection decodes, the paste-back decodes again, the same bytes to the same
pixels (a 48 MP photo is 144 MB of RGB, its JPEG a few MB).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image, ImageCms, UnidentifiedImageError

from pipeline.schema import Status

EXIF_ORIENTATION = 0x0112
DEFAULT_JPEG_QUALITY = 95
# Pillow allocates an image in blocks of 16 MiB by default, so a photo over about 4 MP (RGB takes 4 bytes a pixel)
# spans several, and its rows cannot be read in place (_storage_view). One block per image, whatever its size (up
# to the pixel limit a run sets): the same memory, in one allocation that goes back to the system when freed
# (Pillow keeps no freed blocks by default, and large allocations are their own mappings).
PILLOW_BLOCK_BYTES = 2**31 - 4096  # the largest Pillow takes: a C int, a multiple of the page size
if Image.core.get_block_size() < PILLOW_BLOCK_BYTES:
    Image.core.set_block_size(PILLOW_BLOCK_BYTES)


class ImageFormat(StrEnum):
    """Supported container formats; values are Pillow's format names."""

    JPEG = "JPEG"
    PNG = "PNG"
    WEBP = "WEBP"
    BMP = "BMP"
    TIFF = "TIFF"


class ImageError(Exception):
    """An image that cannot be decoded or encoded; ``status`` is the row status it maps to."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image and what re-encoding it needs. All arrays are in display orientation.

    ``rgb`` (H, W, 3) uint8 is what detection and restoration see. ``alpha`` (H, W) is uint8, or uint16 for a
    16-bit source. ``pixels16`` is the full-precision colour of a 16-bit source: (H, W) for gray, (H, W, 3)
    RGB otherwise (alpha kept apart). ``mode`` is the source's Pillow mode (e.g. "P", "CMYK", "I;16").
    """

    data: bytes
    format: ImageFormat
    mode: str
    rgb: np.ndarray
    alpha: np.ndarray | None
    pixels16: np.ndarray | None
    gray: bool
    icc_profile: bytes | None
    exif: bytes | None
    orientation: int
    lossless: bool  # WebP stored losslessly (VP8L)
    progressive: bool  # progressive JPEG
    tiff_compression: str | None

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


# --------------------------------------------------------------------------------------------- the header


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says before any pixel is decoded: its size in display orientation (EXIF orientation
    applied, as :func:`decode_image` applies it to the pixels)."""

    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> ImageHeader | None:
    """The header of ``data`` (Pillow's ``Image.open`` reads the header only), or None when it is not an image
    Pillow can open (:func:`decode_image` then says why). Cheap: no pixel is decoded, whatever the image's size.

    The orientation comes from the EXIF block the header already holds (``info["exif"]``; a TIFF's own tags), never
    from ``getexif()`` on a PNG, which may decode the whole image to look for an EXIF chunk after the pixels.
    """
    if not data:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                orientation = _header_orientation(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
            return None
    if orientation in (5, 6, 7, 8):  # a quarter turn: the displayed image is the stored one on its side
        width, height = height, width
    return ImageHeader(width=width, height=height)


def _header_orientation(im: Image.Image) -> int:
    try:
        if im.format == "TIFF":
            value = im.getexif().get(EXIF_ORIENTATION, 1)  # a TIFF's tags are its header
        else:
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(EXIF_ORIENTATION, 1)
        orientation = int(value)
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):  # a broken EXIF block: decode reads it as 1
        return 1
    return orientation if orientation in range(1, 9) else 1


def decoded_pixels(data: bytes, *, max_pixels: int) -> int:
    """How many pixels :func:`decode_image` will hold for ``data``, from its header alone: width x height, and 0 for
    bytes it refuses before decoding a pixel (no readable header, or over ``max_pixels``: status ``too_large``)."""
    header = read_header(data)
    if header is None or header.pixels > max_pixels:
        return 0
    return header.pixels


# --------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode ``data``; raise :class:`ImageError` (TOO_LARGE or DECODE_ERROR) for what cannot be processed."""
    if not data:
        raise ImageError(Status.DECODE_ERROR, "empty image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", module=r"PIL\.")  # e.g. "Corrupt EXIF data": pixels may still be fine
        try:
            im = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError(Status.TOO_LARGE, f"image over the pixel limit: {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(Status.DECODE_ERROR, f"not a readable image: {e}") from e
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    Status.TOO_LARGE, f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
                )
            if width < 1 or height < 1:
                raise ImageError(Status.DECODE_ERROR, f"image has no pixels ({width}x{height})")
            # MPO (camera JPEGs that carry extra pictures, e.g. depth maps): the first picture is the photo
            is_mpo = im.format == "MPO"
            try:
                fmt = ImageFormat.JPEG if is_mpo else ImageFormat(im.format or "")
            except ValueError:
                raise ImageError(Status.DECODE_ERROR, f"unsupported image format {im.format!r}") from None
            if not is_mpo and getattr(im, "n_frames", 1) > 1:
                raise ImageError(Status.DECODE_ERROR, f"animated or multi-page {fmt.value} is not supported")
            try:
                return _decode_opened(im, data, fmt)
            except ImageError:
                raise
            except (OSError, SyntaxError, ValueError, EOFError, cv2.error) as e:
                raise ImageError(Status.DECODE_ERROR, f"corrupt or truncated {fmt.value}: {e}") from e


def _decode_opened(im: Image.Image, data: bytes, fmt: ImageFormat) -> DecodedImage:
    is_16_bit = _is_16_bit(im, data, fmt)
    if not is_16_bit:
        im.load()  # raises on corrupt / truncated pixel data (before getexif, which may load a PNG itself)
    exif_bytes: bytes | None = im.info.get("exif")
    try:
        exif = im.getexif()
        orientation = int(exif.get(EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):  # a broken EXIF block is not a broken image
        exif, orientation, exif_bytes = Image.Exif(), 1, None
    if orientation not in range(1, 9):
        orientation = 1
    if orientation != 1 and fmt is not ImageFormat.TIFF:
        exif[EXIF_ORIENTATION] = 1  # pixels are stored upright from now on
        exif_bytes = exif.tobytes()
    icc: bytes | None = im.info.get("icc_profile") or None
    mode = im.mode
    alpha: np.ndarray | None = None
    pixels16: np.ndarray | None = None

    if is_16_bit:
        pixels16, alpha, gray = _decode_16_bit(data, fmt, im)
        rgb16 = pixels16 if pixels16.ndim == 3 else np.repeat(pixels16[:, :, None], 3, axis=2)
        rgb = _to_8_bit(rgb16)
    else:
        rgb, alpha, gray, icc = _to_rgb(im, icc)

    rgb = _orient(rgb, orientation)
    alpha = None if alpha is None else _orient(alpha, orientation)
    pixels16 = None if pixels16 is None else _orient(pixels16, orientation)
    return DecodedImage(
        data=data,
        format=fmt,
        mode=mode,
        rgb=np.ascontiguousarray(rgb),
        alpha=None if alpha is None else np.ascontiguousarray(alpha),
        pixels16=None if pixels16 is None else np.ascontiguousarray(pixels16),
        gray=gray,
        icc_profile=icc,
        exif=exif_bytes if fmt is not ImageFormat.TIFF else None,
        orientation=orientation,
        lossless=fmt is ImageFormat.WEBP and _webp_is_lossless(data),
        progressive=bool(im.info.get("progressive") or im.info.get("progression")),
        tiff_compression=im.info.get("compression") if fmt is ImageFormat.TIFF else None,
    )


def _is_16_bit(im: Image.Image, data: bytes, fmt: ImageFormat) -> bool:
    if im.mode.startswith("I;16"):
        return True
    if fmt is ImageFormat.PNG and len(data) > 25:
        return data[24] == 16  # IHDR bit depth (Pillow opens 16-bit colour PNGs as 8-bit "RGB"/"RGBA")
    if fmt is ImageFormat.TIFF:
        bits = im.tag_v2.get(258)  # type: ignore[attr-defined]  # BitsPerSample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(b == 16 for b in bits)
    return False


def _decode_16_bit(data: bytes, fmt: ImageFormat, im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """16-bit PNG/TIFF via OpenCV (Pillow reduces 16-bit colour to 8 bits) -> pixels16, alpha, gray."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ImageError(Status.DECODE_ERROR, f"corrupt or unsupported 16-bit {fmt.value}")
    if arr.shape[:2] != (im.size[1], im.size[0]):
        raise ImageError(Status.DECODE_ERROR, f"16-bit {fmt.value}: decoded size {arr.shape} disagrees with header")
    gray_src = (
        im.mode.startswith("I;16")
        or im.mode in ("L", "LA", "I")
        or (
            fmt is ImageFormat.PNG and data[25] in (0, 4)  # IHDR colour type: gray, gray+alpha
        )
    )
    alpha: np.ndarray | None = None
    if arr.ndim == 2:
        return arr, None, True
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3]
    if arr.shape[2] == 2:  # gray + alpha (some OpenCV builds)
        return arr[:, :, 0], arr[:, :, 1], True
    if gray_src:
        return arr[:, :, 0], alpha, True
    return cv2.cvtColor(arr[:, :, :3], cv2.COLOR_BGR2RGB), alpha, False


def _to_8_bit(x16: np.ndarray) -> np.ndarray:
    return ((x16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(im: Image.Image, icc: bytes | None) -> tuple[np.ndarray, np.ndarray | None, bool, bytes | None]:
    """Any 8-bit Pillow mode -> rgb (H, W, 3) uint8, alpha (H, W) uint8 or None, gray, ICC to keep."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("1", "I", "F"):
        im = im.convert("L")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode == "CMYK":
        im, icc = _cmyk_to_rgb(im, icc), None  # output is RGB: a CMYK profile no longer applies
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        im = im.convert("RGB")
    view = _storage_view(im)
    if view is not None:  # the decoder's own memory, read once into the arrays we keep (see _storage_view)
        if im.mode == "L":
            return cv2.cvtColor(view, cv2.COLOR_GRAY2RGB), None, True, icc
        if im.mode == "RGBA":
            return cv2.cvtColor(view, cv2.COLOR_RGBA2RGB), cv2.extractChannel(view, 3), False, icc
        return cv2.cvtColor(view, cv2.COLOR_RGBA2RGB), None, False, icc  # RGB is stored as RGBX
    arr = np.asarray(im)
    if im.mode == "L":
        return np.repeat(arr[:, :, None], 3, axis=2), None, True, icc
    if im.mode == "LA":
        return np.repeat(arr[:, :, :1], 3, axis=2), arr[:, :, 1].copy(), True, icc
    if im.mode == "RGBA":
        return arr[:, :, :3].copy(), arr[:, :, 3].copy(), False, icc
    return arr.copy(), None, False, icc


def _storage_view(im: Image.Image) -> np.ndarray | None:
    """A zero-copy view of a loaded ``L``, ``RGB`` or ``RGBA`` image's pixels, through Pillow's Arrow export: (H, W)
    for ``L``, (H, W, 4) for the others (Pillow stores ``RGB`` as RGBX). None for other modes, or where Pillow's
    storage is not one block (Arrow export needs contiguous rows: hence ``PILLOW_BLOCK_BYTES``).

    Why: ``np.asarray(im)`` goes through ``im.tobytes()``, which packs every row into a list of buffers, joins them
    into one ``bytes`` and then needs a copy to be writable: three passes over the photo and two fresh buffers of its
    size. For a 48 MP JPEG that is 0.19 s of a 0.34 s decode, plus the page faults of 290 MB of new memory, in every
    stage that decodes it. Reading the view once with OpenCV (dropping the padding byte) gives the same pixels,
    bit for bit, in 17 ms.
    """
    if im.mode not in ("L", "RGB", "RGBA"):
        return None
    try:
        values = pa.array(im).values if im.mode != "L" else pa.array(im)
        flat = values.to_numpy(zero_copy_only=True)
    except (ValueError, pa.ArrowException):  # e.g. "Image rows are not contiguous in memory" (several blocks)
        return None
    width, height = im.size
    return flat.reshape(height, width) if im.mode == "L" else flat.reshape(height, width, 4)


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Through the embedded CMYK profile when there is one (to sRGB), else Pillow's plain formula."""
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                return out
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken profile: the plain conversion below is still a faithful-enough preview
    return im.convert("RGB")


def _webp_is_lossless(data: bytes) -> bool:
    # RIFF....WEBP then either a VP8L chunk (simple lossless) or VP8X followed by chunks incl. VP8L.
    return data[12:16] == b"VP8L" or (data[12:16] == b"VP8X" and b"VP8L" in data[30:4096])


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to (H, W, ...) pixels (same transforms as ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(a, k=-1)
    if orientation == 7:
        return a.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(a, k=1)
    return a


# --------------------------------------------------------------------------------------------- encoding


def encode_image(decoded: DecodedImage, rgb: np.ndarray, *, jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode ``rgb`` (H, W, 3) uint8 — ``decoded.rgb`` with faces pasted in — in the source's format.

    Returns ``decoded.data`` itself when ``rgb`` equals ``decoded.rgb``. Raises ImageError(ENCODE_ERROR).
    """
    if rgb.shape != decoded.rgb.shape or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 {decoded.rgb.shape} (the decoded size), got {rgb.dtype} {rgb.shape}")
    if _same_pixels(rgb, decoded.rgb):
        return decoded.data
    try:
        if decoded.pixels16 is not None:
            return _encode_16_bit(decoded, rgb)
        return _encode_8_bit(decoded, rgb, jpeg_quality)
    except (OSError, ValueError, KeyError, cv2.error) as e:
        raise ImageError(Status.ENCODE_ERROR, f"cannot encode {decoded.format.value}: {e}") from e


def _same_pixels(a: np.ndarray, b: np.ndarray, chunk_bytes: int = 2 * 2**20) -> bool:
    """``np.array_equal(a, b)`` for two arrays of one shape, a band of rows at a time, stopping at the first band
    that differs. ``np.array_equal`` builds a bool array of the whole photo (48 MB for 48 MP), fresh memory the
    kernel must zero page by page: a tenth of a write task's time on 48 MP photos (``perf``, this machine); a band
    of ``chunk_bytes`` is reused from the heap, and a photo with a face pasted differs at the face's first row."""
    rows = max(1, chunk_bytes // max(1, a[0].nbytes))
    return all(np.array_equal(a[y : y + rows], b[y : y + rows]) for y in range(0, len(a), rows))


def _gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luma (ITU-R 601, Pillow's rounding: equal channels map to themselves)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _encode_8_bit(decoded: DecodedImage, rgb: np.ndarray, jpeg_quality: int) -> bytes:
    fmt = decoded.format
    if decoded.gray:
        im = Image.fromarray(_gray(rgb))
        if decoded.alpha is not None:
            im.putalpha(Image.fromarray(decoded.alpha))
    else:
        im = Image.fromarray(rgb)
        if decoded.alpha is not None:
            im.putalpha(Image.fromarray(decoded.alpha))
    opts: dict[str, object] = {}
    if decoded.icc_profile and fmt is not ImageFormat.BMP:
        opts["icc_profile"] = decoded.icc_profile
    if decoded.exif and fmt in (ImageFormat.JPEG, ImageFormat.PNG, ImageFormat.WEBP):
        opts["exif"] = decoded.exif
    if fmt is ImageFormat.JPEG:
        if im.mode in ("LA", "RGBA"):  # JPEG has no alpha (cannot happen for a JPEG source)
            im = im.convert(im.mode[:-1])
        opts.update(quality=jpeg_quality, progressive=decoded.progressive)
    elif fmt is ImageFormat.WEBP:
        if im.mode == "L":
            im = im.convert("RGB")  # WebP stores colour only
        elif im.mode == "LA":
            im = im.convert("RGBA")
        opts.update(lossless=True) if decoded.lossless else opts.update(quality=jpeg_quality)
    elif fmt is ImageFormat.TIFF:
        opts["compression"] = decoded.tiff_compression if decoded.tiff_compression in _TIFF_KEEP else "tiff_lzw"
    buf = io.BytesIO()
    im.save(buf, format=fmt.value, **opts)
    return buf.getvalue()


_TIFF_KEEP = ("raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits")


def _encode_16_bit(decoded: DecodedImage, rgb: np.ndarray) -> bytes:
    """Untouched pixels keep their 16-bit values; changed pixels take the new 8-bit value scaled by 257."""
    assert decoded.pixels16 is not None
    changed = np.any(rgb != decoded.rgb, axis=2)  # (H, W)
    out = decoded.pixels16.copy()
    if decoded.gray:
        out[changed] = _gray(rgb)[changed].astype(np.uint16) * 257
        channels = [out]
    else:
        out[changed] = rgb[changed].astype(np.uint16) * 257
        channels = [out[:, :, 2], out[:, :, 1], out[:, :, 0]]  # OpenCV writes BGR
    if decoded.alpha is not None:
        alpha = decoded.alpha.astype(np.uint16) if decoded.alpha.dtype == np.uint16 else decoded.alpha * 257
        if decoded.gray:
            channels = [out, out, out]
        channels.append(alpha.astype(np.uint16))
    arr = channels[0] if len(channels) == 1 else np.stack(channels, axis=2)
    ext = ".png" if decoded.format is ImageFormat.PNG else ".tiff"
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr))
    if not ok:
        raise ImageError(Status.ENCODE_ERROR, f"OpenCV could not write a 16-bit {decoded.format.value}")
    return bytes(buf.tobytes())
