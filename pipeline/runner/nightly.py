"""``dr2 nightly SRC DST --state STATE_URI``: the restore job, run every night over a source that grows.

Each run lists SRC (one paged listing), asks DST which units are committed under the current config with the
input they were made from (size + ETag/mtime in each marker), and hands the rest to the bookkeeping of
:mod:`pipeline.runner.nightly_state`: units are claimed in waves under the state's lease (two runs at once split the
work), each wave is restored by :func:`pipeline.runner.loop.run_restore` restricted to it, every unit's outcome is
recorded, failing units are retried on later runs up to ``--max-attempts`` and then quarantined, and a run record is
appended to the history at STATE_URI.

A unit is known to the state by its name and its input's identity (``train/0001.tar@<size>:<etag>``): a shard
that changed since it was committed is a new unit to the state, redone with a fresh count of attempts, while the
history keeps what happened to the old one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

from pipeline.config import PipelineConfig
from pipeline.formats import shards
from pipeline.formats.units import Unit
from pipeline.runner import nightly_state as ns
from pipeline.runner.loop import UnitOutcome, plan_units, run_restore

log = logging.getLogger(__name__)

DEFAULT_WAVE = 256
"""Units per wave: each wave is one Ray job (actors start once per wave), and concurrent runs split by waves."""


def state_key(unit: Unit) -> str:
    return f"{unit.name}@{unit.input}" if unit.input else unit.name


def run_nightly_job(cfg: PipelineConfig, state_uri: str, *, max_attempts: int = ns.DEFAULT_MAX_ATTEMPTS,
                    retry_quarantined: bool = False, wave: int = DEFAULT_WAVE) -> ns.RunRecord:
    """One nightly run (see the module docstring). Raises only when the run cannot start (SRC, DST or the state
    unreachable, a changed config without --overwrite); every later failure is in the returned record."""
    from pipeline.graph.models import model_identity

    options = cfg.storage_options()
    config_hash = cfg.output_hash(model_identity(cfg))
    units = plan_units(cfg)
    states = shards.unit_states(units, cfg.dst, config_hash, verify=cfg.verify, options=options)
    conflicts = [n for n, s in states.items() if s == "conflict"]
    if conflicts and not cfg.overwrite:
        raise ValueError(f"{len(conflicts)} unit(s) in {cfg.dst} were made under another config (first: "
                         f"{conflicts[0]}): rerun with --overwrite to redo them, or use another DST and --state")
    by_key = {state_key(u): u for u in units}
    done = {state_key(u) for u in units if states[u.name] == "done"}
    run_id = ns.new_run_id()

    def process(keys: list[str]) -> Iterator[ns.UnitOutcome]:
        outcomes: list[ns.UnitOutcome] = []

        def heard(o: UnitOutcome) -> None:
            key = state_key(next(u for u in chosen if u.name == o.unit))
            outcomes.append(ns.UnitOutcome(unit=key, ok=o.ok, error=o.error, samples=o.stats.get("statuses", {}),
                                           faces=int(o.stats.get("faces", 0))))

        chosen = [by_key[k] for k in keys]
        try:
            run_restore(dataclasses.replace(cfg, limit=None), only={u.name for u in chosen}, on_unit=heard,
                        run_id=run_id)
        except KeyboardInterrupt:  # a stop (runner/stopping.py): what finished is reported, then the stop goes on
            yield from outcomes  # the units it cut short are not (run_restore told nothing of them): run_nightly
            raise  # gives them their attempt back
        except Exception as e:  # noqa: BLE001 - every unit got its outcome through on_unit; the run goes on
            log.warning("the restore of %d units stopped: %s", len(keys), e)
        reported = {o.unit for o in outcomes}
        for u in chosen:  # units run_restore had nothing to do for (done meanwhile by another run)
            if state_key(u) not in reported:
                outcomes.append(ns.UnitOutcome(unit=state_key(u), ok=True))
        yield from outcomes

    state = ns.NightlyState(state_uri, options=options)
    # SIGTERM and Ctrl-C: pipeline/runner/stopping.py (the CLI installs it) raises KeyboardInterrupt once the commits
    # under way are done; run_nightly records what finished, gives the rest their attempt back, completes its record
    # ("stopped"), releases its claims and lets the stop go on up. A hard stop releases the claims as its last words
    # (LeaseKeeper) and leaves the record "running".
    return ns.run_nightly(state, list(by_key), done, process, max_attempts=max_attempts,
                          retry_quarantined=retry_quarantined, config_hash=config_hash, run_id=run_id, claim_batch=wave)
