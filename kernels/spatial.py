"""Spatial flash attention, forward and backward (FlashAttention-2 style), in Triton.

    attention(q, k, v, scale=None) -> o         q (B, Lq, H, D), k/v (B, Lk, H, D), o (B, Lq, H, D)

Supported: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), fp32 / fp16 / bf16 (all three
the same dtype), any strides (nothing is copied), any Lq, Lk >= 1, 1 <= D <= 256, any B*H (the
grid is one-dimensional: program id = (b*H + h) * m_blocks + m_block, so no 65,535 limit). The head
dim is split into two power-of-two pieces (kernels/_common.py): 40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32.

Forward: online softmax in base 2 (exp2, scale * log2 e folded into one multiply), fp32
statistics, saves the row logsumexp (base 2) for the backward.
Backward: two kernels, no atomics (deterministic): `_attn_bwd_dq` (one program per query block:
delta = rowsum(dO * O) computed and stored, then dQ by recomputing P from the logsumexp) and
`attn_bwd_dkdv` (kernels/_common.py; one program per key block, loops over query blocks: dK, dV).

Caveats: fp32 inputs use IEEE fp32 dots (no TF32), which is exact but slow; the launch configs
are heuristics chosen without a GPU to time them on (FWD_CANDIDATES / BWD_CANDIDATES in
kernels/_common.py); no dropout, no masks, no causal.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (BWD_CANDIDATES, FWD_CANDIDATES, LOG2E, attn_bwd_dkdv, branch_fwd, bucket, bwd_blocks,
                      bwd_config, check_qkv, dq_loop, empty, fwd_config, head_block, head_flags, load_rows,
                      precision, store_rows, stride_unit, strides, tuned_config)
from .tuning import pow2_bucket

# ----------------------------------------------------------------------------- forward

@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, sod,
              H, Lq, Lk, D: tl.constexpr, qk_scale, m_blocks,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
              EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
              UNIT: tl.constexpr):
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqb, sql, sqh, skb = sqb * UNIT, sql * UNIT, sqh * UNIT, skb * UNIT
    skl, skh, svb, svl = skl * UNIT, skh * UNIT, svb * UNIT, svl * UNIT
    svh, sob, sol, soh = svh * UNIT, sob * UNIT, sol * UNIT, soh * UNIT
    bh, mb, b, h = head_block(tl.program_id(0), m_blocks, H)
    K += b * skb + h * skh
    V += b * svb + h * svh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q0, q1 = load_rows(Q + b * sqb + h * sqh, offs_m * sql, m_ok, sqd, D, D0, D1, HAS_D1, MASK_D0, MASK_D1,
                        not EVEN_M)
    acc0, acc1, m_i, l_i = branch_fwd(q0, q1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, BLOCK_M, BLOCK_N,
                                       D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)

    inv_l = 1.0 / l_i
    store_rows(O + b * sob + h * soh, offs_m * sol, m_ok, sod, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    lse_ptrs = LSE + bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, m_i + tl.log2(l_i))
    else:
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=offs_m < Lq)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA,
                 sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                 sob, sol, soh, sod, sdob, sdol, sdoh, sdod, sdqb, sdql, sdqh, sdqd,
                 H, Lq, Lk, D: tl.constexpr, sm_scale, qk_scale, m_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                 UNIT: tl.constexpr):
    """One program per (b, h, query block): delta = rowsum(dO * O) (stored), then dQ."""
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqb, sql, sqh, skb = sqb * UNIT, sql * UNIT, sqh * UNIT, skb * UNIT
    skl, skh, svb, svl = skl * UNIT, skh * UNIT, svb * UNIT, svl * UNIT
    svh, sob, sol, soh = svh * UNIT, sob * UNIT, sol * UNIT, soh * UNIT
    sdob, sdol, sdoh, sdqb = sdob * UNIT, sdol * UNIT, sdoh * UNIT, sdqb * UNIT
    sdql, sdqh = sdql * UNIT, sdqh * UNIT
    bh, mb, b, h = head_block(tl.program_id(0), m_blocks, H)
    K += b * skb + h * skh
    V += b * svb + h * svh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q0, q1 = load_rows(Q + b * sqb + h * sqh, offs_m * sql, m_ok, sqd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    do0, do1 = load_rows(DO + b * sdob + h * sdoh, offs_m * sdol, m_ok, sdod,
                          D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    o0, o1 = load_rows(O + b * sob + h * soh, offs_m * sol, m_ok, sod,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
    if HAS_D1:
        delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
    row = bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        lse = tl.load(LSE + row)
        tl.store(DELTA + row, delta)
    else:
        lse = tl.load(LSE + row, mask=offs_m < Lq, other=0.0)
        tl.store(DELTA + row, delta, mask=offs_m < Lq)

    dq0, dq1 = dq_loop(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse, delta,
                        BLOCK_M, BLOCK_N, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)

    store_rows(DQ + b * sdqb + h * sdqh, offs_m * sdql, m_ok, sdqd, dq0 * sm_scale, dq1 * sm_scale,
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)


# ----------------------------------------------------------------------------- launchers

def attention_fwd(q, k, v, scale, config=None):
    """Launch the forward. Returns o (B, Lq, H, D) and lse (B, H, Lq) fp32, base 2."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn, warps, stages = config or fwd_config(D, q.dtype)
    o = empty(q.shape, q)
    lse = empty((B, H, Lq), q, torch.float32)
    m_blocks = triton.cdiv(Lq, bm)
    u = stride_unit(q, k, v, o)
    _attn_fwd[(B * H * m_blocks,)](
        q, k, v, o, lse, *strides(q, u), *strides(k, u), *strides(v, u), *strides(o, u),
        H, Lq, Lk, D, scale * LOG2E, m_blocks,
        BLOCK_M=bm, BLOCK_N=bn, **head_flags(D), EVEN_M=Lq % bm == 0, EVEN_N=Lk % bn == 0,
        PREC=precision(q.dtype), UNIT=u, num_warps=warps, num_stages=stages)
    return o, lse


def attention_bwd(q, k, v, o, lse, do, scale, config=None):
    """Launch the backward. Returns dq, dk, dv (contiguous, the inputs' dtype)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    (dq_bm, dq_bn), (kv_bm, kv_bn), warps, stages = bwd_blocks(config or bwd_config(D, q.dtype))
    dq = empty(q.shape, q)
    dk = empty(k.shape, k)
    dv = empty(v.shape, v)
    delta = empty(lse.shape, lse)
    u = stride_unit(q, k, v, o, do, dq, dk, dv)
    common = dict(**head_flags(D), PREC=precision(q.dtype), UNIT=u, num_warps=warps, num_stages=stages)
    m_blocks = triton.cdiv(Lq, dq_bm)
    _attn_bwd_dq[(B * H * m_blocks,)](
        q, k, v, o, do, dq, lse, delta, *strides(q, u), *strides(k, u), *strides(v, u), *strides(o, u),
        *strides(do, u), *strides(dq, u), H, Lq, Lk, D, scale, scale * LOG2E, m_blocks,
        BLOCK_M=dq_bm, BLOCK_N=dq_bn, EVEN_M=Lq % dq_bm == 0, EVEN_N=Lk % dq_bn == 0, **common)
    n_blocks = triton.cdiv(Lk, kv_bn)
    attn_bwd_dkdv[(B * H * n_blocks,)](
        q, k, v, do, dk, dv, lse, delta, *strides(q, u), *strides(k, u), *strides(v, u), *strides(do, u),
        *strides(dk, u), *strides(dv, u), H, Lq, Lk, D, scale, scale * LOG2E, n_blocks,
        BLOCK_M=kv_bm, BLOCK_N=kv_bn, EVEN_M=Lq % kv_bm == 0, EVEN_N=Lk % kv_bn == 0, **common)
    return dq, dk, dv



class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, fwd_cfg, bwd_cfg):
        fwd_cfg = fwd_cfg or tuned_config("attention.fwd", q.shape[-1], q.dtype, lambda: _shape_key(q, k),
                                          FWD_CANDIDATES, lambda c: attention_fwd(q, k, v, scale, c), q.is_cuda)
        o, lse = attention_fwd(q, k, v, scale, fwd_cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.bwd_cfg = scale, bwd_cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        bwd_cfg = ctx.bwd_cfg or tuned_config(
            "attention.bwd", q.shape[-1], q.dtype, lambda: _shape_key(q, k), BWD_CANDIDATES,
            lambda c: attention_bwd(q, k, v, o, lse, do, ctx.scale, c), q.is_cuda)
        dq, dk, dv = attention_bwd(q, k, v, o, lse, do, ctx.scale, bwd_cfg)
        return dq, dk, dv, None, None, None


def _shape_key(q, k) -> tuple:
    """Tuning key beyond (dtype, D): Lq, Lk and the number of (batch, head) pairs, as powers of two."""
    return (pow2_bucket(q.shape[1]), pow2_bucket(k.shape[1]), pow2_bucket(q.shape[0] * q.shape[2]))


def attention(q, k, v, scale=None, fwd_config=None, bwd_config=None):
    """softmax(q k^T * scale) v. q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D), contiguous.

    fwd_config / bwd_config: (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides (tests, tuning).
    """
    check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _Attention.apply(q, k, v, scale, fwd_config, bwd_config)


def supports(q, k, v) -> bool:
    try:
        check_qkv(q, k, v)
    except (ValueError, RuntimeError):
        return False
    return q.is_cuda and k.device == q.device and v.device == q.device


def attention_ref(q, k, v, scale=None):
    """The reference: plain PyTorch in the inputs' dtype (or float64 for tests)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
