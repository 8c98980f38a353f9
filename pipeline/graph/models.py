"""Building the models a stage holds, the one place: the MTCNN detector, the face restorer, and the node-local cache
of model directories that live on S3.

Device choice lives here, not in ``dr2`` (which never picks a device): ``auto`` means CUDA when this
process can see a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` for an actor given ``num_gpus``), else CPU.
Model directories given as ``s3://`` URIs are copied to a node-local cache and checksum-verified first
(:func:`localize_model_dir`). ``dr2 restore`` (through :func:`restorer_from_config`) and ``dr2 restore-faces``
both build their restorer with :func:`build_restorer`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import PipelineConfig, RestorerKind
from pipeline.store import storage
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from dr2.restorer import FaceRestorer
    from pipeline.imaging.mtcnn import MTCNN

# torch, dr2 and the detector are imported inside the builders: the driver calls model_identity() and
# check_restorer_config() only, and should not pay seconds and hundreds of MiB for what only actors use.

log = logging.getLogger(__name__)

WEIGHTS_HELP = (
    "DR2 needs its weights: download DR2_FFHQ.pkl and SPARNetHD_FFHQ_DR2aug.pth from the links in the official "
    "repository (Kaldwin0106/DR2_Drgradation_Remover, readme), then run `dr2 weights import DR2_FFHQ.pkl --kind ddpm "
    "--out models/ddpm` and `dr2 weights import SPARNetHD_FFHQ_DR2aug.pth --kind sparnethd --out models/sparnethd`, "
    "and pass --ddpm models/ddpm --enhancer models/sparnethd. To check detection and alignment without weights, "
    "use --restorer passthrough."
)


def model_cache_root() -> Path:
    """Where s3:// model dirs are cached on this node."""
    return Path(os.environ.get("DR2_CACHE", Path(tempfile.gettempdir()) / "dr2-cache"))


def pick_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but this process sees no CUDA device")
    return torch.device(device)


def check_restorer_config(cfg: PipelineConfig) -> None:
    """Refuse to run DR2 without weights, saying how to get them."""
    if cfg.restorer is RestorerKind.DR2 and (not cfg.ddpm or not cfg.enhancer):
        missing = " and ".join(n for n, v in (("--ddpm", cfg.ddpm), ("--enhancer", cfg.enhancer)) if not v)
        raise ValueError(f"--restorer dr2 needs {missing}. {WEIGHTS_HELP}")


def build_detector(cfg: PipelineConfig, device: torch.device) -> MTCNN:
    from pipeline.imaging.mtcnn import MTCNNConfig, load_mtcnn

    mtcnn_cfg = MTCNNConfig(
        min_face_size=max(12, cfg.min_face_size),
        thresholds=(0.6, 0.7, cfg.detect_threshold),
        max_side=cfg.detect_max_side,
    )
    return load_mtcnn(mtcnn_cfg, device=device)


def build_restorer(*, kind: RestorerKind, ddpm: str, enhancer: str, device: torch.device, precision: str, seed: int,
                   batch_size: int, omega: int | None, options: StorageOptions | None = None,
                   fast: dict[str, Any] | None = None, simulate_faces_per_s: float = 34.0) -> FaceRestorer:
    """The face restorer of ``kind``; for DR2, model dirs (local or s3://) are localized and verified first.

    ``enhancer`` ``"none"`` (or empty) means bicubic upsampling instead of SPARNetHD. ``fast`` holds the GPU fast
    path's choices (``attention``, ``channels_last``, ``compile``: see :class:`dr2.restorer.DR2Restorer`).
    """
    from dr2.restorer import DR2Restorer, PassthroughRestorer

    if kind is RestorerKind.PASSTHROUGH:
        return PassthroughRestorer()
    if kind is RestorerKind.SIMULATE:
        from pipeline.graph.simulate import SimulatedRestorer

        return SimulatedRestorer(faces_per_s=simulate_faces_per_s, batch_size=batch_size)
    if kind is RestorerKind.TINY:
        return DR2Restorer.tiny_random(device=device, precision=precision, seed=seed, batch_size=batch_size,
                                       omega=omega, **(fast or {}))
    if not ddpm:
        raise ValueError(f"--ddpm is required. {WEIGHTS_HELP}")
    cache = model_cache_root()
    ddpm_dir = localize_model_dir(ddpm, cache, options=options)
    enhancer_dir = None if enhancer in ("", "none") else localize_model_dir(enhancer, cache, options=options)
    return DR2Restorer.from_dirs(ddpm_dir, enhancer_dir, device=device, precision=precision, seed=seed,
                                 batch_size=batch_size, omega=omega, **(fast or {}))


def restorer_from_config(cfg: PipelineConfig, device: torch.device) -> FaceRestorer:
    check_restorer_config(cfg)
    return build_restorer(kind=cfg.restorer, ddpm=cfg.ddpm, enhancer=cfg.enhancer, device=device,
                          precision=cfg.precision, seed=cfg.seed, batch_size=cfg.restore_batch_size,
                          omega=cfg.resolved_omega, options=cfg.storage_options(),
                          fast={"attention": cfg.attention, "channels_last": cfg.channels_last, "compile": cfg.compile},
                          simulate_faces_per_s=cfg.simulate_faces_per_s)


def _model_config(model_dir: str, options: StorageOptions) -> dict[str, Any]:
    try:
        blob: dict[str, Any] = json.loads(storage.read_bytes(f"{model_dir.rstrip('/')}/config.json", options=options))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{model_dir} is not a model directory (no config.json): make one with `dr2 weights import` ("
            f"{WEIGHTS_HELP})") from None
    return blob


def model_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """The models' identity without loading them: restorer kind and weight checksums (from config.json)."""
    check_restorer_config(cfg)
    if cfg.restorer is RestorerKind.DR2:
        opts = cfg.storage_options()
        ddpm = _model_config(cfg.ddpm, opts)
        size = int(ddpm.get("config", {}).get("image_size", 0) or 0)
        if size and size % cfg.N:
            raise ValueError(f"--N {cfg.N} does not divide the DDPM's image size {size}: use a power of two up to "
                             f"{size}")
        return {
            "restorer": "dr2",
            "ddpm_sha256": str(ddpm["sha256"]),
            "enhancer_sha256": "none" if cfg.enhancer == "none" else str(_model_config(cfg.enhancer, opts)["sha256"]),
        }
    if cfg.restorer is RestorerKind.SIMULATE:  # in every dr2.json: these outputs are not restorations
        from pipeline.graph.simulate import SIMULATED_NOTE

        return {"restorer": "simulate", "faces_per_s": cfg.simulate_faces_per_s,
                "note": SIMULATED_NOTE.format(rate=cfg.simulate_faces_per_s)}
    return {"restorer": cfg.restorer.value}


# --- the node-local cache of s3:// model directories ---------------------------------------------

MODEL_FILES = ("config.json", "model.safetensors")
SHA256_KEY = "sha256"


def _download(uri: str, dest: Path, options: StorageOptions | None) -> str:
    """Stream ``uri`` to a temp file beside ``dest``, rename it onto ``dest``; returns the sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    h = hashlib.sha256()
    try:
        with storage.open_read(uri, options=options) as src, open(tmp, "wb") as out:
            while chunk := src.read(8 * storage.MiB):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def localize_model_dir(uri: str, cache_root: str | Path, *, options: StorageOptions | None = None) -> Path:
    """A local directory holding the model at ``uri`` (``config.json`` + ``model.safetensors``).

    A local directory is returned as is. For ``s3://``, both files are downloaded into
    ``cache_root/<sha256(uri)[:16]>/`` and ``model.safetensors`` is checked against the sha256 that
    ``config.json`` records under ``"sha256"``. A cached copy whose hash matches is reused; a
    mismatch is downloaded once more, and a second mismatch raises :class:`StorageError` (the weights
    or the recorded hash are wrong). Safe with several processes on one node: a file lock serialises
    them and every file lands by download-to-temp + rename.
    """
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {uri}")
        return path
    cache_dir = Path(cache_root) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _localize_locked(uri.rstrip("/"), cache_dir, options)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _localize_locked(uri: str, cache_dir: Path, options: StorageOptions | None) -> Path:
    config_path = cache_dir / MODEL_FILES[0]
    weights_path = cache_dir / MODEL_FILES[1]
    _download(storage.join(uri, MODEL_FILES[0]), config_path, options)  # small: always refresh
    try:
        expected = json.loads(config_path.read_text())[SHA256_KEY]
    except (KeyError, ValueError, TypeError) as e:
        raise storage.StorageError(
            f"{uri}/config.json records no {SHA256_KEY!r} of {MODEL_FILES[1]}: cannot verify") from e
    stamp = cache_dir / f".{MODEL_FILES[1]}.verified"
    if weights_path.is_file() and stamp.is_file():
        st = weights_path.stat()
        if stamp.read_text() == f"{expected} {st.st_size} {st.st_mtime_ns}":
            return cache_dir
    from dr2.weights import sha256_file

    actual = sha256_file(weights_path) if weights_path.is_file() else None
    for attempt in range(2):
        if actual == expected:
            st = weights_path.stat()
            stamp.write_text(f"{expected} {st.st_size} {st.st_mtime_ns}")
            return cache_dir
        if actual is not None:
            log.warning(
                "%s: sha256 %s != recorded %s (attempt %d); downloading", weights_path, actual, expected, attempt
            )
        actual = _download(storage.join(uri, MODEL_FILES[1]), weights_path, options)
    if actual == expected:
        st = weights_path.stat()
        stamp.write_text(f"{expected} {st.st_size} {st.st_mtime_ns}")
        return cache_dir
    raise storage.StorageError(
        f"{uri}/{MODEL_FILES[1]} has sha256 {actual} but config.json records {expected}, after re-downloading: "
        "the uploaded weights or the recorded hash are wrong; re-upload the model directory"
    )
