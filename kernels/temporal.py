"""Temporal self-attention (attention along frames), forward and backward, in Triton.

    temporal_attention(q, k, v, scale=None) -> o
        q, k, v (N, F, H, D)        N = B*h*w sequences of F frames, H heads
        or      (B, S, F, H, D)     the same with N split in two (B, S = h*w), for views that cannot
                                    be flattened to one N stride without a copy (B > 1 below)

Supported: CUDA tensors (or CPU under TRITON_INTERPRET=1); fp32 / fp16 / bf16; 1 <= F <= 64;
1 <= D <= 256 (split into power-of-two pieces as in kernels/_common.py: 40 = 32 + 16, 80 = 64 + 16,
160 = 128 + 32); any number of sequences (the grid is one-dimensional, well past 65,535); any
strides. The UNet's q/k/v (heartbeat/attention.py TemporalAttention) are (B, F, h*w*heads, D) views of
its (B, F, h*w, C) projections: N = B clips, and every (pixel, head) pair one of the H "heads", so
they are read in place, never copied. The output is allocated dense in q's own dimension order, so
a caller that views q out of (B, F, h*w, C) gets o laid out as (B, F, h*w, C) too and views it back
for free.

How: sequences are short, so one program packs G = ROWS / F_pad whole sequences (F_pad = F rounded
up to a power of two) into one ROWS x D tile, consecutive (n, h) pairs, which for the UNet's layout
are adjacent in memory (one frame of G heads is G*D contiguous elements; frames are h*w*C apart). It computes the ROWS x ROWS score tile with one dot and masks it to its
block diagonal (a query sees only the frames of its own sequence), so the softmax is exact in a
single pass (no online rescaling, no loop). The block diagonal wastes ROWS / F_pad of the dot's
FLOPs, which is cheap next to the memory traffic this kernel is bound by. Backward recomputes P in
the tile and produces dQ, dK, dV in the same program (delta = rowsum(P * dP), the same as
rowsum(dO * O), without reading O): no atomics, deterministic.

Caveats: block sizes are heuristics, not tuned on a GPU; fp32 uses IEEE dots.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (DTYPES, LOG2E, MAX_HEAD_DIM, check_device, empty, head_flags, load, load_rows, precision,
                      store, stride_unit, strides)

MAX_FRAMES = 64


@triton.jit
def _row_offsets(pid, F, NSEQ, H, S, sb, ss, sf, sh,
                 ROWS: tl.constexpr, FP: tl.constexpr):
    """Memory offset of each packed row (sequence g of the program, frame f) and its validity."""
    r = tl.arange(0, ROWS)
    seq = pid.to(tl.int64) * (ROWS // FP) + r // FP   # sequence index = (b*S + s)*H + h
    f = r % FP
    h = seq % H
    n = seq // H
    off = (n // S) * sb + (n % S) * ss + f * sf + h * sh
    ok = (f < F) & (seq < NSEQ)
    return off, ok


@triton.jit
def _scores(q0, q1, K, koff, kok, d0, d1, D, F, skd, qk_scale,
            HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, ROW_MASK: tl.constexpr,
            ROWS: tl.constexpr, FP: tl.constexpr, PREC: tl.constexpr):
    """Block-diagonal base-2 logits (ROWS, ROWS) and the K^T tiles they were made from."""
    k0t = load(K + koff[None, :] + d0[:, None] * skd, d0[:, None] < D, kok[None, :], MASK_D0, ROW_MASK)
    s = tl.dot(q0, k0t, input_precision=PREC)
    k1t = k0t
    if HAS_D1:
        k1t = load(K + koff[None, :] + d1[:, None] * skd, d1[:, None] < D, kok[None, :], MASK_D1, ROW_MASK)
        s += tl.dot(q1, k1t, input_precision=PREC)
    r = tl.arange(0, ROWS)
    same = (r[:, None] // FP) == (r[None, :] // FP)
    if ROW_MASK:  # padded frames are no keys; keys of missing sequences (loaded as 0) stay finite,
        same = same & ((r[None, :] % FP) < F)   # so no row is all -inf and nothing turns NaN
    s = tl.where(same, s * qk_scale, float("-inf"))
    return s, k0t, k1t


@triton.jit
def _temporal_fwd(Q, K, V, O,
                  sqb, sqs, sqf, sqh, sqd, skb, sks, skf, skh, skd, svb, svs, svf, svh, svd,
                  sob, sos, sof, soh, sod,
                  F, NSEQ, H, S, D: tl.constexpr, qk_scale,
                  ROWS: tl.constexpr, FP: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                  ROW_MASK: tl.constexpr, PREC: tl.constexpr,
                  UNIT: tl.constexpr):
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqb, sqs, sqf, sqh = sqb * UNIT, sqs * UNIT, sqf * UNIT, sqh * UNIT
    skb, sks, skf, skh = skb * UNIT, sks * UNIT, skf * UNIT, skh * UNIT
    svb, svs, svf, svh = svb * UNIT, svs * UNIT, svf * UNIT, svh * UNIT
    sob, sos, sof, soh = sob * UNIT, sos * UNIT, sof * UNIT, soh * UNIT
    pid = tl.program_id(0)
    qoff, ok = _row_offsets(pid, F, NSEQ, H, S, sqb, sqs, sqf, sqh, ROWS, FP)
    koff, _ = _row_offsets(pid, F, NSEQ, H, S, skb, sks, skf, skh, ROWS, FP)
    voff, _ = _row_offsets(pid, F, NSEQ, H, S, svb, svs, svf, svh, ROWS, FP)
    ooff, _ = _row_offsets(pid, F, NSEQ, H, S, sob, sos, sof, soh, ROWS, FP)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    q0, q1 = load_rows(Q, qoff, ok, sqd, D, D0, D1, HAS_D1, MASK_D0, MASK_D1, ROW_MASK)
    # V is issued before the scores: its latency overlaps the QK^T dot and the softmax
    v0, v1 = load_rows(V, voff, ok, svd, D, D0, D1, HAS_D1, MASK_D0, MASK_D1, ROW_MASK)
    s, k0t, k1t = _scores(q0, q1, K, koff, ok, d0, d1, D, F, skd, qk_scale,
                          HAS_D1, MASK_D0, MASK_D1, ROW_MASK, ROWS, FP, PREC)
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    inv_l = 1.0 / tl.sum(p, 1)
    p = p * inv_l[:, None]
    o0 = tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
    store(O + ooff[:, None] + d0[None, :] * sod, o0.to(O.dtype.element_ty), ok[:, None], d0[None, :] < D,
           ROW_MASK, MASK_D0)
    if HAS_D1:
        o1 = tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
        store(O + ooff[:, None] + d1[None, :] * sod, o1.to(O.dtype.element_ty), ok[:, None], d1[None, :] < D,
               ROW_MASK, MASK_D1)


@triton.jit
def _temporal_bwd(Q, K, V, DO, DQ, DK, DV,
                  sqb, sqs, sqf, sqh, sqd, skb, sks, skf, skh, skd, svb, svs, svf, svh, svd,
                  sdob, sdos, sdof, sdoh, sdod, sgb, sgs, sgf, sgh, sgd,
                  F, NSEQ, H, S, D: tl.constexpr, sm_scale, qk_scale,
                  ROWS: tl.constexpr, FP: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                  HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                  ROW_MASK: tl.constexpr, PREC: tl.constexpr,
                  UNIT: tl.constexpr):
    """dQ, dK, dV for the packed tile; the three gradients share one stride set (sg*)."""
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqb, sqs, sqf, sqh = sqb * UNIT, sqs * UNIT, sqf * UNIT, sqh * UNIT
    skb, sks, skf, skh = skb * UNIT, sks * UNIT, skf * UNIT, skh * UNIT
    svb, svs, svf, svh = svb * UNIT, svs * UNIT, svf * UNIT, svh * UNIT
    sdob, sdos, sdof, sdoh = sdob * UNIT, sdos * UNIT, sdof * UNIT, sdoh * UNIT
    sgb, sgs, sgf, sgh = sgb * UNIT, sgs * UNIT, sgf * UNIT, sgh * UNIT
    pid = tl.program_id(0)
    qoff, ok = _row_offsets(pid, F, NSEQ, H, S, sqb, sqs, sqf, sqh, ROWS, FP)
    koff, _ = _row_offsets(pid, F, NSEQ, H, S, skb, sks, skf, skh, ROWS, FP)
    voff, _ = _row_offsets(pid, F, NSEQ, H, S, svb, svs, svf, svh, ROWS, FP)
    dooff, _ = _row_offsets(pid, F, NSEQ, H, S, sdob, sdos, sdof, sdoh, ROWS, FP)
    goff, _ = _row_offsets(pid, F, NSEQ, H, S, sgb, sgs, sgf, sgh, ROWS, FP)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    q0 = load(Q + qoff[:, None] + d0[None, :] * sqd, ok[:, None], d0[None, :] < D, ROW_MASK, MASK_D0)
    do0 = load(DO + dooff[:, None] + d0[None, :] * sdod, ok[:, None], d0[None, :] < D, ROW_MASK, MASK_D0)
    v0t = load(V + voff[None, :] + d0[:, None] * svd, d0[:, None] < D, ok[None, :], MASK_D0, ROW_MASK)
    q1 = q0
    if HAS_D1:   # (loaded after the first pieces: this order keeps sm_90 register use lowest)
        q1 = load(Q + qoff[:, None] + d1[None, :] * sqd, ok[:, None], d1[None, :] < D, ROW_MASK, MASK_D1)
        do1 = load(DO + dooff[:, None] + d1[None, :] * sdod, ok[:, None], d1[None, :] < D, ROW_MASK, MASK_D1)
        v1t = load(V + voff[None, :] + d1[:, None] * svd, d1[:, None] < D, ok[None, :], MASK_D1, ROW_MASK)
    s, k0t, k1t = _scores(q0, q1, K, koff, ok, d0, d1, D, F, skd, qk_scale,
                          HAS_D1, MASK_D0, MASK_D1, ROW_MASK, ROWS, FP, PREC)
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    p = p * (1.0 / tl.sum(p, 1))[:, None]
    dp = tl.dot(do0, v0t, input_precision=PREC)
    if HAS_D1:
        dp += tl.dot(do1, v1t, input_precision=PREC)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])            # delta = rowsum(P * dP) = rowsum(dO * O)
    dst = tl.trans(ds.to(q0.dtype))
    pt = tl.trans(p.to(do0.dtype))
    ds = ds.to(q0.dtype)
    ok2 = ok[:, None]
    store(DQ + goff[:, None] + d0[None, :] * sgd,
           (tl.dot(ds, tl.trans(k0t), input_precision=PREC) * sm_scale).to(DQ.dtype.element_ty),
           ok2, d0[None, :] < D, ROW_MASK, MASK_D0)
    store(DK + goff[:, None] + d0[None, :] * sgd,
           (tl.dot(dst, q0, input_precision=PREC) * sm_scale).to(DK.dtype.element_ty),
           ok2, d0[None, :] < D, ROW_MASK, MASK_D0)
    store(DV + goff[:, None] + d0[None, :] * sgd, tl.dot(pt, do0, input_precision=PREC).to(DV.dtype.element_ty),
           ok2, d0[None, :] < D, ROW_MASK, MASK_D0)
    if HAS_D1:
        store(DQ + goff[:, None] + d1[None, :] * sgd,
               (tl.dot(ds, tl.trans(k1t), input_precision=PREC) * sm_scale).to(DQ.dtype.element_ty),
               ok2, d1[None, :] < D, ROW_MASK, MASK_D1)
        store(DK + goff[:, None] + d1[None, :] * sgd,
               (tl.dot(dst, q1, input_precision=PREC) * sm_scale).to(DK.dtype.element_ty),
               ok2, d1[None, :] < D, ROW_MASK, MASK_D1)
        store(DV + goff[:, None] + d1[None, :] * sgd, tl.dot(pt, do1, input_precision=PREC).to(DV.dtype.element_ty),
               ok2, d1[None, :] < D, ROW_MASK, MASK_D1)


# ----------------------------------------------------------------------------- launchers

def tile_rows(F: int) -> int:
    """Rows of one packed tile: 64 (G = 64 / F_pad sequences), or F_pad itself when larger."""
    return max(64, triton.next_power_of_2(F))


def launch_config(D: int, dtype):
    """(num_warps, num_stages) by padded head dim; one pass, so stages only matter for loads. 4 warps
    (one warp group: a 64-row tile is exactly one wgmma M) up to D = 80, 8 past it."""
    d0, d1 = head_flags(D)["D0"], head_flags(D)["D1"] if head_flags(D)["HAS_D1"] else 0
    return (4 if d0 + d1 <= 80 else 8), 1


def grid_size(nseq: int, F: int) -> int:
    """Programs launched: ceil(sequences / G). One-dimensional, so no 65,535 limit on any axis."""
    return triton.cdiv(nseq, tile_rows(F) // triton.next_power_of_2(F))


def _as5(x):
    """(N, F, H, D) -> a (1, N, F, H, D) view; (B, S, F, H, D) as is."""
    return (x.unsqueeze(0) if x.dim() == 4 else x)


def empty_in_order_of(x, dtype=None):
    """A dense tensor shaped like x whose dimension order (by stride) is x's own, NaN when POISON."""
    order = sorted(range(x.dim()), key=lambda i: (-x.stride(i), -i))   # outermost first
    base = empty([x.shape[i] for i in order], x, dtype)
    inverse = [order.index(i) for i in range(x.dim())]
    return base.permute(*inverse)


def check_inputs(q, k, v):
    check_device(q, k, v)
    if q.dim() not in (4, 5) or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"temporal_attention: q, k, v must share one (N, F, H, D) or (B, S, F, H, D) shape; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"temporal_attention: q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}")
    F, D = q.shape[-3], q.shape[-1]
    if not 1 <= F <= MAX_FRAMES:
        raise ValueError(f"temporal_attention: {F} frames; the kernel handles 1..{MAX_FRAMES}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"temporal_attention: head dim {D} not in 1..{MAX_HEAD_DIM}")
    if q.numel() == 0:
        raise ValueError("temporal_attention: empty input")


def _common(q5, F, D):
    B, S, _, H, _ = q5.shape
    nseq = B * S * H
    rows, fp = tile_rows(F), triton.next_power_of_2(F)
    warps, stages = launch_config(D, q5.dtype)
    even = F == fp and nseq % (rows // fp) == 0
    flags = dict(ROWS=rows, FP=fp, **head_flags(D), ROW_MASK=not even, PREC=precision(q5.dtype),
                 num_warps=warps, num_stages=stages)
    return nseq, H, S, flags


def temporal_fwd(q, k, v, scale):
    o = empty_in_order_of(q)
    q5, k5, v5, o5 = (_as5(x) for x in (q, k, v, o))
    F, D = q5.shape[2], q5.shape[4]
    nseq, H, S, flags = _common(q5, F, D)
    u = stride_unit(q5, k5, v5, o5)
    _temporal_fwd[(grid_size(nseq, F),)](
        q5, k5, v5, o5, *(s for t in (q5, k5, v5, o5) for s in strides(t, u)),
        F, nseq, H, S, D, scale * LOG2E, UNIT=u, **flags)
    return o


def temporal_bwd(q, k, v, do, scale):
    dq, dk, dv = empty_in_order_of(q), empty_in_order_of(q), empty_in_order_of(q)  # one stride set
    q5, k5, v5, do5, dq5, dk5, dv5 = (_as5(x) for x in (q, k, v, do, dq, dk, dv))
    F, D = q5.shape[2], q5.shape[4]
    nseq, H, S, flags = _common(q5, F, D)
    u = stride_unit(q5, k5, v5, do5, dq5, dk5, dv5)
    _temporal_bwd[(grid_size(nseq, F),)](
        q5, k5, v5, do5, dq5, dk5, dv5, *(s for t in (q5, k5, v5, do5, dq5) for s in strides(t, u)),
        F, nseq, H, S, D, scale, scale * LOG2E, UNIT=u, **flags)
    return dq, dk, dv


class _TemporalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return temporal_fwd(q, k, v, scale)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        return (*temporal_bwd(q, k, v, do, ctx.scale), None)


def temporal_attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v along frames: (N, F, H, D) or (B, S, F, H, D) -> same shape."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _TemporalAttention.apply(q, k, v, scale)


def supports(q, k, v) -> bool:
    try:
        check_inputs(q, k, v)
    except (ValueError, RuntimeError):
        return False
    return q.is_cuda and k.device == q.device and v.device == q.device


def temporal_attention_ref(q, k, v, scale=None):
    """Plain PyTorch reference on (..., F, H, D)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("...qhd,...khd->...hqk", q, k) * scale
    return torch.einsum("...hqk,...khd->...qhd", s.softmax(-1), v)
