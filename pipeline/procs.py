"""The processes below a process, from Linux's ``/proc``: what a run's driver started (a local Ray's raylet, GCS,
workers and agents). Used by the CLI's teardown of its local Ray (pipeline/graph/build.py) and by the large-photo
benchmark, which sums the memory of a run's process tree."""

from __future__ import annotations

from pathlib import Path


def process_tree(root: int) -> list[tuple[int, int]] | None:
    """Every live process below ``root`` (its children, theirs...) as (pid, parent pid), each after its parent;
    None where there is no ``/proc`` (not Linux). One read of ``/proc``: a process that starts meanwhile is not in
    it, one that ended is skipped."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        return None
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    below: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        parent = todo.pop()
        for pid in children.get(parent, []):
            below.append((pid, parent))
            todo.append(pid)
    return below
