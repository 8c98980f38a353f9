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
"""

from __future__ import annotations

from enum import StrEnum

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


FINAL_STATUSES = tuple(s for s in Status if s is not Status.PENDING)
