"""``dr2 restore`` end to end on a local Ray: real shards in, real shards out, read back with webdataset.

Each test proves a line of the output contract: every sample once, same keys and order, members passed
through byte for byte, statuses, stats markers, resume, refusal of a changed config, determinism, plain
images with manifests.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.runner.loop import ConfigChangedError, run_restore
from tests.jobs.archive import assert_shard_matches_input, build_archive

pytestmark = pytest.mark.usefixtures("ray_local")


def read_shard(path: Path) -> list[dict[str, Any]]:
    return list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))


def read_input(path: Path) -> list[dict[str, Any]]:
    # the truncated shard needs the library's own recovery handler
    return list(wds.WebDataset(str(path), shardshuffle=False, handler=wds.warn_and_continue, empty_check=False))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[str, str]]]]:
    root = tmp_path_factory.mktemp("archive")
    return root, build_archive(root)


def config(src: Path, dst: Path, **kw: Any) -> PipelineConfig:
    base = {"restorer": RestorerKind.TINY, "N": 4, "tau": 2, "detect_batch_size": 4, "restore_batch_size": 4}
    return PipelineConfig(src=str(src / "shard-{000..002}.tar"), dst=str(dst), **{**base, **kw})


@pytest.fixture(scope="module")
def first_run(archive: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    src, _ = archive
    dst = tmp_path_factory.mktemp("out")
    summary = run_restore(config(src, dst))
    return dst, summary


def test_every_sample_once_same_order_members_kept(archive, first_run) -> None:
    src, expected = archive
    dst, summary = first_run
    assert summary.units_done == 3 and summary.samples == 9
    for shard, want in expected.items():
        inputs = {s["__key__"]: s for s in read_input(src / shard)}
        assert_shard_matches_input(read_shard(dst / shard), inputs, want, shard)


def test_restored_samples_carry_faces_and_differ_from_input(archive, first_run) -> None:
    src, _ = archive
    dst, _ = first_run
    out = {s["__key__"]: s for s in read_shard(dst / "shard-001.tar")}
    inputs = {s["__key__"]: s for s in read_input(src / "shard-001.tar")}
    for key in ("people/hopper_x8", "people/astronaut_rgba"):
        meta = json.loads(out[key]["dr2.json"])
        assert len(meta["faces"]) >= 1
        face = meta["faces"][0]
        assert len(face["box"]) == 4 and len(face["landmarks"]) == 5 and len(face["affine"]) == 2
        assert (meta["N"], meta["tau"], meta["seed"]) == (4, 2, 0)
        member = meta["image_member"]
        before = np.asarray(Image.open(io.BytesIO(inputs[key][member])))
        after = np.asarray(Image.open(io.BytesIO(out[key][member])))
        assert before.shape == after.shape  # same size, same channels (alpha kept on the PNG)
        assert np.abs(before.astype(int) - after.astype(int)).mean() > 0.5  # the tiny model changed the face
    rgba = np.asarray(Image.open(io.BytesIO(out["people/astronaut_rgba"]["png"])))
    assert rgba.shape[2] == 4 and (rgba[..., 3] == 200).all()


def test_stats_marker_counts(first_run) -> None:
    dst, _ = first_run
    stats = json.loads((dst / "shard-000.stats.json").read_text())
    assert stats["samples"] == 4
    assert stats["statuses"] == {"ok": 1, "no_face": 1, "decode_error": 1, "no_image": 1}
    assert stats["faces"] >= 1 and stats["config_hash"]
    damaged = json.loads((dst / "shard-002.stats.json").read_text())
    assert damaged["samples"] == 3 and "truncated" in damaged["read_error"]
    resolved = json.loads((dst / "_dr2" / "config.json").read_text())
    assert resolved["config"]["tau"] == 2 and resolved["config_hash"] == stats["config_hash"]
    assert not list(dst.glob("_dr2_staging/**/*.part"))  # parts are gone once committed


def test_rerun_is_a_noop_and_a_changed_config_is_refused(archive, first_run) -> None:
    src, _ = archive
    dst, _ = first_run
    before = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    again = run_restore(config(src, dst))
    assert again.units_skipped == 3 and again.units_done == 0
    assert {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")} == before
    with pytest.raises(ConfigChangedError, match="--overwrite"):
        run_restore(config(src, dst, tau=3))


def test_same_input_gives_byte_identical_shards_and_resume_after_interruption(archive, first_run, tmp_path) -> None:
    src, _ = archive
    dst, _ = first_run
    cfg = config(src, tmp_path, detect_batch_size=3)  # other batches through Ray, same output
    run_restore(cfg)
    for shard in ("shard-000.tar", "shard-001.tar", "shard-002.tar"):
        assert (tmp_path / shard).read_bytes() == (dst / shard).read_bytes(), shard
    # interrupted: shard-001 was never committed and a stale part from an older run lies in its staging
    (tmp_path / "shard-001.tar").unlink()
    (tmp_path / "shard-001.stats.json").unlink()
    stale = tmp_path / "_dr2_staging" / "shard-001"
    stale.mkdir(parents=True)
    (stale / "000000000-000000001.part").write_bytes(b"garbage from an older config")
    resumed = run_restore(cfg)
    assert resumed.units_done == 1 and resumed.units_skipped == 2
    assert (tmp_path / "shard-001.tar").read_bytes() == (dst / "shard-001.tar").read_bytes()


def test_overwrite_redoes_under_a_new_config(archive, tmp_path) -> None:
    src, _ = archive
    run_restore(config(src, tmp_path, restorer=RestorerKind.PASSTHROUGH))
    redo = run_restore(config(src, tmp_path, restorer=RestorerKind.PASSTHROUGH, tau=5, overwrite=True))
    assert redo.units_done == 3
    meta = [json.loads(s["dr2.json"]) for s in read_shard(tmp_path / "shard-000.tar")]
    assert {m["tau"] for m in meta} == {5}


def test_plain_images_mirror_paths_with_manifests(tmp_path) -> None:
    from tests.jobs.archive import encode, no_face_image
    from tests.pipeline.photos import astronaut, degrade

    src = tmp_path / "photos"
    (src / "2024" / "trip").mkdir(parents=True)
    (src / "2024" / "trip" / "astro.jpg").write_bytes(encode(degrade(astronaut(), 4, seed=3)))
    (src / "2024" / "plain.png").write_bytes(encode(no_face_image(), "PNG"))
    (src / "notes.txt").write_bytes(b"not an image")
    (src / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    dst = tmp_path / "restored"
    summary = run_restore(dataclasses.replace(config(src, dst), src=str(src), images_per_chunk=2))
    layout = json.loads((dst / "_dr2" / "layout.json").read_text())
    assert layout == {"chunks": 2}  # 3 images, 2 per chunk; images are hashed into chunks by path
    assert 1 <= summary.units_done <= 2 and summary.samples == 3
    assert (dst / "2024" / "trip" / "astro.jpg").is_file() and (dst / "2024" / "plain.png").is_file()
    assert (dst / "bad.jpg").read_bytes() == (src / "bad.jpg").read_bytes()
    assert not (dst / "notes.txt").exists()
    lines = [json.loads(line) for p in sorted((dst / "_dr2" / "manifests").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert {m["key"]: m["status"] for m in lines} == {
        "2024/plain.png": "no_face", "2024/trip/astro.jpg": "ok", "bad.jpg": "decode_error"}
    assert len(list((dst / "_dr2" / "manifests").glob("*.stats.json"))) == summary.units_done


def test_growing_image_folder_stays_exact(tmp_path) -> None:
    """Images added (one sorting first), changed and removed between runs: the rerun redoes only the chunks whose
    membership or inputs changed, writes the new image, and no image is listed in two manifests or lost."""
    from tests.jobs.archive import encode, no_face_image

    src, dst = tmp_path / "photos", tmp_path / "restored"
    src.mkdir()
    for i in range(12):
        (src / f"img{i:02d}.png").write_bytes(encode(no_face_image(i)[:40, :40], "PNG"))
    cfg = dataclasses.replace(config(src, dst), src=str(src), images_per_chunk=3, restorer=RestorerKind.PASSTHROUGH)
    first = run_restore(cfg)
    assert first.samples == 12

    def manifests() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in sorted((dst / "_dr2" / "manifests").glob("*.jsonl")):
            for line in p.read_text().splitlines():
                out.setdefault(json.loads(line)["key"], []).append(p.name)
        return out

    before = manifests()
    (src / "000-new.png").write_bytes(encode(no_face_image(99)[:40, :40], "PNG"))  # sorts first
    (src / "img05.png").write_bytes(encode(no_face_image(55)[:40, :40], "PNG"))  # changed
    (src / "img07.png").unlink()  # removed
    second = run_restore(cfg)
    after = manifests()
    assert sorted(after) == sorted([k for k in before if k != "img07.png"] + ["000-new.png"])
    assert all(len(v) == 1 for v in after.values())  # never listed twice
    assert (dst / "000-new.png").read_bytes() == (src / "000-new.png").read_bytes()
    assert (dst / "img05.png").read_bytes() == (src / "img05.png").read_bytes()
    changed = {before[k][0] for k in ("img05.png", "img07.png")} | {after["000-new.png"][0]}
    assert second.units_done == len(changed) and second.units_skipped == second.units_total - len(changed)
    for k, v in after.items():  # every image kept its chunk
        assert k not in before or before[k] == v


def test_refused_image_paths_are_listed_in_their_chunk_markers(tmp_path) -> None:
    """A symlinked image (never followed) and a name that is not UTF-8 are not inputs, but they are not lost without
    a word: each is listed, escaped, with its reason in the marker of the chunk its path hashes to, even a chunk
    that holds nothing else; the rerun is a no-op."""
    import os

    from tests.jobs.archive import encode, no_face_image

    src, dst = tmp_path / "photos", tmp_path / "restored"
    src.mkdir()
    (src / "real.png").write_bytes(encode(no_face_image(1)[:40, :40], "PNG"))
    (src / "link.png").symlink_to(src / "real.png")
    latin1 = os.fsencode(src) + b"/caf\xe9.png"  # a latin-1 name: not valid UTF-8
    with open(latin1, "wb") as f:
        f.write(encode(no_face_image(2)[:40, :40], "PNG"))
    cfg = dataclasses.replace(config(src, dst), src=str(src), images_per_chunk=1, restorer=RestorerKind.PASSTHROUGH)
    summary = run_restore(cfg)
    assert summary.samples == 1 and summary.failed == {}
    markers = [json.loads(p.read_text()) for p in sorted((dst / "_dr2" / "manifests").glob("*.stats.json"))]
    refused = sorted((r["name"], r["reason"]) for m in markers for r in m["refused"])
    assert refused == [("caf\\xe9.png", "name is not valid UTF-8"), ("link.png", "a symbolic link (not followed)")]
    assert sum(m["samples"] for m in markers) == 1 and not (dst / "link.png").exists()
    assert run_restore(cfg).units_done == 0

    only = tmp_path / "only-links"
    only.mkdir()
    (only / "a.jpg").symlink_to(src / "real.png")
    out = tmp_path / "out-links"
    summary = run_restore(dataclasses.replace(cfg, src=str(only), dst=str(out)))
    assert summary.units_done == 1 and summary.samples == 0
    (marker,) = [json.loads(p.read_text()) for p in (out / "_dr2" / "manifests").glob("*.stats.json")]
    assert marker["refused"] == [{"name": "a.jpg", "reason": "a symbolic link (not followed)"}]


def test_busy_fractions_in_markers_summary_and_report(first_run) -> None:
    """Every run records how much of its actors' wall time went to work, per stage: in each marker (the run so far),
    the summary and the report (a stage-utilisation table)."""
    dst, summary = first_run
    for stage in ("detect", "restore"):
        b = summary.busy[stage]
        assert b["actors"] == 1 and 0 < b["busy_s"] <= b["wall_s"] and 0 < b["fraction"] <= 1, b
        assert abs(b["fraction"] - b["busy_s"] / b["wall_s"]) < 1e-3
        assert b["steady_s"] <= b["wall_s"] and b["steady_fraction"] >= b["fraction"] - 1e-3
        w = b.get("waits")
        if w:  # an actor that had more than one block: its waits fit in the steady time it was not busy
            assert w["count"] >= 1 and 0 <= w["total_s"] <= b["steady_s"] - b["busy_s"] + 0.01, b
            assert 0 <= w["median_ms"] <= w["p90_ms"], b
    assert "restore busy" in summary.table() and "detect busy" in summary.table()
    markers = [json.loads(p.read_text()) for p in sorted(dst.glob("*.stats.json"))]
    assert all(set(m["busy"]) <= {"detect", "restore"} for m in markers)
    assert any(m["busy"].get("restore", {}).get("busy_s", 0) > 0 for m in markers)  # a snapshot taken mid-run
    report = json.loads((dst / "_dr2" / "report" / "report.json").read_text())
    assert report["busy"] == summary.busy and report["pools"]["restore"]["max_actors"] == 1
    html = (dst / "_dr2" / "report" / "index.html").read_text()
    assert 'data-busy="restore"' in html and 'data-busy="detect"' in html and "Stage utilisation" in html
    assert "waits between blocks" in html


def test_autoscaling_pools_grow_on_demand_and_never_shrink_mid_run(archive, tmp_path) -> None:
    """An autoscaling pool (passthrough on two cores: one to two detectors, capacity.plan_pools) keeps the actors it
    grew to until its input ends. Ray Data's default shrinks a pool as soon as it is half used and starts a new actor,
    a model load, once blocks queue again (build.NEVER_SHRINK): a run then saw more detector actors than its pool
    holds (4 for a pool of 2, benchmarks/bench_capacity.py)."""
    from pipeline.graph.build import NEVER_SHRINK, build_dataset, stream_summaries
    from pipeline.graph.models import model_identity
    from pipeline.runner.loop import plan_units

    src, _ = archive
    cfg = config(src, tmp_path / "out", restorer=RestorerKind.PASSTHROUGH)
    graph = build_dataset(plan_units(cfg), cfg, model_identity(cfg), "0" * 64)
    assert (graph.pools.detect.min_actors, graph.pools.detect.max_actors) == (1, 2)
    assert graph.ds.context.autoscaling_config.actor_pool_util_downscaling_threshold == NEVER_SHRINK < 0
    parts = list(stream_summaries(graph))
    assert {p["unit"] for p in parts} == {f"shard-{i:03d}.tar" for i in range(3)}
    assert 1 <= graph.busy["detect"]["actors"] <= graph.pools.detect.max_actors, graph.busy


def test_simulated_restorer_says_so_everywhere(archive, tmp_path) -> None:
    """--restorer simulate passes faces through after a stated time per face, and every output, the summary and the
    report say that these are not restorations."""
    src, _ = archive
    cfg = config(src, tmp_path, restorer=RestorerKind.SIMULATE, simulate_faces_per_s=50.0)
    summary = run_restore(cfg)
    assert summary.faces >= 1 and "NOT a restoration" in summary.simulated and "SIMULATED" in summary.table()
    samples = read_shard(tmp_path / "shard-000.tar")
    metas = [json.loads(s["dr2.json"]) for s in samples]
    assert all("NOT a restoration" in m["simulated"] and m["models"]["restorer"] == "simulate" for m in metas)
    assert summary.stage_seconds["restore"] >= summary.faces / 50.0 * 0.9  # it took the time it was told to
    html = (tmp_path / "_dr2" / "report" / "index.html").read_text()
    assert "SIMULATED RESTORER" in html
