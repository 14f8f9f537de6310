"""Small shared blocks of the UNet, with Stable Diffusion 1.5's (CompVis/LDM) parameter names.

    timestep_embedding(t, dim)        sinusoidal embedding, cos first (SD1.5 / flip_sin_to_cos=True)
    zero_module(m)                    zero a module's parameters in place (new layers start at zero output)
    GroupNorm32                       GroupNorm with fp32 statistics, optionally fused with SiLU
    ResBlock                          in_layers / emb_layers / out_layers / skip_connection
    Downsample, Upsample              `op` (stride-2 conv) and `conv` (nearest x2 then conv)
    checkpoint(fn, *args, enabled)    torch.utils.checkpoint (use_reentrant=False) when enabled
    MEMORY_FORMAT, as_layout(x),      the one memory layout of the UNet's and the VAE's activations and
    layout_weights(module)            conv weights; the deliberate conversions to it

Memory format (docs/ARCHITECTURE.md §Tensors): one layout for every conv input and conv weight of the
UNet and the VAE, NCHW (torch.contiguous_format). A conv that meets a channels-last input with NCHW
weights re-lays its weights on every call (an aten::copy_ inside aten::_convolution, 1280x2560x3x3 at
SD1.5's widest); a conv whose input and weight agree copies nothing. Layout changes happen only where
a module turns pixels into tokens and back (SpatialTransformer, the VAE's AttnBlock), and there they
go through as_layout on purpose; tests/test_memory_format.py checks that a forward makes no weight copies.
Why NCHW, for now: it is what checkpoints, safetensors, FSDP shards and the diffusers reference hold, so
nothing is converted anywhere. Channels-last is the likely better default: on the CPU (fp32, oneDNN) it
ran the sd15 UNet faster in the latest side-by-side runs (docs/ARCHITECTURE.md §Tensors), but the
training paths (FSDP2 shards, resume, EMA) have not been run under it, so it is not the default yet. On
a GPU in bf16, channels-last convs are usually faster (cuDNN's tensor-core kernels work in NHWC and
transpose NCHW around them); that is expected, not measured here (`tools/bench_e2e.py
--memory_format=channels_last` measures it). To switch, set MEMORY_FORMAT = torch.channels_last: UNet
and AutoencoderKL convert their weights once at construction and their inputs on entry, and the token
reshapes become free views.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .attention import group_norm

MEMORY_FORMAT = torch.contiguous_format  # the policy above; torch.channels_last is the one alternative


def as_layout(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) in MEMORY_FORMAT: a no-op when it already is, else one copy made on purpose."""
    return x.contiguous(memory_format=MEMORY_FORMAT)


def layout_weights(module: nn.Module) -> nn.Module:
    """Every 4-d parameter and buffer of `module` in MEMORY_FORMAT, in place, once (a no-op under NCHW)."""
    return module.to(memory_format=MEMORY_FORMAT)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """SD1.5's sinusoidal embedding. t (B,) int or float -> (B, dim) fp32, [cos | sin] halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpoint(fn, *args, enabled: bool = False):
    """fn(*args), recomputed in backward (non-reentrant) when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with statistics in fp32 (output in the input dtype); `silu=True` fuses a SiLU after it.

    x (N, C, *spatial) -> same shape. `backend` is the attention backend name (auto/triton use the
    fused Triton kernel on CUDA; elsewhere torch's group_norm).
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, silu: bool = False,
                 backend: str = "auto"):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by norm_groups={num_groups}; "
                             "choose widths that are multiples of --norm_groups")
        super().__init__(num_groups, num_channels, eps=eps)
        self.silu = silu
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu=self.silu, backend=self.backend)


class ResBlock(nn.Module):
    """SD's ResBlock: (GN+SiLU, conv3x3) + Linear(SiLU(emb)) -> (GN+SiLU, dropout, zero conv3x3) + skip.

    x (N, cin, H, W), emb (N, emb_dim) -> (N, cout, H, W). `skip_connection` is a 1x1 conv when
    cin != cout (SD1.5), else identity. out_layers.3 starts at zero as in SD.
    """

    def __init__(self, cin: int, emb_dim: int, cout: int, groups: int = 32, dropout: float = 0.0,
                 backend: str = "auto"):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, cin, silu=True, backend=backend), nn.Identity(),  # .1 = SiLU, fused into .0
            nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, cout, silu=True, backend=backend), nn.Identity(),  # .1 = SiLU, fused into .0
            nn.Dropout(dropout), zero_module(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (N, cout) -> (N, cout, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv `op`. (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 `conv`. (N, C, H, W) -> (N, C, 2H, 2W), or to `size` when given."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
