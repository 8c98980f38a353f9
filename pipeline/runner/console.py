"""What reaches a person's console: our lines on the terminal, everything a library prints on its own in a log file.

Two things live here, neither of them Ray-specific (:func:`pipeline.graph.build.init_ray` wires Ray to them):

* :func:`divert_stderr` -- file descriptor 2 goes to a log file while Python's ``sys.stderr`` keeps writing to the
  terminal. Native code writes to descriptor 2 directly, past every log level: Ray's core worker in the driver
  (``logging.cc`` level lines, the ``E ... core_worker.cc`` line it prints at any level, ray-project/ray#53727; its
  failure-signal dumps, ``*** SIGTERM received``, ``PC: @``), and C libraries (libpng's ``libpng error: ...``,
  libjpeg's warnings). Our own lines (log records, the progress line, the summary, the one-line error) are Python
  writes to ``sys.stderr``/``sys.stdout`` and still reach the terminal, and so does anything else written through
  Python, a traceback included: only what bypasses Python is diverted. :func:`log_to` sends named loggers (a
  library's own console handlers) to the same file; :func:`move_diverted` moves the file next to the library's logs
  once they exist.
* :class:`ConsoleHandler` -- how our log records read on the console: one line each (``dr2: warning: ...``), no
  timestamps or logger names, and other libraries' records only from WARNING up; ``verbose`` shows everything with
  timestamps, logger names and tracebacks.

Descriptor 2 belongs to the whole process, so the diversion is process state: done once, kept until the process
exits (children started after it inherit the log file as their stderr).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import TextIO

log = logging.getLogger(__name__)

OUR_PACKAGES = frozenset({"dr2", "pipeline", "jobs"})  # logger names' first part; "dr2" is also the CLI's logger
DIVERTED_NAME = "dr2-driver-stderr.log"
VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Diverted:
    """Where descriptor 2 goes now (``path``), and a text stream that writes there (``stream``, on descriptor 2)."""

    path: str
    stream: TextIO


_diverted: Diverted | None = None  # process state: descriptor 2 is the process's


def divert_stderr() -> Diverted:
    """Point descriptor 2 at a new log file (in the temp folder until :func:`move_diverted`); keep ``sys.stderr`` on
    the terminal. Idempotent. Returns where the diverted output goes.

    When ``sys.stderr`` writes to descriptor 2 (a plain run), it is replaced by a stream on a duplicate of the
    original descriptor 2, and logging handlers that held the old object are pointed at the new one; when it writes
    elsewhere (a test's capture, a notebook), it is left alone.
    """
    global _diverted
    if _diverted is not None:
        return _diverted
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    old = sys.stderr
    if _fileno(old) == 2:
        terminal = open(os.dup(2), "w", buffering=1, encoding=old.encoding, errors=old.errors)  # kept open for good
        sys.stderr = terminal
        for handler in _all_handlers():
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(terminal)
    fd, path = tempfile.mkstemp(prefix="dr2-stderr-", suffix=".log")
    os.dup2(fd, 2)
    os.close(fd)
    stream = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    _diverted = Diverted(path, stream)
    return _diverted


def diverted() -> Diverted | None:
    """Where descriptor 2 goes, when it is diverted (None: it is the console)."""
    return _diverted


def move_diverted(folder: str) -> str:
    """Move the diverted output into ``folder`` (as ``dr2-driver-stderr.log``, appended to) and keep writing there;
    returns its path ("" when nothing is diverted). What was written before the move is copied first."""
    if _diverted is None:
        return ""
    target = os.path.join(folder, DIVERTED_NAME)
    if os.path.abspath(target) == os.path.abspath(_diverted.path):
        return target
    _diverted.stream.flush()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    with open(_diverted.path, "rb") as before, open(fd, "ab", closefd=False) as after:
        shutil.copyfileobj(before, after)
        after.flush()
        os.dup2(fd, 2)
        shutil.copyfileobj(before, after)  # whatever arrived between the copy and the switch
    os.close(fd)
    os.unlink(_diverted.path)
    _diverted.path = target
    return target


def log_to(stream: TextIO, *names: str) -> None:
    """Send the console handlers of the loggers ``names`` (those writing to ``sys.stderr``/``sys.stdout``, now or
    at emit time) to ``stream`` instead, keeping their level, format and filters; file handlers stay as they are."""
    consoles = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if not isinstance(handler, logging.StreamHandler) or id(handler.stream) not in consoles:
                continue
            replacement = logging.StreamHandler(stream)
            replacement.setLevel(handler.level)
            replacement.setFormatter(handler.formatter)
            for f in handler.filters:
                replacement.addFilter(f)
            logger.removeHandler(handler)
            logger.addHandler(replacement)


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


def _all_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [h for lg in loggers for h in lg.handlers]


# --------------------------------------------------------------------------------------------- our log lines


class ConsoleFormatter(logging.Formatter):
    """``dr2: message`` for INFO, ``dr2: warning: message`` (``error``, ``critical``) above it: one line, with the
    exception's type and text appended in place of its traceback."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            if str(e) not in text:
                text = f"{text} ({type(e).__name__}: {e})"
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
        if record.levelno >= logging.WARNING:
            return f"dr2: {record.levelname.lower()}: {text}"
        return f"dr2: {text}"


class ConsoleHandler(logging.Handler):
    """Writes records to whatever ``sys.stderr`` is when they are emitted (so a later :func:`divert_stderr` or a
    test's capture is followed). Not ``verbose``: our packages' records at the logger's level, other libraries' from
    WARNING up, in :class:`ConsoleFormatter`'s one-line form; ``verbose``: every record, timestamped, tracebacks."""

    def __init__(self, *, verbose: bool = False) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(VERBOSE_FORMAT) if verbose else ConsoleFormatter())
        if not verbose:
            self.addFilter(lambda r: r.levelno >= logging.WARNING or r.name.split(".")[0] in OUR_PACKAGES)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging's own convention: report and go on
            self.handleError(record)


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """The CLI's logging: one :class:`ConsoleHandler` on the root logger (replacing one installed before), at DEBUG
    with ``verbose``, WARNING with ``quiet``, else INFO."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler(verbose=verbose))
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
