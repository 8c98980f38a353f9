"""verify_fixtures: passes on the golden fixtures, fails when one reference array is perturbed."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dr2.verify import FixtureResult, format_table, verify_fixtures


def test_all_golden_fixtures_pass(dr2_reference: Path) -> None:
    results = verify_fixtures(dr2_reference)
    failed = [r for r in results if not r.passed]
    assert not failed, format_table(failed)
    names = {r.name for r in results}
    for expected in (
        "manifest/ddpm_unet",
        "manifest/sparnethd",
        "unet_small/out",
        "unet_small/temb",
        "sparnethd_small/out",
        "resizer/lowpass_N8",
        "respacing/timestep_map",
        "respacing/omega_table",
        "trajectory/out",
        "trajectory/model_out_002",
        "trajectory/noise_consumed",
    ):
        assert expected in names
    assert format_table(results).endswith(f"{len(results)}/{len(results)} passed")


def test_perturbed_array_fails(dr2_reference: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fixtures"
    copy.mkdir()
    for name in ("sparnethd_small_config.json", "sparnethd_small_weights.npz", "sparnethd_small_io.npz", "resizer.npz"):
        shutil.copyfile(dr2_reference / name, copy / name)
    with np.load(copy / "resizer.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["lowpass_N4"] = arrays["lowpass_N4"].copy()
    arrays["lowpass_N4"][1, 2, 30, 31] += 1e-3  # one value, about 1e-3 relative
    np.savez_compressed(copy / "resizer.npz", **arrays)

    results = verify_fixtures(copy)
    failed = [r.name for r in results if not r.passed]
    assert failed == ["resizer/lowpass_N4"]
    table = format_table(results)
    assert "FAIL" in table and "1 FAILED" in table
    assert any(r.name == "sparnethd_small/out" and r.passed for r in results)


def test_missing_or_broken_fixtures(tmp_path: Path, dr2_reference: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no DR2 golden fixtures"):
        verify_fixtures(tmp_path)
    shutil.copyfile(dr2_reference / "sparnethd_small_config.json", tmp_path / "sparnethd_small_config.json")
    shutil.copyfile(dr2_reference / "unet_small_weights.npz", tmp_path / "sparnethd_small_weights.npz")  # wrong file
    shutil.copyfile(dr2_reference / "sparnethd_small_io.npz", tmp_path / "sparnethd_small_io.npz")
    results = verify_fixtures(tmp_path)
    assert results == [FixtureResult("sparnethd_small", float("inf"), 0.0, False, results[0].detail)]
    assert "missing keys" in results[0].detail
