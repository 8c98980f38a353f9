"""The pipeline's stages: plain functions over lists of row dicts, and the thin Ray classes that hold a model.

Each stage takes rows (``pipeline.schema``) and returns the same rows with columns filled in; none drops a
row. Exceptions that concern one image become that row's ``status``/``error`` through ``row_guard``; an
exception that concerns the infrastructure (weights that will not load, storage that refuses writes)
propagates and stops the job (STYLE rule 7).

Stages, in order:

1. ``read_source`` (Ray ``flat_map``, CPU task): one input shard or image chunk -> its rows, then an end marker.
2. ``detect_rows`` (actor: ``DetectStage``): decode, detect, align -> ``faces`` and ``crops``.
3. ``restore_rows`` (actor: ``RestoreStage``): all crops of a batch, across images, through the restorer.
4. ``compose_and_write`` (CPU task): paste back, encode, write the output part; returns a small summary row.

The Ray classes follow Ray's batch-inference pattern: ``__init__`` loads the model once, ``__call__`` maps
a batch under ``torch.inference_mode()``. ``pipeline/build.py`` is the only place that wires them into Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from dr2.diffusion import default_omega
from dr2.restorer import FACE_SIZE, FaceRestorer
from pipeline import schema as S
from pipeline import storage
from pipeline.config import PipelineConfig
from pipeline.decode import DecodedImage, ImageError, decode_image, encode_image
from pipeline.faces import AlignOptions, FaceMeta, align_faces, paste_faces
from pipeline.models import build_detector, build_restorer, pick_device
from pipeline.mtcnn import MTCNN, Detection
from pipeline.shards import (
    Sample,
    ShardReadError,
    iter_tar_samples,
    pick_image_member,
    write_image_outputs,
    write_shard_rows,
)
from pipeline.storage import read_bytes

log = logging.getLogger(__name__)

Row = dict[str, Any]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------- helpers


def guarded(row: Row, status: S.Status, fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)`` for one row; an exception becomes the row's ``status``/``error`` and gives None.

    ``ImageError`` carries its own status (``decode_error``, ``too_large``); anything else gets ``status``.
    The one place where a per-image failure turns into data (STYLE rule 7); ``fn`` never returns None.
    """
    try:
        return fn(*args)
    except ImageError as e:
        row[S.STATUS], row[S.ERROR] = e.status.value, str(e)
    except Exception as e:  # noqa: BLE001 - a row status is the point: one bad image must not stop the job
        log.warning("%s %s/%s: %s", status.value, row[S.SHARD], row[S.KEY], e, exc_info=True)
        row[S.STATUS], row[S.ERROR] = status.value, f"{type(e).__name__}: {e}"
    return None


def _pending(row: Row) -> bool:
    return not S.is_marker(row) and row[S.STATUS] == S.Status.PENDING.value


def _add_timing(row: Row, name: str, seconds: float) -> None:
    timings = json.loads(row[S.TIMINGS])
    timings[name] = round(timings.get(name, 0.0) + seconds, 6)
    row[S.TIMINGS] = json.dumps(timings, sort_keys=True)


@contextlib.contextmanager
def _timed(row: Row, name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _add_timing(row, name, time.perf_counter() - t0)


def align_options(cfg: PipelineConfig) -> AlignOptions:
    return AlignOptions(select=cfg.select, max_faces=cfg.max_faces, min_face_size=cfg.min_face_size)


def to_rows(table: pa.Table) -> list[Row]:
    return table.to_pylist()


def to_table(rows: list[Row]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=S.ROW_SCHEMA)


# --------------------------------------------------------------------------------------------- 1. read


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work, stats and resume: a .tar shard, or a chunk of plain images."""

    shard: str  # output name: the shard's relative name ("part/000.tar") or "chunk-000003"
    source: str  # the shard URI, or the image root for a chunk
    images: tuple[str, ...] = ()  # chunk only: relative image paths

    def to_item(self) -> dict[str, Any]:
        return {"shard": self.shard, "source": self.source, "images": list(self.images)}


def read_source(item: dict[str, Any]) -> Iterator[Row]:
    """Rows of one work unit, in input order, then its end marker.

    A shard that breaks off (truncated or corrupt tar) yields the samples before the cut, then the
    interrupted sample (status ``truncated``, with the members that were read); the marker's ``error``
    says what happened and the shard's stats record it. Unreadable storage raises.
    """
    shard, source, images = item["shard"], item["source"], item["images"]
    n, error = 0, ""
    if images:  # a chunk of plain images: the key is the relative path
        for n, rel in enumerate(images):
            member = rel.rsplit(".", 1)[-1].lower()
            yield S.new_row(key=rel, source=source, shard=shard, index=n, image_member=member,
                            image=read_bytes(storage.join(source, rel)), extra=[])
        n = len(images)
    else:
        try:
            for sample in iter_tar_samples(source):
                yield _sample_row(sample, source, shard, n)
                n += 1
        except ShardReadError as e:
            log.warning("shard %s: %s", source, e)
            error = str(e)
            if e.partial is not None:
                row = _sample_row(e.partial, source, shard, n)
                row[S.STATUS], row[S.ERROR] = S.Status.TRUNCATED.value, f"sample cut off by a damaged shard: {e.reason}"
                yield row
                n += 1
    yield S.end_marker(source=source, shard=shard, size=n, error=error)


def _sample_row(sample: Sample, source: str, shard: str, index: int) -> Row:
    """A sample's row. ``extra_*`` keep every member in input order; the image member's own slot there is
    empty (its bytes travel once, in ``image``) and the writer puts the output bytes back in that slot."""
    member = pick_image_member(sample.members)
    image = next((d for name, d in sample.members if name == member), None) if member else None
    extra = [(name, b"" if name == member else d) for name, d in sample.members]
    return S.new_row(key=sample.key, source=source, shard=shard, index=index, image_member=member, image=image,
                     extra=extra)


# --------------------------------------------------------------------------------------------- 2. detect


def detect_rows(rows: list[Row], detector: MTCNN, cfg: PipelineConfig) -> list[Row]:
    """Decode each pending row, detect faces in the whole batch at once, align the chosen ones."""
    decoded: list[tuple[Row, np.ndarray]] = []
    for row in filter(_pending, rows):
        with _timed(row, "decode"):
            img = guarded(row, S.Status.DECODE_ERROR, _decode, row, cfg)
        if img is not None:
            decoded.append((row, img.rgb))
    if not decoded:
        return rows
    t0 = time.perf_counter()
    detections: list[Detection | None]
    try:
        detections = list(detector.detect([rgb for _, rgb in decoded]))
    except Exception:  # noqa: BLE001 - retry image by image so one bad image does not fail its neighbours
        detections = [guarded(row, S.Status.DETECT_ERROR, _detect_one, detector, rgb) for row, rgb in decoded]
    per_image = (time.perf_counter() - t0) / len(decoded)
    opts = align_options(cfg)
    for (row, rgb), det in zip(decoded, detections, strict=True):
        if det is None:
            continue
        _add_timing(row, "detect", per_image)
        with _timed(row, "align"):
            faces = guarded(row, S.Status.DETECT_ERROR, align_faces, rgb, det, opts)
        if faces is None:
            continue
        row[S.FACES] = json.dumps([f.meta.to_json_dict() for f in faces])
        row[S.CROPS] = [f.crop.tobytes() for f in faces]
        if not faces:
            row[S.STATUS], row[S.ERROR] = S.Status.NO_FACE.value, ""
    return rows


def _decode(row: Row, cfg: PipelineConfig) -> DecodedImage:
    return decode_image(row[S.IMAGE], max_pixels=cfg.max_pixels)


def _detect_one(detector: MTCNN, rgb: np.ndarray) -> Detection:
    return detector.detect([rgb])[0]


# --------------------------------------------------------------------------------------------- 3. restore


def face_key(row: Row, face_index: int) -> str:
    """The stable name a face's noise is seeded from: shard, sample key, face index."""
    return f"{row[S.SHARD]}/{row[S.KEY]}/{face_index}"


def restore_rows(rows: list[Row], restorer: FaceRestorer, cfg: PipelineConfig) -> list[Row]:
    """Restore every crop of the batch, across images, ``cfg.restore_batch_size`` faces per forward pass.

    A failing forward pass is retried face by face, so only the images whose faces fail get
    ``restore_error`` (and pass through unchanged).
    """
    todo = [r for r in rows if _pending(r) and r[S.CROPS]]
    faces = [(r, i, c) for r in todo for i, c in enumerate(r[S.CROPS])]
    restored: dict[int, list[bytes]] = {id(r): [b""] * len(r[S.CROPS]) for r in todo}
    bs = max(1, cfg.restore_batch_size)
    for start in range(0, len(faces), bs):
        chunk = faces[start : start + bs]
        t0 = time.perf_counter()
        out: list[np.ndarray | None]
        try:
            out = list(_restore_chunk(restorer, chunk, cfg))
        except Exception:  # noqa: BLE001 - isolate the image that fails
            out = [guarded(r, S.Status.RESTORE_ERROR, _restore_one, restorer, r, i, c, cfg) if _pending(r) else None
                   for r, i, c in chunk]
        per_face = (time.perf_counter() - t0) / len(chunk)
        for (r, i, _), face in zip(chunk, out, strict=True):
            if face is not None:
                restored[id(r)][i] = face.tobytes()
            _add_timing(r, "restore", per_face)
    for r in todo:
        if _pending(r):
            r[S.RESTORED] = restored[id(r)]
    return rows


def _restore_one(restorer: FaceRestorer, row: Row, i: int, crop: bytes, cfg: PipelineConfig) -> np.ndarray:
    return _restore_chunk(restorer, [(row, i, crop)], cfg)[0]


def _restore_chunk(restorer: FaceRestorer, chunk: Sequence[tuple[Row, int, bytes]], cfg: PipelineConfig) -> np.ndarray:
    batch = np.stack([np.frombuffer(c, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3) for _, _, c in chunk])
    keys = [face_key(r, i) for r, i, _ in chunk]
    return restorer.restore(batch, keys, N=cfg.N, tau=cfg.tau)  # (B, 512, 512, 3) uint8


# --------------------------------------------------------------------------------------------- 4. compose


def compose_rows(rows: list[Row], cfg: PipelineConfig) -> list[Row]:
    """Paste restored faces back and encode; set ``output`` and the final status on every row.

    Rows that are not restored keep their input bytes as output (passed through with their status).
    """
    for row in rows:
        if S.is_marker(row):
            continue
        if _pending(row) and row[S.RESTORED]:
            with _timed(row, "compose"):
                out = guarded(row, S.Status.ENCODE_ERROR, _compose, row, cfg)
            if out is not None:
                row[S.OUTPUT], row[S.STATUS] = out, S.Status.OK.value
        if row[S.STATUS] == S.Status.PENDING.value:  # never restored (e.g. no crops): pass through
            row[S.STATUS] = S.Status.NO_FACE.value
        if row[S.OUTPUT] is None:
            row[S.OUTPUT] = row[S.IMAGE]
        row[S.CROPS], row[S.RESTORED] = [], []  # large and no longer needed
    return rows


def _compose(row: Row, cfg: PipelineConfig) -> bytes:
    img = _decode(row, cfg)
    affines = [FaceMeta.from_json_dict(m).affine_matrix() for m in json.loads(row[S.FACES])]
    restored = [np.frombuffer(b, np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3) for b in row[S.RESTORED]]
    return encode_image(img, paste_faces(img.rgb, affines, restored), jpeg_quality=cfg.jpeg_quality)


def sample_metadata(row: Row, cfg: PipelineConfig, model_info: dict[str, Any]) -> dict[str, Any]:
    """The ``dr2.json`` member of a sample. Deterministic unless ``record_timings`` is set."""
    meta: dict[str, Any] = {
        "key": row[S.KEY],
        "status": row[S.STATUS],
        "error": row[S.ERROR],
        "image_member": row[S.IMAGE_MEMBER],
        "faces": json.loads(row[S.FACES]) if row[S.STATUS] in (S.Status.OK.value, S.Status.RESTORE_ERROR.value,
                                                                S.Status.ENCODE_ERROR.value) else [],
        "N": cfg.N,
        "tau": cfg.tau,
        "omega": default_omega(cfg.N, cfg.tau) if cfg.omega is None else cfg.omega,
        "seed": cfg.seed,
        "restorer": cfg.restorer.value,
        "models": model_info,
    }
    if cfg.record_timings:
        meta["timings"] = json.loads(row[S.TIMINGS])
    return meta


SUMMARY_COLUMNS = (S.SHARD, S.SOURCE, S.INDEX, S.KEY, S.STATUS, S.ERROR, S.FACES, S.TIMINGS, S.SHARD_SIZE)
SUMMARY_SCHEMA = pa.schema([S.ROW_SCHEMA.field(k) for k in SUMMARY_COLUMNS])


def summary(row: Row) -> Row:
    """What reaches the driver: no image bytes."""
    return {k: row[k] for k in SUMMARY_COLUMNS}


METADATA_MEMBER = "dr2.json"


def compose_and_write(rows: list[Row], cfg: PipelineConfig, model_info: dict[str, Any], images_mode: bool) -> list[Row]:
    """Compose, then stage this batch's samples as parts (shards) or write the image files (plain images);
    return summary rows."""
    compose_rows(rows, cfg)
    samples = [r for r in rows if not S.is_marker(r)]
    if images_mode:
        # manifest lines: the sample's dr2.json fields plus where it sits (shard, index)
        write_image_outputs(cfg.dst, [{S.SHARD: r[S.SHARD], S.INDEX: r[S.INDEX], S.OUTPUT: r[S.OUTPUT],
                                       **sample_metadata(r, cfg, model_info)} for r in samples])
    else:
        for r in samples:
            meta = json.dumps(sample_metadata(r, cfg, model_info), sort_keys=True, indent=1).encode()
            keep = [i for i, n in enumerate(r[S.EXTRA_NAMES]) if n != METADATA_MEMBER]  # reprocessed outputs
            r[S.EXTRA_NAMES] = [r[S.EXTRA_NAMES][i] for i in keep] + [METADATA_MEMBER]
            r[S.EXTRA_DATA] = [r[S.EXTRA_DATA][i] for i in keep] + [meta]
        write_shard_rows(cfg.dst, samples)
    return [summary(r) for r in rows]


# --------------------------------------------------------------------------------------------- Ray classes


class DetectStage:
    """Actor: holds the MTCNN detector."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.detector = build_detector(cfg, pick_device(cfg.device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.inference_mode():
            return to_table(detect_rows(to_rows(batch), self.detector, self.cfg))


class RestoreStage:
    """Actor: holds the face restorer (DR2 + enhancer on a GPU in production)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.restorer = build_restorer(cfg, pick_device(cfg.device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.inference_mode():
            return to_table(restore_rows(to_rows(batch), self.restorer, self.cfg))


def compose_and_write_batch(batch: pa.Table, cfg: PipelineConfig, model_info: dict[str, Any],
                            images_mode: bool) -> pa.Table:
    rows = compose_and_write(to_rows(batch), cfg, model_info, images_mode)
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)
