"""kernels/temporal.py: attention along frames on (N, F, H, D) and (B, S, F, H, D) views, vs float64."""
import os

import pytest
import torch

from test_kernels_common import CUDA, DTYPES, check, leaf, leaf64, need_runnable, rand


@pytest.fixture(autouse=True)
def _runnable():
    need_runnable()


def strided_views(B, F, hw, H, D, dtype, gen):
    """q, k, v as per-head views of one fused (B, F, h*w, 3*C) projection, (B, h*w, F, H, D) without
    a copy (no stride order a 4-D view can flatten when B > 1); for B == 1 also (N = h*w, F, H, D)."""
    C = H * D
    qkv = rand(B, F, hw, 3 * C, dtype=dtype, gen=gen)
    views = [qkv[..., i * C:(i + 1) * C].unflatten(-1, (H, D)).transpose(1, 2) for i in range(3)]
    if B == 1:
        views = [x[0] for x in views]
    return views


def run_case(N, F, H, D, dtype, layout="contiguous", scale=None, seed=0, B=1):
    from kernels.temporal import temporal_attention, temporal_attention_ref
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q, k, v = (rand(N, F, H, D, dtype=dtype, gen=g) for _ in range(3))
    elif layout == "unet":  # heartbeat/attention.py TemporalAttention: (B, F, h*w*heads, D) views of
        C = H * D           # three (B, F, h*w, C) projections; N = h*w pixels here
        q, k, v = (rand(B, F, N, C, dtype=dtype, gen=g).view(B, F, N * H, D) for _ in range(3))
    else:  # "strided": per-head views of one fused projection; 5-D when B > 1
        q, k, v = strided_views(B, F, N, H, D, dtype, g)
        assert not q.is_contiguous()
    do = rand(*q.shape, dtype=dtype, gen=g)
    qt, kt, vt = leaf(q), leaf(k), leaf(v)
    o = temporal_attention(qt, kt, vt, scale=scale)
    o.backward(do)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    r64 = temporal_attention_ref(q64, k64, v64, scale)
    r64.backward(do.double())
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    rl = temporal_attention_ref(ql, kl, vl, scale)
    rl.backward(do)
    tag = f"N={N} F={F} H={H} D={D} {dtype} {layout}"
    check(f"o {tag}", o, r64, rl, dtype)
    if F > 1:  # with one frame the softmax is constant: dq = dk = 0 exactly, compared below
        check(f"dq {tag}", qt.grad, q64.grad, ql.grad, dtype)
        check(f"dk {tag}", kt.grad, k64.grad, kl.grad, dtype)
    else:
        assert torch.equal(qt.grad, torch.zeros_like(qt.grad)) and torch.equal(kt.grad, torch.zeros_like(kt.grad))
    check(f"dv {tag}", vt.grad, v64.grad, vl.grad, dtype)
    return o


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 160])
@pytest.mark.parametrize("F", [1, 7, 16])
def test_sweep(F, D, dtype):
    run_case(5, F, 2, D, dtype)   # 10 sequences: the last tile is partly empty for every F


@pytest.mark.parametrize("F", [7, 16])
@pytest.mark.parametrize("D", [40, 80, 160])
def test_unet_layout(F, D):
    """The UNet's views: 2 clips, 9 pixels x 2 heads as the heads, frames h*w*C apart. The output is
    (B, F, h*w*heads, D) dense, so TemporalAttention views it back to (B, F, h*w, C) for free."""
    o = run_case(9, F, 2, D, torch.bfloat16, layout="unet", B=2)
    assert o.shape == (2, F, 18, D) and o.is_contiguous()


@pytest.mark.parametrize("F", [1, 7, 16])
@pytest.mark.parametrize("D", [40, 80])
def test_strided_views(F, D):
    o = run_case(9, F, 2, D, torch.bfloat16, layout="strided")
    # the output is dense in q's own dimension order: (h*w, F, H, D) stored as (F, h*w, H, D)
    assert o.stride(1) > o.stride(0) > o.stride(2) > o.stride(3) == 1


def test_five_dim_batch_views():
    """B > 1: (B, h*w, F, H, D) views that no 4-D view can express without a copy."""
    run_case(6, 7, 2, 40, torch.float16, layout="strided", B=3)


def test_frames_64_and_odd():
    run_case(2, 64, 1, 40, torch.float16, scale=0.5)
    run_case(3, 33, 1, 24, torch.float32)


def test_grid_is_one_dimensional():
    """Any number of sequences: the launch grid is 1-D (axis 0 holds 2^31 - 1 programs), never
    B*H on axis 1/2 where CUDA stops at 65,535."""
    from kernels.temporal import grid_size, tile_rows
    assert tile_rows(16) == 64 and tile_rows(1) == 64 and tile_rows(64) == 64
    assert grid_size(1 << 26, 16) == (1 << 26) // 4   # 64-row tiles: 4 sequences of 16 frames each
    assert grid_size(70_001, 7) == -(-70_001 // 8)     # F_pad = 8: 8 sequences per tile
    assert grid_size(5, 64) == 5


@pytest.mark.skipif(not CUDA and os.environ.get("HEARTBEAT_SLOW_TESTS", "0") == "0",
                    reason="~1 min in the interpreter: set HEARTBEAT_SLOW_TESTS=1 (always runs on CUDA)")
def test_batch_beyond_65535():
    """N*H = 70,000 sequences, forward and backward, every element written (outputs start as NaN)."""
    from kernels.temporal import temporal_attention, temporal_attention_ref
    g = torch.Generator().manual_seed(3)
    q, k, v = (rand(70_000, 2, 1, 16, dtype=torch.float16, gen=g).requires_grad_() for _ in range(3))
    o = temporal_attention(q, k, v)
    o.backward(torch.ones_like(o))
    ref = temporal_attention_ref(q.double(), k.double(), v.double())
    assert (o.double() - ref).abs().max().item() < 4e-3
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_deterministic():
    from kernels.temporal import temporal_attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(6, 16, 2, 40, dtype=torch.bfloat16, gen=g) for _ in range(3))
    do = rand(6, 16, 2, 40, dtype=torch.bfloat16, gen=g)
    runs = []
    for _ in range(2):
        qt, kt, vt = leaf(q), leaf(k), leaf(v)
        o = temporal_attention(qt, kt, vt)
        o.backward(do)
        runs.append([o.detach(), qt.grad, kt.grad, vt.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launcher_checks():
    from kernels.temporal import temporal_attention
    with pytest.raises(ValueError):
        temporal_attention(*(rand(2, 65, 1, 16),) * 3)
    with pytest.raises(ValueError):
        x = rand(2, 4, 1, 16)
        temporal_attention(x, x, x.half())


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_matches_sdpa_on_gpu():
    import torch.nn.functional as F
    from kernels.temporal import temporal_attention
    # the UNet's views at the 64x64-latent level: 2 clips, 4096 pixels x 8 heads, 16 frames
    q, k, v = (rand(2, 16, 4096 * 8 * 40, dtype=torch.bfloat16).view(2, 16, 4096 * 8, 40) for _ in range(3))
    o = temporal_attention(q, k, v)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert (o.float() - ref.float()).abs().max().item() < 2e-2
