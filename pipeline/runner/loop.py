"""The archive job: ``dr2 restore SRC DST``. Plans the units, skips finished ones, runs the Ray graph, commits
each unit as soon as all its samples are staged, and prints a summary.

Exactly-once, as the driver sees it:

* The writers send one summary per staged part (the index range it covers, counts per status, faces,
  seconds) and one per unit end (how many samples the reader found). A unit is committed only when its end
  summary has arrived and the part summaries cover ``0..unit_size-1`` exactly (the same cover rule the commit
  applies to the staged parts, so a retried block is never counted twice). The commit concatenates the staged
  parts into the unit's output atomically and then writes its ``.stats.json`` marker, which a rerun checks; it
  runs in the background (:class:`pipeline.formats.shards.Committer`: the driver's threads, or a Ray task for a large
  shard on S3), batched when units complete faster than one by one (archives of thousands of tiny shards).
* A rerun skips units whose marker carries the same config hash and whose output has the recorded size;
  ``--overwrite`` redoes them; a unit done under another config is refused unless ``--overwrite`` is given.
* Staged parts live under a folder named by the unit and the config hash, and those of units about to be
  processed are cleared first, so a part from another run or config can never be mixed in.
* The driver holds a few numbers per unit in flight, never a row per sample: its memory is flat in the
  number of rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import schema as S
from pipeline.config import InputFormat, PipelineConfig
from pipeline.formats import AUTO_ORDER, format_of, shards
from pipeline.formats.shards import ShardCommitError
from pipeline.formats.units import Unit, UnitKind
from pipeline.runner import stopping
from pipeline.store import storage
from pipeline.store.sources import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

CONFIG_FILE = "_dr2/config.json"


class ConfigChangedError(RuntimeError):
    """A unit in DST was made under another config; rerun with --overwrite to redo it."""


@dataclass
class UnitProgress:
    unit: Unit
    expected: int | None = None  # from the end summary
    read_error: str = ""
    parts: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)  # by index range: a retry counts once
    read_seconds: float = 0.0
    skipped_members: list[dict[str, str]] = field(default_factory=list)  # of the unit, from its end summary
    committed: bool = False

    def cover(self) -> list[dict[str, Any]] | None:
        """The part summaries that cover the unit exactly, once its end has arrived; else None."""
        if self.committed or self.expected is None:
            return None
        try:
            chain = shards.cover([(a, b, p) for (a, b), p in self.parts.items()], self.expected, self.unit.name)
        except ShardCommitError:
            return None
        return [p for _, _, p in chain]


@dataclass
class RunSummary:
    units_total: int = 0
    units_skipped: int = 0
    units_done: int = 0
    samples: int = 0
    faces: int = 0
    faces_found: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    stage_seconds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    plan_seconds: float = 0.0
    first_commit_seconds: float | None = None
    read_errors: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # units that could not be done, with the reason
    config_hash: str = ""
    model_info: dict[str, Any] = field(default_factory=dict)
    suspect: int = 0  # restored faces with a quality flag
    verdicts: Counter[str] = field(default_factory=Counter)  # faces pasted back, per degradation verdict
    skipped: int = 0  # faces pasted back unrestored (clean, under --skip-clean)
    saved_s: float = 0.0  # restorer seconds that saved: skipped x the run's restore seconds per restored face
    sheet: list[dict[str, Any]] = field(default_factory=list)  # the report's contact-sheet entries (bounded)
    non_ok: list[dict[str, Any]] = field(default_factory=list)  # non-ok samples for the report (bounded)
    non_ok_total: int = 0
    report: str = ""  # the report page's URI, once written
    started: float = field(default_factory=time.time)
    busy: dict[str, dict[str, Any]] = field(default_factory=dict)  # per stage: actors, busy_s, wall_s, fraction
    pools: dict[str, Any] = field(default_factory=dict)  # the pools the run had (pipeline.graph.capacity.Pools)
    memory: dict[str, Any] = field(default_factory=dict)  # how its memory budget was spent (pipeline.graph.memory)
    simulated: str = ""  # the simulated restorer's note: these outputs are NOT restorations

    def table(self) -> str:
        lines = [
            f"{'units (shards/chunks)':<24}{self.units_total} total, {self.units_skipped} already done, "
            f"{self.units_done} written" + (f", {len(self.failed)} FAILED" if self.failed else ""),
            f"{'samples':<24}{self.samples}",
            f"{'faces found':<24}{self.faces_found}",
            f"{'faces pasted back':<24}{self.faces}",
        ]
        for status, n in sorted(self.statuses.items()):
            lines.append(f"{'  ' + status:<24}{n}")
        rate = self.faces / self.seconds if self.seconds else 0.0
        rows = self.samples / self.seconds if self.seconds else 0.0
        lines.append(f"{'wall time':<24}{self.seconds:.1f} s ({rows:.1f} samples/s, {rate:.2f} faces/s)")
        if self.first_commit_seconds is not None:
            lines.append(f"{'first unit committed':<24}{self.first_commit_seconds:.1f} s after start "
                         f"(planning {self.plan_seconds:.1f} s)")
        for stage in ("restore", "detect"):
            b = self.busy.get(stage)
            if b:
                w = b.get("waits") or {}
                waits = (f"; {w['count']} waits between blocks, median {w['median_ms']:.0f} ms"
                         if w.get("count") and "median_ms" in w else "")
                lines.append(f"{stage + ' busy':<24}{b['fraction']:.0%} of {b['wall_s']:.1f} actor-s "
                             f"({b['actors']} actor(s); the rest waiting for input{waits})")
        if self.simulated:
            lines.append(f"{'SIMULATED':<24}{self.simulated}")
        if self.suspect:
            lines.append(f"{'suspect faces':<24}{self.suspect} (quality flags; listed first in the report)")
        if self.verdicts:
            lines.append(f"{'degradation':<24}" + ", ".join(f"{n} {v}" for v, n in _in_verdict_order(self.verdicts)))
        if self.skipped:
            lines.append(f"{'skipped (clean)':<24}{self.skipped} faces pasted back unrestored, ~{self.saved_s:.1f} s "
                         "of restorer time saved")
        for unit, err in self.read_errors.items():
            lines.append(f"{'read error':<24}{unit}: {err}")
        for unit, err in self.failed.items():
            lines.append(f"{'FAILED':<24}{unit}: {err}")
        return "\n".join(lines)


VERDICT_ORDER = ("clean", "mild", "moderate", "severe")  # imaging.degradation.Verdict, without importing OpenCV


def _in_verdict_order(counts: Counter[str]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (VERDICT_ORDER.index(kv[0]) if kv[0] in VERDICT_ORDER else 9, kv[0]))


# --------------------------------------------------------------------------------------------- planning


def plan_units(cfg: PipelineConfig) -> list[Unit]:
    """The units of SRC, listed by the format ``--input-format`` names; ``auto`` asks the formats in
    :data:`pipeline.formats.AUTO_ORDER` (tar shards, parquet files, plain images) and takes the first that finds
    any."""
    kinds = AUTO_ORDER if cfg.input_format is InputFormat.AUTO else (INPUT_KINDS[cfg.input_format],)
    for kind in kinds:
        units = format_of(kind).list_units(cfg)
        if units:
            return units
    if cfg.input_format is InputFormat.AUTO:
        raise FileNotFoundError(f"no .tar shards, no .parquet files and no images ({', '.join(IMAGE_SUFFIXES)}) "
                                f"under {cfg.src!r}")
    raise FileNotFoundError(f"no {cfg.input_format.value} input matches {cfg.src!r}")


INPUT_KINDS = {InputFormat.WEBDATASET: UnitKind.SHARD, InputFormat.PARQUET: UnitKind.PARQUET,
               InputFormat.IMAGES: UnitKind.IMAGES}


def select_todo(units: Sequence[Unit], cfg: PipelineConfig, config_hash: str, *, tidy: bool = False) -> list[Unit]:
    """The units to run: not done under this config (``--overwrite``: all). One listing of DST decides; ``tidy``
    (holding DST's lease) also removes what interrupted runs left there (:func:`shards.unit_states`)."""
    states = shards.unit_states(units, cfg.dst, config_hash, verify=cfg.verify, tidy=tidy,
                                options=cfg.storage_options())
    todo, conflicts = [], []
    for u in units:
        state = states[u.name]
        if state == "done" and not cfg.overwrite:
            continue
        if state == "conflict" and not cfg.overwrite:
            conflicts.append(u.name)
            continue
        todo.append(u)
    if conflicts:
        raise ConfigChangedError(
            f"{len(conflicts)} unit(s) in {cfg.dst} were made under a different config or models "
            f"(first: {conflicts[0]}). Rerun with --overwrite to redo them, or choose another DST."
        )
    return todo


# --------------------------------------------------------------------------------------------- running


LEASE_FILE = "_dr2/lease.json"
LEASE_TTL_S = 60.0


def run_restore(cfg: PipelineConfig, *, on_part: Callable[[dict[str, Any], RunSummary], None] | None = None,
                only: Collection[str] | None = None, on_unit: Callable[[UnitOutcome], None] | None = None,
                run_id: str | None = None) -> RunSummary:
    """Run the whole job; returns the summary (also logged).

    One writer per DST: the run holds the lease ``DST/_dr2/lease.json`` (renewed in the background) from planning to
    its last commit; another run on the same DST waits up to ``cfg.wait`` seconds, then stops with
    :class:`~pipeline.store.leases.LeaseHeld` naming the holder. A lease whose holder was a process of this machine that
    has exited is taken over at once; another machine's, once it expires.

    ``only`` restricts the run to these unit names (the nightly job); ``on_part`` sees every part summary as it
    arrives (progress display, benchmarks); ``on_unit`` hears of every unit committed or failed (not of those a stop
    cut short: the run raises ``KeyboardInterrupt`` after the commits under way). A unit that cannot
    be read is recorded in ``summary.failed`` and the others go on; an error of the job itself (an actor that keeps
    dying, weights that fail their checksum) raises after the units already complete are committed.
    """
    if not cfg.src or not cfg.dst:
        raise ValueError("both SRC and DST are needed")
    with _dst_lease(cfg, run_id) as lease:
        return _run_leased(cfg, lease, on_part=on_part, only=only, on_unit=on_unit)


@contextlib.contextmanager
def _dst_lease(cfg: PipelineConfig, run_id: str | None) -> Iterator[Any]:
    """The lease on DST; a storage failure while taking it (wrong credentials, no bucket) is the StorageError that
    names what to check, as for any other storage call."""
    import botocore.exceptions

    from pipeline.store.leases import Owner, hold_lease

    uri = storage.join(cfg.dst, LEASE_FILE)
    with contextlib.ExitStack() as stack:
        try:
            lease = stack.enter_context(hold_lease(uri, ttl=LEASE_TTL_S, owner=Owner.current(run_id),
                                                   options=cfg.storage_options(), wait_s=cfg.wait, take_dead=True))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise storage.translate_error(e, uri, "take the lease on", cfg.storage_options()) from e
        yield lease  # released however the run ends


@dataclass(frozen=True)
class UnitOutcome:
    """What became of one unit in a run: committed (``ok``) with its stats, or failed with the reason."""

    unit: str
    ok: bool
    error: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


def _run_leased(cfg: PipelineConfig, lease: Any, *, on_part: Callable[[dict[str, Any], RunSummary], None] | None,
                only: Collection[str] | None, on_unit: Callable[[UnitOutcome], None] | None) -> RunSummary:
    from pipeline.graph.build import build_dataset, init_ray, remote_call, stream_summaries, wait
    from pipeline.graph.models import model_identity

    t0 = time.perf_counter()
    options = cfg.storage_options()
    model_info = model_identity(cfg)
    config_hash = cfg.output_hash(model_info)
    units = plan_units(cfg)
    if only is not None:
        wanted = set(only)
        units = [u for u in units if u.name in wanted]
    todo = select_todo(units, cfg, config_hash, tidy=True)
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    summary = RunSummary(units_total=len(units), units_skipped=len(units) - len(todo), config_hash=config_hash,
                         model_info=model_info, simulated=str(model_info.get("note", "")))
    resolved = {"config": cfg.to_dict(), "resolved": {"omega": cfg.resolved_omega}, "models": model_info,
                "config_hash": config_hash}
    storage.write_bytes_atomic(storage.join(cfg.dst, CONFIG_FILE), json.dumps(resolved, indent=2).encode(),
                               options=options)
    if units:
        units[0].format.prepare_dst(cfg, units)  # e.g. an image folder's chunk layout
    summary.plan_seconds = time.perf_counter() - t0
    if not todo:
        log.info("all %d units in %s are done; nothing to do (use --overwrite to redo)", len(units), cfg.dst)
        summary.seconds = time.perf_counter() - t0
        return summary
    shards.clear_stagings(todo, cfg.dst, config_hash, options=options)

    init_ray(cfg)
    from pipeline.runner.progress import Progress

    if cfg.report and cfg.report_faces_per_thousand is None:
        cfg = dataclasses.replace(cfg, report_faces_per_thousand=sheet_rate(cfg, todo))
    images = sum(len(u.images) for u in todo)
    bar = Progress(len(todo), images or None, mode=cfg.progress)
    progress = {u.name: UnitProgress(u) for u in todo}
    # Commits run in the background as units complete, batched when they complete faster than one by one
    # (pipeline.formats.shards.Committer); the lease is checked before each batch too.
    committer = shards.Committer(cfg.dst, config_hash, remote=lambda fn, *a, **k: wait([remote_call(fn, *a, **k)])[0],
                                 check=lease.check, describe=one_line, options=options)

    def settle(done: list[shards.CommitResult]) -> None:
        """Record finished commits; a commit that failed (storage refused the output) fails its unit only."""
        for r in done:
            p, stats = progress[r.job.unit.name], dict(r.job.stats)
            if r.error:  # recorded as this unit's failure; the other units stand
                summary.units_done -= 1
                summary.samples -= stats["samples"]
                summary.faces -= stats["faces"]
                summary.faces_found -= stats["faces_found"]
                summary.statuses.subtract(stats["statuses"])
                _fail(p, f"commit failed: {r.error}", summary, on_unit)
                continue
            if summary.first_commit_seconds is None:
                summary.first_commit_seconds = r.at - t0
            if on_unit is not None:
                on_unit(UnitOutcome(p.unit.name, True, stats=stats))
        summary.statuses = +summary.statuses  # drop zero counts

    def committed() -> str:
        """What a stopped run's one line says (pipeline.runner.stopping.final_line)."""
        pending = committer.pending()
        done = summary.units_skipped + summary.units_done - pending
        return (f"{done} of {summary.units_total} unit(s) committed ({summary.units_skipped} of them before this "
                "run)" + (f"; {pending} commit(s) were under way (a unit without its .stats.json marker is redone)"
                          if pending else ""))

    with stopping.progress(committed):  # the line a stopped run prints (pipeline/runner/stopping.py)
        try:
            graph = build_dataset(todo, cfg, model_info, config_hash)
            summary.pools = graph.pools.to_dict()
            summary.memory = graph.memory_plan.to_dict() if graph.memory_plan is not None else {}
            for part in stream_summaries(graph):
                stopping.check()  # a stop whose first exception was lost (pipeline/runner/stopping.py) stops here
                settle(committer.results())
                p = progress[part[S.UNIT]]
                if p.committed:  # a retried block of a unit already committed (or failed): nothing more to count
                    continue
                if part["first"] == -1:  # the unit's end
                    p.expected, p.read_error = part[S.UNIT_SIZE], part[S.ERROR] or ""
                    p.read_seconds = float((part["seconds"] or {}).get("read") or 0.0)
                    p.skipped_members = list(part[S.NOTES] or [])
                    if p.expected is not None and p.expected < 0:  # the unit could not be read: record it, go on
                        _fail(p, p.read_error, summary, on_unit)
                        continue
                elif (part["first"], part["last"]) not in p.parts:
                    p.parts[(part["first"], part["last"])] = part
                    _collect_report_rows(summary, part)
                chain = p.cover()
                if part["first"] >= 0:
                    bar.update(rows=part["last"] - part["first"] + 1, faces=int(part["faces"]),
                               statuses=dict(part["statuses"]))
                if on_part is not None:
                    on_part(part, summary)
                if chain is None:
                    continue
                stats = _stats(p, chain, config_hash, busy=graph.poll_busy())
                lease.check()  # never commit once another run may own DST
                log.debug("%s: all %d samples staged, committing", p.unit.name, p.expected)
                assert p.expected is not None  # a cover needs the unit's end
                committer.put(shards.CommitJob(p.unit, p.expected, stats))
                bar.update(units=1)
                summary.units_done += 1
                summary.samples += stats["samples"]
                summary.faces += stats["faces"]
                summary.faces_found += stats["faces_found"]
                summary.statuses.update(stats["statuses"])
                summary.stage_seconds.update(stats["seconds"])
                if p.read_error:
                    summary.read_errors[p.unit.name] = p.read_error
                p.parts, p.committed = {}, True
        except BaseException as e:
            # The job itself broke (or was interrupted): what was complete is committed, the rest is reported. A
            # stop (Ctrl-C, SIGTERM) is no unit's outcome: on_unit does not hear of the units it cut short, so the
            # nightly job gives them their attempt back instead of counting a failure towards their quarantine.
            bar.close()
            settle(committer.close())
            stopped = isinstance(e, KeyboardInterrupt)
            for p in progress.values():
                if not p.committed and p.unit.name not in summary.failed:
                    _fail(p, f"the run stopped before this unit was complete: {one_line(e)}", summary,
                          None if stopped else on_unit)
            raise
        bar.close()
        summary.busy = graph.busy
        settle(committer.close())
    for p in progress.values():
        if not p.committed and p.unit.name not in summary.failed:
            _fail(p, "not all samples arrived (a bug: please report it)", summary, on_unit)
    summary.seconds = time.perf_counter() - t0
    restored = summary.faces - summary.skipped
    if summary.skipped and restored > 0:  # the run's measured restorer seconds per restored face, over all its parts
        summary.saved_s = summary.skipped * summary.stage_seconds["restore"] / restored
    if cfg.report:
        summary.report = write_run_report(cfg, summary)
    log.debug("summary\n%s", summary.table())  # the CLI prints it
    return summary


TYPICAL_BYTES_PER_FACE = 150_000  # a web photo with one face: only to size the report's sample


def sheet_rate(cfg: PipelineConfig, units: Sequence[Unit]) -> int:
    """Per-1000 sampling rate of the contact sheet, so that about ``cfg.report_faces`` faces are kept whatever the
    archive's size; estimated from the input's bytes (the listing gives them) before any face is found."""
    size = sum(u.size_hint[0] or 0 for u in units)
    faces = max(1, size // TYPICAL_BYTES_PER_FACE, sum(len(u.images) for u in units))
    return max(1, min(1000, -(-cfg.report_faces * 1000 // faces)))


MAX_SHEET = 2000  # contact-sheet entries the driver keeps (the report shows the worst 500)
MAX_NON_OK = 500


def _collect_report_rows(summary: RunSummary, part: dict[str, Any]) -> None:
    """Keep what the report needs from a part summary, bounded: the driver's memory stays flat in rows."""
    summary.suspect += int(part.get("suspect") or 0)
    summary.verdicts.update(dict(part.get("verdicts") or []))
    summary.skipped += int(part.get("skipped") or 0)
    summary.saved_s += float(part.get("saved_s") or 0.0)
    if part.get("sheet"):
        summary.sheet.extend(json.loads(part["sheet"]))
        if len(summary.sheet) > MAX_SHEET:
            from pipeline.runner.report import normalise

            summary.sheet = normalise({"run": {}, "faces": summary.sheet})["faces"][: MAX_SHEET // 2]
    rows = part.get("non_ok") or []
    summary.non_ok_total += len(rows)
    room = MAX_NON_OK - len(summary.non_ok)
    summary.non_ok.extend({"shard": part[S.UNIT], **r} for r in rows[: max(0, room)])


def write_run_report(cfg: PipelineConfig, summary: RunSummary) -> str:
    """``DST/_dr2/report/index.html`` (+ ``report.json``) for this run: counts, timings, units, the contact sheet of
    faces (worst first) and the samples that were not ok."""
    from pipeline.runner import report

    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    rep = {
        "run": {"started": iso(summary.started), "ended": iso(summary.started + summary.seconds),
                "wall_seconds": round(summary.seconds, 3), "config": cfg.to_dict(),
                "config_hash": summary.config_hash, "models": summary.model_info},
        "counts": {"samples": dict(sorted(summary.statuses.items())), "faces_found": summary.faces_found,
                   "faces_restored": summary.faces,
                   "faces_per_second": round(summary.faces / summary.seconds, 4) if summary.seconds else 0.0,
                   "suspect_faces": summary.suspect},
        "degradation": {"verdicts": dict(_in_verdict_order(summary.verdicts)), "skipped": summary.skipped,
                        "saved_seconds": round(summary.saved_s, 3), "adaptive": cfg.adaptive,
                        "skip_clean": cfg.skips_clean,
                        "thresholds": {"clean_max_factor": cfg.clean_max_factor, "mild_max_factor": cfg.mild_max_factor,
                                       "moderate_max_factor": cfg.moderate_max_factor}},
        "units": {"done": summary.units_done, "skipped": summary.units_skipped,
                  "failed": [{"unit": u, "reason": r} for u, r in summary.failed.items()]},
        "stage_seconds": {k: round(v, 3) for k, v in summary.stage_seconds.items() if v},
        "busy": summary.busy,
        "pools": summary.pools,
        "memory": summary.memory,
        "simulated": summary.simulated,
        "quality_thresholds": dataclasses.asdict(cfg.quality_thresholds()),
        "faces": summary.sheet,
        "non_ok": summary.non_ok,
        "non_ok_total": summary.non_ok_total,
    }
    try:
        return report.write_report(cfg.dst, rep)
    except Exception as e:  # noqa: BLE001 - the outputs are committed; a report that cannot be written is a warning
        log.warning("could not write the run report: %s", e)
        return ""


def one_line(e: BaseException) -> str:
    """The first line of what an error says, taken from the innermost cause: Ray wraps a worker's exception (a
    RayTaskError, a UserCodeException from Ray Data) around the one that says what happened."""
    cause: BaseException = e
    seen: set[int] = set()
    while id(cause) not in seen:
        seen.add(id(cause))
        inner = getattr(cause, "cause", None) or cause.__cause__
        if not isinstance(inner, BaseException):
            break
        cause = inner
    text = [t.strip() for t in str(cause).strip().splitlines() if t.strip()]
    lines = [t for t in text if not t.startswith(("Traceback", "ray::", "File ", "^"))]
    head = lines[-1] if lines else ""
    name = type(cause).__name__
    return f"{name}: {head}" if head and not head.startswith(name) else (head or name)


def _fail(p: UnitProgress, reason: str, summary: RunSummary, on_unit: Callable[[UnitOutcome], None] | None) -> None:
    summary.failed[p.unit.name] = reason
    p.committed = True  # nothing more is done for it in this run
    if on_unit is not None:
        on_unit(UnitOutcome(p.unit.name, False, error=reason))


def _stats(p: UnitProgress, chain: list[dict[str, Any]], config_hash: str,
           busy: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    verdicts: Counter[str] = Counter()
    seconds: Counter[str] = Counter({"read": p.read_seconds})
    for part in chain:
        statuses.update(dict(part["statuses"]))
        verdicts.update(dict(part.get("verdicts") or []))
        seconds.update({k: v for k, v in (part["seconds"] or {}).items() if v})
    return {
        "shard": p.unit.name,
        "source": p.unit.source,
        "samples": p.expected,
        "statuses": dict(sorted(statuses.items())),
        "faces": sum(int(part["faces"]) for part in chain),
        "faces_found": sum(int(part["faces_found"]) for part in chain),
        "written": sum(int(part.get("written") or 0) for part in chain),
        "verdicts": dict(_in_verdict_order(verdicts)),  # faces pasted back, per degradation verdict
        "skipped": sum(int(part.get("skipped") or 0) for part in chain),  # of them, pasted back unrestored
        "saved_s": round(sum(float(part.get("saved_s") or 0.0) for part in chain), 3),  # restorer time that saved
        "read_error": p.read_error,
        "input": p.unit.input,
        "format": p.unit.kind.value,
        "images": None,
        "refused": None,
        **p.unit.format.marker_fields(p.unit),  # a chunk's images and refused paths, a parquet file's image column
        "skipped_members": p.skipped_members,
        "config_hash": config_hash,
        "seconds": {k: round(v, 3) for k, v in sorted(seconds.items())},
        # the run's stage actors up to this commit (pipeline.graph.flight.busy_table): how much of their wall time they
        # spent working; the restorers' share is what a GPU node is paid for
        "busy": busy or {},
    }


def with_overrides(cfg: PipelineConfig, **kw: Any) -> PipelineConfig:
    return dataclasses.replace(cfg, **kw)
