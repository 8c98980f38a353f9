"""The archive job: ``dr2 restore SRC DST``. Plans the work units, skips finished ones, runs the Ray graph,
commits each shard as soon as all its samples are written, and prints a summary.

Exactly-once, as the driver sees it:

* A unit (input shard, or chunk of plain images) is committed only when the driver has seen its end
  marker and one summary row for each of the ``shard_size`` samples the reader found. The commit (a small
  Ray task) concatenates the staged parts into ``DST/<shard>`` atomically and then writes
  ``DST/<shard stem>.stats.json``, the marker that a rerun checks.
* A rerun skips units whose marker carries the same config hash; ``--overwrite`` redoes them; a unit done
  under another config is refused unless ``--overwrite`` is given.
* Staged parts of units about to be processed are cleared first, so a part from an older config can never
  be mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import schema as S
from pipeline.build import build_dataset, init_ray, remote_call, stream_summaries, wait
from pipeline.config import InputFormat, PipelineConfig
from pipeline.models import model_identity
from pipeline.shards import (
    UnitState,
    chunk_name,
    chunk_state,
    clear_chunk_staging,
    clear_staging,
    commit_chunk,
    commit_shard,
    shard_state,
)
from pipeline.stages import WorkUnit
from pipeline.storage import IMAGE_SUFFIXES, expand_sources, is_s3, list_images, write_bytes_atomic

log = logging.getLogger(__name__)

CONFIG_FILE = "_dr2/config.json"


class ConfigChangedError(RuntimeError):
    """A unit in DST was made under another config; rerun with --overwrite to redo it."""


@dataclass
class UnitProgress:
    unit: WorkUnit
    expected: int | None = None  # from the end marker
    read_error: str = ""
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)  # by index: a repeated row counts once
    committed: bool = False
    statuses: Counter[str] = field(default_factory=Counter)
    faces: int = 0
    seconds: Counter[str] = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return not self.committed and self.expected is not None and len(self.rows) == self.expected


@dataclass
class RunSummary:
    units_total: int = 0
    units_skipped: int = 0
    units_done: int = 0
    samples: int = 0
    faces: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    read_errors: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        lines = [
            f"{'units (shards/chunks)':<24}{self.units_total} total, {self.units_skipped} already done, "
            f"{self.units_done} written",
            f"{'samples':<24}{self.samples}",
            f"{'faces restored':<24}{self.faces}",
        ]
        for status, n in sorted(self.statuses.items()):
            lines.append(f"{'  ' + status:<24}{n}")
        rate = self.faces / self.seconds if self.seconds else 0.0
        lines.append(f"{'wall time':<24}{self.seconds:.1f} s ({rate:.2f} faces/s)")
        for unit, err in self.read_errors.items():
            lines.append(f"{'read error':<24}{unit}: {err}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- planning


def _common_dir(uris: Sequence[str]) -> str:
    dirs = [u.rsplit("/", 1)[0] for u in uris]
    prefix = posixpath.commonpath(dirs) if not any(d.startswith("s3://") for d in dirs) else _common_s3(dirs)
    return prefix


def _common_s3(dirs: Sequence[str]) -> str:
    parts = [d.split("/") for d in dirs]
    common = []
    for segs in zip(*parts, strict=False):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return "/".join(common)


def plan_units(cfg: PipelineConfig) -> tuple[list[WorkUnit], bool]:
    """The work units of SRC and whether they are plain-image chunks."""
    fmt = cfg.input_format
    shards = expand_sources(cfg.src) if fmt in (InputFormat.AUTO, InputFormat.WEBDATASET) else []
    dst = cfg.dst.rstrip("/") + "/"
    inside = [u for u in shards if u.startswith(dst) or u.startswith(os.path.abspath(dst))]
    if inside:
        raise ValueError(f"SRC matches files inside DST ({inside[0]}): outputs would be read back as inputs. "
                         "Choose a DST outside SRC.")
    if shards:
        root = _common_dir(shards)
        return [WorkUnit(shard=u[len(root):].lstrip("/"), source=u) for u in shards], False
    if fmt is InputFormat.WEBDATASET:
        raise FileNotFoundError(f"no .tar shards match {cfg.src!r}")
    images = list_images(cfg.src, IMAGE_SUFFIXES)
    if not is_s3(cfg.src) and Path(cfg.dst).resolve().is_relative_to(Path(cfg.src).resolve()):
        raise ValueError(f"DST {cfg.dst} lies inside SRC {cfg.src}: outputs would be read back as inputs")
    if not images:
        raise FileNotFoundError(f"no .tar shards and no images ({', '.join(IMAGE_SUFFIXES)}) under {cfg.src!r}")
    n = max(1, cfg.images_per_chunk)
    chunks = [tuple(images[i : i + n]) for i in range(0, len(images), n)]
    return [WorkUnit(shard=chunk_name(k), source=cfg.src, images=c) for k, c in enumerate(chunks)], True


def _chunk_number(unit: WorkUnit) -> int:
    return int(unit.shard.rsplit("-", 1)[1])


def unit_state(unit: WorkUnit, dst: str, config_hash: str) -> UnitState:
    if unit.images:
        return chunk_state(dst, _chunk_number(unit), config_hash)
    return shard_state(dst, unit.shard, config_hash)


def clear_unit_staging(unit: WorkUnit, dst: str) -> None:
    if unit.images:
        clear_chunk_staging(dst, _chunk_number(unit))
    else:
        clear_staging(dst, unit.shard)


def commit_unit(unit: WorkUnit, dst: str, stats: dict[str, Any]) -> dict[str, Any]:
    """Assemble a unit's staged parts into its final object and write its marker (runs as a Ray task)."""
    if unit.images:
        return commit_chunk(dst, _chunk_number(unit), stats["samples"], stats)
    return commit_shard(dst, unit.shard, stats["samples"], stats)


def select_todo(units: Sequence[WorkUnit], cfg: PipelineConfig, config_hash: str) -> list[WorkUnit]:
    todo, conflicts = [], []
    for u in units:
        state = unit_state(u, cfg.dst, config_hash)
        if state == "done" and not cfg.overwrite:
            continue
        if state == "conflict" and not cfg.overwrite:
            conflicts.append(u.shard)
            continue
        todo.append(u)
    if conflicts:
        raise ConfigChangedError(
            f"{len(conflicts)} unit(s) in {cfg.dst} were made under a different config or models "
            f"(first: {conflicts[0]}). Rerun with --overwrite to redo them, or choose another DST."
        )
    return todo


# --------------------------------------------------------------------------------------------- running


def run_restore(cfg: PipelineConfig) -> RunSummary:
    """Run the whole job; returns the summary (also logged)."""
    t0 = time.perf_counter()
    if not cfg.src or not cfg.dst:
        raise ValueError("both SRC and DST are needed")
    if cfg.endpoint_url:  # the standard variable: boto3 here, and the workers of a local Ray, read it
        os.environ["AWS_ENDPOINT_URL"] = cfg.endpoint_url
    model_info = model_identity(cfg)
    config_hash = cfg.output_hash(model_info)
    units, images_mode = plan_units(cfg)
    todo = select_todo(units, cfg, config_hash)
    summary = RunSummary(units_total=len(units), units_skipped=len(units) - len(todo))
    resolved = {"config": cfg.to_dict(), "models": model_info, "config_hash": config_hash}
    write_bytes_atomic(f"{cfg.dst.rstrip('/')}/{CONFIG_FILE}", json.dumps(resolved, indent=2).encode())
    if not todo:
        log.info("all %d units in %s are done; nothing to do (use --overwrite to redo)", len(units), cfg.dst)
        summary.seconds = time.perf_counter() - t0
        return summary
    for u in todo:
        clear_unit_staging(u, cfg.dst)

    init_ray(cfg)
    progress = {u.shard: UnitProgress(u) for u in todo}
    commits = []
    ds = build_dataset(todo, cfg, model_info, images_mode=images_mode)
    for row in stream_summaries(ds):
        p = progress[row[S.SHARD]]
        if S.is_marker(row):
            p.expected, p.read_error = row[S.SHARD_SIZE], row[S.ERROR]
        elif row[S.INDEX] not in p.rows:
            p.rows[row[S.INDEX]] = row
            p.statuses[row[S.STATUS]] += 1
            if row[S.STATUS] == S.Status.OK.value:
                p.faces += len(json.loads(row[S.FACES]))
            for k, v in json.loads(row[S.TIMINGS]).items():
                p.seconds[k] += v
        if p.complete:
            log.info("%s: all %d samples written, committing", p.unit.shard, len(p.rows))
            commits.append(remote_call(commit_unit, p.unit, cfg.dst, _stats(p, config_hash)))
            summary.units_done += 1
            summary.samples += len(p.rows)
            summary.faces += p.faces
            summary.statuses.update(p.statuses)
            if p.read_error:
                summary.read_errors[p.unit.shard] = p.read_error
            p.rows, p.committed = {}, True
    wait(commits)
    incomplete = [s for s, p in progress.items() if not p.committed]
    if incomplete:
        raise RuntimeError(f"{len(incomplete)} unit(s) did not receive all their samples: {incomplete[:5]}")
    summary.seconds = time.perf_counter() - t0
    log.debug("summary\n%s", summary.table())  # the CLI prints it
    return summary


def _stats(p: UnitProgress, config_hash: str) -> dict[str, Any]:
    return {
        "shard": p.unit.shard,
        "source": p.unit.source,
        "samples": len(p.rows),
        "statuses": dict(sorted(p.statuses.items())),
        "faces": p.faces,
        "read_error": p.read_error,
        "config_hash": config_hash,
        "seconds": {k: round(v, 3) for k, v in sorted(p.seconds.items())},
    }


def with_overrides(cfg: PipelineConfig, **kw: Any) -> PipelineConfig:
    return dataclasses.replace(cfg, **kw)
