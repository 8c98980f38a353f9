"""The command line: help texts, options generated from PipelineConfig, presets, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import main
from jobs.configargs import dataclass_from_args
from jobs.parser import build_parser
from pipeline.config import FaceSelect, PipelineConfig, RestorerKind, load_preset


def test_every_config_field_is_an_option_with_help() -> None:
    parser = build_parser()
    args = parser.parse_args(["restore", "in", "out"])
    cfg = dataclass_from_args(PipelineConfig, args, src=args.src, dst=args.dst)
    assert cfg == PipelineConfig(src="in", dst="out")  # defaults survive the round trip exactly


def test_options_parse_to_typed_config() -> None:
    args = build_parser().parse_args(
        ["restore", "a", "b", "--N", "4", "--tau", "22", "--omega", "30", "--select", "largest", "--restorer",
         "passthrough", "--overwrite", "--detect-max-side", "none", "--gpus-per-restorer", "0.5"])
    cfg = dataclass_from_args(PipelineConfig, args, src=args.src, dst=args.dst)
    assert (cfg.N, cfg.tau, cfg.omega) == (4, 22, 30)
    assert cfg.select is FaceSelect.LARGEST and cfg.restorer is RestorerKind.PASSTHROUGH
    assert cfg.overwrite is True and cfg.detect_max_side is None and cfg.gpus_per_restorer == 0.5


def test_preset_sets_defaults_and_explicit_values_win() -> None:
    severe = load_preset("severe")
    assert severe == {"N": 16, "tau": 35}
    args = build_parser(severe).parse_args(["restore", "a", "b", "--tau", "10"])
    assert (args.N, args.tau) == (16, 10)


def test_output_hash_ignores_execution_settings_only() -> None:
    base = PipelineConfig(src="a", dst="b")
    same = PipelineConfig(src="x", dst="y", restore_actors=8, gpus_per_restorer=1.0, overwrite=True)
    other = PipelineConfig(src="a", dst="b", tau=10)
    assert base.output_hash({}) == same.output_hash({})
    assert base.output_hash({}) != other.output_hash({})
    assert base.output_hash({"ddpm_sha256": "1"}) != base.output_hash({"ddpm_sha256": "2"})


def test_dr2_without_weights_is_refused_with_instructions(tmp_path, capsys) -> None:
    (tmp_path / "in").mkdir()
    code = main(["restore", str(tmp_path / "in"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--ddpm" in err and "dr2 weights import" in err and "passthrough" in err


@pytest.mark.parametrize("command", ["restore", "demo", "restore-faces", "verify-fixtures", "weights", "bench",
                                     "estimate"])
def test_help_runs_for_every_command_without_importing_torch_or_ray(command: str) -> None:
    # a fresh interpreter each: `dr2 COMMAND --help` (and the parsing every command starts with) costs a third of a
    # second; torch alone would add a second, and the workers of a run never need the CLI's parser
    probe = ("import sys\nfrom jobs.cli import main\ntry:\n    main([sys.argv[1], '--help'])\nexcept SystemExit:\n"
             "    pass\nprint('imported:', [m for m in ('torch', 'ray') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe, command], capture_output=True, text=True, check=True).stdout
    assert "usage: dr2" in out and "imported: []" in out


@pytest.mark.slow  # every golden fixture through the tiny models (dr2/test_verify.py covers verify.py fast)
def test_verify_fixtures_passes_on_the_shipped_fixtures(capsys) -> None:
    assert main(["verify-fixtures"]) == 0
    table = capsys.readouterr().out
    assert "dr2_trajectory" in table or "trajectory" in table
    assert "FAIL" not in table.upper().replace("FAILED: 0", "")


@pytest.mark.slow  # imports a checkpoint and restores two photos end to end
def test_weights_import_then_restore_faces(tmp_path, capsys, dr2_reference) -> None:
    """An official-layout checkpoint (flat state dict, torch.save) imports, and restore-faces runs on it."""
    import numpy as np
    import torch
    from PIL import Image

    from dr2.restorer import DR2Restorer
    from tests.pipeline.photos import astronaut, grace_hopper

    tiny = DR2Restorer.tiny_random(weights_seed=5)
    ckpt = tmp_path / "DR2_FFHQ.pkl"
    torch.save(tiny.unet.state_dict(), ckpt)
    # the default architecture is the official full-size one: a tiny file is refused, naming what differs
    assert main(["weights", "import", str(ckpt), "--kind", "ddpm", "--out", str(tmp_path / "x")]) == 2
    assert "missing" in capsys.readouterr().err.lower()
    config = dr2_reference / "unet_small_config.json"
    assert main(["weights", "import", str(ckpt), "--kind", "ddpm", "--out", str(tmp_path / "ddpm"),
                 "--config", str(config)]) == 0
    assert (tmp_path / "ddpm" / "model.safetensors").is_file()

    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(astronaut()[:480, 16:496]).save(faces / "a.png")
    Image.fromarray(grace_hopper()[:400, :400]).save(faces / "b.jpg")
    assert main(["restore-faces", str(faces), str(tmp_path / "out"), "--ddpm", str(tmp_path / "ddpm"),
                 "--enhancer", "none", "--N", "4", "--tau", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    outs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in outs] == ["a.png", "b.png"]
    restored = np.asarray(Image.open(outs[0]))
    assert restored.shape == (512, 512, 3)
    # the command is the library's face path: same weights, no enhancer, same key (the file name) and batch shape
    library = DR2Restorer.tiny_random(weights_seed=5, enhancer=False, batch_size=2)
    face = np.asarray(Image.open(faces / "a.png").resize((512, 512), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(library.restore(face[None], ["a.png"], N=4, tau=2)[0], restored)


@pytest.mark.parametrize(("kw", "message"), [
    ({"tau": 100}, "tau must be in 0..99"),
    ({"N": 16, "tau": 75}, "official rule gives 100"),
    ({"tau": 30, "omega": 20}, "omega must be in tau..99"),
    ({"N": 0}, "must be a power of two"),
    ({"N": 3}, "must be a power of two"),
])
def test_dr2_settings_out_of_range_are_refused_up_front(kw, message) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineConfig(src="a", dst="b", **kw)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_errors_name_the_problem_and_the_fix(tmp_path, capsys) -> None:
    """What a newcomer tripped on: each failure is one line on stderr that says what to do (no traceback)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"\x89PNG not really")
    dst_file = tmp_path / "out.txt"
    dst_file.write_text("I am a file")
    cases = [
        (["restore", str(src), str(dst_file), "--restorer", "passthrough"], "choose a folder"),
        (["restore", str(src), str(tmp_path / "o"), "--ddpm", str(tmp_path / "empty"), "--enhancer", "none"],
         "dr2 weights import"),
        (["restore", str(src), str(tmp_path / "o")], "--restorer dr2 needs --ddpm"),
        (["restore", str(tmp_path / "nothing-here"), str(tmp_path / "o"), "--restorer", "passthrough"],
         "no such file or directory"),
        (["restore", str(src), str(tmp_path / "o"), "--N", "3"], "power of two"),
        (["restore", str(src), str(tmp_path / "o"), "--tau", "30", "--omega", "20"], "pass an --omega in that range"),
    ]
    (tmp_path / "empty").mkdir()
    for args, hint in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args, out, err)
        assert hint in err and "Traceback" not in err and err.count("\n") == 1, (args, err)


def test_unknown_preset_shows_the_restore_usage(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["restore", "a", "b", "--preset", "brutal"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "restore" in err and "SRC" in err.upper() and "mild" in err


def test_version_and_dry_run(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "dr2-pipeline" in capsys.readouterr().out
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"s{i}.tar").write_bytes(b"")
    code, out, _ = run_cli(["restore", str(src), str(tmp_path / "dst"), "--restorer", "passthrough", "--dry-run",
                            "--limit", "2"], capsys)
    assert code == 0 and "3 unit(s)" in out and "2 to do" in out and "s0.tar" in out
    assert not (tmp_path / "dst").exists()  # a dry run writes nothing


def test_top_level_help_reads_as_text(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "nightly" in out and "check-output" in out
