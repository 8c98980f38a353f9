"""Fast checks of the Ray wiring's plain parts (pipeline/graph/build.py, and the flight log of
pipeline/graph/flight.py), without starting Ray: the busy table every marker, summary and report carries, the block
labels an actor death is reported with, the actor-pool strategies the pool rule turns into, and which errors count as
a stage actor's death. The wiring itself runs end to end in the slow tests (tests/jobs/test_restore.py and the others
that start Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import schema as S
from pipeline.graph import build, flight
from pipeline.graph.capacity import StagePool


def test_busy_table_sums_a_stages_actors_and_leaves_out_fill_and_drain() -> None:
    ready = {("restore", "a1"): 10.0, ("restore", "a2"): 20.0, ("detect", "d1"): 0.0}
    busy = {("restore", "a1"): 30.0, ("restore", "a2"): 15.0, ("detect", "d1"): 5.0}
    working = {("restore", "a1"): [12.0, 42.0], ("restore", "a2"): [22.0, 52.0]}  # detect never started a block
    table = flight.busy_table(ready, busy, now=60.0, working=working)
    assert table["restore"] == {"actors": 2, "busy_s": 45.0, "wall_s": 90.0, "steady_s": 60.0,
                                "fraction": 0.5, "steady_fraction": 0.75}
    assert table["detect"] == {"actors": 1, "busy_s": 5.0, "wall_s": 60.0, "steady_s": 0.0,
                               "fraction": round(5 / 60, 4), "steady_fraction": 0.0}
    # an actor whose clock reads busier than alive is capped at 1; one ready after `now` counts no wall time
    capped = flight.busy_table({("r", "x"): 0.0, ("r", "late"): 9.0}, {("r", "x"): 12.0}, now=8.0)
    assert capped["r"]["fraction"] == 1.0 and capped["r"]["wall_s"] == 8.0 and capped["r"]["actors"] == 2
    assert flight.busy_table({}, {}, now=1.0) == {}


def test_busy_table_says_how_the_time_between_blocks_was_spent() -> None:
    """An actor's waits between blocks: many short ones (handing blocks over) and a starved one show in the median
    and the 90th percentile; the count and seconds are of all waits, the quantiles of those kept."""
    ready = {("restore", "a"): 0.0, ("restore", "b"): 0.0, ("detect", "d"): 0.0}
    working = {("restore", "a"): [0.0, 10.0], ("restore", "b"): [0.0, 10.0], ("detect", "d"): [0.0, 10.0]}
    waits = {("restore", "a"): (12, 2.0, [0.01] * 8 + [1.0]), ("restore", "b"): (1, 0.02, [0.02]),
             ("gone", "x"): (3, 1.0, [0.3])}  # a stage no actor was ready in: left out
    table = flight.busy_table(ready, {("restore", "a"): 8.0}, now=10.0, working=working, waits=waits)
    assert table["restore"]["waits"] == {"count": 13, "total_s": 2.02, "median_ms": 10.0, "p90_ms": 1000.0}
    assert "waits" not in table["detect"] and "gone" not in table


def test_the_flight_log_counts_an_actors_waits_between_its_blocks() -> None:
    """FlightLog's own bookkeeping (its class body, without Ray): no wait before an actor's first block; the time
    from a block's end to the next block's start afterwards."""
    log = flight.FlightLog()  # the class the FlightLog actor runs, without Ray
    log.ready("restore", "a")
    log.start("restore", "b1", "a")
    log.finish("restore", "b1", "a", busy_s=0.1)
    assert log.waited["restore", "a"] == 0
    log.start("restore", "b2", "a")
    log.finish("restore", "b2", "a", busy_s=0.1)
    log.start("restore", "b3", "a")
    assert log.waited["restore", "a"] == 2 and len(log.waits["restore", "a"]) == 2
    assert log.busy()["restore"]["waits"]["count"] == 2


def test_block_label_names_each_units_rows_and_skips_end_rows() -> None:
    table = pa.table({S.UNIT: ["a.tar", "a.tar", "b.tar", "a.tar", "b.tar"], S.INDEX: [3, 7, 0, 5, -1]})
    assert build.block_label(table) == "a.tar rows 3-7, b.tar rows 0-0"
    assert build.block_label(pa.table({S.UNIT: ["a.tar"], S.INDEX: [-1]})) == "an end-of-unit block"


def test_actor_pools_are_fixed_or_autoscaling_as_the_pool_says() -> None:
    fixed = build._actor_pool(StagePool(min_actors=2, max_actors=2, cpus=0.5, gpus=0.0), in_flight=4)
    assert (fixed.min_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (2, 2, 4)
    scaling = build._actor_pool(StagePool(min_actors=1, max_actors=3, cpus=1.0, gpus=0.0))
    assert (scaling.min_size, scaling.max_size) == (1, 3)


@pytest.mark.parametrize("error", [ValueError("bad block"), RuntimeError("ObjectLostError: ...")])
def test_only_an_actors_death_is_reported_as_one(error: BaseException) -> None:
    # not a death: nothing to say, and the flight log (a Ray actor) is never asked
    assert build._died_on(None, error) is None
