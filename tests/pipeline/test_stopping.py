"""pipeline/runner/stopping.py in a process of its own (its handlers and watchdog are the process's): a stop whose first
exception Python swallowed still stops the run at its next :func:`~pipeline.runner.stopping.check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LOST = """
import os, signal, sys
from pipeline.runner import stopping

class Finalised:
    def __del__(self):  # the signal's handler runs in here: Python prints its exception and drops it
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):
            pass

with stopping.handling("restore", grace_s=60):
    stopping.check()  # no stop asked for: nothing
    Finalised()
    print("went on after the signal", flush=True)
    try:
        stopping.check()
    except KeyboardInterrupt as e:
        print("check raised", type(e).__name__, e.signum, stopping.exit_code(), flush=True)
        os._exit(0)
print("not stopped", flush=True)
"""


def test_a_stop_whose_exception_was_lost_is_raised_again_by_check() -> None:
    proc = subprocess.run([sys.executable, "-c", LOST], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert "Exception ignored" in proc.stderr and "Interrupted: SIGTERM" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == ["went on after the signal", "check raised Interrupted 15 143"], proc
    assert proc.returncode == 0, proc


RACE = """
import os, signal, time
from pipeline.runner import stopping

with stopping.handling("restore", grace_s=60):
    # the signal reaches the watchdog's thread (it is blocked in this one), which hears it through the wakeup pipe and
    # records it at once; the main thread, asleep, runs the Python handler a second later: a busy main thread's order
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        for _ in range(1000):  # the handler runs at the next bytecodes
            time.sleep(0.001)
    except KeyboardInterrupt as e:
        late = time.monotonic() - stopping._stop.at
        said = "after the watchdog recorded it" if late > 0.5 else late
        print("raised", type(e).__name__, e.signum, said, flush=True)
        os._exit(0)
print("not raised", flush=True)
os._exit(0)
"""


def test_the_handler_raises_even_when_the_watchdog_recorded_the_signal_first() -> None:
    """The watchdog hears a signal as it arrives (the wakeup pipe) and the main thread runs the Python handler when it
    next runs bytecode; the handler must still raise Interrupted (it used to see the signal already recorded, take
    itself for a second one and raise nothing: the run went on until its grace period was over)."""
    proc = subprocess.run([sys.executable, "-c", RACE], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["raised Interrupted 15 after the watchdog recorded it"], proc


SHIELD = """
import os, signal, subprocess, sys, time
from pipeline.runner import stopping

CHILD = "print(int([l for l in open('/proc/self/status') if l.startswith('SigBlk')][0].split()[1], 16) >> 14 & 1)"

def child_blocks_sigterm():
    return subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout.strip()

with stopping.children_shielded():  # outside handling(): a program of its own keeps Ray's behaviour
    print("outside", child_blocks_sigterm(), flush=True)
with stopping.handling("restore", grace_s=60):
    try:
        with stopping.children_shielded():
            print("inside", child_blocks_sigterm(), flush=True)
            signal.signal(signal.SIGTERM, lambda *a: print("the library's handler", flush=True))  # as ray.init does
        print("ours again", signal.getsignal(signal.SIGTERM) is stopping._on_signal, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still here", flush=True)
    except KeyboardInterrupt as e:
        print("raised", type(e).__name__, e.signum, flush=True)
        print("after", child_blocks_sigterm(), flush=True)
        os._exit(0)
print("not raised", flush=True)
os._exit(0)
"""


def test_children_started_by_the_cli_are_deaf_to_sigterm_and_our_handler_is_back_after() -> None:
    """What a local Ray's processes start with inside the CLI (stopping.children_shielded): SIGTERM blocked, so a
    signal to the whole group leaves the raylet to the driver's teardown; outside the CLI, nothing changes. On the way
    out our handler is back where a library replaced it, and the driver's own SIGTERM is raised as ours."""
    proc = subprocess.run([sys.executable, "-c", SHIELD], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["outside 0", "inside 1", "ours again True", "raised Interrupted 15",
                                      "after 0"], proc
