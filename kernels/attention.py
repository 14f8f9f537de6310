"""Spatial flash attention, forward and backward (FlashAttention-2 style), in Triton.

    attention(q, k, v, scale=None) -> o         q (B, Lq, H, D), k/v (B, Lk, H, D), o (B, Lq, H, D)

Supported: CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), fp32 / fp16 / bf16 (all three
the same dtype), any strides (nothing is copied), any Lq, Lk >= 1, 1 <= D <= 256, any B*H (the
grid is one-dimensional: program id = (b*H + h) * m_blocks + m_block, so no 65,535 limit).

Head dim without paying a full power of two: the head dim is split into two power-of-two pieces,
D = D0 + D1 (D0 the largest power of two <= D, at least 16; D1 the next power of two >= the rest,
at least 16), each with its own dot, so 40 = 32 + 16 (8 masked), 80 = 64 + 16, 160 = 128 + 32,
instead of 64 / 128 / 256. Masks exist only in the variants that need them (MASK_D0 / MASK_D1,
EVEN_M / EVEN_N compile-time flags).

Forward: online softmax in base 2 (exp2, scale * log2 e folded into one multiply), fp32
statistics, saves the row logsumexp (base 2) for the backward.
Backward: two kernels, no atomics (deterministic): `_attn_bwd_dq` (one program per query block:
delta = rowsum(dO * O) computed and stored, then dQ by recomputing P from the logsumexp) and
`_attn_bwd_dkdv` (one program per key block, loops over query blocks: dK, dV).

Caveats: fp32 inputs use IEEE fp32 dots (no TF32), which is exact but slow; the block sizes are
heuristics chosen without a GPU to tune on (see CONFIGS); no dropout, no masks, no causal.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from . import _interpreter_compat

_interpreter_compat()   # only acts under TRITON_INTERPRET=1 (fixes for Triton's CPU interpreter)

# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def _load(ptrs, m0, m1, USE_M0: tl.constexpr, USE_M1: tl.constexpr):
    """Load a 2-D tile; m0 (X, 1) and m1 (1, Y) masks are applied only where the flag says so."""
    if USE_M0:
        if USE_M1:
            x = tl.load(ptrs, mask=m0 & m1, other=0.0)
        else:
            x = tl.load(ptrs, mask=m0, other=0.0)
    else:
        if USE_M1:
            x = tl.load(ptrs, mask=m1, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store(ptrs, x, m0, m1, USE_M0: tl.constexpr, USE_M1: tl.constexpr):
    if USE_M0:
        if USE_M1:
            tl.store(ptrs, x, mask=m0 & m1)
        else:
            tl.store(ptrs, x, mask=m0)
    else:
        if USE_M1:
            tl.store(ptrs, x, mask=m1)
        else:
            tl.store(ptrs, x)


@triton.jit
def _load_rows(X, roff, rok, sd, D, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
               MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_R: tl.constexpr):
    """A (rows, D) tile as its two head-dim pieces: X + roff[r] + d * sd for d in [0, D0) and
    [D0, D0 + D1); x1 is x0 when there is no second piece. rok (rows,) masks rows when MASK_R."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    x0 = _load(X + roff[:, None] + d0[None, :] * sd, rok[:, None], d0[None, :] < D, MASK_R, MASK_D0)
    x1 = x0
    if HAS_D1:
        x1 = _load(X + roff[:, None] + d1[None, :] * sd, rok[:, None], d1[None, :] < D, MASK_R, MASK_D1)
    return x0, x1


@triton.jit
def _store_rows(X, roff, rok, sd, x0, x1, D, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_R: tl.constexpr):
    """Store the two head-dim pieces of a (rows, D) tile (cast to X's type), as _load_rows reads them."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    _store(X + roff[:, None] + d0[None, :] * sd, x0.to(X.dtype.element_ty), rok[:, None], d0[None, :] < D,
           MASK_R, MASK_D0)
    if HAS_D1:
        _store(X + roff[:, None] + d1[None, :] * sd, x1.to(X.dtype.element_ty), rok[:, None], d1[None, :] < D,
               MASK_R, MASK_D1)


@triton.jit
def _head_block(pid, blocks, H):
    """Program id -> (b*H + h, block index, b, h), b and h as int64 for the pointer offsets."""
    bh = pid // blocks
    return bh, pid % blocks, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _branch_fwd(q0, q1, K, V, skl, skd, svl, svd, Lk, D, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over one context: unnormalised accumulators, row max and row sum (base 2)."""
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        n = start_n + offs_n
        n_ok_row = n[None, :] < Lk
        n_ok_col = n[:, None] < Lk
        k0t = _load(K + n[None, :] * skl + d0[:, None] * skd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
        s = tl.dot(q0, k0t, input_precision=PREC)
        if HAS_D1:
            k1t = _load(K + n[None, :] * skl + d1[:, None] * skd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
            s += tl.dot(q1, k1t, input_precision=PREC)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(n_ok_row, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = _load(V + n[:, None] * svl + d0[None, :] * svd, n_ok_col, d0[None, :] < D, not EVEN_N, MASK_D0)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
        if HAS_D1:
            v1 = _load(V + n[:, None] * svl + d1[None, :] * svd, n_ok_col, d1[None, :] < D, not EVEN_N, MASK_D1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sob, sol, soh, sod,
              H, Lq, Lk, D, qk_scale, m_blocks,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
              HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
              EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr):
    bh, mb, b, h = _head_block(tl.program_id(0), m_blocks, H)
    K += b * skb + h * skh
    V += b * svb + h * svh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q0, q1 = _load_rows(Q + b * sqb + h * sqh, offs_m * sql, m_ok, sqd, D, D0, D1, HAS_D1, MASK_D0, MASK_D1,
                        not EVEN_M)
    acc0, acc1, m_i, l_i = _branch_fwd(q0, q1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, BLOCK_M, BLOCK_N,
                                       D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)

    inv_l = 1.0 / l_i
    _store_rows(O + b * sob + h * soh, offs_m * sol, m_ok, sod, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    lse_ptrs = LSE + bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        tl.store(lse_ptrs, m_i + tl.log2(l_i))
    else:
        tl.store(lse_ptrs, m_i + tl.log2(l_i), mask=offs_m < Lq)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _p_dp_tile(q0, q1, do0, do1, K, V, skl, skd, svl, svd, n, Lk, D, qk_scale, lse,
               D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, MASK_D0: tl.constexpr,
               MASK_D1: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """One key tile n of a query block's backward: P recomputed from the row logsumexp (base 2),
    dP = dO V^T, and the K^T pieces that dQ = dS K needs (k1t is k0t when there is no second piece)."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_ok_row = n[None, :] < Lk
    k0t = _load(K + n[None, :] * skl + d0[:, None] * skd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
    v0t = _load(V + n[None, :] * svl + d0[:, None] * svd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
    s = tl.dot(q0, k0t, input_precision=PREC)
    dp = tl.dot(do0, v0t, input_precision=PREC)
    k1t = k0t
    if HAS_D1:
        k1t = _load(K + n[None, :] * skl + d1[:, None] * skd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
        v1t = _load(V + n[None, :] * svl + d1[:, None] * svd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
        s += tl.dot(q1, k1t, input_precision=PREC)
        dp += tl.dot(do1, v1t, input_precision=PREC)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if not EVEN_N:
        p = tl.where(n_ok_row, p, 0.0)
    return p, dp, k0t, k1t


@triton.jit
def _dq_loop(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse, delta,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
             EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """Unscaled dQ of one query block over one context: dQ = sum_n (P * (dP - delta)) K.
    Shared by the spatial and the dual backward."""
    offs_n = tl.arange(0, BLOCK_N)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        p, dp, k0t, k1t = _p_dp_tile(q0, q1, do0, do1, K, V, skl, skd, svl, svd, start_n + offs_n, Lk, D,
                                     qk_scale, lse, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 += tl.dot(ds, tl.trans(k0t), input_precision=PREC)
        if HAS_D1:
            dq1 += tl.dot(ds, tl.trans(k1t), input_precision=PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA,
                 sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                 sob, sol, soh, sod, sdob, sdol, sdoh, sdod, sdqb, sdql, sdqh, sdqd,
                 H, Lq, Lk, D, sm_scale, qk_scale, m_blocks,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                 HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                 EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """One program per (b, h, query block): delta = rowsum(dO * O) (stored), then dQ."""
    bh, mb, b, h = _head_block(tl.program_id(0), m_blocks, H)
    K += b * skb + h * skh
    V += b * svb + h * svh
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q0, q1 = _load_rows(Q + b * sqb + h * sqh, offs_m * sql, m_ok, sqd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    do0, do1 = _load_rows(DO + b * sdob + h * sdoh, offs_m * sdol, m_ok, sdod,
                          D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    o0, o1 = _load_rows(O + b * sob + h * soh, offs_m * sol, m_ok, sod,
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

    dq0, dq1 = _dq_loop(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse, delta,
                        BLOCK_M, BLOCK_N, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)

    _store_rows(DQ + b * sdqb + h * sdqh, offs_m * sdql, m_ok, sdqd, dq0 * sm_scale, dq1 * sm_scale,
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                   sdob, sdol, sdoh, sdod, sdkb, sdkl, sdkh, sdkd, sdvb, sdvl, sdvh, sdvd,
                   H, Lq, Lk, D, sm_scale, qk_scale, n_blocks,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """One program per (b, h, key block), looping over query blocks: dK and dV (transposed math:
    S^T = K Q^T so that P^T, dP^T come out in the layout the dots want)."""
    bh, nb, b, h = _head_block(tl.program_id(0), n_blocks, H)
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += bh.to(tl.int64) * Lq
    DELTA += bh.to(tl.int64) * Lq

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_ok = offs_n < Lk
    k0, k1 = _load_rows(K + b * skb + h * skh, offs_n * skl, n_ok, skd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    v0, v1 = _load_rows(V + b * svb + h * svh, offs_n * svl, n_ok, svd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    for start_m in range(0, Lq, BLOCK_M):
        m = start_m + offs_m
        m_ok_row = m[None, :] < Lq
        q0t = _load(Q + m[None, :] * sql + d0[:, None] * sqd, d0[:, None] < D, m_ok_row, MASK_D0, not EVEN_M)
        do0, do1 = _load_rows(DO, m * sdol, m < Lq, sdod, D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
        if EVEN_M:
            lse = tl.load(LSE + m)
            delta = tl.load(DELTA + m)
        else:  # rows past Lq: lse = +inf makes P^T = 0 there
            lse = tl.load(LSE + m, mask=m < Lq, other=float("inf"))
            delta = tl.load(DELTA + m, mask=m < Lq, other=0.0)
        st = tl.dot(k0, q0t, input_precision=PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PREC)
        if HAS_D1:
            q1t = _load(Q + m[None, :] * sql + d1[:, None] * sqd, d1[:, None] < D, m_ok_row, MASK_D1, not EVEN_M)
            st += tl.dot(k1, q1t, input_precision=PREC)
            dpt += tl.dot(v1, tl.trans(do1), input_precision=PREC)
        pt = tl.exp2(st * qk_scale - lse[None, :])          # (BLOCK_N, BLOCK_M)
        dst = (pt * (dpt - delta[None, :])).to(q0t.dtype)
        pt = pt.to(do0.dtype)
        dv0 += tl.dot(pt, do0, input_precision=PREC)
        dk0 += tl.dot(dst, tl.trans(q0t), input_precision=PREC)
        if HAS_D1:
            dv1 += tl.dot(pt, do1, input_precision=PREC)
            dk1 += tl.dot(dst, tl.trans(q1t), input_precision=PREC)

    _store_rows(DK + b * sdkb + h * sdkh, offs_n * sdkl, n_ok, sdkd, dk0 * sm_scale, dk1 * sm_scale,
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    _store_rows(DV + b * sdvb + h * sdvh, offs_n * sdvl, n_ok, sdvd, dv0, dv1,
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)


# ----------------------------------------------------------------------------- launchers

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def split_head_dim(D: int):
    """(D0, D1): two power-of-two pieces covering D; D1 = 0 when D0 alone covers it."""
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


def head_flags(D: int):
    """Compile-time head-dim flags shared by every attention kernel here."""
    d0, d1 = split_head_dim(D)
    return dict(D0=d0, D1=d1 if d1 else 16, HAS_D1=d1 > 0, MASK_D0=D < d0, MASK_D1=d1 > 0 and d0 + d1 != D)


def precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


# Launch configs, key = padded head dim bucket. fwd: (BLOCK_M, BLOCK_N, num_warps, num_stages); bwd:
# (BLOCK_A, BLOCK_B, num_warps, num_stages), the larger block on the side each backward kernel keeps
# resident (see bwd_blocks). The first candidate of each list is the default (FWD_CONFIGS /
# BWD_CONFIGS), a heuristic chosen with no GPU to time it on, such that every bf16/fp16 variant
# compiles for sm_90 with wgmma and without register spills (ptxas -v, kernels/compile_check.py),
# except D > 160 in the backward. The others are what kernels/tuning.py times when
# HEARTBEAT_AUTOTUNE=1 (fp16/bf16 only); all are compiled offline in the tests. fp32: stages 1.
FWD_CANDIDATES = {
    64: [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 128, 8, 2)],
    256: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
BWD_CANDIDATES = {
    64: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
    128: [(64, 64, 8, 2), (64, 32, 4, 2), (128, 64, 8, 1)],
    256: [(16, 64, 8, 1), (32, 64, 8, 1)],
}
FWD_CONFIGS = {b: c[0] for b, c in FWD_CANDIDATES.items()}
BWD_CONFIGS = {b: c[0] for b, c in BWD_CANDIDATES.items()}


def _bucket(D):
    d0, d1 = split_head_dim(D)
    return 64 if d0 + d1 <= 64 else 128 if d0 + d1 <= 128 else 256


def fwd_config(D, dtype):
    bm, bn, w, s = FWD_CONFIGS[_bucket(D)]
    return bm, bn, w, (1 if dtype == torch.float32 else s)


def bwd_config(D, dtype):
    bm, bn, w, s = BWD_CONFIGS[_bucket(D)]
    if dtype == torch.float32 and _bucket(D) == 256:
        bm, bn = 32, 32
    return bm, bn, w, (1 if dtype == torch.float32 else s)


def tuned_config(name: str, D: int, dtype, key: tuple, candidates: dict, launch, device_ok: bool):
    """A config from kernels/tuning.py when HEARTBEAT_AUTOTUNE is on (fp16/bf16 on CUDA, or under the
    interpreter for the tests), else None (the launcher's default)."""
    from . import tuning
    if dtype == torch.float32 or not tuning.enabled() or not (device_ok or interpreting()):
        return None
    return tuning.choose(name, (str(dtype)[6:], D) + key, candidates[_bucket(D)], launch)


POISON = False  # tests set True: fresh outputs start as NaN (0x7fff.. for ints), so unwritten elements show


def empty(shape, like, dtype=None):
    """A fresh contiguous output on like's device (NaN-filled when POISON is set)."""
    x = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return x.fill_(float("nan")) if POISON and x.is_floating_point() else x


def empty_like(x):
    """torch.empty_like (x's memory format), NaN-filled when POISON is set."""
    y = torch.empty_like(x)
    return y.fill_(float("nan")) if POISON and y.is_floating_point() else y


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors):
    for t in tensors:
        if not (t.is_cuda or interpreting()):
            raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def check_qkv(q, k, v, name="attention"):
    check_device(q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be (B, L, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Lq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"{name}: shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim {D} not in 1..{MAX_HEAD_DIM}")
    if Lq < 1 or k.shape[1] < 1 or B < 1 or H < 1:
        raise ValueError(f"{name}: empty input {tuple(q.shape)}, {tuple(k.shape)}")


def attention_fwd(q, k, v, scale, config=None):
    """Launch the forward. Returns o (B, Lq, H, D) and lse (B, H, Lq) fp32, base 2."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    bm, bn, warps, stages = config or fwd_config(D, q.dtype)
    o = empty(q.shape, q)
    lse = empty((B, H, Lq), q, torch.float32)
    m_blocks = triton.cdiv(Lq, bm)
    _attn_fwd[(B * H * m_blocks,)](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, Lq, Lk, D, scale * LOG2E, m_blocks,
        BLOCK_M=bm, BLOCK_N=bn, **head_flags(D), EVEN_M=Lq % bm == 0, EVEN_N=Lk % bn == 0,
        PREC=precision(q.dtype), num_warps=warps, num_stages=stages)
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
    common = dict(**head_flags(D), PREC=precision(q.dtype), num_warps=warps, num_stages=stages)
    m_blocks = triton.cdiv(Lq, dq_bm)
    _attn_bwd_dq[(B * H * m_blocks,)](
        q, k, v, o, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        *do.stride(), *dq.stride(), H, Lq, Lk, D, scale, scale * LOG2E, m_blocks,
        BLOCK_M=dq_bm, BLOCK_N=dq_bn, EVEN_M=Lq % dq_bm == 0, EVEN_N=Lk % dq_bn == 0, **common)
    n_blocks = triton.cdiv(Lk, kv_bn)
    _attn_bwd_dkdv[(B * H * n_blocks,)](
        q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        *dk.stride(), *dv.stride(), H, Lq, Lk, D, scale, scale * LOG2E, n_blocks,
        BLOCK_M=kv_bm, BLOCK_N=kv_bn, EVEN_M=Lq % kv_bm == 0, EVEN_N=Lk % kv_bn == 0, **common)
    return dq, dk, dv


def bwd_blocks(config):
    """A backward config (BLOCK_A, BLOCK_B, warps, stages) -> the two kernels' blocks. The larger
    block goes on the dimension each kernel keeps resident (queries for dQ, keys for dK/dV): that is
    the M side of its dots, which must be >= 64 for wgmma with 4+ warps."""
    a, b, warps, stages = config
    big, small = max(a, b), min(a, b)
    return (big, small), (small, big), warps, stages


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, fwd_cfg, bwd_cfg):
        fwd_cfg = fwd_cfg or tuned_config("attention.fwd", q.shape[-1], q.dtype, _shape_key(q, k), FWD_CANDIDATES,
                                          lambda c: attention_fwd(q, k, v, scale, c), q.is_cuda)
        o, lse = attention_fwd(q, k, v, scale, fwd_cfg)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.bwd_cfg = scale, bwd_cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        bwd_cfg = ctx.bwd_cfg or tuned_config("attention.bwd", q.shape[-1], q.dtype, _shape_key(q, k), BWD_CANDIDATES,
                                              lambda c: attention_bwd(q, k, v, o, lse, do, ctx.scale, c), q.is_cuda)
        dq, dk, dv = attention_bwd(q, k, v, o, lse, do, ctx.scale, bwd_cfg)
        return dq, dk, dv, None, None, None


def _shape_key(q, k) -> tuple:
    """Tuning key beyond (dtype, D): Lq, Lk and the number of (batch, head) pairs, as powers of two."""
    from .tuning import pow2_bucket
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


def compile_variants(full=False):
    """The variants the launchers above can produce, for kernels/compile_check.py (see there)."""
    from .compile_check import Variant, make_signature, ptr
    out = []
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    if full:
        cases = [(D, dt, em, en) for D in (16, 40, 64, 80, 96, 128, 160, 256)
                 for dt in DTYPES for em in (False, True) for en in (False, True)]
    else:  # every config bucket, every dtype once, ragged and even flags, the SD1.5 head dims
        cases = [(40, bf, False, False), (40, bf, True, True), (64, fp, False, True), (80, bf, False, False),
                 (160, bf, False, False), (256, bf, True, False), (40, f32, False, False)]
    # every autotuning candidate that is not a default, at one ragged shape per head-dim bucket
    tune = [(D, bf, False, False, f, None) for D in (40, 80, 160) for f in FWD_CANDIDATES[_bucket(D)][1:]]
    tune += [(D, bf, False, False, None, b) for D in (40, 80, 160) for b in BWD_CANDIDATES[_bucket(D)][1:]]
    cases = [c + (fwd_config(c[0], c[1]), bwd_config(c[0], c[1])) for c in cases] + tune
    for D, dt, even_m, even_n, fcfg, bcfg in cases:
        flags = dict(**head_flags(D), EVEN_M=even_m, EVEN_N=even_n, PREC=precision(dt))
        tag = f"D={D} {str(dt)[6:]} EVEN_M={even_m} EVEN_N={even_n}"
        unit = {n: 1 for n in ("sqd", "skd", "svd", "sod", "sdod", "sdqd", "sdkd", "sdvd")}
        (dq_bm, dq_bn), (kv_bm, kv_bn), bw, bs = bwd_blocks(bcfg or bwd_config(D, dt))
        for kernel, cfg, ptrs in (
                (_attn_fwd, fcfg, dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), O=ptr(dt), LSE="*fp32")),
                (_attn_bwd_dq, (dq_bm, dq_bn, bw, bs), dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), O=ptr(dt), DO=ptr(dt),
                                                        DQ=ptr(dt), LSE="*fp32", DELTA="*fp32")),
                (_attn_bwd_dkdv, (kv_bm, kv_bn, bw, bs), dict(Q=ptr(dt), K=ptr(dt), V=ptr(dt), DO=ptr(dt), DK=ptr(dt),
                                                          DV=ptr(dt), LSE="*fp32", DELTA="*fp32"))):
            if (kernel is _attn_fwd and fcfg is None) or (kernel is not _attn_fwd and bcfg is None):
                continue
            bm, bn, warps, stages = cfg
            const = dict(flags, BLOCK_M=bm, BLOCK_N=bn, **{n: 1 for n in unit if n in kernel.arg_names})
            sig = make_signature(kernel, ptrs, floats=("qk_scale", "sm_scale"), constexprs=const)
            out.append(Variant(f"{kernel.__name__} {tag} BM={bm} BN={bn}", kernel, sig, const,
                               warps, stages, expect_mma=dt != torch.float32))
    return out


from . import _callable_module  # noqa: E402  (kernels.attention stays callable once this file is imported)
_callable_module(__name__)
