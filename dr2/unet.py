"""The DDPM noise predictor of DR2: the ADM UNet of guided-diffusion, in the layout of the official checkpoint.

This module owns the network only (no schedule, no sampling). It matches the class
``DRDR.unet.UNetModel`` of the official DR2 code (Kaldwin0106/DR2_Drgradation_Remover, itself derived from
openai/guided-diffusion via ILVR-ADM):

* ``state_dict`` keys and shapes are those of the official ``DR2_FFHQ.pkl`` (``UNetConfig()`` builds the
  full-size network: 362 entries, 93,563,910 parameters), so an official checkpoint loads with
  ``strict=True``;
* the numerics follow the official forward pass: the sinusoidal timestep embedding is ``[cos, sin]`` computed
  in float32, GroupNorm (32 groups) runs in float32, up/down ResBlocks resample after GN+SiLU and before the
  first conv (and resample the skip input too), attention is the "legacy" QKV order (heads split before
  q/k/v) with the softmax in float32, and decoder skips are concatenated as ``[h, skip]``.

``attention_resolutions`` holds DOWNSAMPLE RATES, as in the official code: ``(16,)`` puts attention where the
feature maps are 1/16 of the input size (16x16 in the 256 px model).

Everything that the official constructor accepts builds the same network here: ``num_heads`` vs
``num_head_channels``, ``num_heads_upsample``, ``use_new_attention_order``, ``conv_resample``,
``resblock_updown=False`` (plain Upsample/Downsample blocks), ``num_classes`` (label embedding), ``dims``
1/2/3. ``use_checkpoint`` (gradient checkpointing) and ``use_fp16`` (a flag the official forward uses to cast
activations; its fp16 conversion code is commented out) do not change the weights: precision is chosen by the
caller (``model.to(dtype)`` or autocast), and the network runs in the dtype of its parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dr2.configs import check_known_keys

GROUPS = 32  # GroupNorm groups of every normalisation layer (official ``normalization``)

# How attention is evaluated; not part of the architecture (no weights, not in config.json).
# "math": the official explicit einsum/softmax/einsum (the reference numerics, fp32 softmax);
# "sdpa": torch's fused ``scaled_dot_product_attention`` (flash/memory-efficient kernels on CUDA). Both compute
# softmax(q k^T / sqrt(ch)) v; they differ by float rounding only (measured in tests/dr2/test_unet.py).
AttentionImpl = Literal["math", "sdpa"]


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Constructor arguments of the official ``DRDR.unet.UNetModel``; the defaults build the full-size model."""

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 6  # epsilon (3) + variance interpolation value v (3): LEARNED_RANGE
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16,)  # downsample rates, as in the official code
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 4
    num_head_channels: int = 64  # -1: use num_heads
    num_heads_upsample: int = -1  # -1: same as num_heads
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False

    def __post_init__(self) -> None:
        # Accept lists (JSON) but store tuples, so the config stays hashable and frozen.
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.dims not in (1, 2, 3):
            raise ValueError(f"dims must be 1, 2 or 3, got {self.dims}")
        if not self.channel_mult:
            raise ValueError("channel_mult must not be empty")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists), the official constructor kwargs."""
        d = asdict(self)
        d["attention_resolutions"] = list(self.attention_resolutions)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Inverse of :meth:`to_dict`; accepts lists for tuples and rejects unknown keys."""
        check_known_keys(cls, d)
        return cls(**d)

    @classmethod
    def tiny(cls) -> UNetConfig:
        """The 64 px test model of the golden fixtures (``unet_small_config.json``): 1,105,158 parameters."""
        return cls(
            image_size=64,
            model_channels=32,
            channel_mult=(1, 1, 1, 2),
            attention_resolutions=(4,),
            num_head_channels=16,
        )


def timestep_embedding(timesteps: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """Sinusoidal embedding ``[cos(t*f), sin(t*f)]`` (cos first), f_k = exp(-ln(max_period) * k / half), float32.

    timesteps: (B,) integer or fractional timesteps. Returns (B, dim) float32 (zero-padded if dim is odd).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the activation dtype (official ``GroupNorm32``)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(GROUPS, channels)


def _conv(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


def _avg_pool(dims: int, kernel: int | tuple[int, ...]) -> nn.Module:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](kernel_size=kernel, stride=kernel)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to the children that take it (keys ``<block>.<index>`` as official)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (the inner two axes for dims=3), then an optional 3x3 conv (key ``conv``)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = _conv(dims, channels, self.out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # x (B, C, *S) -> (B, C_out, *2S)
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without a conv (key ``op``); dims=3 keeps the first axis."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride: int | tuple[int, ...] = 2 if dims != 3 else (1, 2, 2)
        self.op: nn.Module
        if use_conv:
            self.op = _conv(dims, channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = _avg_pool(dims, stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)  # (B, C, *S) -> (B, C_out, *S/2)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (up or down).

    in_layers = GN, SiLU, conv3x3; emb_layers = SiLU, Linear(emb -> 2*C_out with scale-shift norm, else C_out);
    out_layers = GN, SiLU, Dropout, conv3x3 (zero-initialised). With scale-shift norm,
    h = GN(h) * (1 + scale) + shift before the rest of out_layers. Up/down blocks resample h after GN+SiLU and
    before the first conv, and resample the skip input the same way.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        *,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), _conv(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(_conv(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = _conv(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = _conv(dims, channels, self.out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            out: Tensor = checkpoint(self._forward, x, emb, use_reentrant=False)
            return out
        return self._forward(x, emb)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x (B, C, *S); emb (B, E)
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))  # GN, SiLU
            h = self.h_upd(h)  # (B, C, *S') with S' = 2S or S/2
            x = self.x_upd(x)
            h = self.in_layers[2](h)  # (B, C_out, *S')
        else:
            h = self.in_layers(x)  # (B, C_out, *S)
        emb_out = self.emb_layers(emb).type(h.dtype)  # (B, 2*C_out) or (B, C_out)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))  # (B, ., 1, ...)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)  # (B, C_out, 1, ...) each
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h  # (B, C_out, *S')


def _legacy_qkv_attention(qkv: Tensor, n_heads: int) -> Tensor:
    """Heads split first: qkv (B, H*3*ch, T) -> per head [q; k; v] blocks of ch channels -> (B, H*ch, T)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, ch * 3, length).split(ch, dim=1)  # (B*H, ch, T) each
    scale = 1 / math.sqrt(math.sqrt(ch))  # q and k each scaled by ch^-1/4 (kinder to fp16 than one ch^-1/2)
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B*H, T, T)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v)  # (B*H, ch, T)
    return a.reshape(bs, -1, length)


def _qkv_attention(qkv: Tensor, n_heads: int) -> Tensor:
    """q/k/v split first, then heads: qkv (B, 3*H*ch, T) -> (B, H*ch, T) (``use_new_attention_order``)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.chunk(3, dim=1)  # (B, H*ch, T) each
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum(
        "bct,bcs->bts",
        (q * scale).reshape(bs * n_heads, ch, length),
        (k * scale).reshape(bs * n_heads, ch, length),
    )  # (B*H, T, T)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    a = torch.einsum("bts,bcs->bct", weight, v.reshape(bs * n_heads, ch, length))  # (B*H, ch, T)
    return a.reshape(bs, -1, length)


def _sdpa_qkv_attention(qkv: Tensor, n_heads: int, *, legacy: bool) -> Tensor:
    """The same attention as :func:`_legacy_qkv_attention` (``legacy``) or :func:`_qkv_attention`, through
    ``F.scaled_dot_product_attention`` (scale 1/sqrt(ch), applied once inside the kernel instead of ch^-1/4 on
    q and k). qkv (B, 3*H*ch, T) -> (B, H*ch, T)."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    if legacy:  # per head [q; k; v] blocks
        q, k, v = qkv.reshape(bs, n_heads, 3 * ch, length).split(ch, dim=2)  # (B, H, ch, T) each
    else:  # q, k, v blocks, each split into heads
        q, k, v = (part.reshape(bs, n_heads, ch, length) for part in qkv.chunk(3, dim=1))
    a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))  # (B,H,T,ch)
    return a.transpose(-1, -2).reshape(bs, n_heads * ch, length)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions: GN, 1x1 conv1d to 3C, multi-head attention, 1x1 conv1d, residual."""

    def __init__(
        self,
        channels: int,
        *,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} not divisible by {self.num_heads} heads")
        self.use_new_attention_order = use_new_attention_order
        self.attention_impl: AttentionImpl = "math"  # set by UNetModel.set_attention; not a weight
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        if self.attention_impl == "sdpa":
            a = _sdpa_qkv_attention(qkv, self.num_heads, legacy=not self.use_new_attention_order)
        elif self.use_new_attention_order:
            a = _qkv_attention(qkv, self.num_heads)
        else:
            a = _legacy_qkv_attention(qkv, self.num_heads)
        h = self.proj_out(a)  # (B, C, T)
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The ADM UNet with timestep embedding and attention; module names equal the official checkpoint keys.

    ``forward(x, timesteps)``: x (B, in_channels, H, W), H and W divisible by 2**(len(channel_mult)-1);
    timesteps (B,) ORIGINAL 0..999 steps (the respaced index is mapped by ``SpacedDiffusion.model_timesteps``).
    Returns (B, out_channels, H, W): for DR2, epsilon (channels 0-2) and the variance value v (3-5).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        time_embed_dim = c.model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int | None = None, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                c.dropout,
                out_channels=ch_out,
                dims=c.dims,
                use_checkpoint=c.use_checkpoint,
                use_scale_shift_norm=c.use_scale_shift_norm,
                **kw,
            )

        def attn(ch_in: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch_in,
                num_heads=heads,
                num_head_channels=c.num_head_channels,
                use_new_attention_order=c.use_new_attention_order,
            )

        ch = input_ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(_conv(c.dims, c.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1  # current downsample rate
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample, c.dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, c.num_heads), res(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(c.channel_mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                skip_ch = skip_chans.pop()
                layers = [res(ch + skip_ch, int(c.model_channels * mult))]
                ch = int(c.model_channels * mult)
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(
                        res(ch, ch, up=True) if c.resblock_updown else Upsample(ch, c.conv_resample, c.dims, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(_conv(c.dims, input_ch, c.out_channels, 3, padding=1)))

    def set_attention(self, impl: AttentionImpl) -> UNetModel:
        """Evaluate every attention block with ``impl`` ("math": official explicit path, the default; "sdpa")."""
        if impl not in ("math", "sdpa"):
            raise ValueError(f"attention must be 'math' or 'sdpa', got {impl!r}")
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.attention_impl = impl
        return self

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """x (B, C_in, H, W); timesteps (B,) original steps; y (B,) class labels iff ``num_classes`` is set."""
        if (y is not None) != (self.config.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        if timesteps.ndim != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"timesteps must be (B,) = ({x.shape[0]},), got {tuple(timesteps.shape)}")
        dtype = next(self.parameters()).dtype  # the network runs in its parameters' dtype
        temb = timestep_embedding(timesteps, self.config.model_channels)  # (B, model_channels) float32
        emb = self.time_embed(temb.to(dtype))  # (B, 4*model_channels)
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(dtype)  # (B, C_in, H, W)
        skips: list[Tensor] = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)  # (B, C_deep, H/2^L, W/2^L)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)  # [h, skip] along channels
        return self.out(h).to(x.dtype)  # (B, out_channels, H, W)
