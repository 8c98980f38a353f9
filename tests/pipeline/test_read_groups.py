"""Small units travel together (pipeline/formats/units.py ``read_groups``, pipeline/graph/stages.py ``read_units``):
several units share one read task and its blocks, and every unit keeps exactly its own rows and its end row, as when
read alone."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import webdataset as wds

from pipeline import schema as S
from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.units import MIN_READ_GROUPS, Unit, UnitKind, read_groups, shard_unit
from pipeline.graph import stages
from pipeline.store.storage import local_object


def shard(tmp_path: Path, name: str, rows: int) -> Unit:
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(rows):
            sink.write({"__key__": f"{path.stem}_{i:03d}", "jpg": bytes([i % 256]) * 500, "json": b"{}"})
    return shard_unit(name, local_object(str(path)))


def sized(name: str, nbytes: int) -> Unit:
    return Unit(name=name, kind=UnitKind.SHARD, source=name, input=f"{nbytes}:v1")


def test_groups_are_consecutive_and_bounded() -> None:
    units = [sized(f"s{i}.tar", 100) for i in range(7)]
    groups = read_groups(units, max_rows=3, max_bytes=10_000, min_groups=1)  # a shard counts its end row: 3 a group
    assert [[u.name for u in g] for g in groups] == [["s0.tar", "s1.tar", "s2.tar"], ["s3.tar", "s4.tar", "s5.tar"],
                                                     ["s6.tar"]]
    assert [u for g in groups for u in g] == units
    by_bytes = read_groups([sized("a", 400), sized("b", 400), sized("c", 400)], max_rows=100, max_bytes=1000,
                           min_groups=1)
    assert [[u.name for u in g] for g in by_bytes] == [["a", "b"], ["c"]]


def test_big_or_unknown_units_keep_a_task_of_their_own() -> None:
    big, small = sized("big.tar", 5000), sized("small.tar", 10)
    unknown = Unit(name="u.tar", kind=UnitKind.SHARD, source="u.tar")  # no listed size
    chunk = Unit(name="chunk-000001", kind=UnitKind.IMAGES, source="/x", images=tuple(f"{i}.jpg" for i in range(9)))
    groups = read_groups([small, big, small, unknown, small, chunk, small], max_rows=10, max_bytes=1000,
                         min_groups=1)
    assert [[u.name for u in g] for g in groups] == [["small.tar"], ["big.tar"], ["small.tar"], ["u.tar"],
                                                     ["small.tar"], ["chunk-000001"], ["small.tar"]]


def test_a_few_units_are_read_one_by_one_and_many_in_groups() -> None:
    """Groups stop growing once fewer than ``min_groups`` would remain: a handful of shards keeps one read task (and
    block, and early commit) each; thousands share a few hundred a task."""
    few = [sized(f"s{i}.tar", 100) for i in range(MIN_READ_GROUPS + 5)]
    assert [len(g) for g in read_groups(few, max_rows=256, max_bytes=2**30)] == [1] * len(few)
    many = [sized(f"s{i:04d}.tar", 100) for i in range(2000)]
    groups = read_groups(many, max_rows=256, max_bytes=2**30)
    assert len(groups) == 16 and {len(g) for g in groups} == {125}
    assert len(read_groups(many * 3, max_rows=256, max_bytes=2**30)) == 24  # 256 units a group at most (rows)


def test_units_read_together_give_each_unit_its_rows_and_end_row(tmp_path: Path) -> None:
    units = [shard(tmp_path, f"s{i}.tar", n) for i, n in enumerate([5, 1, 0, 7, 2])]
    cfg = PipelineConfig(src=str(tmp_path / "in"), dst=str(tmp_path / "out"), restorer=RestorerKind.PASSTHROUGH,
                         rows_per_block=4)
    together = list(stages.read_units(units, cfg))
    E = S.END_INDEX
    assert [list(zip(b.column(S.UNIT).to_pylist(), b.column(S.INDEX).to_pylist(), strict=True)) for b in together] == [
        [("s0.tar", 0), ("s0.tar", 1), ("s0.tar", 2), ("s0.tar", 3)],
        [("s0.tar", 4), ("s0.tar", E), ("s1.tar", 0), ("s1.tar", E)],
        [("s2.tar", E), ("s3.tar", 0), ("s3.tar", 1), ("s3.tar", 2)],
        [("s3.tar", 3), ("s3.tar", 4), ("s3.tar", 5), ("s3.tar", 6)],
        [("s3.tar", E), ("s4.tar", 0), ("s4.tar", 1), ("s4.tar", E)],
    ]  # 15 samples and 5 end rows packed into blocks of 4, each unit's end row right after its last sample
    rows = pa.concat_tables(together)
    assert rows.schema == S.ROW_SCHEMA
    alone = pa.concat_tables([b for u in units for b in stages.read_unit(u, cfg)])
    keep = [c for c in S.ROW_SCHEMA.names if c != S.TIMINGS]  # read seconds differ from run to run
    assert rows.select(keep).equals(alone.select(keep))  # the same rows, in the same order, end rows included
    ends = [r for r in rows.to_pylist() if r[S.INDEX] == S.END_INDEX]
    assert [(r[S.UNIT], r[S.UNIT_SIZE]) for r in ends] == [("s0.tar", 5), ("s1.tar", 1), ("s2.tar", 0), ("s3.tar", 7),
                                                           ("s4.tar", 2)]
    assert all(r[S.TIMINGS]["read"] > 0 for r in ends)
    assert all(r[S.TIMINGS] is None for r in rows.to_pylist() if r[S.INDEX] != S.END_INDEX)


def test_an_unreadable_unit_in_a_group_fails_alone(tmp_path: Path) -> None:
    good = shard(tmp_path, "good.tar", 3)
    gone = Unit(name="gone.tar", kind=UnitKind.SHARD, source=str(tmp_path / "in" / "gone.tar"), input="10:1")
    cfg = PipelineConfig(src=str(tmp_path / "in"), dst=str(tmp_path / "out"), restorer=RestorerKind.PASSTHROUGH)
    rows = pa.concat_tables(list(stages.read_units([gone, good], cfg))).to_pylist()
    assert [(r[S.UNIT], r[S.INDEX], r[S.UNIT_SIZE]) for r in rows] == [
        ("gone.tar", S.END_INDEX, -1), ("good.tar", 0, None), ("good.tar", 1, None), ("good.tar", 2, None),
        ("good.tar", S.END_INDEX, 3)]
    assert "cannot read" in rows[0][S.ERROR]
