"""pipeline/procs.py: the processes below a process, read from /proc (what the CLI's teardown kills)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.procs import process_tree


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux's /proc")
def test_a_child_and_its_grandchild_each_after_its_parent() -> None:
    # a child that starts a grandchild and prints its pid; both sleep until killed
    code = ("import subprocess, sys, time; g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(g.pid, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    try:
        tree = process_tree(os.getpid())
        assert tree is not None
        assert (child.pid, os.getpid()) in tree and (grandchild, child.pid) in tree
        pids = [pid for pid, _ in tree]
        assert pids.index(child.pid) < pids.index(grandchild)
        assert process_tree(grandchild) == []
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.kill()
        child.wait()
