"""The record that flows: column names, their Arrow types and the row statuses, named once.

One row per source image flows through every stage; no stage drops a row. Stages only add or replace
columns, and they work on whole Arrow tables (blocks of hundreds of rows), never on Python dicts per row:
moving a cheap row must cost next to nothing beside the work done on it (STYLE rule 14). A row whose
image is bad carries ``status`` and a readable ``error`` to the end and is written to the output all the
same (its original bytes pass through unchanged).

Columns (Arrow types in :data:`ROW_SCHEMA`):

* ``key``: the sample key (WebDataset ``__key__``, or the relative path for plain images).
* ``unit``: the unit of work, stats and resume (:class:`pipeline.formats.units.Unit` name): the input shard's
  relative name, or an image chunk's name.
* ``index``: the sample's position inside its unit (output order). ``-1`` marks a unit's END ROW, emitted by
  the reader after the unit's last sample, whose ``unit_size`` says how many samples the unit held and whose
  ``error`` says why reading stopped early, if it did. Stages pass end rows on untouched; the writer turns
  them into the summary that lets the driver commit the unit.
* ``image_member``: the name (suffix) of the member that holds the image (``jpg``, ``png``), or null.
* ``image``: the image's raw bytes as read.
* ``member_names`` / ``member_data``: every member of the sample in input order; the image member's slot
  holds empty bytes (its bytes travel once, in ``image``; the writer puts the output back in that slot).
* ``faces``: per detected and aligned face: ``box`` (x1, y1, x2, y2), ``score``, ``landmarks`` (5 x (x, y),
  flattened), ``affine`` (the 2x3 photo -> crop matrix, flattened), ``degradation`` (the estimate on the aligned
  crop, :mod:`pipeline.imaging.degradation`), the face's resolved ``N``/``tau``/``omega``, and ``restored``/``reason``
  (false for a face that is pasted back unchanged, e.g. clean under ``--skip-clean``); all set by the detector.
* ``crops``: aligned 512x512x3 uint8 faces (raw bytes) between detection and restoration. Decoded photos never
  travel: a 48 MP photo is 144 MB of pixels against a few MB of JPEG, so detection keeps only its faces' crops and
  affines, and the paste-back decodes the ``image`` bytes again (``pipeline/graph/memory.py``).
* ``restored``: restored faces, same layout as ``crops``; dropped after paste-back.
* ``dr2_thumbs``: per restored face, DR2's own output (before the enhancer) as a 160x160x3 uint8 thumbnail, for
  the run report's contact sheet.
* ``output``: the composed, re-encoded image (or the input bytes for a passed-through row).
* ``status`` / ``error``: on every row, from the reader on.
* ``timings``: seconds per stage for this row.
* ``notes``: members that could not be carried under their own name (:class:`pipeline.formats.wds.MemberNote`): on a
  sample row they go to its ``dr2.json`` (``skipped_members``); on an end row (e.g. a sample whose key itself is
  unsafe) to the unit's stats marker.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

import pyarrow as pa

KEY = "key"
UNIT = "unit"
INDEX = "index"
UNIT_SIZE = "unit_size"
IMAGE_MEMBER = "image_member"
IMAGE = "image"
MEMBER_NAMES = "member_names"
MEMBER_DATA = "member_data"
FACES = "faces"
CROPS = "crops"
RESTORED = "restored"
DR2_THUMBS = "dr2_thumbs"
OUTPUT = "output"
STATUS = "status"
ERROR = "error"
TIMINGS = "timings"
NOTES = "notes"
END_INDEX = -1

STAGES = ("read", "decode", "detect", "align", "restore", "compose", "write")
"""Stage names of ``timings``, in pipeline order."""

DEGRADATION_TYPE = pa.struct(
    [
        ("score", pa.float64()),
        ("verdict", pa.string()),
        ("resolution", pa.float64()),
        ("noise", pa.float64()),
        ("blocking", pa.float64()),
        ("block_period", pa.float64()),
        ("version", pa.string()),
    ]
)
"""A face's degradation estimate (:class:`pipeline.imaging.degradation.Degradation`, its fields as they are)."""

FACE_TYPE = pa.struct(
    [
        ("box", pa.list_(pa.float64())),
        ("score", pa.float64()),
        ("landmarks", pa.list_(pa.float64())),
        ("affine", pa.list_(pa.float64())),
        ("degradation", DEGRADATION_TYPE),
        # the face's own DR2 setting (the run's, or its verdict's under --preset auto) and whether it goes to the
        # restorer at all (false: a clean face under --skip-clean, pasted back unchanged; ``reason`` says why)
        ("N", pa.int64()),
        ("tau", pa.int64()),
        ("omega", pa.int64()),
        ("restored", pa.bool_()),
        ("reason", pa.string()),
    ]
)
NOTE_TYPE = pa.struct([("name", pa.string()), ("reason", pa.string())])
TIMINGS_TYPE = pa.struct([(name, pa.float64()) for name in STAGES])
ROW_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (UNIT, pa.string()),
        (INDEX, pa.int64()),
        (UNIT_SIZE, pa.int64()),
        (IMAGE_MEMBER, pa.string()),
        (IMAGE, pa.large_binary()),
        (MEMBER_NAMES, pa.list_(pa.string())),
        (MEMBER_DATA, pa.list_(pa.large_binary())),
        (FACES, pa.list_(FACE_TYPE)),
        (CROPS, pa.list_(pa.large_binary())),
        (RESTORED, pa.list_(pa.large_binary())),
        (DR2_THUMBS, pa.list_(pa.binary())),
        (OUTPUT, pa.large_binary()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (TIMINGS, TIMINGS_TYPE),
        (NOTES, pa.list_(NOTE_TYPE)),
    ]
)

SUMMARY_SCHEMA = pa.schema(
    [
        (UNIT, pa.string()),
        ("first", pa.int64()),  # first..last: the indexes this part covers; both -1 for an end row
        ("last", pa.int64()),
        (UNIT_SIZE, pa.int64()),  # end rows: the unit's sample count
        (ERROR, pa.string()),  # end rows: why reading stopped early
        ("statuses", pa.map_(pa.string(), pa.int64())),
        ("faces", pa.int64()),  # faces restored and pasted back
        ("faces_found", pa.int64()),
        ("seconds", TIMINGS_TYPE),
        (NOTES, pa.list_(NOTE_TYPE)),  # end rows: members of the unit not carried (unsafe keys, ...)
        ("suspect", pa.int64()),  # restored faces with a quality flag
        ("verdicts", pa.map_(pa.string(), pa.int64())),  # faces pasted back, per degradation verdict
        ("skipped", pa.int64()),  # faces pasted back unrestored (clean, under --skip-clean)
        ("saved_s", pa.float64()),  # skipped x this part's restore seconds per restored face (0 if none restored)
        ("written", pa.int64()),  # samples of the part written to the output (all unless --skip-status)
        ("sheet", pa.string()),  # the report's contact-sheet entries of this part, JSON (report.face_entry)
        ("non_ok", pa.list_(pa.struct([("key", pa.string()), ("status", pa.string()), ("error", pa.string())]))),
    ]
)
"""What reaches the driver: one small row per staged part (and one per unit end), never one per sample."""


class Status(StrEnum):
    """What happened to a row. Every input sample ends with exactly one of these."""

    PENDING = "pending"  # still in flight; never written
    OK = "ok"  # at least one face restored and pasted back
    NO_FACE = "no_face"  # decoded fine, no face found: image passed through unchanged
    NO_IMAGE = "no_image"  # the sample has no image member: passed through unchanged
    DECODE_ERROR = "decode_error"  # bytes that are not a readable image
    TOO_LARGE = "too_large"  # over the pixel limit (decompression-bomb guard)
    DETECT_ERROR = "detect_error"  # the detector failed on this image
    RESTORE_ERROR = "restore_error"  # the restorer failed on this image's faces
    ENCODE_ERROR = "encode_error"  # the composed image could not be encoded
    TRUNCATED = "truncated"  # the unit broke off inside this sample: passed through with the members read


FINAL_STATUSES = tuple(s for s in Status if s is not Status.PENDING)


class FaceSelect(StrEnum):
    """Which detected faces an image restores."""

    ALL = "all"  # every face (up to max_faces, largest first)
    LARGEST = "largest"  # the face with the largest box
    CENTER = "center"  # the face whose box centre is nearest the image centre


def empty_timings() -> dict[str, float]:
    return dict.fromkeys(STAGES, 0.0)


def dr2_json(meta: dict[str, Any]) -> bytes:
    """A sample's metadata document as every output holds it: the ``dr2.json`` member of a tar sample, the ``dr2``
    column of a parquet row or of :func:`pipeline.api.restore_dataset`, a :class:`pipeline.api.RestoredImage`'s
    ``metadata_json`` (sorted keys, indent 1, UTF-8): one encoding, so one parser and one byte comparison serve all."""
    return json.dumps(meta, sort_keys=True, indent=1).encode()
