"""Dual cross-attention: attn(q_t, k_t, v_t) + attn(q_i, k_i, v_i) in one kernel, forward and backward.

    dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=None) -> o
        q_t, q_i (B, Lq, H, D); k_t, v_t (B, Lt, H, D) text tokens; k_i, v_i (B, Li, H, D) image-prior
        tokens; o (B, Lq, H, D) contiguous.

Two softmaxes (docs/ARCHITECTURE.md, "Conditions": not one softmax over the concatenated tokens), computed by the same
program one after the other on the query tile it holds, summed in registers and written once.
When q_i is q_t (or views the same memory with the same strides) Q is read once.

Supported: CUDA (or CPU under TRITON_INTERPRET=1); fp32 / fp16 / bf16; any Lq; any context
lengths >= 1 (designed for text 1..154 and image 1..256: a context fits one or two key blocks);
1 <= D <= 256 split as in kernels/_common.py; any strides; any B*H (1-D grid).

Backward: `_dual_bwd_dq` (one program per query block and both branches: per branch, a first pass
over the keys gives delta = rowsum(P * dP) (= rowsum(dO * O_branch), which the forward never
materialised), a second gives dQ; one dQ write when q_i is q_t), then kernels/_common.py's
`attn_bwd_dkdv` once per branch for dK, dV. No atomics: deterministic.

Caveats: block sizes are heuristics (no GPU to tune on); fp32 uses IEEE dots.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (BWD_CANDIDATES, FWD_CANDIDATES, LOG2E, attn_bwd_dkdv, branch_fwd, bucket, bwd_blocks,
                      bwd_config, check_qkv, dq_loop, empty, fwd_config, head_block, head_flags, load_rows, p_dp_tile,
                      precision, store_rows, stride_unit, strides, tuned_config)
from .tuning import pow2_bucket


@triton.jit
def _dual_fwd(QT, KT, VT, QI, KI, VI, O, LSE,
              sqtb, sqtl, sqth, sqtd, sktb, sktl, skth, sktd, svtb, svtl, svth, svtd,
              sqib, sqil, sqih, sqid, skib, skil, skih, skid, svib, svil, svih, svid,
              sob, sol, soh, sod,
              H, Lq, Lt, Li, D: tl.constexpr, qk_scale, m_blocks, lse_branch_stride,
              BLOCK_M: tl.constexpr, BLOCK_NT: tl.constexpr, BLOCK_NI: tl.constexpr,
              D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, MASK_D0: tl.constexpr,
              MASK_D1: tl.constexpr, EVEN_M: tl.constexpr, EVEN_NT: tl.constexpr, EVEN_NI: tl.constexpr,
              SHARED_Q: tl.constexpr, PREC: tl.constexpr,
              UNIT: tl.constexpr):
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqtb, sqtl, sqth, sktb = sqtb * UNIT, sqtl * UNIT, sqth * UNIT, sktb * UNIT
    sktl, skth, svtb, svtl = sktl * UNIT, skth * UNIT, svtb * UNIT, svtl * UNIT
    svth, sqib, sqil, sqih = svth * UNIT, sqib * UNIT, sqil * UNIT, sqih * UNIT
    skib, skil, skih, svib = skib * UNIT, skil * UNIT, skih * UNIT, svib * UNIT
    svil, svih, sob, sol = svil * UNIT, svih * UNIT, sob * UNIT, sol * UNIT
    soh = soh * UNIT
    bh, mb, b, h = head_block(tl.program_id(0), m_blocks, H)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q0, q1 = load_rows(QT + b * sqtb + h * sqth, offs_m * sqtl, m_ok, sqtd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    t0, t1, m_t, l_t = branch_fwd(q0, q1, KT + b * sktb + h * skth, VT + b * svtb + h * svth,
                                   sktl, sktd, svtl, svtd, Lt, D, qk_scale, BLOCK_M, BLOCK_NT,
                                   D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_NT, PREC)
    if not SHARED_Q:
        q0, q1 = load_rows(QI + b * sqib + h * sqih, offs_m * sqil, m_ok, sqid,
                            D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    i0, i1, m_im, l_im = branch_fwd(q0, q1, KI + b * skib + h * skih, VI + b * svib + h * svih,
                                     skil, skid, svil, svid, Li, D, qk_scale, BLOCK_M, BLOCK_NI,
                                     D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_NI, PREC)
    inv_t = 1.0 / l_t
    inv_i = 1.0 / l_im
    store_rows(O + b * sob + h * soh, offs_m * sol, m_ok, sod,
                t0 * inv_t[:, None] + i0 * inv_i[:, None], t1 * inv_t[:, None] + i1 * inv_i[:, None],
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    row = bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        tl.store(LSE + row, m_t + tl.log2(l_t))
        tl.store(LSE + lse_branch_stride + row, m_im + tl.log2(l_im))
    else:
        tl.store(LSE + row, m_t + tl.log2(l_t), mask=offs_m < Lq)
        tl.store(LSE + lse_branch_stride + row, m_im + tl.log2(l_im), mask=offs_m < Lq)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _branch_dq(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
               EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """Unscaled dQ of one branch and its delta = rowsum(P * dP), in two passes over the keys."""
    offs_n = tl.arange(0, BLOCK_N)
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):   # pass 1: delta
        p, dp, _k0t, _k1t = p_dp_tile(q0, q1, do0, do1, K, V, skl, skd, svl, svd, start_n + offs_n, Lk, D,
                                       qk_scale, lse, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)
        delta += tl.sum(p * dp, 1)
    dq0, dq1 = dq_loop(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse, delta,   # pass 2
                        BLOCK_M, BLOCK_N, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)
    return dq0, dq1, delta


@triton.jit
def _dual_bwd_dq(QT, KT, VT, QI, KI, VI, DO, DQT, DQI, LSE, DELTA,
                 sqtb, sqtl, sqth, sqtd, sktb, sktl, skth, sktd, svtb, svtl, svth, svtd,
                 sqib, sqil, sqih, sqid, skib, skil, skih, skid, svib, svil, svih, svid,
                 sdob, sdol, sdoh, sdod, sgb, sgl, sgh, sgd,
                 H, Lq, Lt, Li, D: tl.constexpr, sm_scale, qk_scale, m_blocks, lse_branch_stride,
                 BLOCK_M: tl.constexpr, BLOCK_NT: tl.constexpr, BLOCK_NI: tl.constexpr,
                 D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, MASK_D0: tl.constexpr,
                 MASK_D1: tl.constexpr, EVEN_M: tl.constexpr, EVEN_NT: tl.constexpr, EVEN_NI: tl.constexpr,
                 SHARED_Q: tl.constexpr, SUM_DQ: tl.constexpr, PREC: tl.constexpr,
                 UNIT: tl.constexpr):
    """dQ of both branches (summed into DQT when SUM_DQ) and both deltas. DQT, DQI share strides sg*."""
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqtb, sqtl, sqth, sktb = sqtb * UNIT, sqtl * UNIT, sqth * UNIT, sktb * UNIT
    sktl, skth, svtb, svtl = sktl * UNIT, skth * UNIT, svtb * UNIT, svtl * UNIT
    svth, sqib, sqil, sqih = svth * UNIT, sqib * UNIT, sqil * UNIT, sqih * UNIT
    skib, skil, skih, svib = skib * UNIT, skil * UNIT, skih * UNIT, svib * UNIT
    svil, svih, sdob, sdol = svil * UNIT, svih * UNIT, sdob * UNIT, sdol * UNIT
    sdoh, sgb, sgl, sgh = sdoh * UNIT, sgb * UNIT, sgl * UNIT, sgh * UNIT
    bh, mb, b, h = head_block(tl.program_id(0), m_blocks, H)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    row = bh.to(tl.int64) * Lq + offs_m
    if EVEN_M:
        lse_t = tl.load(LSE + row)
        lse_i = tl.load(LSE + lse_branch_stride + row)
    else:
        lse_t = tl.load(LSE + row, mask=offs_m < Lq, other=0.0)
        lse_i = tl.load(LSE + lse_branch_stride + row, mask=offs_m < Lq, other=0.0)

    do0, do1 = load_rows(DO + b * sdob + h * sdoh, offs_m * sdol, m_ok, sdod,
                          D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    q0, q1 = load_rows(QT + b * sqtb + h * sqth, offs_m * sqtl, m_ok, sqtd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    t0, t1, delta_t = _branch_dq(q0, q1, do0, do1, KT + b * sktb + h * skth, VT + b * svtb + h * svth,
                                 sktl, sktd, svtl, svtd, Lt, D, qk_scale, lse_t, BLOCK_M, BLOCK_NT,
                                 D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_NT, PREC)
    if not SHARED_Q:
        q0, q1 = load_rows(QI + b * sqib + h * sqih, offs_m * sqil, m_ok, sqid,
                            D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    i0, i1, delta_i = _branch_dq(q0, q1, do0, do1, KI + b * skib + h * skih, VI + b * svib + h * svih,
                                 skil, skid, svil, svid, Li, D, qk_scale, lse_i, BLOCK_M, BLOCK_NI,
                                 D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_NI, PREC)
    if EVEN_M:
        tl.store(DELTA + row, delta_t)
        tl.store(DELTA + lse_branch_stride + row, delta_i)
    else:
        tl.store(DELTA + row, delta_t, mask=offs_m < Lq)
        tl.store(DELTA + lse_branch_stride + row, delta_i, mask=offs_m < Lq)

    g = b * sgb + h * sgh
    if SUM_DQ:
        store_rows(DQT + g, offs_m * sgl, m_ok, sgd, (t0 + i0) * sm_scale, (t1 + i1) * sm_scale,
                    D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
    else:
        store_rows(DQT + g, offs_m * sgl, m_ok, sgd, t0 * sm_scale, t1 * sm_scale,
                    D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
        store_rows(DQI + g, offs_m * sgl, m_ok, sgd, i0 * sm_scale, i1 * sm_scale,
                    D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)


# ----------------------------------------------------------------------------- launchers

def ctx_block(L: int, cap: int = 64) -> int:
    """Key block for a context of L tokens: the context rounded up to a power of two (>= 16), at
    most `cap` (64 in the forward: 128 spills registers on sm_90 at D = 40; the backward passes its
    dQ key block, 16 at D > 128)."""
    return min(cap, max(16, triton.next_power_of_2(L)))


def same_memory(a, b) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _flags(Lq, Lt, Li, D, dtype, bm, bnt, bni, shared):
    return dict(BLOCK_M=bm, BLOCK_NT=bnt, BLOCK_NI=bni, **head_flags(D), EVEN_M=Lq % bm == 0,
                EVEN_NT=Lt % bnt == 0, EVEN_NI=Li % bni == 0, SHARED_Q=shared, PREC=precision(dtype))


# The dual forward holds two contexts' accumulators: past a head dim of 64, (128 rows, 8 warps) needs
# 145-156 registers on sm_90 (1 CTA/SM, kernels/compile_check.py); (64 rows, 4 warps) fits 2+.
DUAL_FWD_CONFIGS = {128: (64, 64, 4, 3), 256: (64, 64, 4, 2)}


def dual_fwd_config(D, dtype):
    if bucket(D) not in DUAL_FWD_CONFIGS:
        return fwd_config(D, dtype)
    bm, bn, w, s = DUAL_FWD_CONFIGS[bucket(D)]
    return bm, bn, w, (1 if dtype == torch.float32 else s)


def dual_fwd(q_t, k_t, v_t, q_i, k_i, v_i, scale, config=None):
    B, Lq, H, D = q_t.shape
    Lt, Li = k_t.shape[1], k_i.shape[1]
    bm, cap, warps, stages = config or dual_fwd_config(D, q_t.dtype)
    bnt, bni = ctx_block(Lt, cap), ctx_block(Li, cap)
    o = empty(q_t.shape, q_t)
    lse = empty((2, B, H, Lq), q_t, torch.float32)
    m_blocks = triton.cdiv(Lq, bm)
    u = stride_unit(q_t, k_t, v_t, q_i, k_i, v_i, o)
    _dual_fwd[(B * H * m_blocks,)](
        q_t, k_t, v_t, q_i, k_i, v_i, o, lse, *(s for t in (q_t, k_t, v_t, q_i, k_i, v_i, o) for s in strides(t, u)),
        H, Lq, Lt, Li, D, scale * LOG2E, m_blocks, B * H * Lq,
        **_flags(Lq, Lt, Li, D, q_t.dtype, bm, bnt, bni, same_memory(q_t, q_i)), UNIT=u,
        num_warps=warps, num_stages=stages)
    return o, lse


def dual_bwd(q_t, k_t, v_t, q_i, k_i, v_i, lse, do, scale, sum_dq, config=None):
    B, Lq, H, D = q_t.shape
    Lt, Li = k_t.shape[1], k_i.shape[1]
    (bm, dq_bn), (kv_bm, kv_bn), warps, stages = bwd_blocks(config or bwd_config(D, q_t.dtype))
    bnt, bni = ctx_block(Lt, dq_bn), ctx_block(Li, dq_bn)
    dq_t = empty(q_t.shape, q_t)
    dq_i = dq_t if sum_dq else empty(q_i.shape, q_i)
    delta = empty(lse.shape, lse)
    m_blocks = triton.cdiv(Lq, bm)
    u = stride_unit(q_t, k_t, v_t, q_i, k_i, v_i, do, dq_t, dq_i)
    _dual_bwd_dq[(B * H * m_blocks,)](
        q_t, k_t, v_t, q_i, k_i, v_i, do, dq_t, dq_i, lse, delta,
        *(s for t in (q_t, k_t, v_t, q_i, k_i, v_i, do, dq_t) for s in strides(t, u)),
        H, Lq, Lt, Li, D, scale, scale * LOG2E, m_blocks, B * H * Lq,
        **_flags(Lq, Lt, Li, D, q_t.dtype, bm, bnt, bni, same_memory(q_t, q_i)), SUM_DQ=sum_dq, UNIT=u,
        num_warps=warps, num_stages=stages)
    grads = []
    for q, k, v, branch in ((q_t, k_t, v_t, 0), (q_i, k_i, v_i, 1)):
        Lk = k.shape[1]
        bn = kv_bn   # even for 16 tokens: masked, but wgmma-sized and spill-free
        dk, dv = empty(k.shape, k), empty(v.shape, v)
        n_blocks = triton.cdiv(Lk, bn)
        uk = stride_unit(q, k, v, do, dk, dv)
        attn_bwd_dkdv[(B * H * n_blocks,)](
            q, k, v, do, dk, dv, lse[branch], delta[branch], *(s for t in (q, k, v, do, dk, dv) for s in strides(t, uk)),
            H, Lq, Lk, D, scale, scale * LOG2E, n_blocks,
            BLOCK_M=kv_bm, BLOCK_N=bn, **head_flags(D), EVEN_M=Lq % kv_bm == 0, EVEN_N=Lk % bn == 0,
            PREC=precision(q.dtype), UNIT=uk, num_warps=warps, num_stages=stages)
        grads += [dk, dv]
    return dq_t, (None if sum_dq else dq_i), *grads


class _DualCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_t, k_t, v_t, q_i, k_i, v_i, scale, sum_dq, fwd_cfg, bwd_cfg):
        fwd_cfg = fwd_cfg or tuned_config("dual.fwd", q_t.shape[-1], q_t.dtype, lambda: _shape_key(q_t, k_t, k_i),
                                          FWD_CANDIDATES,
                                          lambda c: dual_fwd(q_t, k_t, v_t, q_i, k_i, v_i, scale, c), q_t.is_cuda)
        o, lse = dual_fwd(q_t, k_t, v_t, q_i, k_i, v_i, scale, fwd_cfg)
        ctx.save_for_backward(q_t, k_t, v_t, q_i, k_i, v_i, lse)
        ctx.scale, ctx.sum_dq, ctx.bwd_cfg = scale, sum_dq, bwd_cfg
        return o

    @staticmethod
    def backward(ctx, do):
        q_t, k_t, v_t, q_i, k_i, v_i, lse = ctx.saved_tensors
        bwd_cfg = ctx.bwd_cfg or tuned_config(
            "dual.bwd", q_t.shape[-1], q_t.dtype, lambda: _shape_key(q_t, k_t, k_i), BWD_CANDIDATES,
            lambda c: dual_bwd(q_t, k_t, v_t, q_i, k_i, v_i, lse, do, ctx.scale, ctx.sum_dq, c), q_t.is_cuda)
        dq_t, dq_i, dk_t, dv_t, dk_i, dv_i = dual_bwd(q_t, k_t, v_t, q_i, k_i, v_i, lse, do, ctx.scale,
                                                      ctx.sum_dq, bwd_cfg)
        return dq_t, dk_t, dv_t, dq_i, dk_i, dv_i, None, None, None, None


def _shape_key(q_t, k_t, k_i) -> tuple:
    return (pow2_bucket(q_t.shape[1]), pow2_bucket(k_t.shape[1]), pow2_bucket(k_i.shape[1]),
            pow2_bucket(q_t.shape[0] * q_t.shape[2]))


def check_inputs(q_t, k_t, v_t, q_i, k_i, v_i):
    check_qkv(q_t, k_t, v_t, "dual_cross_attention (text)")
    check_qkv(q_i, k_i, v_i, "dual_cross_attention (image)")
    if q_t.shape != q_i.shape or q_t.dtype != q_i.dtype:
        raise ValueError(f"dual_cross_attention: q_t {tuple(q_t.shape)} {q_t.dtype} and q_i "
                         f"{tuple(q_i.shape)} {q_i.dtype} must agree")


def dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=None, fwd_config=None, bwd_config=None):
    """attn(q_t, k_t, v_t) + attn(q_i, k_i, v_i) -> (B, Lq, H, D) contiguous.

    When q_i is q_t (the same tensor object), Q is read once and one dQ is written (autograd then
    credits it once); when they are different objects viewing the same memory, Q is still read once
    in the forward but each gets its own gradient. fwd_config / bwd_config: (BLOCK_M, BLOCK_N,
    num_warps, num_stages) overrides for tests and tuning (BLOCK_N caps both contexts' key blocks, as
    64 does by default); without them, kernels/tuning.py picks one when HEARTBEAT_AUTOTUNE=1."""
    check_inputs(q_t, k_t, v_t, q_i, k_i, v_i)
    scale = 1.0 / math.sqrt(q_t.shape[-1]) if scale is None else float(scale)
    return _DualCrossAttention.apply(q_t, k_t, v_t, q_i, k_i, v_i, scale, q_i is q_t, fwd_config, bwd_config)


def supports(q_t, k_t, v_t, q_i, k_i, v_i) -> bool:
    try:
        check_inputs(q_t, k_t, v_t, q_i, k_i, v_i)
    except (ValueError, RuntimeError):
        return False
    return all(t.is_cuda and t.device == q_t.device for t in (q_t, k_t, v_t, q_i, k_i, v_i))


def dual_cross_attention_ref(q_t, k_t, v_t, q_i, k_i, v_i, scale=None):
    """Plain PyTorch: two softmaxes, summed."""
    scale = 1.0 / math.sqrt(q_t.shape[-1]) if scale is None else scale

    def attn(q, k, v):
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    return attn(q_t, k_t, v_t) + attn(q_i, k_i, v_i)
