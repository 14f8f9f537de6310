"""What the kernel files share (private): masked tile loads/stores, the head-dim split, the
flash-attention building blocks of the spatial and the dual cross-attention kernels, the launch
configs, input checks and output allocation (docs/ARCHITECTURE.md, "Kernels").

Head dim without paying a full power of two: the head dim is split into two power-of-two pieces,
D = D0 + D1 (D0 the largest power of two <= D, at least 16; D1 the next power of two >= the rest,
at least 16), each with its own dot, so 40 = 32 + 16 (8 masked), 80 = 64 + 16, 160 = 128 + 32,
instead of 64 / 128 / 256. Masks exist only in the variants that need them (MASK_D0 / MASK_D1,
EVEN_M / EVEN_N compile-time flags).

Shared by kernels/spatial.py and kernels/dual_cross.py: `branch_fwd` (online softmax over one
context), `p_dp_tile` and `dq_loop` (one query block's backward over one context) and the
`attn_bwd_dkdv` kernel (dK, dV of one context).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import _interpreter_compat, tuning

_interpreter_compat()   # only acts under TRITON_INTERPRET=1 (fixes for Triton's CPU interpreter)

# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def load(ptrs, m0, m1, USE_M0: tl.constexpr, USE_M1: tl.constexpr):
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
def store(ptrs, x, m0, m1, USE_M0: tl.constexpr, USE_M1: tl.constexpr):
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
def load_rows(X, roff, rok, sd, D, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
               MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_R: tl.constexpr):
    """A (rows, D) tile as its two head-dim pieces: X + roff[r] + d * sd for d in [0, D0) and
    [D0, D0 + D1); x1 is x0 when there is no second piece. rok (rows,) masks rows when MASK_R."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    x0 = load(X + roff[:, None] + d0[None, :] * sd, rok[:, None], d0[None, :] < D, MASK_R, MASK_D0)
    x1 = x0
    if HAS_D1:
        x1 = load(X + roff[:, None] + d1[None, :] * sd, rok[:, None], d1[None, :] < D, MASK_R, MASK_D1)
    return x0, x1


@triton.jit
def store_rows(X, roff, rok, sd, x0, x1, D, D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr,
                MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_R: tl.constexpr):
    """Store the two head-dim pieces of a (rows, D) tile (cast to X's type), as load_rows reads them."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    store(X + roff[:, None] + d0[None, :] * sd, x0.to(X.dtype.element_ty), rok[:, None], d0[None, :] < D,
           MASK_R, MASK_D0)
    if HAS_D1:
        store(X + roff[:, None] + d1[None, :] * sd, x1.to(X.dtype.element_ty), rok[:, None], d1[None, :] < D,
               MASK_R, MASK_D1)


@triton.jit
def head_block(pid, blocks, H):
    """Program id -> (b*H + h, block index, b, h), b and h as int64 for the pointer offsets."""
    bh = pid // blocks
    return bh, pid % blocks, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


# ----------------------------------------------------------------------------- forward

@triton.jit
def branch_fwd(q0, q1, K, V, skl, skd, svl, svd, Lk, D, qk_scale,
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
        k0t = load(K + n[None, :] * skl + d0[:, None] * skd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
        s = tl.dot(q0, k0t, input_precision=PREC)
        if HAS_D1:
            k1t = load(K + n[None, :] * skl + d1[:, None] * skd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
            s += tl.dot(q1, k1t, input_precision=PREC)
        s = s * qk_scale
        if not EVEN_N:
            s = tl.where(n_ok_row, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = load(V + n[:, None] * svl + d0[None, :] * svd, n_ok_col, d0[None, :] < D, not EVEN_N, MASK_D0)
        acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v0.dtype), v0, input_precision=PREC)
        if HAS_D1:
            v1 = load(V + n[:, None] * svl + d1[None, :] * svd, n_ok_col, d1[None, :] < D, not EVEN_N, MASK_D1)
            acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1, input_precision=PREC)
    return acc0, acc1, m_i, l_i


# ----------------------------------------------------------------------------- backward

@triton.jit
def p_dp_tile(q0, q1, do0, do1, K, V, skl, skd, svl, svd, n, Lk, D, qk_scale, lse,
               D0: tl.constexpr, D1: tl.constexpr, HAS_D1: tl.constexpr, MASK_D0: tl.constexpr,
               MASK_D1: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """One key tile n of a query block's backward: P recomputed from the row logsumexp (base 2),
    dP = dO V^T, and the K^T pieces that dQ = dS K needs (k1t is k0t when there is no second piece)."""
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_ok_row = n[None, :] < Lk
    k0t = load(K + n[None, :] * skl + d0[:, None] * skd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
    v0t = load(V + n[None, :] * svl + d0[:, None] * svd, d0[:, None] < D, n_ok_row, MASK_D0, not EVEN_N)
    s = tl.dot(q0, k0t, input_precision=PREC)
    dp = tl.dot(do0, v0t, input_precision=PREC)
    k1t = k0t
    if HAS_D1:
        k1t = load(K + n[None, :] * skl + d1[:, None] * skd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
        v1t = load(V + n[None, :] * svl + d1[:, None] * svd, d1[:, None] < D, n_ok_row, MASK_D1, not EVEN_N)
        s += tl.dot(q1, k1t, input_precision=PREC)
        dp += tl.dot(do1, v1t, input_precision=PREC)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if not EVEN_N:
        p = tl.where(n_ok_row, p, 0.0)
    return p, dp, k0t, k1t


@triton.jit
def dq_loop(q0, q1, do0, do1, K, V, skl, skd, svl, svd, Lk, D, qk_scale, lse, delta,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
             EVEN_N: tl.constexpr, PREC: tl.constexpr):
    """Unscaled dQ of one query block over one context: dQ = sum_n (P * (dP - delta)) K.
    Shared by the spatial and the dual backward."""
    offs_n = tl.arange(0, BLOCK_N)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    for start_n in range(0, Lk, BLOCK_N):
        p, dp, k0t, k1t = p_dp_tile(q0, q1, do0, do1, K, V, skl, skd, svl, svd, start_n + offs_n, Lk, D,
                                     qk_scale, lse, D0, D1, HAS_D1, MASK_D0, MASK_D1, EVEN_N, PREC)
        ds = (p * (dp - delta[:, None])).to(q0.dtype)
        dq0 += tl.dot(ds, tl.trans(k0t), input_precision=PREC)
        if HAS_D1:
            dq1 += tl.dot(ds, tl.trans(k1t), input_precision=PREC)
    return dq0, dq1


@triton.jit
def attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA,
                   sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                   sdob, sdol, sdoh, sdod, sdkb, sdkl, sdkh, sdkd, sdvb, sdvl, sdvh, sdvd,
                   H, Lq, Lk, D: tl.constexpr, sm_scale, qk_scale, n_blocks,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   HAS_D1: tl.constexpr, MASK_D0: tl.constexpr, MASK_D1: tl.constexpr,
                   EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, PREC: tl.constexpr,
                  UNIT: tl.constexpr):
    """One program per (b, h, key block), looping over query blocks: dK and dV (transposed math:
    S^T = K Q^T so that P^T, dP^T come out in the layout the dots want)."""
    # UNIT = 8 when the launcher proved every non-head-dim stride a multiple of 8 (strides come
    # divided by it): the offsets are then known multiples of 8 elements, so loads vectorise.
    sqb, sql, sqh, skb = sqb * UNIT, sql * UNIT, sqh * UNIT, skb * UNIT
    skl, skh, svb, svl = skl * UNIT, skh * UNIT, svb * UNIT, svl * UNIT
    svh, sdob, sdol, sdoh = svh * UNIT, sdob * UNIT, sdol * UNIT, sdoh * UNIT
    sdkb, sdkl, sdkh, sdvb = sdkb * UNIT, sdkl * UNIT, sdkh * UNIT, sdvb * UNIT
    sdvl, sdvh = sdvl * UNIT, sdvh * UNIT
    bh, nb, b, h = head_block(tl.program_id(0), n_blocks, H)
    Q += b * sqb + h * sqh
    DO += b * sdob + h * sdoh
    LSE += bh.to(tl.int64) * Lq
    DELTA += bh.to(tl.int64) * Lq

    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    d0 = tl.arange(0, D0)
    d1 = D0 + tl.arange(0, D1)
    n_ok = offs_n < Lk
    k0, k1 = load_rows(K + b * skb + h * skh, offs_n * skl, n_ok, skd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    v0, v1 = load_rows(V + b * svb + h * svh, offs_n * svl, n_ok, svd,
                        D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)

    for start_m in range(0, Lq, BLOCK_M):
        m = start_m + offs_m
        m_ok_row = m[None, :] < Lq
        q0t = load(Q + m[None, :] * sql + d0[:, None] * sqd, d0[:, None] < D, m_ok_row, MASK_D0, not EVEN_M)
        do0, do1 = load_rows(DO, m * sdol, m < Lq, sdod, D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_M)
        if EVEN_M:
            lse = tl.load(LSE + m)
            delta = tl.load(DELTA + m)
        else:  # rows past Lq: lse = +inf makes P^T = 0 there
            lse = tl.load(LSE + m, mask=m < Lq, other=float("inf"))
            delta = tl.load(DELTA + m, mask=m < Lq, other=0.0)
        st = tl.dot(k0, q0t, input_precision=PREC)
        dpt = tl.dot(v0, tl.trans(do0), input_precision=PREC)
        if HAS_D1:
            q1t = load(Q + m[None, :] * sql + d1[:, None] * sqd, d1[:, None] < D, m_ok_row, MASK_D1, not EVEN_M)
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

    store_rows(DK + b * sdkb + h * sdkh, offs_n * sdkl, n_ok, sdkd, dk0 * sm_scale, dk1 * sm_scale,
                D, D0, D1, HAS_D1, MASK_D0, MASK_D1, not EVEN_N)
    store_rows(DV + b * sdvb + h * sdvh, offs_n * sdvl, n_ok, sdvd, dv0, dv1,
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
# Backward defaults (kernels/compile_check.py, sm_90): at D <= 64, (128, 32, 8 warps) gives dQ 102 and
# dK/dV 126 registers, 2 CTAs/SM each, where (64, 64, 8) had dK/dV at 195-203 registers, 1 CTA/SM;
# at D = 80, (64, 32, 4 warps) gives dQ 4 and dK/dV 2 CTAs/SM (was 2 and 1).
BWD_CANDIDATES = {
    64: [(128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    128: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 1)],
    256: [(16, 64, 8, 1), (32, 64, 8, 1)],
}
FWD_CONFIGS = {b: c[0] for b, c in FWD_CANDIDATES.items()}
BWD_CONFIGS = {b: c[0] for b, c in BWD_CANDIDATES.items()}


def bucket(D):
    d0, d1 = split_head_dim(D)
    return 64 if d0 + d1 <= 64 else 128 if d0 + d1 <= 128 else 256


def fwd_config(D, dtype):
    bm, bn, w, s = FWD_CONFIGS[bucket(D)]
    return bm, bn, w, (1 if dtype == torch.float32 else s)


def bwd_config(D, dtype):
    bm, bn, w, s = BWD_CONFIGS[bucket(D)]
    if dtype == torch.float32 and bucket(D) == 256:
        bm, bn = 32, 32
    return bm, bn, w, (1 if dtype == torch.float32 else s)


def tuned_config(name: str, D: int, dtype, key_fn, candidates: dict, launch, device_ok: bool):
    """A config from kernels/tuning.py when HEARTBEAT_AUTOTUNE is on (fp16/bf16 on CUDA, or under the
    interpreter for the tests), else None (the launcher's default). key_fn() -> the shape key, only
    computed when tuning is on."""
    if not tuning.ENABLED or dtype == torch.float32 or not (device_ok or INTERPRETING):
        return None
    return tuning.choose(name, (str(dtype)[6:], D) + key_fn(), candidates[bucket(D)], launch)


POISON = False  # tests set True: fresh outputs start as NaN (0x7fff.. for ints), so unwritten elements show


def empty(shape, like, dtype=None):
    """A fresh contiguous output on like's device (NaN-filled when POISON is set)."""
    x = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return x.fill_(float("nan")) if POISON and x.is_floating_point() else x


def empty_like(x):
    """torch.empty_like (x's memory format), NaN-filled when POISON is set."""
    y = torch.empty_like(x)
    return y.fill_(float("nan")) if POISON and y.is_floating_point() else y


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")   # fixed once Triton is imported
INT32_MAX = 2 ** 31 - 1


def interpreting() -> bool:
    return INTERPRETING


def check_device(*tensors):
    for t in tensors:
        if not (t.is_cuda or INTERPRETING):
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
    check_int32_extent(name, q=q, k=k, v=v)


def stride_unit(*tensors) -> int:
    """8 when the launcher can prove 16-byte alignment for vector loads: every tensor's last (head-dim)
    stride is 1, its other strides are multiples of 8 (and below 2**31), its data pointer is 16-byte
    aligned. The kernels then take those strides divided by 8 and multiply by the constexpr UNIT,
    so the compiler knows every row offset is a multiple of 8 elements (D = 40 has no stride divisible
    by 16 for Triton to find on its own). Else 1: the same kernel, unhinted."""
    for t in tensors:
        st = t.stride()
        if st[-1] != 1 or t.data_ptr() % 16 or any(x % 8 or x >= 2 ** 31 for x in st[:-1]):
            return 1
    return 8


def strides(t, unit: int) -> tuple:
    """t's strides as the kernels take them: all but the last divided by `unit` (see stride_unit)."""
    st = t.stride()
    return tuple(x // unit for x in st[:-1]) + (st[-1],)


def check_int32_extent(name, **tensors):
    """The kernels index one (batch, head) slice with int32 offsets (row * row stride + d * d stride,
    rows padded by up to a block); batch and head offsets are int64. Refuse a slice that would
    overflow, naming the tensor and the fix, instead of reading the wrong memory."""
    for which, x in tensors.items():
        L, D = x.shape[1], x.shape[-1]
        extent = (L + 127) * abs(x.stride(1)) + (D - 1) * abs(x.stride(-1))
        if extent > INT32_MAX:
            raise ValueError(f"{name}: {which} {tuple(x.shape)} with strides {tuple(x.stride())} spans {extent:,} "
                             "elements within one (batch, head), past the kernels' int32 offsets (2**31 - 1); "
                             "split the sequence into a larger batch, or use attn_backend=sdpa")


def bwd_blocks(config):
    """A backward config (BLOCK_A, BLOCK_B, warps, stages) -> the two kernels' blocks. The larger
    block goes on the dimension each kernel keeps resident (queries for dQ, keys for dK/dV): that is
    the M side of its dots, which must be >= 64 for wgmma with 4+ warps."""
    a, b, warps, stages = config
    big, small = max(a, b), min(a, b)
    return (big, small), (small, big), warps, stages
