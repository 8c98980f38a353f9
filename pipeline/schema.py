"""The record that flows: column names and row statuses, named once.

One row per source image flows through every stage; no stage drops a row. Stages only add or
replace columns. A row whose image is bad carries ``status`` and a readable ``error`` to the end and
is written to the output all the same (its original bytes pass through unchanged).

Columns (Arrow types in brackets):

* ``key`` [string]: the sample key (WebDataset ``__key__``, or the relative path for plain images).
* ``source`` [string]: the shard URI or object it came from.
* ``shard`` [string]: the unit of work, stats and resume: the input shard's relative name.
* ``index`` [int64]: the sample's position inside its shard (output order).
* ``image_member`` [string]: the name of the member that holds the image (e.g. ``jpg``, ``png``).
* ``image`` [binary]: the raw bytes as read.
* ``extra_names`` [list<string>], ``extra_data`` [list<binary>]: every other member of the sample,
  passed through byte for byte, in input order.
* ``faces`` [string]: JSON list of per-face metadata (box, score, landmarks, affine) after detection.
* ``crops`` [list<binary>]: aligned 512x512x3 uint8 faces (raw bytes) between detection and restoration.
* ``restored`` [list<binary>]: restored faces, same layout as ``crops``.
* ``output`` [binary]: the composed, re-encoded image (or the input bytes for a passed-through row).
* ``status`` [string] and ``error`` [string]: on every row, from the first stage on.
* ``timings`` [string]: JSON object of seconds per stage.
* ``shard_size`` [int64]: set only on a shard's end marker (``index == -1``), the row the reader emits after
  a shard's last sample: how many samples the shard held, and in ``error`` why reading stopped early, if it
  did. The driver commits a shard once it has seen the marker and that many rows. Stages pass markers on
  untouched.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import pyarrow as pa

KEY = "key"
SOURCE = "source"
SHARD = "shard"
INDEX = "index"
IMAGE_MEMBER = "image_member"
IMAGE = "image"
EXTRA_NAMES = "extra_names"
EXTRA_DATA = "extra_data"
FACES = "faces"
CROPS = "crops"
RESTORED = "restored"
OUTPUT = "output"
STATUS = "status"
ERROR = "error"
TIMINGS = "timings"
SHARD_SIZE = "shard_size"
END_MARKER_INDEX = -1

ROW_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (SOURCE, pa.string()),
        (SHARD, pa.string()),
        (INDEX, pa.int64()),
        (IMAGE_MEMBER, pa.string()),
        (IMAGE, pa.binary()),
        (EXTRA_NAMES, pa.list_(pa.string())),
        (EXTRA_DATA, pa.list_(pa.binary())),
        (FACES, pa.string()),
        (CROPS, pa.list_(pa.binary())),
        (RESTORED, pa.list_(pa.binary())),
        (OUTPUT, pa.binary()),
        (STATUS, pa.string()),
        (ERROR, pa.string()),
        (TIMINGS, pa.string()),
        (SHARD_SIZE, pa.int64()),
    ]
)


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
    TRUNCATED = "truncated"  # the shard broke off inside this sample: passed through with the members read


FINAL_STATUSES = tuple(s for s in Status if s is not Status.PENDING)


def new_row(*, key: str, source: str, shard: str, index: int, image_member: str | None, image: bytes | None,
            extra: list[tuple[str, bytes]]) -> dict[str, Any]:
    """A row as the reader emits it: every column present, later stages fill the rest."""
    return {
        KEY: key, SOURCE: source, SHARD: shard, INDEX: index, IMAGE_MEMBER: image_member, IMAGE: image,
        EXTRA_NAMES: [n for n, _ in extra], EXTRA_DATA: [d for _, d in extra], FACES: "[]", CROPS: [],
        RESTORED: [], OUTPUT: None, STATUS: Status.PENDING.value if image is not None else Status.NO_IMAGE.value,
        ERROR: "" if image is not None else "sample has no image member", TIMINGS: "{}", SHARD_SIZE: None,
    }


def end_marker(*, source: str, shard: str, size: int, error: str = "") -> dict[str, Any]:
    """The row that closes a shard: ``size`` samples were read; ``error`` says why reading stopped early."""
    row = new_row(key="", source=source, shard=shard, index=END_MARKER_INDEX, image_member=None, image=None, extra=[])
    row.update({STATUS: Status.PENDING.value, ERROR: error, SHARD_SIZE: size})
    return row


def is_marker(row: dict[str, Any]) -> bool:
    return bool(row[INDEX] == END_MARKER_INDEX)
