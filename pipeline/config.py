"""The restoration job's configuration: one frozen dataclass, from which the CLI is generated and which is
written, resolved, beside the outputs (``_dr2/config.json``).

Fields carry their help text in ``metadata["help"]``; ``jobs/configargs.py`` turns them into argparse
options. ``output_hash()`` covers exactly the fields that change output bytes: it is the resume key stored
in each shard's ``.stats.json`` (pool sizes, addresses and the detector's batch size do not change outputs
and are left out, so a rerun with more GPUs still resumes). The restorer's batch size is in: the networks
always run on exactly that many faces (short batches padded), which keeps a face's output independent of
its neighbours, but float rounding depends on the batch shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from dr2.configs import check_known_keys
from pipeline.schema import FINAL_STATUSES, FaceSelect
from pipeline.store.storage import StorageOptions

if TYPE_CHECKING:
    from pipeline.imaging.degradation import DegradationThresholds
    from pipeline.imaging.quality import QualityThresholds


class InputFormat(StrEnum):
    AUTO = "auto"  # .tar shards if the source names any, else .parquet files, else plain images
    WEBDATASET = "webdataset"
    PARQUET = "parquet"
    IMAGES = "images"


class RestorerKind(StrEnum):
    DR2 = "dr2"  # DR2 + enhancer, needs --ddpm (and --enhancer, or "none")
    PASSTHROUGH = "passthrough"  # faces returned unchanged: check detection/alignment before spending GPU time
    TINY = "tiny"  # tiny random DR2 models: tests, benchmarks and the demo; output is NOT a restoration
    # a capacity tool: holds the GPU Ray gives it and takes 1/simulate_faces_per_s per face, faces unchanged;
    # NOT a restoration (every output, the summary and the report say so)
    SIMULATE = "simulate"


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """Everything a restoration run needs. Paper names: ``N`` (low-pass factor), ``tau`` (output step)."""

    src: str = _f("", "input: .tar shards or .parquet files (path, glob, {000..009}, s3://) or a folder/prefix of "
                  "images", cli=False)
    dst: str = _f("", "output folder or s3:// prefix", cli=False)
    input_format: InputFormat = _f(InputFormat.AUTO, "what SRC holds")
    image_column: str = _f("", "parquet: the column that holds the images (binary, or a {bytes, path} struct); "
                               "empty: the first binary column named jpg/png/webp/image/img/..., else the first "
                               "{bytes, path} struct, else the only binary column")
    # --- restoration ---
    restorer: RestorerKind = _f(RestorerKind.DR2, "face restorer")
    ddpm: str = _f("", "DR2 DDPM model dir or s3:// URI (made by `dr2 weights import`)")
    enhancer: str = _f("", "SPARNetHD model dir or s3:// URI, or 'none' for bicubic")
    simulate_faces_per_s: float = _f(
        34.0, "simulate restorer: faces per second per actor, the GPU you are sizing for (34: full-size DR2 on an "
        "H100/H200 target); it sleeps that long per face and passes faces through unchanged")
    N: int = _f(8, "DR2 low-pass factor N (1, 2, 4, 8, 16): larger removes heavier degradation, keeps less identity")
    tau: int = _f(35, "DR2 output step tau (0..99): larger smooths more")
    omega: int | None = _f(None, "DR2 start step omega (tau..99); none = the official rule from N and tau (see "
                           "resolved_omega)")
    # --- per-face strength (pipeline/imaging/degradation.py): --preset auto sets adaptive ---
    adaptive: bool = _f(False, "per-face DR2 setting from each face's degradation verdict (--preset auto): mild -> "
                               "N=4/tau=22, moderate -> N=8/tau=35, severe -> N=16/tau=35, omega by the official rule; "
                               "--N/--tau/--omega are then not used")
    skip_clean: bool | None = _f(None, "paste faces whose verdict is clean back unchanged instead of restoring them "
                                       "(dr2.json says restored: false and why); none: on with --adaptive, else off")
    clean_max_factor: float = _f(2.5, "degradation score (an equivalent low-pass factor at the 512 crop) up to which "
                                      "a face is clean (pipeline/imaging/degradation.py DegradationThresholds)")
    mild_max_factor: float = _f(8.0, "degradation score up to which a face is mild (above: moderate)")
    moderate_max_factor: float = _f(16.0, "degradation score up to which a face is moderate (above: severe)")
    seed: int = _f(0, "base seed; each face's noise is seeded from (seed, shard, key, face index)")
    precision: str = _f("fp32", "fp32, or bf16/fp16 autocast of the UNet and SPARNetHD (filters, schedule and norms "
                                "stay fp32); bf16 is the GPU setting", choices=("fp32", "bf16", "fp16"))
    attention: str = _f("auto", "attention kernel: math (the official matmuls), sdpa (PyTorch's fused kernel, equal "
                                "within fp32 rounding); auto: math for fp32 on CPU, else sdpa",
                        choices=("auto", "math", "sdpa"))
    channels_last: bool | None = _f(None, "channels-last memory format for the networks; none: on for CUDA only")
    compile: bool = _f(False, "torch.compile the networks over the fixed batch shape (paid once per actor)")
    # --- faces ---
    select: FaceSelect = _f(FaceSelect.ALL, "which faces to restore per image")
    max_faces: int = _f(16, "restore at most this many faces per image")
    min_face_size: int = _f(24, "skip faces whose box is smaller than this (pixels)")
    detect_threshold: float = _f(0.9, "MTCNN O-Net score threshold for a face")
    detect_max_side: int | None = _f(2048, "detect on a copy whose longer side is at most this; none = full size")
    # --- quality flags (dr2.json, the report): a flagged face is "suspect", kept, never dropped ---
    suspect_min_lowfreq_psnr: float = _f(20.0, "flag a face whose low frequencies drift from the input's below this "
                                               "PSNR (dB, through DR2's own down/up-by-N filter)")
    suspect_max_delta_e: float = _f(10.0, "flag a face whose colours shift by more than this mean CIE76 Delta E")
    suspect_min_sharpness_gain: float = _f(0.2, "flag a face whose Laplacian variance falls below this x the input's")
    suspect_max_sharpness_gain: float = _f(1000.0, "flag a face whose Laplacian variance exceeds this x the input's")
    skip_status: str = _f(
        "", "comma-separated statuses whose samples are left OUT of the outputs (still counted in the stats and the "
        "report), e.g. decode_error,too_large,truncated,no_image, for readers that fail on them "
        "(ray.data.read_webdataset's default decoder); default: keep all")
    # --- images ---
    max_pixels: int = _f(100_000_000, "images over this many pixels are passed through with status too_large")
    jpeg_quality: int = _f(95, "quality of re-encoded JPEG outputs")
    images_per_chunk: int = _f(256, "images mode: images per unit of work (manifest, stats, resume)")
    # --- execution (do not change outputs) ---
    address: str | None = _f(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray on this machine)")
    device: str = _f("auto", "restorer device: auto (cuda if Ray gives the actor a GPU), cpu, cuda")
    restore_actors: int | None = _f(None, "restorer actors; none: one per GPU of the cluster (one on a CPU-only one)")
    detect_actors: int | None = _f(
        None, "detector actors; none: sized to the cluster (pipeline/graph/capacity.py: an autoscaling pool, up to "
        "two per GPU when the restorers have GPUs, else up to three quarters of the cores the restorers leave)")
    gpus_per_restorer: float | None = _f(
        None, "GPUs per restorer actor; none: 0.8 when the cluster has GPUs and detection runs there (the rest "
        "holds two detectors), 1 when --gpus-per-detector 0, else 0 (a fraction shares a GPU)")
    restore_prefetch: int = _f(2, "blocks queued per restorer actor, so the next faces are ready when a batch ends")
    gpus_per_detector: float | None = _f(
        None, "GPUs per detector actor; none: 0.1 when the cluster has GPUs (MTCNN runs on the restorers' GPUs), "
        "else 0; 0 keeps detection on CPUs")
    cpus_per_actor: float = _f(0.5, "CPUs reserved per actor (fractional, so reads and writes keep running)")
    detect_batch_size: int = _f(8, "images decoded per detector step (each image is detected on its own, so that "
                                   "its faces never depend on its neighbours)")
    rows_per_block: int = _f(
        256, "at most this many samples travel together between stages (one Ray call and one staged part per block)")
    block_mb: int = _f(64, "at most this many MiB of input bytes per block")
    faces_per_block: int = _f(
        0, "at most this many faces per block reaching the restorer (0: 2 x restore_batch_size), so that "
        "detection, restoration and writing overlap")
    restore_batch_size: int = _f(
        8, "faces per restorer forward pass; it fixes the networks' batch shape, so like N and tau it is part of "
        "the output's identity (float rounding depends on it)")
    object_store_memory: int | None = _f(None, "bytes for Ray's object store when starting a local Ray; none: a "
                                               "quarter of --memory-budget-mb (pipeline/graph/memory.py)")
    memory_budget_mb: int | None = _f(
        None, "MiB a run may take on a node for decoded pixels and blocks in flight (pipeline/graph/memory.py): it "
        "sizes blocks by decoded pixels, the write tasks running at once and a local Ray's object store; none: an "
        "eighth of the node's memory")
    block_megapixels: float | None = _f(
        None, "at most this many decoded megapixels per block (a larger photo travels alone); none: from "
        "--memory-budget-mb")
    overwrite: bool = _f(False, "redo shards that are already done, also under a changed config")
    verify: bool = _f(False, "on resume, also check each finished output's sha256 against its marker (reads them all)")
    wait: float = _f(0.0, "seconds to wait while another run holds DST (default 0: stop at once and name it)")
    stop_grace: float = _f(30.0, "seconds a stopped run (Ctrl-C, SIGTERM) has to finish the commits under way before "
                                 "it exits anyway (a second signal: at once)")
    limit: int | None = _f(None, "process at most this many units (shards/chunks) of those not done yet: a trial run")
    endpoint_url: str | None = _f(None, "S3 endpoint (MinIO, Ceph, R2); default: AWS_ENDPOINT_URL or AWS")
    report: bool = _f(True, "write the run report DST/_dr2/report/index.html (+ report.json, face thumbnails)")
    report_faces: int = _f(200, "about this many faces on the report's contact sheet, a sample chosen by key hash "
                                "(suspect faces always; the page shows the worst 500)")
    report_faces_per_thousand: int | None = _f(
        None, "sheet sampling rate per 1000 faces; none: from --report-faces and the input's size", cli=False)
    progress: str = _f("auto", "progress display: bar (a terminal), plain (a line every 30 s), json (one object per "
                       "update, for logs), quiet; auto picks bar on a terminal, else plain",
                       choices=("auto", "bar", "plain", "json", "quiet"))
    ray_logs: bool = _f(False, "show Ray's own progress bars and worker logs here (they always go to Ray's log files)")
    record_timings: bool = _f(False, "add per-stage seconds to each dr2.json (outputs are then not byte-reproducible)")

    # Fields that do not change output bytes.
    EXECUTION_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "src", "dst", "address", "device", "restore_actors", "detect_actors", "gpus_per_restorer",
            "gpus_per_detector", "cpus_per_actor", "detect_batch_size", "object_store_memory",
            "overwrite", "endpoint_url", "record_timings", "rows_per_block", "block_mb", "faces_per_block",
            "verify", "wait", "stop_grace", "limit", "restore_prefetch", "progress", "ray_logs", "report",
            "report_faces", "report_faces_per_thousand", "memory_budget_mb", "block_megapixels",
        }
    )

    # Fields added after outputs existed, hashed only when set: at their default they change no output, and leaving
    # them out keeps the config hash, hence the resume of every DST made before them.
    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = {"image_column": ""}

    def __post_init__(self) -> None:
        """Refuse DR2 settings the sampler would reject, before any Ray worker starts."""
        if self.N < 1 or self.N & (self.N - 1):
            raise ValueError(f"--N must be a power of two that divides the DDPM's image size (1, 2, 4, 8, 16, 32; the "
                             f"presets use 4, 8 and 16), got {self.N}")
        if not 0 <= self.tau <= 99:
            raise ValueError(f"tau must be in 0..99 (the 100-step schedule), got {self.tau}")
        omega = self.resolved_omega
        if not self.tau <= omega <= 99:
            rule = f" (the official rule gives {omega} for N={self.N}, tau={self.tau})" if self.omega is None else ""
            hint = "lower --tau or pass --omega" if self.omega is None else "pass an --omega in that range"
            raise ValueError(f"omega must be in tau..99 (tau={self.tau}), got {omega}{rule}: {hint}")
        unknown = set(self.skipped_statuses) - {s.value for s in FINAL_STATUSES}
        if unknown:
            raise ValueError(f"--skip-status: unknown status(es) {sorted(unknown)}; choose from "
                             f"{', '.join(s.value for s in FINAL_STATUSES)}")
        if not 1.0 <= self.clean_max_factor <= self.mild_max_factor <= self.moderate_max_factor:
            raise ValueError("need 1 <= --clean-max-factor <= --mild-max-factor <= --moderate-max-factor, got "
                             f"{self.clean_max_factor}, {self.mild_max_factor}, {self.moderate_max_factor}")
        if self.simulate_faces_per_s <= 0:
            raise ValueError(f"--simulate-faces-per-s must be > 0, got {self.simulate_faces_per_s}")
        if self.restore_batch_size < 1 or self.detect_batch_size < 1 or self.rows_per_block < 1 or self.block_mb < 1:
            raise ValueError("batch and block sizes must be >= 1")
        if (self.memory_budget_mb is not None and self.memory_budget_mb < 1) or (
                self.block_megapixels is not None and self.block_megapixels <= 0):
            raise ValueError("--memory-budget-mb must be >= 1 and --block-megapixels > 0")

    @property
    def skipped_statuses(self) -> frozenset[str]:
        return frozenset(x.strip() for x in self.skip_status.split(",") if x.strip())

    @cached_property
    def resolved_omega(self) -> int:
        """omega, resolved ONCE for the whole job: the given value, else the official rule from N and tau
        (:func:`dr2.omega.default_omega`). Everything downstream (sampler, dr2.json) takes this value."""
        if self.omega is not None:
            return self.omega
        from dr2.omega import default_omega  # no torch: the driver resolves omega before any worker starts

        return default_omega(self.N, self.tau)

    @property
    def skips_clean(self) -> bool:
        """Whether faces judged clean are pasted back unrestored: ``skip_clean``, else on exactly with ``adaptive``."""
        return self.adaptive if self.skip_clean is None else self.skip_clean

    def degradation_thresholds(self) -> DegradationThresholds:
        """The verdict's cuts (:class:`pipeline.imaging.degradation.DegradationThresholds`) from the ``*_max_factor``
        fields."""
        from pipeline.imaging.degradation import DegradationThresholds  # OpenCV: imported where the estimate is needed

        return DegradationThresholds(clean_max_factor=self.clean_max_factor, mild_max_factor=self.mild_max_factor,
                                     moderate_max_factor=self.moderate_max_factor)

    def face_setting(self, verdict: str | None) -> tuple[int, int, int]:
        """(N, tau, omega) for a face of ``verdict``: with ``adaptive`` the official preset of its verdict (clean and
        mild: mild; ``ADAPTIVE_SETTINGS``) with omega by the official rule; else the run's own N, tau and
        :attr:`resolved_omega`. The one place a face's setting is resolved."""
        if not self.adaptive or verdict is None:
            return self.N, self.tau, self.resolved_omega
        n, tau = ADAPTIVE_SETTINGS[verdict]
        from dr2.omega import default_omega

        return n, tau, default_omega(n, tau)

    def quality_thresholds(self) -> QualityThresholds:
        from pipeline.imaging.quality import QualityThresholds

        return QualityThresholds(min_lowfreq_psnr=self.suspect_min_lowfreq_psnr, max_delta_e=self.suspect_max_delta_e,
                                 min_sharpness_gain=self.suspect_min_sharpness_gain,
                                 max_sharpness_gain=self.suspect_max_sharpness_gain)

    @cached_property
    def ddpm_size(self) -> int:
        """The DDPM's image size, where DR2's low-pass acts (256 for the official weights, 64 for the tiny models;
        the passthrough restorer has none: 512, the crop itself). Read from the model directory's config.json."""
        if self.restorer is RestorerKind.TINY:
            return 64
        if self.restorer is RestorerKind.PASSTHROUGH or not self.ddpm:
            return 512
        from pipeline.store import storage

        blob = json.loads(storage.read_bytes(storage.join(self.ddpm, "config.json"), options=self.storage_options()))
        return int(blob.get("config", {}).get("image_size", 256))

    @property
    def block_pixels(self) -> int:
        """Decoded pixels per block (a photo with more travels alone): ``block_megapixels``, which the run resolves
        from the memory budget before its stages start (``pipeline/graph/memory.py``); unresolved (a stage called
        outside a run), one photo at the pixel limit."""
        return int(self.block_megapixels * 1e6) if self.block_megapixels is not None else self.max_pixels

    @property
    def faces_block(self) -> int:
        return self.faces_per_block or 2 * self.restore_batch_size

    def storage_options(self) -> StorageOptions:
        """How every stage reaches storage: built here from the config and passed down explicitly."""
        return StorageOptions(endpoint_url=self.endpoint_url or None)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def output_hash(self, model_info: dict[str, Any]) -> str:
        """sha256 of the output-relevant fields plus the models' identity (weight checksums)."""
        from pipeline.imaging.degradation import ESTIMATOR_VERSION  # the verdicts (and so N/tau, skips) depend on it

        relevant = {k: v for k, v in self.to_dict().items() if k not in self.EXECUTION_FIELDS
                    and not (k in self.HASHED_WHEN_SET and v == self.HASHED_WHEN_SET[k])}
        return config_hash({"config": relevant, "models": model_info, "estimator": ESTIMATOR_VERSION})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineConfig:
        check_known_keys(cls, d)
        names = {f.name: f for f in dataclasses.fields(cls)}
        return cls(**{k: _coerce(names[k], v) for k, v in d.items()})


PRESETS: dict[str, dict[str, Any]] = {
    "mild": {"N": 4, "tau": 22},
    "moderate": {"N": 8, "tau": 35},
    "severe": {"N": 16, "tau": 35},
    "auto": {"adaptive": True},
}
"""The named presets, as config fields: the official demo's three (N, tau) settings, and ``auto`` (each face gets
its degradation verdict's setting). The CLI's ``--preset`` and the Python API take them from here."""

PRESET_HELP = (
    "N/tau from the official demo's three settings: mild (N=4, tau=22), moderate (N=8, tau=35), "
    "severe (N=16, tau=35). Explicit --N/--tau win. auto (--adaptive): each face gets the setting of its "
    "degradation verdict (pipeline/imaging/degradation.py), and clean faces are pasted back unrestored (--skip-clean)."
)


def load_preset(name: str) -> dict[str, Any]:
    """A preset's config fields (a copy: callers may add their own overrides to it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


ADAPTIVE_SETTINGS: dict[str, tuple[int, int]] = {
    "clean": (PRESETS["mild"]["N"], PRESETS["mild"]["tau"]),  # reached only without skip_clean: the mildest
    **{v: (PRESETS[v]["N"], PRESETS[v]["tau"]) for v in ("mild", "moderate", "severe")},
}
"""(N, tau) per degradation verdict under ``adaptive``: the presets of the same names."""


def with_preset(config: PipelineConfig | None = None, preset: str | None = None, **overrides: Any) -> PipelineConfig:
    """``config`` (default: the defaults) with ``preset``'s fields and then ``overrides`` applied, as ``dr2 restore``
    resolves ``--preset`` and explicit options: a preset sets N/tau (or ``adaptive``), an explicit value wins.

    >>> with_preset(preset="severe", tau=10).N, with_preset(preset="severe", tau=10).tau
    (16, 10)
    """
    fields = {**(load_preset(preset) if preset else {}), **overrides}
    if config is None:
        return PipelineConfig.from_dict(fields)
    names = {f.name: f for f in dataclasses.fields(PipelineConfig)}
    check_known_keys(PipelineConfig, fields)
    return dataclasses.replace(config, **{k: _coerce(names[k], v) for k, v in fields.items()})


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no whitespace, UTF-8) of a JSON-able config mapping."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(v: Any) -> Any:
    return v.value if isinstance(v, StrEnum) else v


def _coerce(f: dataclasses.Field[Any], v: Any) -> Any:
    return type(f.default)(v) if isinstance(f.default, StrEnum) else v
