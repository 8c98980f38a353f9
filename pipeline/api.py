"""The Python API: restore one image, a Ray dataset, or a whole archive, with the same options and the same bytes as
``dr2 restore``.

Three entry points, each a thin face on the code the command line runs (STYLE rule 16):

* :class:`Restorer`: build the models once, call it per image (a numpy array, channel order stated, or encoded
  bytes), get a :class:`RestoredImage`: the output image (the bytes ``dr2 restore`` writes, and decoded RGB), and per
  face its box, landmarks, affine, degradation estimate, quality measures and flags, with the sample's status and
  error. Like ``GFPGANer.enhance`` (cropped faces, restored faces, pasted image), but the record is ``dr2.json``'s.
* :func:`restore_dataset`: a stage for a Ray Data pipeline. Takes a dataset with an image column (bytes, or a
  Hugging Face ``{bytes, path}`` struct), returns one with the restored image and the metadata added, every other
  column unchanged and no row dropped. Use it between your own ``ray.data.read_*`` and ``write_*``.
* :func:`run`: the whole ``dr2 restore`` job (plan, lease, stream, commit, report) on ``config.src``/``config.dst``.

The options are :class:`~pipeline.config.PipelineConfig`'s, the fields ``dr2 restore --help`` lists; pass a config,
keyword overrides of one, or both, and ``preset=`` as ``--preset`` (:func:`~pipeline.config.with_preset`: explicit
values win over the preset).

What is shared with ``dr2 restore``, so that the bytes agree: a one-image call builds the same record rows
(:func:`pipeline.graph.dataset.record_block`) and runs ``detect_block``, ``restore_block``, ``compose_block`` and
``rows_metadata`` of :mod:`pipeline.graph.stages`, in this process; a dataset runs them on the run's own Ray stages,
pools and failure bounds (:func:`pipeline.graph.build.restore_dataset_graph`). A face's noise is seeded from the seed, a
unit name, the sample's key and the face's index: pass the ``key`` (and ``unit``) ``dr2 restore`` gave a sample to get
its bytes (a tar's sample key and shard name; for a folder of images the relative path and the chunk named in the
manifest); by default the key is the image's content hash, so the one-image call and the dataset agree with each other.

Example, one image::

    >>> from pipeline import Restorer
    >>> restorer = Restorer(preset="moderate", ddpm="models/ddpm", enhancer="models/sparnethd")  # doctest: +SKIP
    >>> result = restorer(open("photo.jpg", "rb").read())                                       # doctest: +SKIP
    >>> result.status, len(result.faces), result.faces[0].box                                   # doctest: +SKIP
    >>> open("restored.jpg", "wb").write(result.output)                                        # doctest: +SKIP

A Ray Data pipeline::

    >>> import ray.data
    >>> from pipeline import restore_dataset
    >>> ds = ray.data.read_parquet("s3://bucket/photos/")                                       # doctest: +SKIP
    >>> ds = restore_dataset(ds, image_column="image", preset="auto", ddpm=..., enhancer=...)   # doctest: +SKIP
    >>> ds.write_parquet("s3://bucket/restored/")                                               # doctest: +SKIP

``examples/restore_one_image.py`` and ``examples/ray_parquet_pipeline.py`` run both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline import schema as S
from pipeline.config import PipelineConfig, with_preset
from pipeline.graph.dataset import UNIT, check_columns, content_key, image_suffix, record_block

if TYPE_CHECKING:
    import ray.data

    from pipeline.imaging.degradation import Degradation
    from pipeline.imaging.quality import FaceQuality
    from pipeline.runner.loop import RunSummary  # TODO(lead): run loop moves to pipeline/runner/ at merge

log = logging.getLogger(__name__)

Channels = Literal["rgb", "bgr"]


def resolve_config(config: PipelineConfig | None = None, *, preset: str | None = None,
                   **overrides: Any) -> PipelineConfig:
    """The config the API runs with: ``config`` (default: ``dr2 restore``'s defaults), then ``preset``'s fields, then
    ``overrides`` (keyword names are PipelineConfig's fields: ``N``, ``tau``, ``restorer``, ``device``, ...). The
    report is off: it belongs to a run's DST.

    >>> cfg = resolve_config(preset="severe", tau=30, restorer="tiny")
    >>> (cfg.N, cfg.tau, cfg.restorer.value)
    (16, 30, 'tiny')
    """
    return dataclasses.replace(with_preset(config, preset, **overrides), report=False)


# --------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RestoredFace:
    """One face of a :class:`RestoredImage`: the numbers its ``dr2.json`` entry holds, typed, and its pixels.

    ``box`` is (x1, y1, x2, y2) and ``landmarks`` five (x, y) points (eyes, nose, mouth corners) in the photo's
    pixels; ``affine`` the 2x3 photo-to-crop matrix of the 512x512 FFHQ alignment. ``quality`` and ``flags`` (restored
    faces only) are :mod:`pipeline.imaging.quality`'s measures and what they flag; ``degradation`` the estimate on the
    aligned crop; ``N``/``tau``/``omega`` the DR2 setting the face got; ``restored`` false (with a ``reason``) for a
    face pasted back unchanged (clean, under ``skip_clean``). ``crop`` is the aligned input and ``restored_face`` the
    output, 512x512x3 uint8 RGB (None where the face failed to restore).
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...]
    affine: tuple[tuple[float, float, float], tuple[float, float, float]]
    degradation: Degradation | None
    quality: FaceQuality | None
    flags: tuple[str, ...]
    N: int | None
    tau: int | None
    omega: int | None
    restored: bool
    reason: str
    crop: np.ndarray | None
    restored_face: np.ndarray | None


@dataclass(frozen=True)
class RestoredImage:
    """What one image became: ``output``, the encoded bytes ``dr2 restore`` writes for it (the restored image in the
    input's format, or the input's own bytes where nothing was restored: no face, a bad image), ``rgb`` the output
    decoded, ``faces``, and the sample's ``status``/``error`` (:class:`pipeline.schema.Status`). ``metadata`` is the
    sample's ``dr2.json`` as a dict and ``metadata_json`` its bytes as an output holds them."""

    key: str
    status: S.Status
    error: str
    output: bytes | None
    faces: tuple[RestoredFace, ...]
    metadata: dict[str, Any]

    @property
    def ok(self) -> bool:
        """At least one face was restored and pasted back."""
        return self.status is S.Status.OK

    @property
    def suspect(self) -> bool:
        """A restored face has a quality flag (kept, never dropped: look at it)."""
        return bool(self.metadata.get("suspect"))

    @property
    def metadata_json(self) -> bytes:
        from pipeline.schema import dr2_json

        return dr2_json(self.metadata)

    @cached_property
    def rgb(self) -> np.ndarray | None:
        """The output decoded: (H, W, 3) uint8 RGB in display orientation (8 bits per channel, whatever the file's
        depth), or None where the output is not a readable image (status ``decode_error``)."""
        if self.output is None:
            return None
        from pipeline.imaging.decode import ImageError, decode_image

        try:
            return decode_image(self.output, max_pixels=2**62).rgb
        except ImageError:
            return None

    @property
    def bgr(self) -> np.ndarray | None:
        """:attr:`rgb` in OpenCV's channel order."""
        rgb = self.rgb
        return None if rgb is None else np.ascontiguousarray(rgb[:, :, ::-1])


# --------------------------------------------------------------------------------------------- one image


def encode_array(image: np.ndarray, channels: Channels) -> bytes:
    """A uint8 (H, W, 3) array in ``channels`` order -> PNG bytes (lossless), the form the stages take."""
    import cv2

    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    bgr = image if channels == "bgr" else image[:, :, ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError("could not encode the array as PNG")
    return bytes(buf)


class Restorer:
    """Face restoration of single images, in this process: build once (the models load here), call per image.

    Takes what ``dr2 restore`` takes: a :class:`~pipeline.config.PipelineConfig`, keyword overrides of its fields,
    ``preset=`` (``mild``, ``moderate``, ``severe``, ``auto``). Detection, alignment, restoration, paste-back,
    encoding and the metadata are the run's own stage functions, so for the same image, key and config the
    output and ``dr2.json`` are byte-identical to what ``dr2 restore`` writes. On a CPU the stages run on one torch
    thread, as ``dr2 restore``'s workers do (float rounding follows the thread count); the caller's setting is put
    back after each call.

    >>> from tests.pipeline.photos import astronaut                                              # doctest: +SKIP
    >>> restorer = Restorer(restorer="tiny", preset="mild")                                      # doctest: +SKIP
    >>> result = restorer(astronaut(), channels="rgb")                                           # doctest: +SKIP
    >>> result.status.value, result.faces[0].box, result.rgb.shape                               # doctest: +SKIP
    ('ok', (..., ..., ..., ...), (512, 512, 3))
    """

    def __init__(self, config: PipelineConfig | None = None, *, preset: str | None = None, **overrides: Any) -> None:
        from pipeline.graph.models import build_detector, model_identity, pick_device, restorer_from_config

        self.config = resolve_config(config, preset=preset, **overrides)
        self.model_info = model_identity(self.config)  # refuses DR2 without weights, checks N against the DDPM
        self.device = pick_device(self.config.device)
        with self._threads():
            self._detector = build_detector(self.config, self.device)
            self._restorer = restorer_from_config(self.config, self.device)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """One torch thread on a CPU for the duration (what a Ray worker of ``dr2 restore`` runs with)."""
        import torch

        if self.device.type != "cpu":
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def __call__(self, image: np.ndarray | bytes, *, channels: Channels | None = None, key: str | None = None,
                 unit: str = UNIT, image_member: str | None = None) -> RestoredImage:
        """Restore the faces of one image.

        ``image``: encoded bytes (JPEG, PNG, WebP, BMP, TIFF: the output keeps the format), or a uint8 (H, W, 3) array
        with ``channels`` saying its order (``"rgb"``; ``"bgr"`` for OpenCV's ``imread``); an array goes through the
        stages as a PNG, and the output is a PNG. ``key`` (default: the content hash) and ``unit`` name the faces'
        noise; ``image_member`` is the suffix ``dr2.json`` names (default: from the bytes' format). A bad image is a
        status (``decode_error``, ``too_large``), never an exception.
        """
        return self.restore_many([image], channels=channels, keys=None if key is None else [key], unit=unit,
                                 image_members=None if image_member is None else [image_member])[0]

    def restore_many(self, images: Sequence[np.ndarray | bytes], *, channels: Channels | None = None,
                     keys: Sequence[str] | None = None, unit: str = UNIT,
                     image_members: Sequence[str | None] | None = None) -> list[RestoredImage]:
        """:meth:`__call__` for several images, in blocks of ``rows_per_block``: the faces of a block go to the
        restorer together (``restore_batch_size`` at a time), which is what keeps a GPU busy. Results in order."""
        datas: list[bytes] = []
        for img in images:
            if isinstance(img, bytes | bytearray | memoryview):
                datas.append(bytes(img))
            elif isinstance(img, np.ndarray):
                if channels is None:
                    raise ValueError("an image array needs channels='rgb' or channels='bgr' (its channel order)")
                datas.append(encode_array(img, channels))
            else:
                raise TypeError(f"an image is encoded bytes or a numpy array, got {type(img).__name__}")
        key_list = list(keys) if keys is not None else [content_key(d) for d in datas]
        members = list(image_members) if image_members is not None else [image_suffix(d) for d in datas]
        if not len(key_list) == len(members) == len(datas):
            raise ValueError(f"{len(datas)} images, {len(key_list)} keys, {len(members)} image_members")
        out: list[RestoredImage] = []
        step = self.config.rows_per_block
        for at in range(0, len(datas), step):
            out.extend(self._block(datas[at : at + step], key_list[at : at + step], members[at : at + step], unit))
        return out

    def _block(self, datas: list[bytes], keys: list[str], members: list[str | None], unit: str) -> list[RestoredImage]:
        import pyarrow as pa
        import torch

        from pipeline.graph.stages import compose_block, detect_block, restore_block, rows_metadata

        cfg = self.config
        table = record_block(datas, keys, members, unit)
        with self._threads(), torch.inference_mode():
            table = pa.concat_tables(list(detect_block(table, self._detector, cfg)))
            table = restore_block(table, self._restorer, cfg)
        composed = compose_block(table, cfg)
        rows = list(range(table.num_rows))
        metas, _, _ = rows_metadata(table, rows, composed, cfg, self.model_info)
        crops, restored = table.column(S.CROPS), table.column(S.RESTORED)
        results = []
        for r, meta in zip(rows, metas, strict=True):
            output = composed.output[r] if composed.output[r] is not None else datas[r]
            faces = tuple(_face(f, _pixels(crops[r].as_py(), j), _pixels(restored[r].as_py(), j))
                          for j, f in enumerate(meta["faces"]))
            results.append(RestoredImage(key=keys[r], status=S.Status(composed.status[r]), error=composed.error[r],
                                         output=output, faces=faces, metadata=meta))
        return results


def _pixels(faces: list[bytes] | None, j: int) -> np.ndarray | None:
    from pipeline.graph.stages import FACE_SIZE

    if not faces or j >= len(faces):
        return None
    return np.frombuffer(faces[j], np.uint8).reshape(FACE_SIZE, FACE_SIZE, 3).copy()


def _face(entry: dict[str, Any], crop: np.ndarray | None, restored: np.ndarray | None) -> RestoredFace:
    """A face's ``dr2.json`` entry (:func:`pipeline.graph.stages.face_json` + quality), typed."""
    from pipeline.imaging.degradation import Degradation
    from pipeline.imaging.quality import FaceQuality

    q = entry.get("quality")
    a = entry["affine"]
    return RestoredFace(
        box=(entry["box"][0], entry["box"][1], entry["box"][2], entry["box"][3]),
        score=entry["score"],
        landmarks=tuple((p[0], p[1]) for p in entry["landmarks"]),
        affine=((a[0][0], a[0][1], a[0][2]), (a[1][0], a[1][1], a[1][2])),
        degradation=Degradation.from_dict(entry["degradation"]) if entry.get("degradation") else None,
        quality=FaceQuality.from_dict(q) if q else None,
        flags=tuple(q["flags"]) if q else (),
        N=entry.get("N"), tau=entry.get("tau"), omega=entry.get("omega"),
        restored=entry.get("restored") is not False and restored is not None,
        reason=entry.get("reason", ""),
        crop=crop, restored_face=restored,
    )


# --------------------------------------------------------------------------------------------- a Ray dataset


def restore_dataset(ds: ray.data.Dataset, *, image_column: str = "image", key_column: str | None = None,
                    output_column: str = "restored_image", metadata_column: str = "dr2",
                    config: PipelineConfig | None = None, preset: str | None = None,
                    **overrides: Any) -> ray.data.Dataset:
    """``ds`` with each row's faces restored: a lazy Ray Data transform, for use between your own ``read_*`` and
    ``write_*`` (or ``iter_batches``).

    ``image_column`` holds encoded image bytes, or a Hugging Face image struct ``{bytes, path}``. Added columns:
    ``output_column`` (default ``restored_image``; pass ``output_column=image_column`` to replace the image), in the
    image column's own type, holding what ``dr2 restore`` writes (the restored image in the input's format, or the
    input's bytes where nothing was restored); ``metadata_column`` (``dr2``), the sample's ``dr2.json`` text, byte for
    byte; and ``<metadata_column>_status`` (``dr2_status``), the status alone, for filters. Every other column passes
    through unchanged, and no row is dropped: a bad image keeps its bytes and gets its status (``decode_error``, ...).

    ``key_column`` names the faces' noise per row (default: the image's content hash, so a row's output does not
    depend on how Ray splits the data). The options are ``dr2 restore``'s (``config``, ``preset``, keyword overrides);
    the pools (``restore_actors``, ``gpus_per_restorer``, ...), batching and failure bounds are the run's
    (``pipeline/graph/build.py``). Starts Ray (as Ray Data would) if it is not running: the pools follow the cluster.

    >>> ds = restore_dataset(ray.data.read_parquet("in/"), restorer="tiny")  # doctest: +SKIP
    >>> ds.filter(lambda row: row["dr2_status"] == "ok").write_parquet("out/")  # doctest: +SKIP
    """
    from pipeline.graph.build import restore_dataset_graph
    from pipeline.graph.models import model_identity

    cfg = resolve_config(config, preset=preset, **overrides)
    if cfg.skipped_statuses:
        raise ValueError("skip_status leaves samples out of a run's outputs; restore_dataset never drops rows: "
                         f"filter on the {metadata_column}{'_status'} column instead")
    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:  # known without running anything: refuse clashing names now (else the first batch does)
        names = list(schema.names)
        if image_column not in names:
            raise ValueError(f"the dataset has no column {image_column!r} (columns: {names}); pass image_column=")
        check_columns(names, image_column=image_column, output_column=output_column, metadata_column=metadata_column)
    return restore_dataset_graph(ds, cfg, model_identity(cfg), image_column=image_column, key_column=key_column,
                                 output_column=output_column, metadata_column=metadata_column)


# --------------------------------------------------------------------------------------------- the whole job


def run(config: PipelineConfig | None = None, *, preset: str | None = None, **overrides: Any) -> RunSummary:
    """The whole ``dr2 restore`` job on ``src``/``dst`` (plan, take DST's lease, stream, commit each unit, write the
    report), as the command runs it; returns its summary (``units_done``, ``samples``, ``statuses``, ``failed``, ...;
    ``summary.table()`` prints what the command prints). Here the report is written, as by the command.

    >>> summary = run(src="photos/", dst="restored/", restorer="passthrough")  # doctest: +SKIP
    >>> summary.units_done, dict(summary.statuses)                            # doctest: +SKIP
    """
    from pipeline.runner.loop import run_restore  # TODO(lead): run loop moves to pipeline/runner/ at merge

    return run_restore(with_preset(config, preset, **overrides))
