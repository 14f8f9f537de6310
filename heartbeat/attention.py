"""Attention (and GroupNorm+SiLU) with a backend dispatch, and the UNet's attention modules.

Layout at every function here: (batch, length, heads, head_dim), the layout linear projections
give for free (DESIGN.md §3). Backends (`ModelConfig.attn_backend`, or the environment variable
HEARTBEAT_ATTN_BACKEND which wins):

    math      explicit softmax(q k^T * scale) v, softmax statistics in fp32; the reference
    sdpa      torch.nn.functional.scaled_dot_product_attention (PyTorch picks flash/mem-efficient/math)
    xformers  xformers.ops.memory_efficient_attention, when installed
    triton    kernels/ (the project's Triton kernels)
    auto      triton on CUDA where the kernel supports the shape, sdpa elsewhere

The UNet reaches the kernels only through these functions.
"""
from __future__ import annotations

import math as _math
import os

import torch
import torch.nn.functional as F

from .config import ATTN_BACKENDS

_SDPA_MAX_BATCH = 32768  # CUDA grids limit batch*heads in some SDPA kernels: chunk above this


def resolve_backend(requested: str = "auto") -> str:
    """The backend actually asked for: HEARTBEAT_ATTN_BACKEND overrides the config."""
    name = os.environ.get("HEARTBEAT_ATTN_BACKEND", "") or requested or "auto"
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {', '.join(ATTN_BACKENDS)}")
    return name


def _kernels():
    """The Triton kernels package, or None when Triton cannot run here."""
    try:
        import kernels  # noqa: WPS433 (lazy: importing triton is slow and optional)
        return kernels
    except Exception:  # ImportError, or a Triton that fails to initialise
        return None


def _use_triton(backend: str, op: str, *tensors) -> bool:
    if backend == "triton":
        if _kernels() is None:
            raise RuntimeError("attn_backend=triton but the Triton kernels cannot be imported; "
                               "install triton or choose --attn_backend=sdpa")
        return True
    if backend != "auto" or not tensors[0].is_cuda:
        return False
    k = _kernels()
    return k is not None and k.supports(op, *tensors)


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
    if q.shape[0] > _SDPA_MAX_BATCH and q.is_cuda:
        return torch.cat([_sdpa(*(t[i:i + _SDPA_MAX_BATCH] for t in (q, k, v)), scale=scale)
                          for i in range(0, q.shape[0], _SDPA_MAX_BATCH)])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


# ------------------------------------------------------------------------------- dispatch

def attention(q, k, v, scale=None, backend: str = "auto"):
    """Self- or cross-attention. q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    backend = resolve_backend(backend)
    if _use_triton(backend, "attention", q, k, v):
        return _kernels().attention(q, k, v, scale=scale)
    if backend == "math":
        return attention_math(q, k, v, scale)
    if backend == "xformers":
        return _xformers().memory_efficient_attention(q, k, v, scale=scale)
    return _sdpa(q, k, v, scale)


def temporal_attention(q, k, v, scale=None, backend: str = "auto"):
    """Attention along frames. q/k/v (N, F, H, D), N = B*h*w, possibly strided views. -> (N, F, H, D)."""
    backend = resolve_backend(backend)
    if _use_triton(backend, "temporal_attention", q, k, v):
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
    if _use_triton(backend, "dual_cross_attention", q_t, k_t, v_t, q_i, k_i, v_i):
        return _kernels().dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=scale)
    return attention(q_t, k_t, v_t, scale, backend) + attention(q_i, k_i, v_i, scale, backend)


def group_norm(x, weight, bias, num_groups: int, eps: float = 1e-5, silu: bool = False,
               backend: str = "auto"):
    """GroupNorm (statistics in fp32), optionally followed by SiLU. x (N, C, *spatial)."""
    backend = resolve_backend(backend)
    if backend in ("auto", "triton") and _use_triton(backend, "group_norm_silu", x):
        return _kernels().group_norm_silu(x, weight, bias, num_groups, eps=eps, silu=silu)
    y = F.group_norm(x.float(), num_groups, weight.float() if weight is not None else None,
                     bias.float() if bias is not None else None, eps).to(x.dtype)
    return F.silu(y) if silu else y
