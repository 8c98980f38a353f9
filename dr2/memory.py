"""How many faces fit on a device: the memory model behind the restorer's fixed batch size.

:func:`suggest_batch_size` turns the free device memory the CALLER measured (e.g. ``torch.cuda.mem_get_info``;
dr2 never picks or queries devices) into a batch size for :class:`dr2.restorer.DR2Restorer`. It is pure: the
same configs, precision and byte count always give the same answer.

The per-face cost is measured, not guessed: :func:`activation_bytes_per_face` runs the UNet and the enhancer
once at batch 1 on the ``meta`` device (shapes only, no data, milliseconds) and records the peak of the bytes
held by live intermediate tensors, exactly as Python frees them. A caching allocator on a real device adds
fragmentation and kernel workspaces on top; the fixed ``reserve_bytes`` and the ``headroom`` fraction cover
those. The bench (``dr2 bench`` on CUDA) prints the measured peak per face next to this estimate.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dr2.sparnet import SPARNetConfig, SPARNetHD
from dr2.unet import UNetConfig, UNetModel

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FACE_BYTES = 512 * 512 * 3  # one aligned uint8 face
GIB = 1 << 30


class _PeakLiveBytes(TorchDispatchMode):
    """Counts the storage bytes of every tensor an op creates until Python frees it; keeps the peak.

    Results that alias an input (views, in-place ops: the schema marks them) own no new storage.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


@lru_cache(maxsize=16)
def activation_bytes_per_face(
    ddpm_config: UNetConfig, enhancer_config: SPARNetConfig | None, precision: Precision
) -> dict[str, int]:
    """Peak bytes of intermediate tensors for ONE face: ``{"unet", "enhancer", "weights"}``.

    Runs on the meta device with the models cast to the compute dtype (what autocast gives the convolutions;
    GroupNorm and the softmax still make their float32 copies, as they do under autocast). ``weights`` counts
    the float32 parameters plus, under autocast, their cached half-precision copies.
    """
    dtype = _DTYPES[precision]
    with torch.device("meta"):
        unet = UNetModel(ddpm_config).eval().to(dtype)
        enhancer = SPARNetHD(enhancer_config).eval().to(dtype) if enhancer_config is not None else None
    params = sum(p.numel() for p in unet.parameters())
    if enhancer is not None:
        params += sum(p.numel() for p in enhancer.parameters()) + sum(b.numel() for b in enhancer.buffers())
    weights = params * 4 + (params * 2 if precision != "fp32" else 0)
    s = ddpm_config.image_size
    x = torch.empty(1, ddpm_config.in_channels, s, s, device="meta", dtype=dtype)
    t = torch.zeros(1, dtype=torch.long, device="meta")
    with torch.no_grad(), _PeakLiveBytes() as unet_mode:
        unet(x, t)
    enh_peak = 0
    if enhancer is not None and enhancer_config is not None:
        e = enhancer_config.size
        h = torch.empty(1, enhancer_config.ch_in, e, e, device="meta", dtype=dtype)
        with torch.no_grad(), _PeakLiveBytes() as enh_mode:
            enhancer(h)
        enh_peak = enh_mode.peak
    return {"unet": unet_mode.peak, "enhancer": enh_peak, "weights": weights}


def bytes_per_face(ddpm_config: UNetConfig, enhancer_config: SPARNetConfig | None, precision: Precision) -> int:
    """Device bytes one more face in the batch costs: the larger network peak (they run one after the other),
    the sampler's float32 state at the DDPM size (x, y, y_prev, noise, mean, log-variance, x0_hat, low-pass
    terms: 12 images), and the face at 512 px in and out (uint8 and float32 copies)."""
    act = activation_bytes_per_face(ddpm_config, enhancer_config, precision)
    s = ddpm_config.image_size
    loop_state = 12 * ddpm_config.in_channels * s * s * 4
    io = FACE_BYTES * (2 + 2 * 4 + 2 * 4)  # uint8 in/out, float32 face at 512 in and out, the dr2 stage
    return max(act["unet"], act["enhancer"]) + loop_state + io


def suggest_batch_size(
    free_bytes: int,
    *,
    ddpm_config: UNetConfig,
    enhancer_config: SPARNetConfig | None,
    precision: Precision,
    headroom: float = 0.85,
    reserve_bytes: int = GIB,
    max_batch_size: int = 64,
) -> int:
    """The restore batch size that fits in ``free_bytes`` of device memory (what the caller measured before
    loading the models), rounded down to a multiple of 8 when it is 8 or more (tensor-core friendly; fewer
    distinct shapes across machines), at most ``max_batch_size``.

    Usable bytes = ``free_bytes * headroom - reserve_bytes`` (allocator fragmentation, cuDNN/cuBLAS workspaces)
    minus the weights; the batch is usable bytes over :func:`bytes_per_face`. Raises ValueError when not even
    one face fits: a device that cannot run the model is broken infrastructure, not a reason to do less work.
    """
    if free_bytes < 0 or not 0 < headroom <= 1 or max_batch_size < 1:
        raise ValueError(f"bad arguments: free_bytes={free_bytes}, headroom={headroom}, max={max_batch_size}")
    weights = activation_bytes_per_face(ddpm_config, enhancer_config, precision)["weights"]
    per_face = bytes_per_face(ddpm_config, enhancer_config, precision)
    usable = int(free_bytes * headroom) - reserve_bytes - weights
    n = usable // per_face
    if n < 1:
        raise ValueError(
            f"not even one face fits: {free_bytes / GIB:.2f} GiB free, the models need {weights / GIB:.2f} GiB, "
            f"{reserve_bytes / GIB:.2f} GiB reserve and {per_face / GIB:.2f} GiB per face ({precision})"
        )
    n = min(int(n), max_batch_size)
    return n - n % 8 if n >= 8 else n
