"""kernels/group_norm.py: GroupNorm(+SiLU), forward and dx / dweight / dbias, vs float64."""
import pytest
import torch

from test_kernels_common import CUDA, DEVICE, DTYPES, check, leaf, leaf64, need_runnable, rand


@pytest.fixture(autouse=True)
def _runnable():
    need_runnable()


def run_case(N, C, spatial, G, dtype, silu=True, split=None, channels_last=False, affine=True,
             offset=1.0, seed=0):
    from kernels.group_norm import group_norm_silu, group_norm_silu_ref
    g = torch.Generator().manual_seed(seed)
    x = rand(N, C, *spatial, dtype=dtype, gen=g, scale=2.0) + offset   # a mean far from 0 tests the variance
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w = rand(C, gen=g) if affine else None      # fp32 parameters, as under bf16 autocast
    b = rand(C, gen=g) if affine else None
    dy = rand(*x.shape, dtype=dtype, gen=g)
    xt, wt, bt = leaf(x), (leaf(w) if affine else None), (leaf(b) if affine else None)
    y = group_norm_silu(xt, wt, bt, G, silu=silu, split=split)
    assert y.stride() == x.stride(), "output must keep x's memory format"
    y.backward(dy)
    x64, w64, b64 = leaf64(x), (leaf64(w) if affine else None), (leaf64(b) if affine else None)
    r64 = group_norm_silu_ref(x64, w64, b64, G, silu=silu)
    r64.backward(dy.double())
    # PyTorch's own low-precision path: group_norm in the dtype (fp32 params cast to it)
    xl = leaf(x)
    wl, bl = (leaf(w.to(dtype)) if affine else None), (leaf(b.to(dtype)) if affine else None)
    rl = group_norm_silu_ref(xl, wl, bl, G, silu=silu)
    rl.backward(dy)
    tag = f"N={N} C={C} {spatial} G={G} {dtype} silu={silu} split={split} cl={channels_last}"
    check(f"y {tag}", y, r64, rl, dtype)
    check(f"dx {tag}", xt.grad, x64.grad, xl.grad, dtype)
    if affine:  # weight grads are fp32 here: PyTorch's lowp error on them is the budget's base
        check(f"dw {tag}", wt.grad, w64.grad, wl.grad, dtype)
        check(f"db {tag}", bt.grad, b64.grad, bl.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("channels_last", [False, True])
def test_sweep(dtype, channels_last):
    run_case(2, 12, (5, 7), 3, dtype, channels_last=channels_last)


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_split_reduction(split, channels_last):
    """Two-pass path: partial moments per chunk, then merged (forward and backward)."""
    run_case(1, 8, (9, 11), 2, torch.bfloat16, split=split, channels_last=channels_last)


def test_no_silu_no_affine():
    run_case(2, 6, (4, 5), 3, torch.float16, silu=False, affine=False)
    run_case(1, 6, (13,), 2, torch.float32, silu=False)


def test_video_shapes_and_channels_not_power_of_two():
    """(N, C, F, H, W) 5-D input, channels per group 10 (SD1.5's 320 / 32): a padded channel block."""
    run_case(1, 20, (2, 3, 5), 2, torch.bfloat16, channels_last=True)
    run_case(1, 20, (2, 3, 5), 2, torch.float32)


def test_large_offset_variance_is_stable():
    """mean 100, std 2: E[x^2] - E[x]^2 in fp32 would lose most digits; Chan's merge does not."""
    run_case(1, 4, (16, 16), 1, torch.float32, offset=100.0, split=3)


def test_plan_splits_small_batches():
    from kernels.group_norm import plan
    bc, bs, split, chunk, warps = plan(1, 320, 64 * 64, 32, target=528)
    assert bc == 2 and split > 1 and chunk % bs == 0 and split * chunk >= 64 * 64   # 2 divides C/G = 10
    assert plan(64, 320, 64 * 64, 32, target=528)[2] == 1   # N*G = 2048 programs: no split


def test_deterministic():
    from kernels.group_norm import group_norm_silu
    g = torch.Generator().manual_seed(2)
    x = rand(1, 8, 6, 6, dtype=torch.bfloat16, gen=g)
    w, b = rand(8, gen=g), rand(8, gen=g)
    dy = rand(1, 8, 6, 6, dtype=torch.bfloat16, gen=g)
    runs = []
    for _ in range(2):
        xt, wt, bt = leaf(x), leaf(w), leaf(b)
        y = group_norm_silu(xt, wt, bt, 2, split=2)
        y.backward(dy)
        runs.append([y.detach(), xt.grad, wt.grad, bt.grad])
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_launcher_checks():
    from kernels.group_norm import group_norm_silu
    with pytest.raises(ValueError):
        group_norm_silu(rand(1, 6, 4, 4), None, None, 4)
    with pytest.raises(ValueError):
        group_norm_silu(rand(1, 6, 4, 4), rand(5), None, 3)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("C,hw", [(320, 32), (640, 16), (1280, 8)])
def test_matches_eager_on_gpu(C, hw):
    from kernels.group_norm import group_norm_silu
    x = rand(16, C, hw, hw, dtype=torch.bfloat16)
    w, b = rand(C), rand(C)
    ref = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, w, b)).to(x.dtype)
    assert (group_norm_silu(x, w, b, 32).float() - ref.float()).abs().max().item() < 5e-2
    assert DEVICE == "cuda"


def test_forward_plan_no_idle_lanes_one_pass_and_split():
    """SD1.5 widths: the channel block divides C/G (no padded lanes), the group is read once,
    and a batch too small to fill the GPU splits each group's reduction."""
    from kernels.group_norm import fwd_plan
    for C, hw in ((320, 32), (640, 16), (1280, 8), (1280, 4), (960, 32), (1920, 16)):
        p = fwd_plan(32, C, hw * hw, 32, sms=132)
        assert (C // 32) % p["BLOCK_C"] == 0 and hw * hw % p["BLOCK_S"] == 0, (C, hw, p)
        # one read of x, except C=960 at 32x32: 30,720 values need 16 warps, 1 CTA/SM; the looped kernel
        assert p["onepass"] == ((C, hw) != (960, 32)) and p["SPLIT"] == 1 and p["num_warps"] <= 8, (C, hw, p)
        assert p["BLOCK_C"] * p["BLOCK_S"] >= 4 * 32 * p["num_warps"], (C, hw, p)   # >= 4 elements a lane
    p = fwd_plan(2, 320, 32 * 32, 32, sms=132)       # N*G = 64 programs < 2 per SM
    assert p["SPLIT"] > 1 and not p["onepass"] and 2 * 32 * p["SPLIT"] >= 2 * 132


@pytest.mark.parametrize("tile,per_thread", [(16, 64), (64, 0)])
def test_one_pass_many_tiles_and_looped_fallback(monkeypatch, tile, per_thread):
    """(16, 64): the one-pass kernel over several position tiles a channel block (and a masked last
    one); (64, 0): a group too large for registers takes the looped two-read kernel."""
    import kernels.group_norm as gn
    monkeypatch.setattr(gn, "FWD_TILE", tile)
    monkeypatch.setattr(gn, "ONEPASS_PER_THREAD", per_thread)
    monkeypatch.setattr(gn, "SMS", 1)                 # N*G >= 2 fills "the GPU": no split
    p = gn.fwd_plan(2, 4, 37, 2, sms=1)
    assert p["onepass"] == (per_thread > 0) and p["SPLIT"] == 1 and 37 % p["BLOCK_S"] != 0
    run_case(2, 4, (37,), 2, torch.bfloat16, silu=per_thread > 0)


def test_split_with_several_channel_blocks():
    """C/G = 6: channel blocks of 2 in the split forward and in both backward phases."""
    run_case(1, 12, (5, 7), 2, torch.bfloat16, split=2)
