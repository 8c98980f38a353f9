"""Failpoints: named places where a test makes a process fail the way production processes fail, to prove the
output contract (every sample once, a unit whole or not at all, same bytes after a rerun) under faults.

Armed only through the environment, which a local Ray's workers inherit from the driver; unset (production),
:func:`hit` is one dictionary lookup::

    DR2_FAILPOINTS="restore.batch=exit@3;commit.after_output=hang@1"  DR2_FAILPOINTS_DIR=/tmp/fp  dr2 restore ...

An entry is ``POINT=ACTION[@WHEN]``:

- ACTION ``exit``: the process dies at once (``os._exit``), as a segfault or an OOM kill would end it;
  ``raise``: a :class:`FailpointError`; ``hang``: the process writes ``DIR/POINT.hung`` and sleeps, so that a
  test can SIGKILL the whole run at exactly that point; ``sleep:S``: writes ``DIR/POINT.hung`` the same way, sleeps
  S seconds and goes on (a slow commit or stage, long enough for a test to act in the middle of it).
- WHEN ``N``: only the N-th time the point is reached, counted over every process of the run (files created
  with ``O_EXCL`` in ``DR2_FAILPOINTS_DIR``, required for counts); ``N+``: the N-th time and every time after;
  ``*`` (the default): every time.

The points (grep ``failpoints.hit``): ``detect.batch``, ``restore.batch``, ``write.block`` (a stage about to take
a block), ``commit.begin`` (parts listed), ``commit.mid_output`` (output half written), ``commit.after_output``
(output in place, no marker yet), ``commit.after_marker`` (marker written, staged parts not yet deleted).
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path

ENV = "DR2_FAILPOINTS"
DIR_ENV = "DR2_FAILPOINTS_DIR"
ACTIONS = ("exit", "raise", "hang", "sleep")


class FailpointError(RuntimeError):
    """What a ``raise`` failpoint raises."""


@cache
def _armed(spec: str) -> dict[str, tuple[str, int, bool]]:
    """``{point: (action, n, and_after)}`` of a ``DR2_FAILPOINTS`` value; n = 0 means every time."""
    out: dict[str, tuple[str, int, bool]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(";"))):
        point, _, rhs = entry.partition("=")
        action, _, when = rhs.partition("@")
        base, colon, seconds = action.partition(":")
        if base not in ACTIONS or not point or (base == "sleep") != bool(colon) or (colon and not _number(seconds)):
            raise ValueError(f"{ENV}: bad entry {entry!r}: want POINT=ACTION[@N|@N+|@*], ACTION one of {ACTIONS} "
                             "(sleep:SECONDS)")
        when = when or "*"
        n = 0 if when == "*" else int(when.rstrip("+"))
        out[point.strip()] = (action, n, when.endswith("+"))
    return out


def _number(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def hit(point: str) -> None:
    """Act if ``point`` is armed for this, the run's k-th, arrival."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    armed = _armed(spec).get(point)
    if armed is None:
        return
    action, n, and_after = armed
    if n:
        k = _arrival(point)
        if k < n or (k > n and not and_after):
            return
    if action == "exit":
        os._exit(1)
    if action == "raise":
        raise FailpointError(f"failpoint {point}")
    if folder := os.environ.get(DIR_ENV):
        Path(folder, f"{point}.hung").write_text(str(os.getpid()))
    if action.startswith("sleep:"):
        time.sleep(float(action.partition(":")[2]))
        return
    while True:
        time.sleep(3600)


def _arrival(point: str) -> int:
    """This arrival's number at ``point``, over all processes of the run: the first free ``DIR/point.k``, taken
    with ``O_EXCL``."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        raise RuntimeError(f"{ENV} with a count needs {DIR_ENV}, a folder shared by the run's processes")
    k = 1
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"{point}.{k}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            k += 1
            continue
        return k
