"""GroupNorm, optionally fused with SiLU, forward and backward, in Triton.

    group_norm_silu(x, weight, bias, num_groups, eps=1e-5, silu=True) -> y
        x (N, C, *spatial) contiguous or channels-last (any layout whose spatial dims flatten to one
        stride: read in place; others are made contiguous first); weight, bias (C,) or None;
        y like x (same memory format), x's dtype.

Supported: CUDA (or CPU under TRITON_INTERPRET=1); x fp32 / fp16 / bf16; weight/bias of any float
dtype (fp32 parameters under bf16 autocast are fine); C divisible by num_groups; any N.

Statistics in fp32. Forward tiles are (BLOCK_C channels, BLOCK_S positions) with BLOCK_C the largest
power of two dividing C/G (SD1.5's 10/20/30/40/60 -> 2/4/2/8/4): no lane holds a padded channel
(next_pow2(C/G) left 37.5% idle); see fwd_plan(). Three forward paths:
    one pass:    one program per group holds all its tiles in registers (a tuple, unrolled), so x is
                 read from memory once: mean, then the sum of squared deviations from the registers,
                 then normalise and write. Taken when there is no split and the group needs at most
                 ONEPASS_PER_THREAD fp32 registers a thread at <= 8 warps, so 2 CTAs fit an SM
                 (every sd15 shape at 256^2 but C=960 at 32x32, whose 30,720 values would need 16);
    SPLIT == 1:  a group too large for that: one program loops over its tiles twice (statistics by
                 Chan's merge of tile moments, then normalise; the second read mostly hits L2);
    SPLIT > 1:   when N*G < SPLIT_SMS programs per SM, `_gn_stats` writes per-chunk (mean, M2, count)
                 of SPLIT chunks of positions, `_gn_fwd` merges the SPLIT partials of its group and
                 normalises its chunk (two launches, no atomics).
Backward: per chunk, per-channel partial sums A_c = sum(dz * xhat), B_c = sum(dz) (dz the gradient
before the affine, through SiLU); dweight, dbias are their sums over batch and chunks (in torch,
fp32, deterministic) and the group terms of dx follow from them: sum(dxhat) = sum_c w_c B_c,
sum(dxhat * xhat) = sum_c w_c A_c; then dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat xhat)).

Caveats: heuristics (tile sizes, split target) are not tuned on a GPU; tiny shapes would be better
served by eager PyTorch (the dispatcher decides through supports()).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, empty, empty_like

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile(X, base, c, s, sc, ss, CG, S, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    """fp32 tile (BLOCK_C, BLOCK_S) of a group at positions s, and its validity mask."""
    ptrs = X + base + c[:, None] * sc + s[None, :] * ss
    ok = (c[:, None] < CG) & (s[None, :] < S)
    if MASK_C or MASK_S:
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptrs).to(tl.float32)
    return x, ok


@triton.jit
def _chunk_stats(X, base, sc, ss, CG, S, s_lo, s_hi,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    """(mean, M2, count) of the group's positions [s_lo, s_hi), by Chan's merge of tile moments.
    Tiles are (BLOCK_C channels, BLOCK_S positions); channel blocks loop when BLOCK_C < CG."""
    mean = tl.full([], 0.0, tl.float32)
    m2 = tl.full([], 0.0, tl.float32)
    n = tl.full([], 0.0, tl.float32)
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            x, ok = _tile(X, base, c, s, sc, ss, CG, S, MASK_C, MASK_S)
            cnt = tl.sum(tl.sum(ok.to(tl.float32), 1), 0)
            t_mean = tl.sum(tl.sum(x, 1), 0) / cnt
            d = tl.where(ok, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, 1), 0)
            tot = n + cnt
            delta = t_mean - mean
            mean = mean + delta * (cnt / tot)
            m2 = m2 + t_m2 + delta * delta * (n * cnt / tot)
            n = tot
    return mean, m2, n


@triton.jit
def _gn_stats(X, MEANP, M2P, CNTP, sxn, sxc, sxs, G, CG, S, chunk,
              SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
              MASK_C: tl.constexpr, MASK_S: tl.constexpr):
    """Split reduction, pass 1: program (n*G + g)*SPLIT + sp writes its chunk's moments."""
    pid = tl.program_id(0)
    ng = pid // SPLIT
    sp = pid % SPLIT
    base = (ng // G).to(tl.int64) * sxn + ((ng % G) * CG).to(tl.int64) * sxc
    s_lo = sp * chunk
    mean, m2, n = _chunk_stats(X, base, sxc, sxs, CG, S, s_lo, tl.minimum(s_lo + chunk, S),
                               BLOCK_C, BLOCK_S, MASK_C, MASK_S)
    tl.store(MEANP + pid, mean)
    tl.store(M2P + pid, m2)
    tl.store(CNTP + pid, n)


@triton.jit
def _group_moments(MEANP, M2P, CNTP, ng, SPLIT: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Merge the SPLIT partial moments of group ng: (mean, variance)."""
    i = tl.arange(0, BLOCK_SPLIT)
    ok = i < SPLIT
    pm = tl.load(MEANP + ng * SPLIT + i, mask=ok, other=0.0)
    pm2 = tl.load(M2P + ng * SPLIT + i, mask=ok, other=0.0)
    pn = tl.load(CNTP + ng * SPLIT + i, mask=ok, other=0.0)
    n = tl.sum(pn, 0)
    mean = tl.sum(pn * pm, 0) / n
    d = pm - mean
    m2 = tl.sum(pm2 + pn * d * d, 0)
    return mean, m2 / n


@triton.jit
def _gn_fwd(X, W, B, Y, MEANP, M2P, CNTP, MEAN, RSTD,
            sxn, sxc, sxs, syn, syc, sys, G, CG, S, chunk, eps,
            SPLIT: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
            MASK_C: tl.constexpr, MASK_S: tl.constexpr, SILU: tl.constexpr):
    """Normalise one chunk (the whole group when SPLIT == 1, computing its statistics first)."""
    pid = tl.program_id(0)
    ng = pid // SPLIT
    sp = pid % SPLIT
    n_i = (ng // G).to(tl.int64)
    g = ng % G
    xbase = n_i * sxn + (g * CG).to(tl.int64) * sxc
    ybase = n_i * syn + (g * CG).to(tl.int64) * syc
    s_lo = sp * chunk
    s_hi = tl.minimum(s_lo + chunk, S)
    if SPLIT == 1:
        mean, m2, cnt = _chunk_stats(X, xbase, sxc, sxs, CG, S, s_lo, s_hi, BLOCK_C, BLOCK_S, MASK_C, MASK_S)
        var = m2 / cnt
    else:
        mean, var = _group_moments(MEANP, M2P, CNTP, ng, SPLIT, BLOCK_SPLIT)
    rstd = 1.0 / tl.sqrt(var + eps)
    if sp == 0:
        tl.store(MEAN + ng, mean)
        tl.store(RSTD + ng, rstd)
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        scale, shift = _affine(W, B, g * CG + c, c < CG, mean, rstd, MASK_C)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            x, ok = _tile(X, xbase, c, s, sxc, sxs, CG, S, MASK_C, MASK_S)
            _store_y(Y, ybase, c, s, syc, sys, x * scale + shift, ok, MASK_C or MASK_S, SILU)


@triton.jit
def _affine(W, B, ch, ok, mean, rstd, MASK: tl.constexpr):
    """(scale, shift) columns for channels ch: y = x * scale + shift is the affine GroupNorm."""
    if MASK:
        w = tl.load(W + ch, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(B + ch, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.load(W + ch).to(tl.float32)
        b = tl.load(B + ch).to(tl.float32)
    return (w * rstd)[:, None], (b - mean * w * rstd)[:, None]


@triton.jit
def _store_y(Y, ybase, c, s, syc, sys, y, ok, MASK: tl.constexpr, SILU: tl.constexpr):
    if SILU:
        y = y * tl.sigmoid(y)
    ptrs = Y + ybase + c[:, None] * syc + s[None, :] * sys
    if MASK:
        tl.store(ptrs, y.to(Y.dtype.element_ty), mask=ok)
    else:
        tl.store(ptrs, y.to(Y.dtype.element_ty))


@triton.jit
def _gn_fwd_onepass(X, W, B, Y, MEAN, RSTD, sxn, sxc, sxs, syn, syc, sys, G, CG, S, eps,
                    NCB: tl.constexpr, NSB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    MASK_S: tl.constexpr, SILU: tl.constexpr):
    """One program per group, one read: the group's NCB x NSB tiles (BLOCK_C channels x BLOCK_S
    positions, BLOCK_C dividing CG) are loaded once into registers (a tuple), the mean and the sum
    of squared deviations are taken from them in fp32, then they are normalised and written."""
    ng = tl.program_id(0)
    n_i = (ng // G).to(tl.int64)
    g = ng % G
    xbase = n_i * sxn + (g * CG).to(tl.int64) * sxc
    ybase = n_i * syn + (g * CG).to(tl.int64) * syc
    cr = tl.arange(0, BLOCK_C)
    sr = tl.arange(0, BLOCK_S)
    xs = ()
    for t in tl.static_range(NCB * NSB):
        x, ok = _tile(X, xbase, (t // NSB) * BLOCK_C + cr, (t % NSB) * BLOCK_S + sr, sxc, sxs, CG, S,
                      False, MASK_S)
        xs = xs + (x,)
    total = tl.sum(tl.sum(xs[0], 1), 0)
    for t in tl.static_range(1, NCB * NSB):
        total += tl.sum(tl.sum(xs[t], 1), 0)
    cnt = (CG * S).to(tl.float32)
    mean = total / cnt
    m2 = tl.full([], 0.0, tl.float32)
    for t in tl.static_range(NCB * NSB):
        d = xs[t] - mean
        if MASK_S:
            d = tl.where(((t % NSB) * BLOCK_S + sr)[None, :] < S, d, 0.0)
        m2 += tl.sum(tl.sum(d * d, 1), 0)
    rstd = 1.0 / tl.sqrt(m2 / cnt + eps)
    tl.store(MEAN + ng, mean)
    tl.store(RSTD + ng, rstd)
    for cb in tl.static_range(NCB):
        c = cb * BLOCK_C + cr
        scale, shift = _affine(W, B, g * CG + c, c < CG, mean, rstd, False)
        for sb in tl.static_range(NSB):
            s = sb * BLOCK_S + sr
            ok = (c[:, None] < CG) & (s[None, :] < S)
            _store_y(Y, ybase, c, s, syc, sys, xs[cb * NSB + sb] * scale + shift, ok, MASK_S, SILU)


@triton.jit
def _dz_tile(X, DY, xbase, dybase, c, s, sxc, sxs, sdc, sds, CG, S, mean, rstd, w, b,
             MASK_C: tl.constexpr, MASK_S: tl.constexpr, SILU: tl.constexpr):
    """xhat and dz (the gradient w.r.t. z = xhat * w + b) for one tile; 0 outside the group."""
    x, ok = _tile(X, xbase, c, s, sxc, sxs, CG, S, MASK_C, MASK_S)
    dz, _ = _tile(DY, dybase, c, s, sdc, sds, CG, S, MASK_C, MASK_S)
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w[:, None] + b[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    if MASK_C or MASK_S:
        xhat = tl.where(ok, xhat, 0.0)
    return xhat, dz, ok


@triton.jit
def _chunk_channel_sums(X, DY, xbase, dybase, c, sxc, sxs, sdc, sds, CG, S, s_lo, s_hi, mean, rstd, w, b,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, MASK_C: tl.constexpr,
                        MASK_S: tl.constexpr, SILU: tl.constexpr):
    a = tl.zeros([BLOCK_C], dtype=tl.float32)
    bsum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        xhat, dz, ok = _dz_tile(X, DY, xbase, dybase, c, s, sxc, sxs, sdc, sds, CG, S, mean, rstd, w, b,
                                MASK_C, MASK_S, SILU)
        a += tl.sum(dz * xhat, 1)
        bsum += tl.sum(dz, 1)
    return a, bsum


@triton.jit
def _load_wb(W, B, ch, ok, MASK_C: tl.constexpr):
    if MASK_C:
        w = tl.load(W + ch, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(B + ch, mask=ok, other=0.0).to(tl.float32)
    else:
        w = tl.load(W + ch).to(tl.float32)
        b = tl.load(B + ch).to(tl.float32)
    return w, b


@triton.jit
def _gn_bwd(X, DY, W, B, MEAN, RSTD, AP, BP, DX,
            sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, C, G, CG, S, chunk,
            SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
            MASK_C: tl.constexpr, MASK_S: tl.constexpr, SILU: tl.constexpr, PHASE: tl.constexpr):
    """PHASE 0: per-channel partials A, B of this chunk -> AP, BP[(n*SPLIT + sp)*C + channel].
    PHASE 1: dx of this chunk from the group's merged partials.
    PHASE 2 (SPLIT == 1): both in one program (the partials also stored for dw/db).
    Channels go in blocks of BLOCK_C (a divisor of CG when MASK_C is off); the group terms
    sum_c w_c A_c and sum_c w_c B_c are accumulated over the blocks."""
    pid = tl.program_id(0)
    ng = pid // SPLIT
    sp = pid % SPLIT
    n_i = (ng // G).to(tl.int64)
    g = ng % G
    xbase = n_i * sxn + (g * CG).to(tl.int64) * sxc
    dybase = n_i * sdn + (g * CG).to(tl.int64) * sdc
    s_lo = sp * chunk
    s_hi = tl.minimum(s_lo + chunk, S)
    mean = tl.load(MEAN + ng)
    rstd = tl.load(RSTD + ng)
    cr = tl.arange(0, BLOCK_C)
    wa = tl.full([], 0.0, tl.float32)     # sum_c w_c A_c over the group (this chunk's, or merged)
    wb = tl.full([], 0.0, tl.float32)     # sum_c w_c B_c
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + cr
        w, b = _load_wb(W, B, g * CG + c, c < CG, MASK_C)
        if PHASE != 1:
            a, bs = _chunk_channel_sums(X, DY, xbase, dybase, c, sxc, sxs, sdc, sds, CG, S, s_lo, s_hi, mean,
                                        rstd, w, b, BLOCK_C, BLOCK_S, MASK_C, MASK_S, SILU)
            part = (n_i * SPLIT + sp) * C + g * CG + c
            if MASK_C:
                tl.store(AP + part, a, mask=c < CG)
                tl.store(BP + part, bs, mask=c < CG)
            else:
                tl.store(AP + part, a)
                tl.store(BP + part, bs)
        else:            # merge this group's partials over the SPLIT chunks
            a = tl.zeros([BLOCK_C], dtype=tl.float32)
            bs = tl.zeros([BLOCK_C], dtype=tl.float32)
            for j in range(0, SPLIT):
                p = (n_i * SPLIT + j) * C + g * CG + c
                a += tl.load(AP + p, mask=c < CG, other=0.0)
                bs += tl.load(BP + p, mask=c < CG, other=0.0)
        wa += tl.sum(w * a, 0)
        wb += tl.sum(w * bs, 0)
    if PHASE != 0:
        inv = 1.0 / (CG * S)
        mean_dxhat = wb * inv            # mean over the group of dxhat = dz * w
        mean_dxhat_xhat = wa * inv
        gbase = n_i * sgn + (g * CG).to(tl.int64) * sgc
        for c0 in range(0, CG, BLOCK_C):
            c = c0 + cr
            w, b = _load_wb(W, B, g * CG + c, c < CG, MASK_C)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                xhat, dz, ok = _dz_tile(X, DY, xbase, dybase, c, s, sxc, sxs, sdc, sds, CG, S, mean, rstd, w, b,
                                        MASK_C, MASK_S, SILU)
                dx = rstd * (dz * w[:, None] - mean_dxhat - xhat * mean_dxhat_xhat)
                ptrs = DX + gbase + c[:, None] * sgc + s[None, :] * sgs
                if MASK_C or MASK_S:
                    tl.store(ptrs, dx.to(DX.dtype.element_ty), mask=ok)
                else:
                    tl.store(ptrs, dx.to(DX.dtype.element_ty))


# ----------------------------------------------------------------------------- launchers

TILE_ELEMENTS = 4096       # BLOCK_C * BLOCK_S per tile (backward)
FWD_TILE = 2048            # forward: at most this many elements per tile
SPLIT_SMS = 2              # the forward splits a group's reduction while N*G < this many programs per SM
SMS = 132                  # H100 / H200; the launcher asks the device when there is one
ONEPASS_PER_THREAD = 64    # one-pass forward while the group needs at most this many registers a thread


def plan(N, C, S, G, split=None, target=None):
    """Backward tile sizes and split: (BLOCK_C, BLOCK_S, SPLIT, chunk, num_warps)."""
    CG = C // G
    bs = max(16, min(triton.next_power_of_2(S), TILE_ELEMENTS))
    if split is None:
        target = target or 4 * SMS
        split = max(1, min(triton.cdiv(target, N * G), triton.cdiv(S, 4 * 256), 64))
    if split > 1:   # the forward's split: tiles no longer than a chunk
        bs = min(bs, max(16, triton.next_power_of_2(triton.cdiv(S, split))))
    bc = min(pow2_divisor(CG), max(1, TILE_ELEMENTS // bs))    # divides C/G: no padded channel lanes
    chunk = triton.cdiv(triton.cdiv(S, split), bs) * bs   # a whole number of tiles per chunk
    split = triton.cdiv(S, chunk)
    warps = max(1, min(8, bc * bs // 512))                # >= 4 elements a lane
    return bc, bs, split, chunk, warps


def pow2_divisor(n: int) -> int:
    return n & -n


def fwd_plan(N, C, S, G, split=None, sms=SMS):
    """Forward tiles: dict(BLOCK_C, BLOCK_S, SPLIT, chunk, num_warps, onepass).

    No idle lanes: BLOCK_C is the largest power of two dividing C/G (SD1.5's 10/20/30/40/60 channels
    per group -> 2/4/2/8/4), never a padded next_pow2(C/G); BLOCK_S a power of two up to S, so a
    tile is only masked at the end of a non-power-of-two S. Split: while N*G < SPLIT_SMS * sms,
    each group's positions are cut in SPLIT chunks. One pass (the group held in registers, read once)
    when there is no split and the group needs <= ONEPASS_PER_THREAD fp32 registers a thread."""
    CG = C // G
    bs = min(triton.next_power_of_2(S), FWD_TILE)
    if split is None:
        split = 1
        if N * G < SPLIT_SMS * sms:   # chunks of >= 1 tile of >= 64 positions
            want = triton.cdiv(SPLIT_SMS * sms, N * G)
            bs = min(bs, max(64, 1 << (triton.cdiv(S, want).bit_length() - 1)))
            split = max(1, min(want, triton.cdiv(S, bs), 64))
    else:   # forced (tests): tiles small enough that the chunks come out about as asked
        bs = min(bs, max(16, triton.next_power_of_2(triton.cdiv(S, split)) // 2))
    bc = min(pow2_divisor(CG), max(1, FWD_TILE // bs))
    if split == 1:
        chunk = triton.cdiv(S, bs) * bs
    else:
        chunk = max(bs, triton.cdiv(S, split) // bs * bs)  # whole tiles, rounded down: >= split chunks
    split = triton.cdiv(S, chunk)
    warps = max(1, min(8, bc * bs // 256))                  # 8 elements (16 bytes in bf16) a thread a tile
    group = CG * triton.cdiv(S, bs) * bs
    if split == 1:   # more warps (up to 8: two CTAs still fit an SM) until the group fits in registers
        while group > ONEPASS_PER_THREAD * 32 * warps and warps < 8:
            warps *= 2
    onepass = split == 1 and group <= ONEPASS_PER_THREAD * 32 * warps
    if not onepass:
        warps = max(1, min(8, bc * bs // 256))
    return dict(BLOCK_C=bc, BLOCK_S=bs, SPLIT=split, chunk=chunk, num_warps=warps, onepass=onepass)


def _flat(x):
    """(N, C, *spatial) -> a (N, C, S) view when the spatial dims share one stride, else a copy."""
    N, C = x.shape[:2]
    try:
        return x.view(N, C, -1)
    except RuntimeError:
        return x.contiguous().view(N, C, -1)


def _sms():
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return SMS


def gn_fwd(x, weight, bias, G, eps, silu, split=None):
    N, C = x.shape[:2]
    CG = C // G
    x3 = _flat(x)
    S = x3.shape[2]
    p = fwd_plan(N, C, S, G, split, _sms())
    bc, bs, split, chunk, warps = p["BLOCK_C"], p["BLOCK_S"], p["SPLIT"], p["chunk"], p["num_warps"]
    y = empty_like(x)   # x's memory format (contiguous or channels-last)
    y3 = _flat(y)
    mean = empty((N * G,), x, torch.float32)
    rstd = empty((N * G,), x, torch.float32)
    if p["onepass"]:
        _gn_fwd_onepass[(N * G,)](x3, weight, bias, y3, mean, rstd, *x3.stride(), *y3.stride(), G, CG, S, eps,
                                  NCB=CG // bc, NSB=triton.cdiv(S, bs), BLOCK_C=bc, BLOCK_S=bs,
                                  MASK_S=S % bs != 0, SILU=silu, num_warps=warps)
        return y, mean, rstd, 1
    flags = dict(BLOCK_C=bc, BLOCK_S=bs, MASK_C=False, MASK_S=S % bs != 0, num_warps=warps)
    if split > 1:
        mp, m2p, cp = (empty((N * G * split,), x, torch.float32) for _ in range(3))
        _gn_stats[(N * G * split,)](x3, mp, m2p, cp, *x3.stride(), G, CG, S, chunk, SPLIT=split, **flags)
    else:
        mp = m2p = cp = mean
    _gn_fwd[(N * G * split,)](x3, weight, bias, y3, mp, m2p, cp, mean, rstd, *x3.stride(), *y3.stride(),
                              G, CG, S, chunk, eps, SPLIT=split, BLOCK_SPLIT=triton.next_power_of_2(split),
                              SILU=silu, **flags)
    return y, mean, rstd, split


def gn_bwd(x, dy, weight, bias, mean, rstd, G, silu, split):
    N, C = x.shape[:2]
    x3, dy3 = _flat(x), _flat(dy)
    S = x3.shape[2]
    bc, bs, _, chunk, warps = plan(N, C, S, G, split)
    dx = empty_like(x)
    dx3 = _flat(dx)
    ap = empty((N, split, C), x, torch.float32)
    bp = empty((N, split, C), x, torch.float32)
    flags = dict(BLOCK_C=bc, BLOCK_S=bs, MASK_C=(C // G) % bc != 0, MASK_S=S % bs != 0, SILU=silu, num_warps=warps)
    args = (x3, dy3, weight, bias, mean, rstd, ap, bp, dx3, *x3.stride(), *dy3.stride(), *dx3.stride(),
            C, G, C // G, S, chunk)
    grid = (N * G * split,)
    if split == 1:
        _gn_bwd[grid](*args, SPLIT=1, PHASE=2, **flags)
    else:
        _gn_bwd[grid](*args, SPLIT=split, PHASE=0, **flags)
        _gn_bwd[grid](*args, SPLIT=split, PHASE=1, **flags)
    dw = ap.sum((0, 1))
    db = bp.sum((0, 1))
    return dx, dw, db


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, G, eps, silu, has_w, has_b, split):
        y, mean, rstd, split = gn_fwd(x, weight, bias, G, eps, silu, split)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.G, ctx.silu, ctx.split, ctx.has = G, silu, split, (has_w, has_b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = gn_bwd(x, dy, weight, bias, mean, rstd, ctx.G, ctx.silu, ctx.split)
        dw = dw.to(weight.dtype) if ctx.has[0] and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if ctx.has[1] and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None, None


def check_inputs(x, weight, bias, num_groups):
    check_device(x)
    if x.dim() < 2 or x.dtype not in DTYPES:
        raise ValueError(f"group_norm_silu: x must be (N, C, *spatial) fp32/fp16/bf16; got {tuple(x.shape)} {x.dtype}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm_silu: {C} channels are not divisible into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (C,) or not t.is_floating_point() or t.device != x.device):
            raise ValueError(f"group_norm_silu: {name} must be ({C},) floating, on {x.device}")
    if x.numel() == 0:
        raise ValueError("group_norm_silu: empty input")


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, silu=True, split=None):
    """GroupNorm (fp32 statistics) then SiLU when silu. split: force SPLIT (tests, tuning)."""
    check_inputs(x, weight, bias, num_groups)
    C = x.shape[1]
    w = weight if weight is not None else torch.ones(C, device=x.device, dtype=torch.float32)
    b = bias if bias is not None else torch.zeros(C, device=x.device, dtype=torch.float32)
    return _GroupNormSiLU.apply(x, w, b, num_groups, float(eps), bool(silu), weight is not None,
                                bias is not None, split)


def supports(x, *rest) -> bool:
    """The dispatcher asks with x alone (weight/bias/groups come at the call, checked there)."""
    try:
        check_device(x)
    except RuntimeError:
        return False
    return x.is_cuda and x.dim() >= 3 and x.dtype in DTYPES and x.numel() > 0


def group_norm_silu_ref(x, weight, bias, num_groups, eps=1e-5, silu=True):
    y = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    return torch.nn.functional.silu(y) if silu else y
