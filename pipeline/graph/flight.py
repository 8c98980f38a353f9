"""The flight log of a run's stage actors: which blocks they started and finished, and how busy each one was.

``pipeline/graph/build.py`` runs :class:`FlightLog` as an actor, one per run. Standard library only: the actor's
worker imports this module, and nothing else of the pipeline.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any


class FlightLog:
    """Which blocks the stage actors started and finished, and how busy each actor was.

    A run whose actor keeps dying can name the block it died on: actors run one block at a time, so a block started
    and never finished was on a dead actor, and the one started most often is the one that kills it.

    Busy fraction: each actor says when it is ready (its model loaded) and, per block, the seconds it spent working
    on it; its wall time runs from ready to the end of the run, so what is not busy is time spent waiting for input
    (faces, for a restorer). Times are taken on this actor's clock (one clock for every node).
    """

    def __init__(self) -> None:
        self.started: Counter[tuple[str, str]] = Counter()
        self.finished: set[tuple[str, str]] = set()
        self.ready_at: dict[tuple[str, str], float] = {}  # (stage, actor id) -> when it was first ready
        self.busy_s: dict[tuple[str, str], float] = {}
        self.working: dict[tuple[str, str], list[float]] = {}  # (stage, actor) -> [first start, last finish]
        # (stage, actor) -> its waits between a block's end and the next block's start (the most recent WAITS_KEPT)
        self.waits: dict[tuple[str, str], deque[float]] = {}
        self.waited: Counter[tuple[str, str]] = Counter()  # all of them: count ...
        self.waited_s: dict[tuple[str, str], float] = {}  # ... and seconds
        self.ended_at: float | None = None

    def ready(self, stage: str, actor: str) -> None:
        self.ready_at.setdefault((stage, actor), time.time())

    def start(self, stage: str, block: str, actor: str = "") -> None:
        self.started[(stage, block)] += 1
        now = time.time()
        span = self.working.setdefault((stage, actor), [now, now])
        if span[1] > span[0]:  # a block of this actor finished before: the time since is a wait for this one
            key, gap = (stage, actor), max(0.0, now - span[1])
            self.waits.setdefault(key, deque(maxlen=WAITS_KEPT)).append(gap)
            self.waited[key] += 1
            self.waited_s[key] = self.waited_s.get(key, 0.0) + gap

    def finish(self, stage: str, block: str, actor: str = "", busy_s: float = 0.0) -> None:
        self.finished.add((stage, block))
        self.busy_s[(stage, actor)] = self.busy_s.get((stage, actor), 0.0) + busy_s
        if (stage, actor) in self.working:
            self.working[(stage, actor)][1] = time.time()

    def end(self) -> None:
        """The run's stream ended: actors' wall time stops here."""
        if self.ended_at is None:
            self.ended_at = time.time()

    def busy(self) -> dict[str, dict[str, Any]]:
        """Per stage: actors seen, their busy and wall seconds summed, and busy / wall."""
        now = self.ended_at if self.ended_at is not None else time.time()
        return busy_table(self.ready_at, self.busy_s, now, self.working,
                          waits={k: (self.waited[k], self.waited_s[k], list(v)) for k, v in self.waits.items()})

    def unfinished(self) -> list[tuple[str, str, int]]:
        """(stage, block, times started) of the blocks never finished, most started first."""
        left = [(s, b, n) for (s, b), n in self.started.items() if (s, b) not in self.finished]
        return sorted(left, key=lambda x: -x[2])


WAITS_KEPT = 1024  # per actor, the most recent waits kept for their quantiles (sorted in the flight log per busy call)


def busy_table(ready_at: dict[tuple[str, str], float], busy_s: dict[tuple[str, str], float], now: float,
               working: dict[tuple[str, str], list[float]] | None = None,
               waits: dict[tuple[str, str], tuple[int, float, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    """The ``busy`` object of markers, summary and report, per stage (summed over the stage's actors):

    * ``actors``; ``busy_s``: seconds working on blocks; ``wall_s``: seconds alive, from each actor's ready time (its
      model loaded) to ``now`` (the run's end); ``fraction`` = busy_s / wall_s: the operator's first number;
    * ``steady_s``/``steady_fraction``: the same from each actor's first block to its last, leaving out the pipeline
      filling at the start and draining at the end (what a long run tends to);
    * ``waits`` (where ``waits`` gives (count, seconds, recent gaps) per actor): how the steady time that is not busy
      is spent between blocks, each wait from one block's end to the next one's start: ``count``, ``total_s``,
      ``median_ms`` and ``p90_ms`` (of the recent ones). Many short waits are the per-call cost of handing a block
      over; few long ones, an actor starved of input.
    """
    out: dict[str, dict[str, Any]] = {}
    for (stage, actor), t in sorted(ready_at.items()):
        row = out.setdefault(stage, {"actors": 0, "busy_s": 0.0, "wall_s": 0.0, "steady_s": 0.0})
        row["actors"] += 1
        row["busy_s"] += busy_s.get((stage, actor), 0.0)
        row["wall_s"] += max(0.0, now - t)
        first, last = (working or {}).get((stage, actor), (0.0, 0.0))
        row["steady_s"] += max(0.0, last - first)
    gaps: dict[str, list[float]] = {}
    for (stage, _actor), (count, seconds, recent) in sorted((waits or {}).items()):
        if stage in out:
            w = out[stage].setdefault("waits", {"count": 0, "total_s": 0.0})
            w["count"] += count
            w["total_s"] += seconds
            gaps.setdefault(stage, []).extend(recent)
    for stage, values in gaps.items():
        w = out[stage]["waits"]
        w["total_s"] = round(w["total_s"], 3)
        if values:
            q = sorted(values)
            w["median_ms"] = round(1e3 * q[len(q) // 2], 1)
            w["p90_ms"] = round(1e3 * q[min(len(q) - 1, int(0.9 * len(q)))], 1)
    for row in out.values():
        row["fraction"] = round(min(1.0, row["busy_s"] / row["wall_s"]), 4) if row["wall_s"] > 0 else 0.0
        row["steady_fraction"] = round(min(1.0, row["busy_s"] / row["steady_s"]), 4) if row["steady_s"] > 0 else 0.0
        for k in ("busy_s", "wall_s", "steady_s"):
            row[k] = round(row[k], 3)
    return out
