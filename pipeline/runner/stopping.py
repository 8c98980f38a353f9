"""How a run stops when it is asked to: Ctrl-C (SIGINT) and SIGTERM, the signal Kubernetes, KubeRay, systemd, Slurm
and Ray's job manager (``dr2 submit --stop``) send before they kill. One mechanism for every command that runs the
pipeline (``dr2 restore``, ``dr2 nightly``), installed by the CLI with :func:`handling`:

* The first signal raises :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, and again at the run
  loop's next step (:func:`check`) should that first one be lost in a ``__del__`` or callback. The run stops taking
  work, lets the commits under way finish (a unit is committed whole, marker last, or not at all), releases its
  leases (the DST lease, nightly claims), and the CLI prints ONE line (:func:`final_line`: what is committed, that a
  rerun resumes) and exits ``128 + signal``: 130 for Ctrl-C, 143 for SIGTERM.
* A watchdog thread bounds that: ``grace_s`` seconds after the first signal it ends the process whatever the main
  thread waits for (a stage actor whose GPU stopped answering, storage that hangs), after the registered last words
  (:func:`add_last_words`: lease releases, at most :data:`LAST_WORDS_S`) and the same one line.
* A second signal ends the process at once, with the same status: nothing is lost, because a commit is atomic and
  its marker comes last; a rerun redoes what has no marker.
* However it stops, the process ends through :func:`end_process` or the hard exit: the registered teardowns (the
  local Ray's processes killed, pipeline/graph/build.py) and ``os._exit`` with the status, never the interpreter's
  exit, where Ray's shutdown could turn 143 into 1 (its core worker exits 1 when it finds its raylet gone: a raylet
  that a SIGKILL or an OOM kill took).

The watchdog hears signals through :func:`signal.set_wakeup_fd` (Python's C-level handler writes each signal's
number to a pipe as it arrives), so the grace period and the second signal work even while the main thread is stuck
in native code that never returns to the interpreter (where Python-level handlers would never run).

Ray: ``ray.init`` installs its own SIGTERM handlers in the driver (Ray 2.60): a Python one (``sys.exit``) and the
core worker's native failure-signal handler (absl's), which prints ``*** SIGTERM received ...`` and the stack to
descriptor 2 and aborts the process (exit status -6) within about 3 s. :func:`reinstall`, which
:func:`pipeline.graph.build.init_ray` calls right after ``ray.init``, puts ours back in their place (``signal.signal``
sets the process's handler, replacing the native one). The local Ray's own processes (raylet, GCS, agents, workers)
start with SIGTERM blocked (:func:`children_shielded`), as Ray starts them with SIGINT blocked: a scheduler that
signals the whole process group, or every process of the job, stops the driver, and the driver stops them once its
commits are done. What they write to descriptor 2 goes to a log file the driver diverted it to before starting them
(:mod:`pipeline.runner.console`).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

DEFAULT_GRACE_S = 30.0
LAST_WORDS_S = 5.0  # what the last words (lease releases) of a hard exit may take, all together
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):  # noqa: N818 -- a KeyboardInterrupt, as Ctrl-C's is
    """The first stop signal, raised in the main thread: every ``except KeyboardInterrupt`` treats it as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


@dataclass
class _Stop:
    command: str
    grace_s: float
    signum: int | None = None  # the first stop signal, once one arrived
    at: float = 0.0  # when (monotonic)
    raised: bool = False  # the main thread has raised Interrupted for it
    said: bool = False  # the one line is out
    active: bool = False  # inside handling()
    exiting: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake_r: int = -1
    wake_w: int = -1


_stop: _Stop | None = None  # process state: signal handlers are the process's
_last_words: dict[int, Callable[[], None]] = {}  # registered by whoever holds a lease, installed or not
_progress: list[Callable[[], str]] = []
_teardowns: list[Callable[[], None]] = []  # what the CLI's process does itself as it ends (stop the local Ray)
_registry_lock = threading.Lock()
_said_last = ""  # what the last describer said when its run ended by an exception


@contextlib.contextmanager
def handling(command: str, *, grace_s: float = DEFAULT_GRACE_S) -> Iterator[None]:
    """Handle SIGINT and SIGTERM inside, as described in the module docstring, for the CLI command ``command`` (the
    line names it). From the main thread only (Python delivers signals there). On the way out the previous handlers
    come back, unless a stop is under way: then the watchdog keeps bounding the process's exit (Ray's shutdown)."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop signals can only be handled from the main thread")
    st = _install(command, grace_s)
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    previous_fd = signal.set_wakeup_fd(st.wake_w, warn_on_full_buffer=False)
    st.active = True
    _apply(st)
    try:
        yield
    finally:
        if st.signum is None:
            st.active = False
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            signal.set_wakeup_fd(previous_fd)


def _install(command: str, grace_s: float) -> _Stop:
    global _stop
    if _stop is None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        _stop = _Stop(command, grace_s, wake_r=r, wake_w=w)
        threading.Thread(target=_watchdog, args=(_stop,), name="stop-watchdog", daemon=True).start()
    else:
        _stop.command, _stop.grace_s = command, grace_s
    return _stop


def reinstall() -> None:
    """Put our handlers back where a library replaced them (``ray.init``: see the module docstring). Nothing outside
    :func:`handling` (a program using the Python API keeps its own handlers) or off the main thread."""
    if _stop is not None and _stop.active and threading.current_thread() is threading.main_thread():
        _apply(_stop)


def _apply(st: _Stop) -> None:
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    signal.set_wakeup_fd(st.wake_w, warn_on_full_buffer=False)


@contextlib.contextmanager
def children_shielded() -> Iterator[None]:
    """The processes started inside (a local Ray: ``ray.init`` starts its raylet, GCS and agents from this thread,
    and the raylet starts the workers) begin with SIGTERM blocked, as Ray itself starts them with SIGINT blocked: a
    stop is the driver's to carry out. Where a scheduler signals the whole process group (a shell's job control,
    the tests) or every process of the job (systemd's stop, Slurm's scancel), the raylet no longer dies with its
    object store while the driver finishes the commits under way, which it touches from its own threads (Ray Data's
    executor, ``ray.get``): its core worker then ended the process with status 1 in the middle of a commit ("The
    connection to the plasma store is failed. Terminate the process"; 1 run in 4 of
    tests/jobs/test_stop.py's SIGTERM to the group, before this). Ray's processes end with the CLI's own teardown
    (SIGKILL, pipeline/graph/build.py) or with this process (the kernel's fate sharing), never by SIGTERM.

    The mask is a thread's, and children inherit it from the thread that forks them: this thread blocks SIGTERM
    while inside (the process's other threads still take a SIGTERM for it, as before), and on the way out our
    handlers go back where the library replaced them (:func:`reinstall`), then the mask is restored. Only
    inside :func:`handling` (the CLI) and on the main thread: a program using the Python API keeps Ray's own
    behaviour (``ray.shutdown`` stops the raylet with SIGTERM)."""
    st = _stop
    if st is None or not st.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        reinstall()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def requested() -> int | None:
    """The signal that asked this process to stop, or None: code that cleans up for a next run in the same process
    (a nightly wave, a notebook) skips what the process's exit does anyway, so that the commits come first."""
    return _stop.signum if _stop is not None else None


def check() -> None:
    """Raise :class:`Interrupted` again if a stop was asked for inside :func:`handling`. The run loops call it at
    each step (each part that arrives, each nightly wave), because the first signal's exception can be lost: raised
    while the main thread runs a ``__del__``, a garbage-collector or a native library's callback, Python only prints
    it ("Exception ignored in ...", into Ray's log) and the run goes on as if no signal had come
    (tests/pipeline/test_stopping.py shows the ``__del__`` case). Once a ``dr2 restore`` of tests/jobs/test_stop.py
    sent SIGTERM mid-commit finished every unit instead: more likely the race :func:`_on_signal` now closes, where
    the handler never raised at all.
    Outside :func:`handling` (a program using the Python API, Ctrl-C's KeyboardInterrupt its own), nothing."""
    st = _stop
    if st is not None and st.active and st.signum is not None and not st.exiting:
        raise Interrupted(st.signum)


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def exit_code(signum: int | None = None) -> int:
    """``128 + signal``, the shell's convention: 130 for Ctrl-C (also a KeyboardInterrupt of unknown origin), 143
    for SIGTERM."""
    signum = signum if signum is not None else requested()
    return 128 + (signum if signum is not None else signal.SIGINT)


def add_last_words(fn: Callable[[], None]) -> Callable[[], None]:
    """Until the returned function is called, a hard exit (grace period over, second signal) calls ``fn`` first
    (releasing a lease: the next run need not wait for it to expire). Bounded: all last words together get
    :data:`LAST_WORDS_S`; an exception in one is ignored."""
    key = object()
    with _registry_lock:
        _last_words[id(key)] = fn

    def forget() -> None:
        with _registry_lock:
            _last_words.pop(id(key), None)

    forget.key = key  # type: ignore[attr-defined]  # keeps id(key) unique while registered
    return forget


def add_teardown(fn: Callable[[], None]) -> None:
    """Have the CLI's process call ``fn`` as it ends (:func:`end_process`, the hard exit), in place of the
    interpreter's exit handlers: ``pipeline.graph.build.init_ray`` registers the stop of the local Ray this process
    started."""
    with _registry_lock:
        if fn not in _teardowns:
            _teardowns.append(fn)


def end_process(code: int) -> None:
    """How the CLI's process ends (``jobs.cli.entry``) with status ``code``. Where a teardown is registered (the
    command started Ray or joined a cluster: ``init_ray``) or a signal stopped the run: the streams and log handlers
    are flushed, the teardowns run and ``os._exit``, not the interpreter's exit with Ray's shutdown at exit (a
    cluster's driver leaves as a killed one would: its head marks the job finished when the connection drops).
    Otherwise (a command that used no Ray) the interpreter's exit.

    Why, for a stopped run: its status was Ray's to decide. Once in CI a ``dr2 restore`` whose process group got
    SIGTERM printed its line and then exited 1, not 143, in Ray's shutdown at exit: the driver's core worker exits
    1 when it finds its raylet's object store gone (its log: "The connection to the plasma store is failed.
    Terminate the process"; the raylet got the group's SIGTERM too, before :func:`children_shielded`). That shutdown
    also waited 5 s on its task events' flush to a GCS already gone ("TaskEventBuffer shutdown timed out"). For a
    run that ended by itself: Ray's shutdown at exit took about 2.8 s of every ``dr2 restore`` (its last line to its
    exit, 2 runs here); the teardown takes a few milliseconds."""
    st = _stop
    stopped = st is not None and st.signum is not None
    with _registry_lock:
        owned = bool(_teardowns)
    if not stopped and not owned:
        raise SystemExit(code)
    if not stopped:  # a stopped run's threads may hold the handlers' locks: its one line is out already
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _tear_down()
    os._exit(code)


def _tear_down() -> None:
    with _registry_lock:
        teardowns = list(_teardowns)
    for fn in teardowns:
        _quietly(fn)


@contextlib.contextmanager
def progress(describe: Callable[[], str]) -> Iterator[None]:
    """While inside, :func:`final_line` says what ``describe()`` returns (what the run has committed so far); left by
    an exception (the stop itself), what it said last stays for the line the CLI prints after."""
    global _said_last
    with _registry_lock:
        _progress.append(describe)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _said_last = describe()
        raise
    finally:
        with _registry_lock:
            if describe in _progress:
                _progress.remove(describe)


def final_line(command: str = "", *, how: str = "") -> str:
    """The one line a stopped run of ``command`` prints: which signal, what is committed, that a rerun resumes.
    ``how`` says how it ended when it did not end by itself (the grace period over, a second signal)."""
    st = _stop
    command = command or (st.command if st is not None else "")
    signum = st.signum if st is not None and st.signum is not None else signal.SIGINT
    done = _said_last
    with _registry_lock:
        describe = _progress[-1] if _progress else None
    if describe is not None:
        with contextlib.suppress(Exception):  # the line must come out whatever the run's state
            done = describe()
    done = done or "units completed before it are committed (their .stats.json markers)"
    return (f"dr2 {command}: interrupted by {signal_name(signum)}{how}: {done}; rerun the same command to resume "
            "with the rest.")


def said() -> None:
    """The caller printed :func:`final_line`: a hard exit after it (Ray's shutdown at exit hanging) adds nothing."""
    if _stop is not None:
        _stop.said = True


def _on_signal(signum: int, frame: object) -> None:
    """Python's handler, in the main thread: the first signal becomes :class:`Interrupted`; the watchdog, which
    hears every signal through the wakeup pipe, counts them and ends the process on the second."""
    st = _stop
    if st is None:
        raise KeyboardInterrupt
    with st.lock:
        if st.signum is None:
            st.signum, st.at = signum, time.monotonic()
        # Whether the main thread has raised, not whether a signal came: the watchdog hears the signal through the
        # wakeup pipe as it arrives and records it, often before the main thread gets to run this handler. Asking
        # "first signal?" here lost the stop whenever the watchdog won that race (the run went on until the grace
        # period was over: seen here on a cold first run, 2 of 2).
        first = not st.raised
        st.raised = True
    if first:
        raise Interrupted(st.signum)


def _watchdog(st: _Stop) -> None:
    """Counts the stop signals as they arrive (bytes on the wakeup pipe) and ends the process on the second one or
    when the grace period after the first is over."""
    heard = 0
    deadline: float | None = None
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([st.wake_r], [], [], timeout)
        if not ready:
            _dump_stacks()
            name = signal_name(st.signum or signal.SIGINT)
            _hard_exit(st, f"; stopped {st.grace_s:g} s after the {name}, the commits still under way abandoned")
            return
        for b in os.read(st.wake_r, 64):
            if b not in SIGNALS:
                continue
            heard += 1
            if heard == 1:
                with st.lock:
                    if st.signum is None:  # the main thread has not run the Python handler yet
                        st.signum, st.at = b, time.monotonic()
                deadline = st.at + st.grace_s
            else:
                _hard_exit(st, f"; stopped at once by a second {signal_name(b)}")
                return


def _hard_exit(st: _Stop, how: str) -> None:
    """Last words (bounded), the one line unless it is out, and ``os._exit``: no Python clean-up runs, which is the
    point (it is what waits)."""
    with st.lock:
        if st.exiting:
            return
        st.exiting = True
    with _registry_lock:
        words = list(_last_words.values())
    threads = [threading.Thread(target=_quietly, args=(fn,), daemon=True) for fn in words]
    for t in threads:
        t.start()
    until = time.monotonic() + LAST_WORDS_S
    for t in threads:
        t.join(max(0.0, until - time.monotonic()))
    if not st.said:
        _write_line(final_line(how=how))
    _tear_down()
    os._exit(exit_code(st.signum))


def _dump_stacks() -> None:
    """What every thread was waiting on when the grace period ran out, into the log file descriptor 2 goes to (Ray's
    log folder, pipeline/runner/console.py), never onto the console: the one line stays the console's."""
    from pipeline.runner import console

    if console.diverted() is None:
        return
    with contextlib.suppress(Exception):  # descriptor 2 without the stream's lock, which another thread may hold
        os.write(2, b"dr2: the grace period is over; the process's threads at that moment:\n")
        faulthandler.dump_traceback(file=2, all_threads=True)


def _quietly(fn: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        fn()


def _write_line(line: str) -> None:
    """To the console, from any thread, without the locks of ``sys.stderr`` (the main thread may hold them)."""
    data = (line + "\n").encode("utf-8", "backslashreplace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a test's capture: no descriptor
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return
    with contextlib.suppress(OSError):
        os.write(fd, data)
