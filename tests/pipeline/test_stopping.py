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
