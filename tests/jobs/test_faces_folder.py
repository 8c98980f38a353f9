"""``dr2 restore-faces`` (jobs/faces_folder.py) on the tiny random models: a folder of faces of any size in, one
512-px PNG per face out, equal to the library's restorer on the same input; what is refused before any work.
(tests/jobs/test_cli.py's slow test runs the command on imported weights.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dr2.restorer import DR2Restorer
from jobs.faces_folder import restore_folder
from tests.pipeline.photos import astronaut

SETTINGS: dict[str, Any] = {"N": 1, "tau": 94, "seed": 0, "device": "cpu", "precision": "fp32"}  # 6 UNet calls a face


def test_a_folder_of_faces_is_restored_like_the_library_does(tmp_path: Path) -> None:
    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(astronaut()[:480, 16:496]).save(faces / "a.png")  # 480 x 480: resized to 512 first
    (faces / "notes.txt").write_text("not a face")
    n = restore_folder(faces, tmp_path / "out", ddpm="", enhancer="none", tiny=True, batch_size=2, **SETTINGS)
    assert n == 1 and [p.name for p in (tmp_path / "out").iterdir()] == ["a.png"]
    restored = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert restored.shape == (512, 512, 3)
    library = DR2Restorer.tiny_random(batch_size=2, seed=0)  # --tiny: the tiny DDPM and enhancer, random weights
    face = np.asarray(Image.open(faces / "a.png").resize((512, 512), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(library.restore(face[None], ["a.png"], N=1, tau=94)[0], restored)


def test_an_empty_folder_and_missing_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no images"):
        restore_folder(tmp_path, tmp_path / "out", ddpm="", enhancer="none", tiny=True, batch_size=2, **SETTINGS)
    Image.new("RGB", (64, 64)).save(tmp_path / "f.png")
    with pytest.raises(ValueError, match="--ddpm is required"):
        restore_folder(tmp_path, tmp_path / "out", ddpm="", enhancer="none", tiny=False, batch_size=1, **SETTINGS)
    assert not (tmp_path / "out").exists()
