"""The pipeline's stages: plain functions over Arrow tables (blocks of rows), and the thin Ray classes that hold
a model.

Each stage takes a block (``pipeline.schema.ROW_SCHEMA``) and returns the same rows with columns filled in;
none drops a row. Only the columns a stage changes are converted to Python, and only for the rows it works on;
the members of a sample travel untouched from the reader to the writer. Exceptions that concern one image
become that row's ``status``/``error`` through :func:`guarded`; an exception that concerns the infrastructure
(weights that will not load, storage that refuses writes) propagates and stops the job (STYLE rule 7).

Stages, in order:

1. :func:`read_units` (CPU task): a group of units (one, or several small ones: ``pipeline.formats.units.read_groups``)
->
   blocks of at most ``rows_per_block`` rows, ``block_mb`` MiB and ``block_pixels`` decoded pixels (from the images'
   headers; ``pipeline/graph/memory.py``), each unit's rows followed by its end row.
2. :func:`detect_block` (actor :class:`DetectStage`): decode (``detect_batch_size`` images and ``block_pixels`` at a
   time), detect, align -> ``faces`` and ``crops``, the decoded pixels dropped; yields blocks of at most
   ``faces_block`` faces, so that the restorer gets work early.
3. :func:`restore_block` (actor :class:`RestoreStage`): every crop of the block, across images, through the
   restorer in ONE call per DR2 setting (one call unless ``--preset auto``; the restorer alone chunks and pads to its
   batch shape), faces planned unrestored (clean under ``--skip-clean``) passed on as they are; if a call fails, its
   faces are retried one by one so only the images whose faces fail get ``restore_error``.
4. :func:`compose_block` + :func:`write_block` (CPU task): decode again the rows with faces to paste (one at a
   time), paste back over the faces' regions and encode, stage one part per block, return one summary row per part
   (:data:`pipeline.schema.SUMMARY_SCHEMA`).

Full-resolution pixels never cross the object store: a 48 MP photo is 144 MB decoded and a few MB as a JPEG, so
blocks carry image bytes, crops and records, and decoding twice (detection, paste-back) costs less than shipping
the pixels twice (``pipeline/graph/memory.py``).

Torch, OpenCV and the models are imported inside the functions that use them: the driver imports this module
to hand its classes to Ray and should not pay for what only workers run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from pipeline import failpoints
from pipeline import schema as S
from pipeline.config import PipelineConfig
from pipeline.formats import shards
from pipeline.formats.base import PartRows
from pipeline.formats.units import Unit, UnitKind
from pipeline.formats.wds import MemberNote
from pipeline.graph import memory
from pipeline.store import storage

if TYPE_CHECKING:
    from dr2.restorer import FaceRestorer
    from pipeline.imaging.decode import DecodedImage
    from pipeline.imaging.degradation import Degradation
    from pipeline.imaging.mtcnn import MTCNN

log = logging.getLogger(__name__)

T = TypeVar("T")
FACE_SIZE = 512  # the aligned-face size (dr2.restorer.FACE_SIZE), here without importing torch


# --------------------------------------------------------------------------------------------- helpers


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def scrub(text: str) -> str:
    """``text`` without object addresses (``<_io.BytesIO object at 0x7f...>``), which differ between runs and
    would make outputs differ (dr2.json carries error texts)."""
    return _ADDRESS.sub("", text)


def error_text(e: BaseException) -> str:
    """A readable, deterministic error text: the exception type and message, with no object addresses."""
    text = scrub(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def guarded(status: list[str], error: list[str], i: int, on_error: S.Status, fn: Callable[..., T],
            *args: Any) -> T | None:
    """``fn(*args)`` for row ``i``; an exception becomes the row's ``status``/``error`` and gives None.

    An ``ImageError`` carries its own status (``decode_error``, ``too_large``); anything else gets ``on_error``.
    The one place where a per-image failure turns into data (STYLE rule 7); ``fn`` never returns None.
    """
    from pipeline.imaging.decode import ImageError

    try:
        return fn(*args)
    except ImageError as e:
        status[i], error[i] = e.status.value, scrub(str(e))
    except Exception as e:  # noqa: BLE001 - a row status is the point: one bad image must not stop the job
        log.warning("%s on row %d: %s", on_error.value, i, e, exc_info=True)
        status[i], error[i] = on_error.value, error_text(e)
    return None


def _column(table: pa.Table, name: str) -> list[Any]:
    return table.column(name).to_pylist()


def _timings(table: pa.Table) -> list[dict[str, float]]:
    return [t if t is not None else S.empty_timings() for t in _column(table, S.TIMINGS)]


def _replace(table: pa.Table, columns: dict[str, list[Any] | pa.Array]) -> pa.Table:
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        field = S.ROW_SCHEMA.field(name)
        arr = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, field.type)
        table = table.set_column(i, field, arr)
    return table


def block_table(columns: dict[str, list[Any]], n: int) -> pa.Table:
    """A block with every ROW_SCHEMA column; columns not given are null."""
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type) for f in S.ROW_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=S.ROW_SCHEMA)


def _pending(status: str) -> bool:
    return status == S.Status.PENDING.value


# --------------------------------------------------------------------------------------------- 1. read


class _BlockBuilder:
    """Accumulates read rows column by column; ``full`` once a block's row, byte or decoded-pixel budget is reached.

    Pixels are counted from each image's header (:func:`pipeline.imaging.decode.decoded_pixels`: nothing is decoded
    here, and an image over ``max_pixels``, never decoded, counts 0). A row whose pixels would take the block over
    ``cfg.block_pixels`` closes the block before it joins (``full`` is then true, and ``take`` gives the closed
    block): a block never holds more decoded pixels than the budget, except one photo larger than it, alone.
    """

    NAMES = (S.KEY, S.UNIT, S.INDEX, S.UNIT_SIZE, S.IMAGE_MEMBER, S.IMAGE, S.MEMBER_NAMES, S.MEMBER_DATA, S.STATUS,
             S.ERROR, S.NOTES, S.TIMINGS)

    def __init__(self, cfg: PipelineConfig) -> None:
        self.max_rows = cfg.rows_per_block
        self.max_bytes = cfg.block_mb * storage.MiB
        self.max_pixels = cfg.block_pixels
        self.image_limit = cfg.max_pixels
        self._closed: pa.Table | None = None
        self._reset()

    def _reset(self) -> None:
        self.cols: dict[str, list[Any]] = {n: [] for n in self.NAMES}
        self.bytes = 0
        self.pixels = 0

    def add(self, *, key: str, unit: str, index: int, image_member: str | None, image: bytes | None,
            members: Sequence[tuple[str, bytes]], status: str, error: str, unit_size: int | None = None,
            notes: Sequence[MemberNote] = (), timings: dict[str, float] | None = None) -> None:
        from pipeline.imaging.decode import decoded_pixels

        pixels = decoded_pixels(image, max_pixels=self.image_limit) if image else 0
        if len(self) and (self._over() or self.pixels + pixels > self.max_pixels):
            if self._closed is not None:
                raise RuntimeError("a full block must be taken before the next row is added")
            self._closed = self._build()  # this row would take the block over its budget: it starts the next one
        c = self.cols
        c[S.KEY].append(key)
        c[S.UNIT].append(unit)
        c[S.INDEX].append(index)
        c[S.UNIT_SIZE].append(unit_size)
        c[S.IMAGE_MEMBER].append(image_member)
        c[S.IMAGE].append(image)
        c[S.MEMBER_NAMES].append([n for n, _ in members])
        c[S.MEMBER_DATA].append([d for _, d in members])
        c[S.STATUS].append(status)
        c[S.ERROR].append(error)
        c[S.NOTES].append([{"name": n.name, "reason": n.reason} for n in notes] or None)
        c[S.TIMINGS].append(timings)
        self.bytes += sum(len(d) for _, d in members) + (len(image) if image else 0)
        self.pixels += pixels

    def __len__(self) -> int:
        return len(self.cols[S.KEY])

    def _over(self) -> bool:
        return len(self) >= self.max_rows or self.bytes >= self.max_bytes or self.pixels >= self.max_pixels

    @property
    def full(self) -> bool:
        return self._closed is not None or self._over()

    def take(self) -> pa.Table:
        """The closed block if a row closed one, else the rows gathered so far."""
        if self._closed is not None:
            table, self._closed = self._closed, None
            return table
        return self._build()

    def _build(self) -> pa.Table:
        table = block_table(self.cols, len(self))
        self._reset()
        return table


def read_unit(unit: Unit, cfg: PipelineConfig) -> Iterator[pa.Table]:
    """Blocks of one unit's rows, in input order; the last block ends with the unit's end row."""
    return read_units([unit], cfg)


def read_units(units: Sequence[Unit], cfg: PipelineConfig) -> Iterator[pa.Table]:
    """Blocks of the units' rows, unit after unit, in input order, each unit's rows followed by its end row (which
    carries the unit's sample count and read seconds); a block holds the rows of as many units as fit its budget.

    A unit that cannot be read at all (storage refuses, the object vanished) ends with an end row of size -1
    whose ``error`` says why: the driver records the unit as failed and goes on with the others.

    The unit's format reads its rows (:meth:`pipeline.formats.base.Format.read`). A shard that breaks off (truncated
    or corrupt tar) yields the samples before the cut, then the interrupted sample (status ``truncated``, with the
    members that were read); the end row's ``error`` says what happened and the unit's stats record it.
    """
    block = _BlockBuilder(cfg)
    for unit in units:
        yield from _read_into(block, unit, cfg)
    if len(block):
        yield block.take()


def _read_into(block: _BlockBuilder, unit: Unit, cfg: PipelineConfig) -> Iterator[pa.Table]:
    """Add ``unit``'s rows and then its end row to ``block``, yielding each block that fills up on the way."""
    pending = S.Status.PENDING.value
    n, error, t0 = 0, "", time.perf_counter()
    unit_notes: list[MemberNote] = []
    try:
        rows = unit.format.read(unit, cfg, unit_notes)
        while True:
            try:
                row = next(rows)
            except StopIteration as done:  # the format's account of how reading ended
                error = done.value or ""
                break
            block.add(key=row.key, unit=unit.name, index=n, image_member=row.image_member, image=row.image,
                      members=row.members, status=row.status, error=row.error, notes=row.notes)
            n += 1
            if block.full:
                yield block.take()
    except Exception as e:  # noqa: BLE001 - one unreadable unit must not stop the others: the driver records it
        log.warning("unit %s cannot be read: %s", unit.name, e, exc_info=True)
        n, error = -1, f"cannot read {unit.source}: {error_text(e)}"
    block.add(key="", unit=unit.name, index=S.END_INDEX, image_member=None, image=None, members=[], status=pending,
              error=error, unit_size=n, notes=unit_notes,
              timings={**S.empty_timings(), "read": time.perf_counter() - t0})
    if block.full:
        yield block.take()


def read_units_batch(batch: pa.Table, cfg: PipelineConfig) -> Iterator[pa.Table]:
    """Ray adapter: each row of ``batch`` is one read group, ``{"units": [Unit.to_item(), ...]}``."""
    for item in batch.to_pylist():
        yield from read_units([Unit.from_item(u) for u in item["units"]], cfg)


# --------------------------------------------------------------------------------------------- 2. detect


def detect_block(table: pa.Table, detector: MTCNN, cfg: PipelineConfig) -> Iterator[pa.Table]:
    """Decode the pending rows a window at a time, detect each image's faces, align the chosen ones.

    A window holds at most ``detect_batch_size`` images and ``cfg.block_pixels`` decoded pixels (from the headers;
    one larger image alone): that is all this stage holds decoded at once, however Ray merged the blocks it is given.
    The decoded pixels stay here: the row keeps its faces' records and 512x512 crops (the paste-back decodes the
    image bytes again, ``pipeline/graph/memory.py``).

    Yields the block in slices of at most ``cfg.faces_block`` faces (a slice ends after the window that reaches it),
    so the restorer starts early.
    """
    from pipeline.imaging.decode import decoded_pixels
    from pipeline.imaging.degradation import estimate_degradation
    from pipeline.imaging.faces import AlignOptions, align_faces

    status, error = _column(table, S.STATUS), _column(table, S.ERROR)
    index = table.column(S.INDEX).to_numpy()
    todo = [i for i, s in enumerate(status) if _pending(s) and index[i] != S.END_INDEX]
    if not todo:
        yield table
        return
    images = table.column(S.IMAGE)
    timings = _timings(table)
    opts = AlignOptions(select=cfg.select, max_faces=cfg.max_faces, min_face_size=cfg.min_face_size)
    thresholds = cfg.degradation_thresholds()
    n = table.num_rows
    faces: list[list[dict[str, Any]] | None] = [None] * n
    crops: list[list[bytes] | None] = [None] * n
    start, face_count = 0, 0
    for window in _pixel_windows(todo, cfg.detect_batch_size, cfg.block_pixels,
                                 lambda i: decoded_pixels(images[i].as_py(), max_pixels=cfg.max_pixels)):
        batch: list[tuple[int, DecodedImage]] = []
        for i in window:
            t0 = time.perf_counter()
            img = guarded(status, error, i, S.Status.DECODE_ERROR, decode_image, images[i].as_py(), cfg.max_pixels)
            timings[i]["decode"] += time.perf_counter() - t0
            if img is not None:
                batch.append((i, img))
        if batch:
            t0 = time.perf_counter()
            # Each image is detected on its own: MTCNN's numbers move (~1e-5 px) with the images that share its
            # forward passes (convolution kernels and their summation order follow the batch shape), and blocks are
            # cut differently from run to run (Ray Data merges blocks; a rerun reads other groups), so a batch's
            # neighbours would make a face's box, hence the output bytes, depend on the run. One failing image
            # fails alone.
            detections: list[Any] = [guarded(status, error, i, S.Status.DETECT_ERROR, _detect_one, detector, img.rgb)
                                     for i, img in batch]
            per_image = (time.perf_counter() - t0) / len(batch)
            for (i, img), det in zip(batch, detections, strict=True):
                timings[i]["detect"] += per_image
                if det is None:
                    continue
                t0 = time.perf_counter()
                aligned = guarded(status, error, i, S.Status.DETECT_ERROR, align_faces, img.rgb, det, opts)
                if aligned is not None:  # the estimate runs on what DR2 is given: the aligned crop (timed as align)
                    faces[i] = [_face_record(f.meta, estimate_degradation(f.crop, thresholds), cfg) for f in aligned]
                    crops[i] = [f.crop.tobytes() for f in aligned]
                    face_count += len(aligned)
                    if not aligned:
                        status[i], error[i] = S.Status.NO_FACE.value, ""
                timings[i]["align"] += time.perf_counter() - t0
        del batch, img  # the window's decoded pixels go before the next window is decoded
        memory.release_freed_memory()  # ... and back to the system (glibc keeps them otherwise: memory.py)
        last = window[-1]
        if face_count >= cfg.faces_block and last + 1 < n:
            yield _detected(table, start, last + 1, status, error, timings, faces, crops)
            start, face_count = last + 1, 0
    yield _detected(table, start, n, status, error, timings, faces, crops)


def _pixel_windows(rows: list[int], max_rows: int, max_pixels: int,
                   pixels_of: Callable[[int], int]) -> Iterator[list[int]]:
    """``rows`` in order, in windows of at most ``max_rows`` whose ``pixels_of`` sum to at most ``max_pixels``; a row
    over ``max_pixels`` makes a window of its own."""
    window: list[int] = []
    held = 0
    for r in rows:
        px = pixels_of(r)
        if window and (len(window) >= max_rows or held + px > max_pixels):
            yield window
            window, held = [], 0
        window.append(r)
        held += px
    if window:
        yield window


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    from pipeline.imaging.decode import decode_image as decode

    return decode(data, max_pixels=max_pixels)


def _detected(table: pa.Table, start: int, stop: int, status: list[str], error: list[str],
              timings: list[dict[str, float]], faces: list[Any], crops: list[Any]) -> pa.Table:
    part = table.slice(start, stop - start)
    sl = slice(start, stop)
    return _replace(part, {S.STATUS: status[sl], S.ERROR: error[sl], S.TIMINGS: timings[sl], S.FACES: faces[sl],
                           S.CROPS: crops[sl]})


def _face_record(meta: Any, degradation: Degradation | None = None,
                 cfg: PipelineConfig | None = None) -> dict[str, Any]:
    """A ``faces`` record (:data:`pipeline.schema.FACE_TYPE`): the detection, the degradation estimate, and the
    face's plan: its (N, tau, omega) (:meth:`PipelineConfig.face_setting`) and whether it is restored at all."""
    rec: dict[str, Any] = {"box": [float(v) for v in meta.box], "score": float(meta.score),
                           "landmarks": [float(v) for xy in meta.landmarks for v in xy],
                           "affine": [float(v) for row in meta.affine for v in row]}
    if degradation is not None and cfg is not None:
        verdict = degradation.verdict.value
        rec["degradation"] = {**dataclasses.asdict(degradation), "verdict": verdict}
        rec["N"], rec["tau"], rec["omega"] = cfg.face_setting(verdict)
        skip = cfg.skips_clean and verdict == "clean"
        rec["restored"] = not skip
        rec["reason"] = f"clean: degradation score {degradation.score:.1f} <= {cfg.clean_max_factor:g}" if skip else ""
    return rec


def face_json(rec: dict[str, Any]) -> dict[str, Any]:
    """A ``faces`` record as ``dr2.json`` shows it: landmarks as 5 (x, y) pairs, affine as 2 rows of 3, then the
    degradation estimate (floats to 3 decimals), the face's N/tau/omega, ``restored`` and (when not) ``reason``."""
    lm, af = rec["landmarks"], rec["affine"]
    out = {"box": list(rec["box"]), "score": rec["score"], "landmarks": [[lm[k], lm[k + 1]] for k in range(0, 10, 2)],
           "affine": [af[0:3], af[3:6]]}
    if rec.get("degradation") is not None:
        out["degradation"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in rec["degradation"].items()}
    for name in ("N", "tau", "omega", "restored"):
        if rec.get(name) is not None:
            out[name] = rec[name]
    if rec.get("reason"):
        out["reason"] = rec["reason"]
    return out


def _detect_one(detector: MTCNN, rgb: np.ndarray) -> Any:
    return detector.detect([rgb])[0]


# --------------------------------------------------------------------------------------------- 3. restore


def face_key(unit: str, key: str, face_index: int) -> str:
    """The stable name a face's noise is seeded from: unit, sample key, face index. The one face-key builder."""
    return f"{unit}/{key}/{face_index}"


Setting = tuple[int, int, int]  # a face's (N, tau, omega)


def _face_plan(rec: dict[str, Any], cfg: PipelineConfig) -> tuple[Setting, bool]:
    """(the face's setting, whether it goes to the restorer), from its ``faces`` record; a record without a plan
    (written before the estimate existed) takes the run's setting and is restored."""
    if rec.get("N") is None:
        return cfg.face_setting(None), True
    return (int(rec["N"]), int(rec["tau"]), int(rec["omega"])), rec.get("restored") is not False


def restore_block(table: pa.Table, restorer: FaceRestorer, cfg: PipelineConfig) -> pa.Table:
    """Restore every crop of the block, across images, in one restorer call per DR2 setting (the restorer batches
    and pads each call; with one setting, as without ``--preset auto``, that is one call for the block).

    Faces planned unrestored (clean under ``--skip-clean``) never reach the restorer: their crop is their output.
    Each face's noise is seeded from its key, so grouping does not change any face's bytes. If a call fails, its
    faces are retried one at a time, so only the images whose faces fail get ``restore_error`` (and pass through
    unchanged). A face's ``restore`` seconds are its call's seconds per face (0 for a skipped face).
    """
    status = _column(table, S.STATUS)
    crops_col = table.column(S.CROPS)
    todo = [i for i, s in enumerate(status) if _pending(s) and crops_col[i].is_valid and len(crops_col[i]) > 0]
    if not todo:
        return table
    error, timings = _column(table, S.ERROR), _timings(table)
    keys, units, records = table.column(S.KEY), table.column(S.UNIT), table.column(S.FACES)
    faces: list[tuple[int, int, bytes]] = [(i, j, c) for i in todo for j, c in enumerate(crops_col[i].as_py())]
    face_keys = [face_key(units[i].as_py(), keys[i].as_py(), j) for i, j, _ in faces]
    plans = [_face_plan(records[i][j].as_py(), cfg) for i, j, _ in faces]
    groups: dict[Setting, list[int]] = {}  # setting -> positions in ``faces``, settings in order of first face
    for f, (setting, restore) in enumerate(plans):
        if restore:
            groups.setdefault(setting, []).append(f)
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(faces)
    for f, (_, restore) in enumerate(plans):
        if not restore:  # pasted back as it is: the crop is the "restored" face and its own thumbnail
            out[f] = _unrestored(faces[f][2])
    for setting, members in groups.items():
        t0 = time.perf_counter()
        try:
            group = _restore_stages(restorer, _stack([faces[f][2] for f in members]), [face_keys[f] for f in members],
                                    cfg, setting)
            for f, one in zip(members, group, strict=True):
                out[f] = one
        except Exception:  # noqa: BLE001 - isolate the faces that fail
            log.warning("restoring %d faces at once failed; retrying them one by one", len(members), exc_info=True)
            for f in members:
                i, _, c = faces[f]
                out[f] = guarded(status, error, i, S.Status.RESTORE_ERROR, _restore_one, restorer, c, face_keys[f],
                                 cfg, setting) if _pending(status[i]) else None
        per_face = (time.perf_counter() - t0) / len(members)
        for f in members:
            timings[faces[f][0]]["restore"] += per_face
    restored: list[list[bytes] | None] = [None] * table.num_rows
    thumbs: list[list[bytes] | None] = [None] * table.num_rows
    for (i, j, _), face in zip(faces, out, strict=True):
        if face is None or not _pending(status[i]):
            continue
        if restored[i] is None:
            restored[i], thumbs[i] = [], []
        row, row_thumbs = restored[i], thumbs[i]
        assert row is not None and row_thumbs is not None and len(row) == j  # faces of a row arrive in order
        row.append(np.ascontiguousarray(face[0]).tobytes())
        row_thumbs.append(face[1].tobytes())
    return _replace(table, {S.STATUS: status, S.ERROR: error, S.TIMINGS: timings, S.RESTORED: restored,
                            S.DR2_THUMBS: thumbs})


THUMB = 160  # the report's thumbnail size: DR2's own output travels on only at this size


def _thumb(face: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(np.ascontiguousarray(face), (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def _unrestored(crop: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A face pasted back without restoration: (its crop, the crop's thumbnail)."""
    face = _stack([crop])[0]
    return face, _thumb(face)


def _restore_stages(restorer: FaceRestorer, faces: np.ndarray, keys: list[str], cfg: PipelineConfig,
                    setting: Setting | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(enhanced output, THUMBxTHUMB thumbnail of the DR2 output before the enhancer) per face, all restored with
    ``setting`` (N, tau, omega); None: the run's own."""
    N, tau, omega = setting or cfg.face_setting(None)
    # The restorer was built with the run's omega (pipeline/graph/models.py): only another one is passed per call, so
    # that restorers which know one omega only keep working for the runs that need no other.
    kw: dict[str, Any] = {} if omega == cfg.resolved_omega else {"omega": omega}
    stages_of = getattr(restorer, "restore_stages", None)
    if stages_of is None:
        enhanced = restorer.restore(faces, keys, N=N, tau=tau, **kw)
        dr2 = enhanced
    else:
        out = stages_of(faces, keys, N=N, tau=tau, **kw)
        enhanced, dr2 = out["enhanced"], out["dr2"]
    return [(e, _thumb(d)) for e, d in zip(enhanced, dr2, strict=True)]


def _stack(crops: Sequence[bytes]) -> np.ndarray:
    return np.stack([np.frombuffer(c, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3) for c in crops])


def _restore_one(restorer: FaceRestorer, crop: bytes, key: str, cfg: PipelineConfig,
                 setting: Setting | None = None) -> tuple[np.ndarray, np.ndarray]:
    return _restore_stages(restorer, _stack([crop]), [key], cfg, setting)[0]


# --------------------------------------------------------------------------------------------- 4. compose + write


@dataclass
class Composed:
    """What :func:`compose_block` decided for every row of a block."""

    status: list[str]
    error: list[str]
    output: list[bytes | None]  # None: the input bytes pass through
    timings: list[dict[str, float]]
    # the report's ``pasted`` image of each face of the rows restored (``cfg.report`` only): views of one copy of the
    # part of the composed photo that the faces' regions cover, so that the whole photos are not kept
    pasted: dict[int, list[np.ndarray]]


def compose_block(table: pa.Table, cfg: PipelineConfig) -> Composed:
    """Paste restored faces back and encode, decoding each row's image bytes again, one row at a time.

    Rows never restored (no crops) end as ``no_face``.
    """
    status, error, timings = _column(table, S.STATUS), _column(table, S.ERROR), _timings(table)
    output: list[bytes | None] = [None] * table.num_rows
    pasted: dict[int, list[np.ndarray]] = {}
    restored = table.column(S.RESTORED)
    index = table.column(S.INDEX).to_numpy()
    for i in range(table.num_rows):
        if index[i] == S.END_INDEX:
            continue
        if _pending(status[i]) and restored[i].is_valid:
            t0 = time.perf_counter()
            out = guarded(status, error, i, S.Status.ENCODE_ERROR, _compose_row, table, i, cfg)
            if out is not None:
                (output[i], rgb), status[i] = out, S.Status.OK.value
                if cfg.report:
                    try:
                        pasted[i] = _pasted_regions(rgb, [f["box"] for f in table.column(S.FACES)[i].as_py()])
                    except ValueError as e:  # a box outside the photo: the report goes without this row's regions
                        log.warning("row %d: no pasted region for the report: %s", i, e)
                del out, rgb  # the composed photo goes before the next row is decoded
                memory.release_freed_memory()  # ... and back to the system (glibc keeps it otherwise: memory.py)
            timings[i]["compose"] += time.perf_counter() - t0
        if _pending(status[i]):  # never restored (e.g. no crops): pass through
            status[i] = S.Status.NO_FACE.value
    return Composed(status, error, output, timings, pasted)


def _compose_row(table: pa.Table, i: int, cfg: PipelineConfig) -> tuple[bytes, np.ndarray]:
    """Row ``i``'s output bytes and composed photo: the image bytes decoded again (the same bytes give the same
    pixels as detection's decode; pixels never travel between stages, ``pipeline/graph/memory.py``), the faces pasted
    over their regions only. Called one row at a time, so a write task holds one decoded photo at once."""
    from pipeline.imaging.decode import encode_image
    from pipeline.imaging.faces import paste_faces

    img = decode_image(table.column(S.IMAGE)[i].as_py(), cfg.max_pixels)
    affines = [np.array(f["affine"], np.float64).reshape(2, 3) for f in table.column(S.FACES)[i].as_py()]
    restored = [np.frombuffer(b, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3)
                for b in table.column(S.RESTORED)[i].as_py()]
    rgb = paste_faces(img.rgb, affines, restored)
    return encode_image(img, rgb, jpeg_quality=cfg.jpeg_quality), rgb


def _pasted_regions(rgb: np.ndarray, boxes: list[list[float]]) -> list[np.ndarray]:
    """The report's ``pasted`` image of each face box (``report.pasted_region``), as views of one copy of the part
    of ``rgb`` that they cover."""
    from pipeline.runner.report import pasted_bounds

    bounds = [pasted_bounds(rgb.shape, (b[0], b[1], b[2], b[3])) for b in boxes]
    left, top = min(b[0] for b in bounds), min(b[1] for b in bounds)
    right, bottom = max(b[2] for b in bounds), max(b[3] for b in bounds)
    part = rgb[top:bottom, left:right].copy()
    return [part[t - top : b - top, x0 - left : x1 - left] for x0, t, x1, b in bounds]


def sample_metadata(*, key: str, status: str, error: str, image_member: str | None,
                    faces: list[dict[str, Any]] | None, timings: dict[str, float] | None, cfg: PipelineConfig,
                    model_info: dict[str, Any], notes: list[dict[str, str]] | None = None,
                    quality: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``dr2.json`` member of a sample. Deterministic unless ``record_timings`` is set.

    ``quality`` (restored faces only): per face the measures of :mod:`pipeline.imaging.quality` and their ``flags``; a
    sample with any flagged face is ``suspect`` (kept, never dropped).

    Each face's entry (:func:`face_json`) carries its ``degradation`` estimate, the ``N``/``tau``/``omega`` it was
    restored with (under ``adaptive`` its verdict's, else the run's, which the top-level ``N``/``tau``/``omega``
    repeat) and ``restored`` (false, with a ``reason``, for a face pasted back unchanged).
    """
    shown = status in (S.Status.OK.value, S.Status.RESTORE_ERROR.value, S.Status.ENCODE_ERROR.value)
    shown_faces = [face_json(f) for f in faces or []] if shown else []
    for face, q in zip(shown_faces, quality or [], strict=False):
        face["quality"] = q
    meta: dict[str, Any] = {
        "key": key,
        "status": status,
        "error": error,
        "image_member": image_member,
        "faces": shown_faces,
        "N": cfg.N,
        "tau": cfg.tau,
        "omega": cfg.resolved_omega,
        "seed": cfg.seed,
        "adaptive": cfg.adaptive,  # true: each face's own N/tau/omega (in its entry) come from its verdict
        "skip_clean": cfg.skips_clean,
        "restorer": cfg.restorer.value,
        "models": model_info,
    }
    if "note" in model_info:  # the simulated restorer (pipeline/graph/simulate.py): these faces are NOT restored
        meta["simulated"] = model_info["note"]
    if quality is not None:
        meta["suspect"] = any(q["flags"] for q in quality)
    if notes:
        meta["skipped_members"] = notes
    if cfg.record_timings and timings is not None:
        meta["timings"] = {k: round(v, 6) for k, v in timings.items() if v}
    return meta


def _runs(units: list[str], index: np.ndarray) -> list[tuple[str, int, list[int]]]:
    """Row positions grouped by unit and split into runs of consecutive ``index``: (unit, first index, rows)."""
    by_unit: dict[str, list[int]] = {}
    for r, u in enumerate(units):
        if index[r] != S.END_INDEX:
            by_unit.setdefault(u, []).append(r)
    out: list[tuple[str, int, list[int]]] = []
    for unit in sorted(by_unit):
        rows = sorted(by_unit[unit], key=lambda r: int(index[r]))
        run: list[int] = []
        for r in rows:
            if run and index[r] == index[run[-1]]:
                raise ValueError(f"{unit}: index {index[r]} appears twice in one block")
            if run and index[r] != index[run[-1]] + 1:
                out.append((unit, int(index[run[0]]), run))
                run = []
            run.append(r)
        if run:
            out.append((unit, int(index[run[0]]), run))
    return out


def write_block(table: pa.Table, cfg: PipelineConfig, model_info: dict[str, Any], config_hash: str,
                kind: UnitKind) -> pa.Table:
    """Compose, then stage one part per run of consecutive indexes (normally one per block), encoded by the unit's
    format (a tar part, the images plus a manifest part, a parquet part). Returns the summary rows the driver
    needs."""
    composed = compose_block(table, cfg)
    status, error, output, timings = composed.status, composed.error, composed.output, composed.timings
    options = cfg.storage_options()
    unit_names = _column(table, S.UNIT)
    index = table.column(S.INDEX).to_numpy()
    keys = _column(table, S.KEY)
    faces, notes = _column(table, S.FACES), _column(table, S.NOTES)
    summaries: list[dict[str, Any]] = []
    for name, first, run in _runs(unit_names, index):
        unit = Unit(name=name, kind=kind, source="")  # staging names and the part's encoding need only kind and name
        t0 = time.perf_counter()
        metas, quality, sheet = rows_metadata(table, run, composed, cfg, model_info)
        rows = PartRows(table, run, output, metas, cfg.skipped_statuses)
        kept = rows.kept()
        data = unit.format.encode_part(unit, cfg.dst, rows, options)
        shards.write_part(unit, cfg.dst, config_hash, first, len(run), data, options=options)
        per_row = (time.perf_counter() - t0) / len(run)
        seconds = S.empty_timings()
        for r in run:
            timings[r]["write"] += per_row
            for k, v in timings[r].items():
                seconds[k] += v
        statuses = Counter(status[r] for r in run)
        verdicts, skipped, saved_s = _degradation_counts([faces[r] for r in run if status[r] == S.Status.OK.value],
                                                         sum(timings[r]["restore"] for r in run))
        summaries.append({
            S.UNIT: name, "first": first, "last": first + len(run) - 1, S.UNIT_SIZE: None, S.ERROR: "",
            "statuses": sorted(statuses.items()),
            "faces": sum(len(faces[r] or []) for r in run if status[r] == S.Status.OK.value),
            "faces_found": sum(len(faces[r] or []) for r in run), "seconds": seconds, S.NOTES: None,
            "suspect": sum(bool(q["flags"]) for r in run for q in quality.get(r, [])),
            "verdicts": sorted(verdicts.items()), "skipped": skipped, "saved_s": saved_s,
            "written": len(kept),
            "sheet": json.dumps(sheet) if sheet else None,
            "non_ok": [{"key": keys[r], "status": status[r], "error": error[r]} for r in run
                       if status[r] not in (S.Status.OK.value, S.Status.NO_FACE.value)][:NON_OK_PER_PART] or None,
        })
    for end in np.flatnonzero(index == S.END_INDEX):
        r = int(end)
        summaries.append({S.UNIT: unit_names[r], "first": -1, "last": -1,
                          S.UNIT_SIZE: table.column(S.UNIT_SIZE)[r].as_py(), S.ERROR: error[r], "statuses": [],
                          "faces": 0, "faces_found": 0, "seconds": timings[r], S.NOTES: notes[r], "suspect": 0,
                          "verdicts": [], "skipped": 0, "saved_s": 0.0, "written": 0,
                          "sheet": None, "non_ok": None})
    return pa.Table.from_pylist(summaries, schema=S.SUMMARY_SCHEMA)


def rows_metadata(table: pa.Table, rows: list[int], composed: Composed, cfg: PipelineConfig,
                  model_info: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]],
                                                      list[dict[str, Any]]]:
    """After :func:`compose_block`: the ``dr2.json`` of each of ``rows`` (:func:`sample_metadata`, with the quality
    measures of its restored faces), the quality per row, and the report's contact-sheet entries (``cfg.report``).
    The one place a sample's metadata is made: the run's writer and the Python API (``pipeline/api.py``) call it."""
    quality, sheet = _judge_faces(table, rows, composed, cfg)
    keys, members = _column(table, S.KEY), _column(table, S.IMAGE_MEMBER)
    faces, notes = _column(table, S.FACES), _column(table, S.NOTES)
    metas = [sample_metadata(key=keys[r], status=composed.status[r], error=composed.error[r], image_member=members[r],
                             faces=faces[r], timings=composed.timings[r], cfg=cfg, model_info=model_info,
                             notes=notes[r], quality=quality.get(r)) for r in rows]
    return metas, quality, sheet


NON_OK_PER_PART = 50  # the report lists non-ok samples; the driver keeps a bounded number of them


def _degradation_counts(rows: list[list[dict[str, Any]] | None],
                        restore_s: float) -> tuple[Counter[str], int, float]:
    """Of the faces pasted back in ``rows``: the count per degradation verdict, how many were pasted back unrestored,
    and the restorer seconds that saved: skipped x ``restore_s`` (the part's restore seconds, which only restored
    faces take) per restored face; 0 when none was restored (nothing measured to extrapolate from)."""
    verdicts: Counter[str] = Counter()
    skipped = restored = 0
    for rec in (f for row in rows for f in row or []):
        if rec.get("degradation") is not None:
            verdicts[rec["degradation"]["verdict"]] += 1
        if rec.get("restored") is False:
            skipped += 1
        else:
            restored += 1
    return verdicts, skipped, round(skipped * restore_s / restored, 6) if restored else 0.0


def _judge_faces(table: pa.Table, run: list[int], composed: Composed,
                 cfg: PipelineConfig) -> tuple[dict[int, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Quality measures and flags of every restored face of ``run`` (row -> per face), and the report's contact
    sheet entries for the faces selected by key hash (always the suspect ones), their thumbnails written."""
    quality: dict[int, list[dict[str, Any]]] = {}
    sheet: list[dict[str, Any]] = []
    if all(composed.status[r] != S.Status.OK.value for r in run):
        return quality, sheet  # no restored face: nothing to measure, and torch stays unimported on cheap blocks
    from pipeline.imaging.quality import measure_face
    from pipeline.runner import report

    thresholds = cfg.quality_thresholds()
    crops, restored, thumbs = table.column(S.CROPS), table.column(S.RESTORED), table.column(S.DR2_THUMBS)
    records = table.column(S.FACES)
    for r in run:
        if composed.status[r] != S.Status.OK.value:
            continue
        unit, key = table.column(S.UNIT)[r].as_py(), table.column(S.KEY)[r].as_py()
        row_thumbs = thumbs[r].as_py() or []
        row_records = records[r].as_py() or []
        quality[r] = []
        for j, (c, o) in enumerate(zip(crops[r].as_py(), restored[r].as_py(), strict=True)):
            inp = np.frombuffer(c, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3)
            out = np.frombuffer(o, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3)
            rec = row_records[j] if j < len(row_records) else {}
            q = measure_face(inp, out, N=rec.get("N") or cfg.N, ddpm_size=cfg.ddpm_size)  # the N this face had
            entry = report.face_entry(shard=unit, key=key, face_index=j, images={}, quality=q, thresholds=thresholds)
            if rec.get("degradation") is not None:  # the sheet shows each face's verdict (pipeline/runner/report.py)
                d = rec["degradation"]
                entry["degradation"] = {"verdict": d["verdict"], "score": round(d["score"], 2)}
                entry["restored"] = rec.get("restored") is not False
            quality[r].append({**q.to_dict(), "flags": entry["flags"]})
            if cfg.report and report.face_sheet_selected(face_key(unit, key, j), suspect=bool(entry["flags"]),
                                                         limit_per_thousand=cfg.report_faces_per_thousand or 1000):
                images = {"input": inp, "enhanced": out}
                if r in composed.pasted:
                    images["pasted"] = composed.pasted[r][j]
                if j < len(row_thumbs):
                    images["dr2"] = np.frombuffer(row_thumbs[j], np.uint8).reshape(THUMB, THUMB, 3)
                entry["images"] = report.write_face_images(report.report_uri(cfg.dst),
                                                           report.face_entry_id(unit, key, j), images)
                sheet.append(entry)
    return quality, sheet


# --------------------------------------------------------------------------------------------- Ray classes


class DetectStage:
    """Actor: holds the MTCNN detector."""

    def __init__(self, cfg: PipelineConfig) -> None:
        from pipeline.graph.models import build_detector, pick_device

        self.cfg = cfg
        self.detector = build_detector(cfg, pick_device(cfg.device))

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        import torch

        failpoints.hit("detect.batch")
        with torch.inference_mode():
            yield from detect_block(batch, self.detector, self.cfg)


class RestoreStage:
    """Actor: holds the face restorer (DR2 + enhancer on a GPU in production)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        from pipeline.graph.models import pick_device, restorer_from_config

        self.cfg = cfg
        device = pick_device(cfg.device)
        if device.type == "cpu":
            # CPU float rounding depends on torch's thread count (the tiny restorer's bytes differ between 1 and 2
            # threads): one thread on every node, whatever its cores or Ray's OMP_NUM_THREADS, so outputs do not
            # depend on where a unit ran. Speed on CPU comes from more actors, not more threads.
            import torch

            torch.set_num_threads(1)
        self.restorer = restorer_from_config(cfg, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        failpoints.hit("restore.batch")
        with torch.inference_mode():
            return restore_block(batch, self.restorer, self.cfg)


def write_block_batch(batch: pa.Table, cfg: PipelineConfig, model_info: dict[str, Any], config_hash: str,
                      kind: str) -> pa.Table:
    """Ray adapter for :func:`write_block` (task). Blocks without a restored face (no face found, passthrough) never
    import torch: a fresh worker starts in a fraction of the time.

    A worker whose earlier task was cancelled by Ray (a failed run stops its tasks with KeyboardInterrupt) while it
    was importing torch keeps a half-imported torch for good; such a worker exits at its next block, so that Ray
    retries the block on a fresh worker instead of failing every block it is given."""
    if S.Status.OK.value in batch.column(S.STATUS).to_pylist():  # restored faces: quality measures need torch
        try:
            import torch  # noqa: F401 - imported first so that a broken import is caught here

            from pipeline.imaging import quality  # noqa: F401
        except Exception as e:  # noqa: BLE001 - an interpreter with a half-imported torch cannot recover
            log.error("this worker cannot import torch (%s: %s); exiting so that Ray retries the block on a fresh "
                      "one", type(e).__name__, e)
            os._exit(1)
    failpoints.hit("write.block")
    return write_block(batch, cfg, model_info, config_hash, UnitKind(kind))
