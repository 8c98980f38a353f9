"""A bad-input corpus for the restore job: one sample (or shard) per kind of input a hostile or careless archive
holds, each with the status it must get and what must reach the output.

Shards are written with Python's ``tarfile`` directly (never through webdataset's writer), so that names, member
types and encodings are exactly as written: symlinks and hardlinks, fifos and devices, directories, ``..`` and
absolute names, latin-1 bytes, repeated members, names without a suffix. Each :class:`Case` says which of its
members must reach the output byte for byte, which must be noted on the sample (``dr2.json`` ``skipped_members``)
and which on the unit (the stats marker's ``skipped_members``).
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.formats.wds import tar_trailer
from tests.pipeline.photos import astronaut, grace_hopper

MAX_PIXELS = 1_000_000
"""The corpus's pixel limit: every real image is smaller, the bombs are larger."""


@dataclass(frozen=True)
class M:
    """One tar member as written: ``name`` may hold surrogate escapes for bytes that are not UTF-8."""

    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""


@dataclass
class Case:
    """One kind of input: its members, and what the output must hold.

    ``key``/``status``: the output sample and the status its ``dr2.json`` must carry, or None where the sample must
    not reach the output (its key is unsafe; then every member is in ``unit_notes``). ``carried``: suffixes whose
    bytes reach the output unchanged (the image too, unless it is restored). ``notes``: escaped member names in the
    sample's ``skipped_members``. ``unit_notes``: escaped names in the unit's stats marker.
    """

    kind: str
    members: list[M]
    key: str | None
    status: str | None
    carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unit_notes: list[str] = field(default_factory=list)
    faces: int = 0  # at least this many faces restored (status ok)
    shard: str = ""


@dataclass
class ShardCase:
    """A malformed shard: the samples it must still give (key, status) and the read error it must report."""

    kind: str
    shard: str
    inputs: int  # samples begun in the input
    want: list[tuple[str, str]]
    read_error: str  # a phrase the stats marker's read_error holds ("" = none)
    carried: dict[str, dict[str, bytes]] = field(default_factory=dict)  # key -> suffix -> bytes


# --------------------------------------------------------------------------------------------- images


def encode(img: np.ndarray | Image.Image, fmt: str, **kw: object) -> bytes:
    im = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def plain(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A small smooth gradient with noise: no face."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 255, y / h * 255, (x + y) / (h + w) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with almost no data: a decompression bomb's
    announcement (nothing may be allocated for it)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _small(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


# --------------------------------------------------------------------------------------------- cases


def _image_case(kind: str, key: str, suffix: str, data: bytes, status: str, **kw: object) -> Case:
    extra = {"json": f'{{"kind": "{kind}"}}'.encode()}
    members = [M(f"{key}.{suffix}", data)] + [M(f"{key}.{s}", d) for s, d in extra.items()]
    return Case(kind, members, key, status, carried=[suffix, *extra], **kw)  # type: ignore[arg-type]


def format_cases() -> list[Case]:
    rgb = plain()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 180, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    frames = [Image.fromarray(plain(seed=i)).convert("P") for i in range(3)]
    gif_anim = io.BytesIO()
    frames[0].save(gif_anim, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    ok16, png16 = cv2.imencode(".png", (rgb.astype(np.uint16) * 257)[..., ::-1])
    assert ok16
    return [
        _image_case("jpeg", "fmt/jpeg", "jpg", encode(rgb, "JPEG", quality=90), "no_face"),
        _image_case("progressive jpeg", "fmt/progressive", "jpg", encode(rgb, "JPEG", progressive=True), "no_face"),
        _image_case("png", "fmt/png", "png", encode(rgb, "PNG"), "no_face"),
        _image_case("png with alpha", "fmt/png_rgba", "png", encode(rgba, "PNG"), "no_face"),
        _image_case("16-bit png", "fmt/png16", "png", png16.tobytes(), "no_face"),
        _image_case("grayscale jpeg", "fmt/gray", "jpeg", encode(gray, "JPEG"), "no_face"),
        _image_case("palette png", "fmt/palette", "png", encode(Image.fromarray(rgb).convert("P"), "PNG"), "no_face"),
        _image_case("webp lossy", "fmt/webp", "webp", encode(rgb, "WEBP", quality=80), "no_face"),
        _image_case("webp lossless", "fmt/webp_ll", "webp", encode(rgb, "WEBP", lossless=True), "no_face"),
        _image_case("bmp", "fmt/bmp", "bmp", encode(rgb, "BMP"), "no_face"),
        _image_case("tiff", "fmt/tiff", "tif", encode(rgb, "TIFF"), "no_face"),
        _image_case("cmyk jpeg", "fmt/cmyk", "jpg", encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "no_face"),
        _image_case("exif-rotated jpeg", "fmt/exif6", "jpg", encode(rgb, "JPEG", exif=exif.tobytes()), "no_face"),
        _image_case("animated gif", "fmt/anim", "gif", gif_anim.getvalue(), "decode_error"),
        _image_case("tiny 1x1", "fmt/one", "png", encode(plain(1, 1), "PNG"), "no_face"),
        _image_case("tiny 2x3", "fmt/two_three", "jpg", encode(plain(2, 3), "JPEG"), "no_face"),
    ]


def broken_cases() -> list[Case]:
    jpg, png = encode(plain(seed=3), "JPEG"), encode(plain(seed=4), "PNG")
    noise = np.random.default_rng(5).integers(0, 256, 3000, np.uint8).tobytes()
    big = np.zeros((1100, 1000, 3), np.uint8)  # 1.1 M pixels, a few KB as PNG
    return [
        _image_case("truncated jpeg", "bad/cut_jpeg", "jpg", jpg[: len(jpg) // 2], "decode_error"),
        _image_case("truncated png", "bad/cut_png", "png", png[: len(png) // 2], "decode_error"),
        _image_case("zero-byte image", "bad/zero", "jpg", b"", "decode_error"),
        _image_case("random bytes", "bad/random", "jpg", noise, "decode_error"),
        _image_case("png bytes named .jpg", "bad/wrong_ext", "jpg", png, "no_face"),
        _image_case("html named .jpg", "bad/html", "jpg", b"<!doctype html><html><body>404</body></html>",
                    "decode_error"),
        _image_case("over max_pixels", "bad/big", "png", encode(big, "PNG"), "too_large"),
        _image_case("bomb header 30000^2", "bad/bomb", "png", png_header_bomb(30000, 30000), "too_large"),
        Case("no image member", [M("bad/caption.txt", b"a caption"), M("bad/caption.json", b"{}")], "bad/caption",
             "no_image", carried=["txt", "json"]),
    ]


def latin1(text: str) -> str:
    """``text`` as tarfile reads its latin-1 bytes with ``surrogateescape``: what a latin-1 GNU tar holds."""
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def name_cases() -> list[Case]:
    img = encode(plain(seed=7), "PNG")
    many = [M(f"names/many.m{i:03d}.bin", bytes([i]) * (i + 1)) for i in range(60)]
    return [
        Case("unicode key", [M("names/ünïcødé/照片 1.png", img)], "names/ünïcødé/照片 1", "no_face", carried=["png"]),
        Case("spaces in key", [M("names/with space/a b.png", img), M("names/with space/a b.txt", b"t")],
             "names/with space/a b", "no_face", carried=["png", "txt"]),
        Case("dotted directories", [M("names/v1.2", kind=tarfile.DIRTYPE), M("names/v1.2/sub.d/k.png", img),
                                    M("names/v1.2/sub.d/k.seg.png", img)],
             "names/v1.2/sub.d/k", "no_face", carried=["png", "seg.png"], unit_notes=["names/v1.2"]),
        Case("duplicate members", [M("names/dup.png", img), M("names/dup.png", b"second copy"),
                                   M("names/dup.txt", b"t")],
             "names/dup", "no_face", carried=["png", "txt"], notes=["names/dup.png"]),
        Case("symlink only", [M("names/sym.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")], "names/sym", "no_image",
             notes=["names/sym.jpg"]),
        Case("hardlink only", [M("names/hard.jpg", kind=tarfile.LNKTYPE, link="names/dup.png")], "names/hard",
             "no_image", notes=["names/hard.jpg"]),
        Case("image and a symlink", [M("names/mixed.png", img),
                                     M("names/mixed.json", kind=tarfile.SYMTYPE, link="../../../x")],
             "names/mixed", "no_face", carried=["png"], notes=["names/mixed.json"]),
        Case("fifo and device", [M("names/dev.png", img), M("names/dev.fifo", kind=tarfile.FIFOTYPE),
                                 M("names/dev.tty", kind=tarfile.CHRTYPE)],
             "names/dev", "no_face", carried=["png"], notes=["names/dev.fifo", "names/dev.tty"]),
        Case("no-suffix names", [M("README", b"not a sample"), M("names/nosuf.png", img), M("names/nosuf", b"key"),
                                 M("names/nosuf.", b"empty suffix")],
             "names/nosuf", "no_face", carried=["png"], notes=["names/nosuf", "names/nosuf."], unit_notes=["README"]),
        Case("meta names", [M("__key__", b"meta"), M("names/meta.png", img), M("names/meta.__key__", b"k")],
             "names/meta", "no_face", carried=["png"], notes=["names/meta.__key__"], unit_notes=["__key__"]),
        Case("dotdot key", [M("../evil.png", img), M("../evil.txt", b"t")], None, None,
             unit_notes=["../evil.png", "../evil.txt"]),
        Case("absolute key", [M("/etc/evil.png", img)], None, None, unit_notes=["/etc/evil.png"]),
        Case("escaping key", [M("a/../../evil.png", img)], None, None, unit_notes=["a/../../evil.png"]),
        Case("backslash key", [M("x\\..\\..\\evil.png", img)], None, None, unit_notes=["x\\..\\..\\evil.png"]),
        Case("non-utf8 key", [M(latin1("names/café.png"), img)], None, None, unit_notes=["names/caf\\xe9.png"]),
        Case("non-utf8 suffix", [M("names/légende.png", img), M("names/légende." + latin1("légende"), b"l")],
             "names/légende", "no_face", carried=["png"], notes=["names/légende.l\\xe9gende"]),
        Case("many members", [M("names/many.png", img), *many], "names/many", "no_face",
             carried=["png", *(m.name.split(".", 1)[1] for m in many)]),
        Case("repeated key, not adjacent", [M("names/dup.json", b"{}")], None, None, unit_notes=["names/dup.json"]),
    ]


def face_cases() -> list[Case]:
    a = _small(astronaut(), 256, 256)
    g = _small(grace_hopper(), 256, 300)
    tiled = np.vstack([np.hstack([a, a[:, ::-1]]), np.hstack([a[:, ::-1], a])])
    return [
        _image_case("face (astronaut)", "faces/astronaut", "jpg", encode(a, "JPEG", quality=92), "ok", faces=1),
        _image_case("face (grace hopper)", "faces/hopper", "png", encode(g, "PNG"), "ok", faces=1),
        _image_case("four faces", "faces/four", "jpg", encode(tiled, "JPEG", quality=92), "ok", faces=4),
        _image_case("face at the border", "faces/border", "jpg", encode(a[20:, 88:], "JPEG", quality=92), "ok",
                    faces=1),
    ]


def write_tar(path: Path, members: list[M]) -> None:
    """GNU format, names as UTF-8 bytes except where they hold surrogate escapes (written back as those bytes)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type, info.linkname, info.mtime = m.kind, m.link, 1_700_000_000
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)


def build_corpus(root: Path) -> tuple[list[Case], list[ShardCase]]:
    """Write the corpus shards under ``root``; return the per-sample cases (in shard order) and the malformed
    shards."""
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for shard, group in (("c-formats.tar", format_cases()), ("c-broken.tar", broken_cases()),
                         ("c-names.tar", name_cases()), ("c-faces.tar", face_cases())):
        write_tar(root / shard, [m for c in group for m in c.members])
        for c in group:
            c.shard = shard
        cases += group

    shard_cases = []
    good = [M(f"t{i}.png", encode(plain(seed=10 + i), "PNG")) for i in range(3)] + [M("t2.txt", b"x" * 5000)]
    write_tar(root / "m-truncated.tar", good)
    data = (root / "m-truncated.tar").read_bytes()
    cut = data.index(b"x" * 512) + 1000  # inside t2.txt's data
    (root / "m-truncated.tar").write_bytes(data[:cut])
    shard_cases.append(ShardCase("truncated tar", "m-truncated.tar", 3, [("t0", "no_face"), ("t1", "no_face"),
                                                                         ("t2", "truncated")], "truncated",
                                 carried={"t0": {"png": good[0].data}, "t1": {"png": good[1].data},
                                          "t2": {"png": good[2].data}}))
    (root / "m-garbage.tar").write_bytes(b"this is not a tar file at all\n" * 64)
    shard_cases.append(ShardCase("garbage tar", "m-garbage.tar", 0, [], "corrupt or truncated"))
    (root / "m-empty.tar").write_bytes(tar_trailer(0))
    shard_cases.append(ShardCase("empty tar", "m-empty.tar", 0, [], ""))
    (root / "m-zero.tar").write_bytes(b"")
    shard_cases.append(ShardCase("zero-byte tar", "m-zero.tar", 0, [], "empty file"))
    return cases, shard_cases
