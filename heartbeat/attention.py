"""Attention (and GroupNorm+SiLU) with a backend dispatch, and the UNet's attention modules.

Layout at every function here: (batch, length, heads, head_dim), the layout linear projections
give for free (docs/ARCHITECTURE.md, "Tensors"). Backends (`ModelConfig.attn_backend`, or the
environment variable HEARTBEAT_ATTN_BACKEND, read once when this module is imported, which wins):

    math      explicit softmax(q k^T * scale) v, softmax statistics in fp32; the reference
    sdpa      torch.nn.functional.scaled_dot_product_attention (PyTorch picks flash/mem-efficient/math)
    xformers  xformers.ops.memory_efficient_attention, when installed
    triton    kernels/ (the project's Triton kernels), forced: an unsupported input is an error
    auto      a Triton kernel where kernels/dispatch.py says so (fp16/bf16 on CUDA, measured faster on
              this GPU in kernels/dispatch.json, and a first-use self-check passed), sdpa elsewhere

Per call the dispatcher does no validation of its own and no import: `auto` is one cached decision
per (op, device, dtype, head dim, grad), and the kernel's launcher checks its inputs once. The UNet
reaches the kernels only through these functions.
"""
from __future__ import annotations

import math as _math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ATTN_BACKENDS

_SDPA_MAX_GRID = 32768   # CUDA grid y/z limits: SDPA kernels put batch and heads there; chunk above this
_ENV_BACKEND = os.environ.get("HEARTBEAT_ATTN_BACKEND", "")
_LOWP = (torch.float16, torch.bfloat16)
_MAX_FRAMES = 64          # the temporal kernel's limit (kernels/temporal.py MAX_FRAMES)
_kernels_mod = None       # the kernels package, imported on first use
_dispatch_mod = None


def resolve_backend(requested: str = "auto") -> str:
    """The backend actually asked for: HEARTBEAT_ATTN_BACKEND (read at import) overrides the config."""
    name = _ENV_BACKEND or requested or "auto"
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {', '.join(ATTN_BACKENDS)}")
    return name


def _kernels(required: bool = True):
    """The kernels package (imported once); None, or an error when required, if it cannot be imported."""
    global _kernels_mod, _dispatch_mod
    if _kernels_mod is None:
        try:
            import kernels  # lazy: importing triton is slow and optional
            import kernels.dispatch
            _kernels_mod, _dispatch_mod = kernels, kernels.dispatch
        except Exception:  # ImportError, or a Triton that fails to initialise
            if required:
                raise RuntimeError("attn_backend=triton but the Triton kernels cannot be imported; "
                                   "install triton or choose --attn_backend=sdpa") from None
            return None
    return _kernels_mod


def _auto(op: str, x, dim: int, grad: bool, extra=None) -> bool:
    """auto: the kernel for this call? CUDA fp16/bf16 only (the fp32 path is exact but slow), then
    the cached decision of kernels/dispatch.py (measured table + self-check)."""
    if not x.is_cuda or x.dtype not in _LOWP or _kernels(False) is None:
        return False
    return _dispatch_mod.use_kernel(op, x, dim, grad, extra)


def _grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _xformers():
    try:
        import xformers.ops as xops
        return xops
    except Exception:
        raise RuntimeError("attn_backend=xformers but xformers is not installed; "
                           "pip install xformers, or choose --attn_backend=sdpa") from None


# ------------------------------------------------------------------------------ references

def attention_math(q, k, v, scale=None):
    """softmax(q k^T * scale) v in the inputs' dtype with fp32 softmax. (B, Lq, H, D) -> (B, Lq, H, D)."""
    scale = 1.0 / _math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    p = s.softmax(dim=-1)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v.float())
    return o.to(q.dtype)


def _sdpa(q, k, v, scale=None):
    for dim in (0, 2):   # batch, heads (the temporal layers' heads are pixels x heads)
        if q.shape[dim] > _SDPA_MAX_GRID and q.is_cuda:
            return torch.cat([_sdpa(*(t.narrow(dim, i, min(_SDPA_MAX_GRID, q.shape[dim] - i)) for t in (q, k, v)),
                                    scale=scale) for i in range(0, q.shape[dim], _SDPA_MAX_GRID)], dim=dim)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


# ------------------------------------------------------------------------------- dispatch

def attention(q, k, v, scale=None, backend: str = "auto"):
    """Self- or cross-attention. q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    backend = resolve_backend(backend)
    if backend == "triton" or (backend == "auto" and _auto("attention", q, q.shape[-1], _grad(q, k, v))):
        return _kernels().attention(q, k, v, scale=scale)
    if backend == "math":
        return attention_math(q, k, v, scale)
    if backend == "xformers":
        return _xformers().memory_efficient_attention(q, k, v, scale=scale)
    return _sdpa(q, k, v, scale)


def temporal_attention(q, k, v, scale=None, backend: str = "auto"):
    """Attention along frames. q/k/v (N, F, H, D), possibly strided views -> (N, F, H, D). The UNet
    passes N = B clips and H = h*w*heads (TemporalAttention); the kernel also takes (B, S, F, H, D)."""
    backend = resolve_backend(backend)
    if backend == "triton" or (backend == "auto" and q.shape[-3] <= _MAX_FRAMES and _auto(
            "temporal_attention", q, q.shape[-1], _grad(q, k, v), q.shape[-3])):
        return _kernels().temporal_attention(q, k, v, scale=scale)
    if backend == "math":
        return attention_math(q, k, v, scale)
    if backend == "xformers":
        return _xformers().memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale=scale)
    return _sdpa(q, k, v, scale)


def dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=None, backend: str = "auto"):
    """attn(q_t, k_t, v_t) + attn(q_i, k_i, v_i): two softmaxes, one output (B, Lq, H, D).

    The image branch may be absent (k_i is None): then this is plain cross-attention on text.
    """
    backend = resolve_backend(backend)
    if k_i is None:
        return attention(q_t, k_t, v_t, scale, backend)
    if backend == "triton" or (backend == "auto" and _auto(
            "dual_cross_attention", q_t, q_t.shape[-1], _grad(q_t, k_t, v_t, q_i, k_i, v_i))):
        return _kernels().dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=scale)
    return attention(q_t, k_t, v_t, scale, backend) + attention(q_i, k_i, v_i, scale, backend)


def group_norm(x, weight, bias, num_groups: int, eps: float = 1e-5, silu: bool = False,
               backend: str = "auto"):
    """GroupNorm (statistics in fp32), optionally followed by SiLU. x (N, C, *spatial)."""
    backend = resolve_backend(backend)
    if backend == "triton" or (backend == "auto" and x.dim() >= 3 and _auto(
            "group_norm_silu", x, x.shape[1], _grad(x, weight, bias), num_groups)):
        return _kernels().group_norm_silu(x, weight, bias, num_groups, eps=eps, silu=silu)
    y = F.group_norm(x.float(), num_groups, weight.float() if weight is not None else None,
                     bias.float() if bias is not None else None, eps).to(x.dtype)
    return F.silu(y) if silu else y


# -------------------------------------------------------------------------------- modules
#
# Parameter names follow SD1.5 (CompVis `CrossAttention`): to_q, to_k, to_v (no bias), to_out.0
# (Linear with bias; to_out.1 is SD's Dropout). New parameters relative to SD:
#   DualCrossAttention: to_q_img (absent when share_q), to_k_img, to_v_img (all Linear, no bias).
#       The image branch shares SD's output projection to_out.0: the dispatcher returns the sum of the
#       two softmax attentions (the fused Triton kernel writes that sum once), so the branch is made
#       zero at init by zeroing to_v_img rather than an output projection of its own.
#   TemporalAttention: to_q, to_k, to_v, to_out.0 (zero-init), pos_emb (max_frames, dim).

class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (SD's attn1). x (N, L, dim) -> (N, L, dim)."""

    def __init__(self, dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads, self.backend = heads, backend
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, C = x.shape
        h = self.heads
        q = self.to_q(x).view(N, L, h, C // h)  # (N, L, heads, head_dim), free after linear
        k = self.to_k(x).view(N, L, h, C // h)
        v = self.to_v(x).view(N, L, h, C // h)
        o = attention(q, k, v, backend=self.backend)
        return self.to_out(o.reshape(N, L, C))


class DualCrossAttention(nn.Module):
    """Cross-attention on text plus cross-attention on image-prior tokens, two softmaxes (SD's attn2).

    out = to_out(Attn(Q_t, K_t, V_t) + Attn(Q_i, K_i, V_i)); Q_t = to_q(x), K_t/V_t = to_k/to_v(text),
    Q_i = to_q_img(x) (or Q_t when share_q: computed once), K_i/V_i = to_k_img/to_v_img(image).
    to_v_img starts at zero, so at init the image branch adds exactly nothing and a loaded SD1.5
    attn2 given text reproduces SD1.5. Zero image tokens (the Conditioner's "absent" image) also
    add exactly nothing: the projections have no bias, so V_i = 0.

    x (N, L, dim); text (N, Lt, context_dim) or None; image (N, Li, context_dim) or None.
    A None branch is skipped; with both None the layer returns zeros (the block skips it).
    """

    def __init__(self, dim: int, context_dim: int, heads: int, share_q: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads, self.share_q, self.backend = heads, share_q, backend
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.to_q_img = None if share_q else nn.Linear(dim, dim, bias=False)
        self.to_k_img = nn.Linear(context_dim, dim, bias=False)
        self.to_v_img = nn.Linear(context_dim, dim, bias=False)
        nn.init.zeros_(self.to_v_img.weight)

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
                image: torch.Tensor | None = None) -> torch.Tensor:
        N, L, C = x.shape
        h, d = self.heads, C // self.heads
        if text is None and image is None:
            return torch.zeros_like(x)

        def heads(t):  # (N, L, C) -> (N, L, heads, head_dim), a view of the projection
            return t.view(t.shape[0], t.shape[1], h, d)

        q_t = heads(self.to_q(x)) if (text is not None or self.share_q) else None
        if image is not None:
            q_i = q_t if self.share_q else heads(self.to_q_img(x))
            k_i, v_i = heads(self.to_k_img(image)), heads(self.to_v_img(image))
        if text is None:
            o = attention(q_i, k_i, v_i, backend=self.backend)
        elif image is None:
            o = attention(q_t, heads(self.to_k(text)), heads(self.to_v(text)), backend=self.backend)
        else:
            o = dual_cross_attention(q_t, heads(self.to_k(text)), heads(self.to_v(text)), q_i, k_i, v_i,
                                     backend=self.backend)
        return self.to_out(o.reshape(N, L, C))


def _frame_table(n: int, dim: int) -> torch.Tensor:
    """Sinusoidal frame positions (n, dim), [cos | sin] halves like the timestep embedding."""
    half = dim // 2
    freqs = torch.exp(-_math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = torch.arange(n, dtype=torch.float32)[:, None] * freqs[None]
    table = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([table, torch.zeros(n, dim - 2 * half)], dim=-1)


class TemporalAttention(nn.Module):
    """Self-attention along frames, one sequence per pixel and head (stage 2's `attn_temporal`).

    x (B, F, L, dim) -> (B, F, L, dim), L = h*w pixels: the LayerNorm'd tokens in the order the
    spatial layers leave them (frames-as-batch), so nothing is transposed or copied around the layer.
    The frame-position embedding `pos_emb` (learned, initialised sinusoidal, max_frames rows) is added
    to the input of q and k only; to_out.0 starts at zero, so a new layer adds nothing.
    q/k/v reach the dispatcher as (B, F, L*heads, head_dim) views of the projections: every
    (pixel, head) pair is one "head" of a batch of B clips, with the frames as the sequence, a layout
    the Triton kernel, SDPA and xformers all read through its strides (docs/ARCHITECTURE.md, "Tensors").
    """

    def __init__(self, dim: int, heads: int, max_frames: int, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads, self.backend = heads, backend
        self.pos_emb = nn.Parameter(_frame_table(max_frames, dim))
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        nn.init.zeros_(self.to_out[0].weight)
        nn.init.zeros_(self.to_out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, F_, L, C = x.shape
        if F_ > self.pos_emb.shape[0]:
            raise ValueError(f"temporal attention got {F_} frames but max_frames={self.pos_emb.shape[0]}; "
                             "raise --max_frames")
        hd, d = L * self.heads, C // self.heads
        xp = x + self.pos_emb[:F_, None].to(x.dtype)  # positions on q/k only
        q = self.to_q(xp).view(B, F_, hd, d)  # (B, F, L*heads, head_dim): free views of the projections
        k = self.to_k(xp).view(B, F_, hd, d)
        v = self.to_v(x).view(B, F_, hd, d)
        o = temporal_attention(q, k, v, backend=self.backend)
        return self.to_out(o.reshape(B, F_, L, C))
