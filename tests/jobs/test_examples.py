"""The examples in examples/ run as a user runs them (a subprocess, the tiny restorer, a few real photos), and
write what they say they write."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.jobs.archive import encode, no_face_image
from tests.pipeline.photos import astronaut, grace_hopper_bytes

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--restorer", "tiny", "--preset", "mild", "-o", "tau=2", "-o", "omega=4", "-o", "restore_batch_size=4"]


def run_example(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # RAY_ADDRESS=local: the example's ray.init() starts its own Ray, never joins one another process left running
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_restore_one_image_example(tmp_path: Path) -> None:
    src = tmp_path / "astronaut.png"
    src.write_bytes(encode(astronaut(), "PNG"))
    out = tmp_path / "restored.png"
    proc = run_example("restore_one_image.py", str(src), str(out), *FAST)
    assert "astronaut.png: ok" in proc.stdout and "face 0: box (" in proc.stdout
    meta = json.loads((tmp_path / "restored.png.dr2.json").read_text())
    assert meta["status"] == "ok" and len(meta["faces"]) == 1 and meta["restorer"] == "tiny"
    restored = np.asarray(Image.open(out))
    assert restored.shape == (512, 512, 3)
    assert np.abs(restored.astype(int) - astronaut()).mean() > 0.1  # the face was changed (tiny random models)


@pytest.mark.slow
def test_ray_parquet_pipeline_example(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    images = [encode(astronaut(), "PNG"), encode(no_face_image(), "PNG"), grace_hopper_bytes()[:2000]]
    pq.write_table(pa.table({"id": [0, 1, 2], "image": images, "caption": ["astronaut", "gradient", "broken"]}),
                   src / "part-0.parquet")
    proc = run_example("ray_parquet_pipeline.py", str(src), str(tmp_path / "out"), *FAST)
    assert "decode_error: 1, no_face: 1, ok: 1" in proc.stdout
    table = pq.read_table(tmp_path / "out").sort_by("id")
    assert table.column("id").to_pylist() == [0, 1, 2]  # every row, the broken one included
    assert table.column("caption").to_pylist() == ["astronaut", "gradient", "broken"]
    assert table.column("image").to_pylist() == images  # the input column unchanged
    assert table.column("dr2_status").to_pylist() == ["ok", "no_face", "decode_error"]
    restored = table.column("restored_image").to_pylist()
    assert restored[1:] == images[1:]  # nothing to restore: the input's bytes, as dr2 restore writes them
    out = np.asarray(Image.open(io.BytesIO(restored[0])))
    assert out.shape == (512, 512, 3) and np.abs(out.astype(int) - astronaut()).mean() > 0.1
    metas = [json.loads(m) for m in table.column("dr2").to_pylist()]
    assert [m["status"] for m in metas] == ["ok", "no_face", "decode_error"] and len(metas[0]["faces"]) == 1
