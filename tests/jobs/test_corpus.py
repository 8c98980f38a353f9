"""The output contract against a bad-input corpus (tests/jobs/corpus.py), through the real job on a local Ray.

Every input sample appears exactly once in its output shard (same key, same order, every carried member byte for
byte, a ``dr2.json`` with the right status); every member that cannot be carried is noted on its sample or on the
unit's stats marker; no output extracts outside its folder; the same input gives the same bytes, whatever the
block and batch settings. Run with ``-s`` to see the table of kinds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.formats.wds import split_member_name
from pipeline.runner.loop import RunSummary, run_restore
from tests.jobs.corpus import MAX_PIXELS, Case, ShardCase, build_corpus

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

Corpus = tuple[Path, list[Case], list[ShardCase]]
ADDRESS = re.compile(r"at 0x[0-9a-fA-F]+")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    cases, shard_cases = build_corpus(root)
    return root, cases, shard_cases


def config(src: Path, dst: Path, **kw: Any) -> PipelineConfig:
    base: dict[str, Any] = {"restorer": RestorerKind.TINY, "N": 4, "tau": 2, "restore_batch_size": 4,
                            "max_pixels": MAX_PIXELS}
    return PipelineConfig(src=str(src / "*.tar"), dst=str(dst), **{**base, **kw})


@pytest.fixture(scope="module")
def runs(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, RunSummary]]:
    """The corpus three times: twice with the same settings, once with other blocks and batches."""
    src = corpus[0]
    settings: list[dict[str, Any]] = [
        {}, {}, {"rows_per_block": 3, "faces_per_block": 1, "detect_batch_size": 1, "block_mb": 1},
    ]
    out = []
    for i, kw in enumerate(settings):
        dst = tmp_path_factory.mktemp(f"run{i}")
        out.append((dst, run_restore(config(src, dst, **kw))))
    return out


def read_output(path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(suffix, bytes)]) in tar order, grouped by WebDataset's rule; every member must be a regular file
    whose name splits into a key and a suffix."""
    out: list[tuple[str, list[tuple[str, bytes]]]] = []
    with tarfile.open(path, encoding="utf-8", errors="strict") as tf:
        for m in tf:
            assert m.isreg(), (path.name, m.name, m.type)
            parts = split_member_name(m.name)
            assert parts is not None, m.name
            f = tf.extractfile(m)
            assert f is not None
            if not out or out[-1][0] != parts[0]:
                out.append((parts[0], []))
            out[-1][1].append((parts[1], f.read()))
    return out


def stats(dst: Path, shard: str) -> dict[str, Any]:
    return json.loads((dst / shard.replace(".tar", ".stats.json")).read_text())


def test_every_kind_once_in_order_with_its_status_and_members(corpus: Corpus, runs: list[Any]) -> None:
    root, cases, shard_cases = corpus
    dst, summary = runs[0]
    rows: list[tuple[str, int, int, int, int, str]] = []
    by_shard: dict[str, list[Case]] = {}
    for c in cases:
        by_shard.setdefault(c.shard, []).append(c)

    for shard, group in by_shard.items():
        out = read_output(dst / shard)
        keys = Counter(k for k, _ in out)
        samples = dict(out)
        # order and uniqueness, shard-wide
        assert [k for k, _ in out] == [c.key for c in group if c.key is not None], shard
        marker = stats(dst, shard)
        input_members = read_input(root / shard)
        assert [n["name"] for n in marker["skipped_members"]] == [n for c in group for n in c.unit_notes], shard
        assert marker["samples"] == len(out) and marker["read_error"] == ""
        for c in group:
            written = keys.get(c.key, 0) if c.key is not None else 0
            reported = c.key is None and all(n in {m["name"] for m in marker["skipped_members"]} for n in c.unit_notes)
            lost = 1 - written - int(reported) if written + int(reported) < 1 else 0
            rows.append((c.kind, 1, written, lost, max(0, written - 1), c.status or "reported in stats"))
            if c.key is None:
                assert reported and written == 0, c.kind
                continue
            assert written == 1, c.kind
            members = samples[c.key]
            meta = json.loads(members[-1][1])
            assert members[-1][0] == "dr2.json" and meta["key"] == c.key, c.kind
            assert meta["status"] == c.status, (c.kind, meta["status"], meta["error"])
            assert [n["name"] for n in meta.get("skipped_members", [])] == c.notes, c.kind
            assert not ADDRESS.search(meta["error"]), (c.kind, meta["error"])  # no object addresses: stable outputs
            assert [s for s, _ in members[:-1]] == c.carried, c.kind  # same members, same order
            written_bytes = dict(members[:-1])
            inputs = input_members.get(c.key, {})
            for suffix in c.carried:
                if c.status == "ok" and suffix == meta["image_member"]:
                    assert written_bytes[suffix] != inputs[suffix], c.kind  # the face was restored
                else:
                    assert written_bytes[suffix] == inputs[suffix], (c.kind, suffix)
            if c.status == "ok":
                assert len(meta["faces"]) >= c.faces, (c.kind, len(meta["faces"]))
            if c.status == "decode_error":
                assert meta["error"], c.kind

    for sc in shard_cases:
        out = read_output(dst / sc.shard)
        marker = stats(dst, sc.shard)
        got = [(k, json.loads(dict(m)["dr2.json"])["status"]) for k, m in out]
        assert got == sc.want, sc.kind
        assert (sc.read_error in marker["read_error"]) if sc.read_error else marker["read_error"] == "", marker
        for k, m in out:
            assert {s: d for s, d in m if s != "dr2.json"} == sc.carried.get(k, {}), (sc.kind, k)
        cut = int(bool(sc.read_error)) * (sc.inputs - len(out))  # samples lost to the damage, in read_error
        rows.append((sc.kind, sc.inputs, len(out), sc.inputs - len(out) - cut,
                     len(out) - len({k for k, _ in out}), ",".join(s for _, s in got) or "(empty shard)"))

    print(f"\n{'kind':<30}{'in':>4}{'out':>5}{'lost':>6}{'dup':>5}  status")
    for kind, n_in, n_out, lost, dup, status in rows:
        print(f"{kind:<30}{n_in:>4}{n_out:>5}{lost:>6}{dup:>5}  {status}")
    print(f"{len(rows)} kinds; run summary: {dict(summary.statuses)}")
    assert len(rows) >= 40
    assert all(lost == 0 and dup == 0 for _, _, _, lost, dup, _ in rows)
    wanted = Counter(c.status for c in cases if c.status) + Counter(s for sc in shard_cases for _, s in sc.want)
    assert summary.statuses == wanted


def read_input(path: Path) -> dict[str, dict[str, bytes]]:
    """The regular members of an input shard as tarfile reads them (names with surrogate escapes), by key and
    suffix, first copy of a repeated name; links, devices and directories are never opened."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tf:
        for m in tf:
            parts = split_member_name(m.name)
            f = tf.extractfile(m) if m.isreg() and parts is not None else None
            if parts is not None and f is not None:
                out.setdefault(parts[0], {}).setdefault(parts[1], f.read())
    return out


def test_input_shards_hold_what_the_cases_say(corpus: Corpus) -> None:
    """The corpus itself, read by webdataset and tarfile: the hostile members really are in the input."""
    root, cases, _ = corpus
    with tarfile.open(root / "c-names.tar", encoding="utf-8", errors="surrogateescape") as tf:
        infos = {m.name: m for m in tf.getmembers()}
    assert infos["names/sym.jpg"].issym() and infos["names/hard.jpg"].islnk()
    assert infos["names/dev.fifo"].isfifo() and infos["names/dev.tty"].ischr() and infos["names/v1.2"].isdir()
    assert "../evil.png" in infos and "/etc/evil.png" in infos and "a/../../evil.png" in infos
    assert "names/caf\udce9.png" in infos  # raw latin-1 bytes, not UTF-8
    formats = {s["__key__"]: s for s in wds.WebDataset(str(root / "c-formats.tar"), shardshuffle=False,
                                                       empty_check=False)}
    assert {k: {s: v for s, v in d.items() if not s.startswith("__")} for k, d in formats.items()} == (
        read_input(root / "c-formats.tar"))
    assert len(formats) == len([c for c in cases if c.shard == "c-formats.tar"])


def test_same_input_same_bytes_whatever_the_blocks(corpus: Corpus, runs: list[Any]) -> None:
    root, _, _ = corpus
    (a, _), (b, _), (c, _) = runs
    shards = sorted(p.name for p in root.glob("*.tar"))
    assert shards == sorted(p.name for p in a.glob("*.tar"))
    for name in shards:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        assert (a / name).read_bytes() == (c / name).read_bytes(), name


def test_outputs_extract_inside_their_folder(runs: list[Any], tmp_path: Path) -> None:
    dst, _ = runs[0]
    for shard in sorted(dst.glob("*.tar")):
        outer = tmp_path / shard.stem
        dest = outer / "dest"
        dest.mkdir(parents=True)
        with tarfile.open(shard) as tf:
            names = tf.getnames()
            tf.extractall(dest, filter="data")
        on_disk = sorted(p.relative_to(outer).as_posix() for p in outer.rglob("*") if not p.is_dir())
        assert on_disk == sorted(f"dest/{n}" for n in names), shard.name
        assert not any(p.is_symlink() for p in outer.rglob("*"))
        by_wds = [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False)]
        assert by_wds == [k for k, _ in read_output(shard)], shard.name  # webdataset reads every sample back


def test_error_texts_are_deterministic(runs: list[Any]) -> None:
    """Errors of broken images reach dr2.json readable and without object addresses, the same in every run."""
    metas = []
    for dst, _ in runs:
        out = dict(read_output(dst / "c-broken.tar"))
        metas.append({k: json.loads(dict(m)["dr2.json"]) for k, m in out.items()})
    # Pillow names the stream with its address (<_io.BytesIO object at 0x...>): scrubbed, the text is stable
    assert metas[0]["bad/random"]["error"] == "not a readable image: cannot identify image file <_io.BytesIO>"
    assert "over the limit" in metas[0]["bad/big"]["error"]
    assert "decompression bomb" in metas[0]["bad/bomb"]["error"]  # refused from the header, before any pixel
    assert metas[0] == metas[1] == metas[2]


def test_config_is_what_the_corpus_expects(corpus: Corpus) -> None:
    root, _, _ = corpus
    cfg = config(root, root / "unused")
    other = dataclasses.replace(cfg, rows_per_block=3, faces_per_block=1, detect_batch_size=1, block_mb=1)
    assert other.output_hash({}) == cfg.output_hash({})  # run 3 must give the same bytes, not just equal stats
