"""DR2Restorer end to end on tiny real models: shapes, determinism, batch independence, the official resize."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from dr2.restorer import (
    FACE_SIZE,
    DR2Restorer,
    FaceRestorer,
    bicubic_resize,
    pil_bicubic_uint8,
    uint8_to_unit,
    unit_to_uint8,
)
from dr2.sparnet import SPARNetConfig
from dr2.unet import UNetConfig
from dr2.weights import ModelKind, save_model_dir

# N=2, tau=89 -> omega=99: 11 UNet steps with the low-pass filter, the cheapest run that exercises Phi_N.
N, TAU = 2, 89


def _faces() -> np.ndarray:
    """Four real 512x512 uint8 RGB images (astronaut crops and flips): (4, 512, 512, 3)."""
    img = data.astronaut()  # (512, 512, 3) uint8
    return np.stack([img, img[::-1], img[:, ::-1], 255 - img]).copy()


@pytest.fixture(scope="module")
def restorer() -> DR2Restorer:
    return DR2Restorer.tiny_random(weights_seed=0, batch_size=4)


@pytest.fixture(scope="module")
def batch_float(restorer: DR2Restorer) -> torch.Tensor:
    return restorer.restore_float(_faces(), ["a", "b", "c", "d"], N=N, tau=TAU)


def test_implements_protocol_and_shapes(restorer: DR2Restorer, batch_float: torch.Tensor) -> None:
    assert isinstance(restorer, FaceRestorer)
    assert batch_float.shape == (4, 3, FACE_SIZE, FACE_SIZE) and batch_float.dtype == torch.float32
    assert float(batch_float.abs().max()) <= 1.0
    out = unit_to_uint8(batch_float)
    assert out.shape == (4, FACE_SIZE, FACE_SIZE, 3) and out.dtype == np.uint8
    assert out.std() > 5  # a real image came out, not a constant
    empty = restorer.restore(np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8), [], N=N, tau=TAU)
    assert empty.shape == (0, FACE_SIZE, FACE_SIZE, 3) and empty.dtype == np.uint8


def test_face_alone_equals_face_in_batch_and_is_deterministic(restorer: DR2Restorer, batch_float: torch.Tensor) -> None:
    faces = _faces()
    alone = restorer.restore_float(faces[1:2], ["b"], N=N, tau=TAU)
    assert float((alone[0] - batch_float[1]).abs().max()) <= 1e-6
    # another batch: face "b" at another position, other neighbours, uint8 path
    other = restorer.restore(faces[[3, 0, 1]], ["d", "x", "b"], N=N, tau=TAU)
    assert np.array_equal(other[2], unit_to_uint8(batch_float)[1])
    assert np.array_equal(other[0], unit_to_uint8(batch_float)[3])
    # the key seeds the noise: the same pixels under another key give another restoration
    assert not np.array_equal(other[1], unit_to_uint8(batch_float)[0])


def test_split_into_chunks_and_no_enhancer() -> None:
    r = DR2Restorer.tiny_random(weights_seed=1, enhancer=False, batch_size=2)
    faces = _faces()[:3]
    keys = ["p", "q", "r"]
    out = r.restore(faces, keys, N=1, tau=94)  # 6 steps; 3 faces = a full chunk and a padded one
    assert out.shape == (3, FACE_SIZE, FACE_SIZE, 3)
    again = r.restore(faces[2:], keys[2:], N=1, tau=94)
    assert np.array_equal(out[2], again[0])
    assert r.describe()["enhancer_name"] == "none" and r.enhancer_size == FACE_SIZE


def test_bad_arguments() -> None:
    # bf16/fp16 autocast now runs on CPU too (issue 8: numerics testable here, tests/dr2/test_fastpath.py)
    with pytest.raises(ValueError, match="precision must be"):
        DR2Restorer.tiny_random(precision="fp8")  # type: ignore[arg-type]
    r = DR2Restorer.tiny_random(batch_size=1, enhancer=False)
    faces = _faces()[:1]
    with pytest.raises(ValueError, match="omega must be in"):
        r.restore(faces, ["a"], N=2, tau=95)  # official rule gives omega = 100, outside the schedule
    with pytest.raises(ValueError, match="faces must be uint8"):
        r.restore(faces.astype(np.float32), ["a"], N=2, tau=0)
    with pytest.raises(ValueError, match="keys"):
        r.restore(faces, ["a", "b"], N=2, tau=0)


def test_downscale_matches_pillow_bicubic() -> None:
    """dr2e.py resizes 512 -> 256 with Pillow BICUBIC on uint8; the restorer reproduces it on the device."""
    img = data.astronaut()
    pil = np.asarray(Image.fromarray(img).resize((256, 256), Image.Resampling.BICUBIC)).astype(np.float64)
    ours = pil_bicubic_uint8(torch.from_numpy(img).permute(2, 0, 1)[None].float(), 256)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - pil).max() <= 1.0 and (ours != pil).mean() < 0.01  # Pillow's fixed-point weights
    # the float filter is Pillow's float ("F" mode) filter exactly
    pil_f = np.asarray(
        Image.fromarray(img[..., 0].astype(np.float32), mode="F").resize((256, 256), Image.Resampling.BICUBIC)
    )
    ours_f = bicubic_resize(torch.from_numpy(img[..., 0]).float()[None, None], 256)[0, 0].numpy()
    assert np.abs(ours_f - pil_f).max() < 1e-3
    assert np.array_equal(unit_to_uint8(uint8_to_unit(img[None], torch.device("cpu")))[0], img)


def test_from_dirs_and_describe(tmp_path: Path) -> None:
    src = DR2Restorer.tiny_random(weights_seed=3, batch_size=1)
    assert src.enhancer is not None
    save_model_dir(src.unet, kind=ModelKind.DDPM, out_dir=tmp_path / "ddpm", source="tiny")
    save_model_dir(src.enhancer, kind=ModelKind.SPARNETHD, out_dir=tmp_path / "sparnethd", source="tiny")
    r = DR2Restorer.from_dirs(tmp_path / "ddpm", tmp_path / "sparnethd", batch_size=1)
    d = r.describe()
    json.dumps(d)  # JSON-serialisable
    saved = json.loads((tmp_path / "ddpm" / "config.json").read_text())
    assert d["ddpm"]["sha256"] == saved["sha256"] and d["ddpm"]["config"] == UNetConfig.tiny().to_dict()
    assert d["enhancer"]["config"] == SPARNetConfig.tiny().to_dict() and len(d["enhancer"]["sha256"]) == 64
    assert d["precision"] == "fp32" and d["restorer"] == "dr2"
    faces = _faces()[:1]
    assert np.array_equal(r.restore(faces, ["k"], N=1, tau=94), src.restore(faces, ["k"], N=1, tau=94))


def test_omega_override_reaches_the_sampler(restorer: DR2Restorer, batch_float: torch.Tensor) -> None:
    """An explicit omega equal to the official rule's gives the same faces; another start step does not."""
    from dr2.diffusion import default_omega

    faces, keys = _faces()[:1], ["a"]
    same = DR2Restorer(unet=restorer.unet, enhancer=restorer.enhancer, batch_size=4, omega=default_omega(N, TAU))
    torch.testing.assert_close(same.restore_float(faces, keys, N=N, tau=TAU), batch_float[:1], rtol=0, atol=0)
    other = DR2Restorer(unet=restorer.unet, enhancer=restorer.enhancer, batch_size=4, omega=TAU)
    assert (other.restore_float(faces, keys, N=N, tau=TAU) - batch_float[:1]).abs().max() > 1e-3
    assert other.describe()["omega"] == TAU
