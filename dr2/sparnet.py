"""SPARNetHD: the enhancer of DR2's second stage (official ``createModel("SPARNetHD2D")``).

DR2 (Wang et al., CVPR 2023) removes degradations with a diffusion model at 256 px and then hands the
result to an enhancer. The official code uses SPARNetHD (Chen et al., "Learning Spatial Attention for
Face Super-Resolution", TIP 2020) built as ``SPAR.models.createModel("SPARNetHD2D")``: ``SPAR.sparnet.
BaseModel(min_ch=32, max_ch=512, size=512, min_feat_size=32, att_name="spar", norm_type="in")`` followed
by ``torch.nn.utils.spectral_norm`` on every ``Conv2d``. The checkpoint ``SPARNetHD_FFHQ_DR2aug.pth`` is
that model's flat ``state_dict``.

What this port keeps:

* The module tree and therefore every state-dict key, shape and order of the official model, in the
  spectral-norm layout: each conv stores ``weight_orig`` (parameter), ``weight_u`` and ``weight_v``
  (buffers) and ``bias`` where the official conv has one. The full-size default config reproduces
  ``tests/fixtures/dr2_reference/sparnethd_manifest.json`` exactly (892 entries, 354 buffers).
* Every config the official ``BaseModel`` accepts, including its quirks: channel clipping, the
  hourglass depth schedule (``int(log2(64 / bottleneck_size))``, decremented per down step), the
  hard-coded hourglass width 64, a negative hourglass depth acting as depth 1 (``if self.depth:``),
  and the in-place activation aliasing an identity shortcut when ``norm_type="none"``.
* Spectral norm in eval mode exactly as torch computes it: ``W = weight_orig / sigma`` with
  ``sigma = <u, weight_orig.reshape(out, -1) @ v>`` from the STORED ``u``/``v`` (no power iteration,
  no SVD). In train mode one power iteration updates ``u``/``v`` first, as torch's default does.

The network has no output activation and no clamp: (B, 3, S, S) in [-1, 1] -> (B, 3, S, S), roughly in
[-1, 1] for trained weights; callers clamp.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dr2.configs import check_known_keys

ReluType = Literal["relu", "leakyrelu", "prelu", "selu", "none"]
NormType = Literal["bn", "in", "gn", "pixel", "none"]  # official 'layer' cannot be built (LayerNorm(None))
AttName = Literal["spar", "spar3d"]
Scale = Literal["none", "up", "down"]

HOURGLASS_MID_CHANNELS = 64  # official HourGlassBlock(c_mid=64), never overridden
_SN_EPS = 1e-12  # torch.nn.utils.spectral_norm default eps


@dataclass(frozen=True, kw_only=True)
class SPARNetConfig:
    """Constructor kwargs of the official ``SPAR.sparnet.BaseModel``; defaults are the SPARNetHD2D model.

    ``size`` is the image side the network is built for (512 for the official checkpoint): it fixes the
    number of down/up steps (``log2(size // min_feat_size)``) and so the architecture.
    """

    size: int = 512
    ch_in: int = 3
    min_ch: int = 32
    max_ch: int = 512
    min_feat_size: int = 32
    res_depth: int = 10
    relu_type: ReluType = "leakyrelu"
    norm_type: NormType = "in"
    att_name: AttName = "spar"
    bottleneck_size: int = 4

    def __post_init__(self) -> None:
        # The official code lower-cases these strings; we keep one spelling so configs compare equal.
        for name, allowed in (("relu_type", ReluType), ("norm_type", NormType), ("att_name", AttName)):
            value = getattr(self, name)
            if value not in get_args(allowed):
                raise ValueError(f"SPARNetConfig.{name}={value!r}; expected one of {get_args(allowed)}")
        if self.size // self.min_feat_size < 1:
            raise ValueError(f"size ({self.size}) must be >= min_feat_size ({self.min_feat_size})")
        if self.bottleneck_size <= 0 or self.min_ch <= 0 or self.max_ch <= 0 or self.ch_in <= 0:
            raise ValueError(f"channel counts and bottleneck_size must be positive: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SPARNetConfig:
        check_known_keys(cls, d)
        return cls(**d)

    @classmethod
    def tiny(cls) -> SPARNetConfig:
        """The 64-px config of ``tests/fixtures/dr2_reference/sparnethd_small_config.json`` (394,310 params)."""
        return cls(size=64, min_ch=8, max_ch=16, min_feat_size=32, res_depth=-1, bottleneck_size=32)

    # Derived architecture numbers, computed as the official BaseModel.__init__ does.
    @property
    def down_steps(self) -> int:
        return int(np.log2(self.size // self.min_feat_size))

    @property
    def first_channels(self) -> int:
        return self._clip(self.max_ch // int(np.log2(self.size // self.min_feat_size) + 1))

    @property
    def first_hourglass_depth(self) -> int:
        return int(np.log2(64 / self.bottleneck_size))

    def _clip(self, c: int) -> int:
        return max(self.min_ch, min(c, self.max_ch))


class SpectralNormConv2d(nn.Module):
    """A ``Conv2d`` under ``torch.nn.utils.spectral_norm``, with the same state-dict entries.

    Entries: ``bias`` (if any), ``weight_orig`` (parameters), then ``weight_u`` (out,), ``weight_v``
    (in*k*k,) (buffers). Eval: ``weight = weight_orig / <u, W v>`` with the stored vectors. Train: one
    power iteration updates ``u``/``v`` in place first (torch's ``n_power_iterations=1``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, bias: bool) -> None:
        super().__init__()
        self.stride = stride
        # Registration order matches torch's spectral_norm, which re-registers weight after bias.
        self.bias: nn.Parameter | None = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_orig = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        nn.init.normal_(self.weight_orig, 0.0, 0.02)  # official init_weights: N(0, 0.02), zero bias
        fan = in_channels * kernel_size * kernel_size
        self.register_buffer("weight_u", F.normalize(torch.randn(out_channels), dim=0, eps=_SN_EPS))
        self.register_buffer("weight_v", F.normalize(torch.randn(fan), dim=0, eps=_SN_EPS))
        self.weight_u: Tensor
        self.weight_v: Tensor

    @torch.no_grad()
    def power_iteration_(self, n: int = 1) -> None:
        """Refine the stored ``u``/``v`` by ``n`` power iterations (what train-mode forwards do)."""
        w = self.weight_orig.detach().reshape(self.weight_orig.shape[0], -1)
        for _ in range(n):
            self.weight_v.copy_(F.normalize(torch.mv(w.t(), self.weight_u), dim=0, eps=_SN_EPS))
            self.weight_u.copy_(F.normalize(torch.mv(w, self.weight_v), dim=0, eps=_SN_EPS))

    def normalized_weight(self) -> Tensor:
        """weight_orig / sigma, computed in float32 even under autocast (sigma is a tiny dot product)."""
        if self.training:
            self.power_iteration_(1)
        device_type = self.weight_orig.device.type
        # "meta" (memory estimates, dr2.memory) has no autocast to turn off
        autocast_off = torch.amp.is_autocast_available(device_type)
        with torch.autocast(device_type, enabled=False) if autocast_off else nullcontext():
            w_mat = self.weight_orig.reshape(self.weight_orig.shape[0], -1)  # (out, in*k*k)
            sigma = torch.dot(self.weight_u, torch.mv(w_mat, self.weight_v))
            return self.weight_orig / sigma

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, self.stride)


class _Identity(nn.Module):
    """Stands for the official lambdas (``lambda x: x``): no parameters, no state-dict entries."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class NormLayer(nn.Module):
    """Official ``NormLayer``: the module path ``<name>.norm`` is kept for parametrised norms."""

    def __init__(self, channels: int, *, norm_type: NormType) -> None:
        super().__init__()
        self.norm_type = norm_type
        if norm_type == "bn":
            self.norm: nn.Module = nn.BatchNorm2d(channels)
            nn.init.normal_(self.norm.weight, 1.0, 0.02)  # official init_weights for BatchNorm2d
        elif norm_type == "in":
            self.norm = nn.InstanceNorm2d(channels, affine=True)  # instance statistics in eval too
        elif norm_type == "gn":
            self.norm = nn.GroupNorm(32, channels, affine=True)
        else:  # 'pixel' is F.normalize over channels, 'none' the identity: neither has state
            self.norm = _Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.norm_type == "pixel":
            return F.normalize(x, p=2, dim=1)
        return self.norm(x)


class ReluLayer(nn.Module):
    """Official ``ReluLayer`` (LeakyReLU slope 0.2); only PReLU has a parameter, at ``<name>.func.weight``."""

    def __init__(self, channels: int, *, relu_type: ReluType) -> None:
        super().__init__()
        funcs: dict[str, nn.Module] = {
            "relu": nn.ReLU(),
            "leakyrelu": nn.LeakyReLU(0.2),
            "prelu": nn.PReLU(channels),
            "selu": nn.SELU(),
            "none": _Identity(),
        }
        self.func = funcs[relu_type]

    def forward(self, x: Tensor) -> Tensor:
        return self.func(x)


class ConvLayer(nn.Module):
    """Official ``ConvLayer``: [nearest x2 up] -> reflection pad k//2 -> conv (stride 2 if down) -> norm -> act.

    The conv has a bias only for norm ``"pixel"``/``"none"``, as in the official code.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int = 3,
        scale: Scale = "none",
        *,
        norm_type: NormType = "none",
        relu_type: ReluType = "none",
    ) -> None:
        super().__init__()
        self.upsample = scale == "up"
        self.pad = kernel_size // 2
        # Registration order (conv2d, relu, norm) matches the official module, hence the state-dict order.
        self.conv2d = SpectralNormConv2d(
            c_in, c_out, kernel_size, stride=2 if scale == "down" else 1, bias=norm_type in ("pixel", "none")
        )
        self.relu = ReluLayer(c_out, relu_type=relu_type)
        self.norm = NormLayer(c_out, norm_type=norm_type)

    def forward(self, x: Tensor) -> Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.pad(x, (self.pad, self.pad, self.pad, self.pad), mode="reflect")
        return self.relu(self.norm(self.conv2d(x)))


class HourGlassBlock(nn.Module):
    """Official simplified hourglass: a spatial attention mask ``sigmoid(conv(HG(x)))`` multiplied onto x.

    At each level: ``up1 = b1(x)``, ``low1 = b2(x)`` (stride 2), ``low2`` = the next level (or ``b2_plus``
    at level 1), ``up2 = b3(low2)`` (nearest x2 then conv); the level returns ``up1 + up2``. Depth 0 is the
    identity; a negative depth behaves as the official ``if self.depth:`` makes it (one level named by it).
    """

    def __init__(self, depth: int, c_in: int, c_out: int, *, norm_type: NormType, relu_type: ReluType) -> None:
        super().__init__()
        self.depth = depth
        self._kw: dict[str, Any] = {"norm_type": norm_type, "relu_type": relu_type}
        if depth:
            self._add_level(depth, c_in)
            self.out_block = nn.Sequential(ConvLayer(HOURGLASS_MID_CHANNELS, c_out), nn.Sigmoid())

    def _add_level(self, level: int, c_in: int) -> None:
        c1 = c_in if level == self.depth else HOURGLASS_MID_CHANNELS
        mid = HOURGLASS_MID_CHANNELS
        self.add_module(f"b1_{level}", ConvLayer(c1, mid, **self._kw))
        self.add_module(f"b2_{level}", ConvLayer(c1, mid, scale="down", **self._kw))
        if level > 1:
            self._add_level(level - 1, c_in)
        else:
            self.add_module(f"b2_plus_{level}", ConvLayer(mid, mid, **self._kw))
        self.add_module(f"b3_{level}", ConvLayer(mid, mid, scale="up", **self._kw))

    def _level(self, level: int, x: Tensor) -> Tensor:
        up1 = self._modules[f"b1_{level}"](x)  # type: ignore[misc]
        low1 = self._modules[f"b2_{level}"](x)  # type: ignore[misc]
        if level > 1:
            low2 = self._level(level - 1, low1)
        else:
            low2 = self._modules[f"b2_plus_{level}"](low1)  # type: ignore[misc]
        up2 = self._modules[f"b3_{level}"](low2)  # type: ignore[misc]
        if up1.shape[2:] != up2.shape[2:]:  # odd sizes: the official code resizes (nearest) to match
            up2 = F.interpolate(up2, size=up1.shape[2:])
        return up1 + up2

    def forward(self, x: Tensor) -> Tensor:
        if not self.depth:
            return x
        mask = self.out_block(self._level(self.depth, x))  # (B, 1, H, W) for 'spar', (B, C, H, W) for 'spar3d'
        return x * mask


class ResidualBlock(nn.Module):
    """Official pre-activation ``ResidualBlock``: ``shortcut(x) + HG(conv2(conv1(act(norm(x)))))``.

    Down blocks put the stride on conv2, up blocks the upsample on conv1. The shortcut is a plain
    ConvLayer (bias, no norm, no activation) unless the block keeps both size and width.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        *,
        scale: Scale,
        hg_depth: int,
        att_name: AttName,
        norm_type: NormType,
        relu_type: ReluType,
    ) -> None:
        super().__init__()
        kw: dict[str, Any] = {"norm_type": norm_type, "relu_type": relu_type}
        self.identity_shortcut = scale == "none" and c_in == c_out
        if not self.identity_shortcut:
            self.shortcut_func = ConvLayer(c_in, c_out, 3, scale)
        self.preact_func = nn.Sequential(NormLayer(c_in, norm_type=norm_type), ReluLayer(c_in, relu_type=relu_type))
        scale_pairs: dict[Scale, tuple[Scale, Scale]] = {
            "down": ("none", "down"),
            "up": ("up", "none"),
            "none": ("none", "none"),
        }
        scales = scale_pairs[scale]
        self.conv1 = ConvLayer(c_in, c_out, 3, scales[0], **kw)
        self.conv2 = ConvLayer(c_out, c_out, 3, scales[1], norm_type=norm_type, relu_type="none")
        c_attn = 1 if att_name == "spar" else c_out
        self.att_func = HourGlassBlock(hg_depth, c_out, c_attn, **kw)
        # Official quirk: with norm 'none' the pre-activation is an IN-PLACE activation of x itself, and an
        # identity shortcut is that same tensor, so the shortcut carries act(x), not x.
        self.shortcut_sees_preact = self.identity_shortcut and norm_type == "none"

    def forward(self, x: Tensor) -> Tensor:
        out = self.preact_func(x)
        if self.identity_shortcut:
            identity = out if self.shortcut_sees_preact else x
        else:
            identity = self.shortcut_func(x)
        out = self.conv2(self.conv1(out))
        return identity + self.att_func(out)


class SPARNetHD(nn.Module):
    """The official ``SPAR.sparnet.BaseModel`` with spectral norm on every conv (SPARNetHD2D by default).

    encoder (ConvLayer, ``down_steps`` down ResidualBlocks) -> ``res_depth + 3 - down_steps`` ResidualBlocks
    -> ``down_steps`` up ResidualBlocks -> ConvLayer to 3 channels. Any input size divisible by
    ``2 ** down_steps`` runs (the checkpoint was trained at ``config.size``).
    """

    def __init__(self, config: SPARNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        kw: dict[str, Any] = {"norm_type": c.norm_type, "relu_type": c.relu_type, "att_name": c.att_name}
        n_ch = c.first_channels
        hg_depth = c.first_hourglass_depth

        encoder: list[nn.Module] = [ConvLayer(c.ch_in, n_ch, 3)]
        for _ in range(c.down_steps):
            encoder.append(ResidualBlock(c._clip(n_ch), c._clip(n_ch * 2), scale="down", hg_depth=hg_depth, **kw))
            n_ch *= 2  # unclipped, as official
            hg_depth -= 1
        hg_depth += 1
        self.encoder = nn.Sequential(*encoder)

        n_res = c.res_depth + 3 - c.down_steps
        self.res_layers = nn.Sequential(
            *[ResidualBlock(c._clip(n_ch), c._clip(n_ch), scale="none", hg_depth=hg_depth, **kw) for _ in range(n_res)]
        )

        decoder: list[nn.Module] = []
        for _ in range(c.down_steps):  # official up_steps == down_steps
            hg_depth += 1
            decoder.append(ResidualBlock(c._clip(n_ch), c._clip(n_ch // 2), scale="up", hg_depth=hg_depth, **kw))
            n_ch //= 2
        self.decoder = nn.Sequential(*decoder)
        self.out_conv = ConvLayer(c._clip(n_ch), 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, ch_in, S, S) in [-1, 1] -> (B, 3, S, S), unclamped
        return self.out_conv(self.decoder(self.res_layers(self.encoder(x))))

    @torch.no_grad()
    def power_iteration_(self, n: int) -> None:
        """Run ``n`` power iterations on every spectral-norm conv (fresh random models; see tiny_random)."""
        for m in self.modules():
            if isinstance(m, SpectralNormConv2d):
                m.power_iteration_(n)

    @classmethod
    def random(cls, config: SPARNetConfig, *, seed: int) -> SPARNetHD:
        """A seeded random model with converged spectral-norm vectors, in eval mode (tests, benchmarks)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
            model.power_iteration_(30)
        return model.eval()
