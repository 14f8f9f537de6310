"""kernels/spatial.py: spatial flash attention, forward and all gradients, against float64.

CPU: runs in Triton's interpreter (TRITON_INTERPRET=1 is set by test_kernels_common before Triton
is imported); CUDA: the same sweeps on the GPU, plus a comparison with SDPA.
"""
import pytest
import torch

from test_kernels_common import (CUDA, DEVICE, DTYPES, check, leaf, leaf64, need_runnable, rand)


@pytest.fixture(autouse=True)
def _runnable():
    need_runnable()


def run_case(B, Lq, Lk, H, D, dtype, cfg=None, layout="contiguous", scale=None, seed=0):
    from kernels.spatial import attention, attention_ref
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q, k, v = rand(B, Lq, H, D, dtype=dtype, gen=g), rand(B, Lk, H, D, dtype=dtype, gen=g), rand(B, Lk, H, D, dtype=dtype, gen=g)
    elif layout == "packed":     # q, k, v sliced out of one (B, L, 3, H, D) projection: strided views
        assert Lq == Lk
        qkv = rand(B, Lq, 3, H, D, dtype=dtype, gen=g)
        q, k, v = qkv.unbind(2)
    elif layout == "padded":     # rows of D + 1 elements: strides not multiples of 8, the unhinted variant
        q, k, v = (rand(B, L, H, D + 1, dtype=dtype, gen=g)[..., :D] for L in (Lq, Lk, Lk))
    else:                        # "transposed": (B, H, L, D) storage seen as (B, L, H, D), stride_d != 1 for v
        q = rand(B, H, Lq, D, dtype=dtype, gen=g).transpose(1, 2)
        k = rand(B, H, Lk, D, dtype=dtype, gen=g).transpose(1, 2)
        v = rand(B, H, D, Lk, dtype=dtype, gen=g).permute(0, 3, 1, 2)
    do = rand(B, Lq, H, D, dtype=dtype, gen=g)
    qt, kt, vt = leaf(q), leaf(k), leaf(v)
    o = attention(qt, kt, vt, scale=scale, fwd_config=cfg, bwd_config=cfg)
    o.backward(do)
    q64, k64, v64 = leaf64(q), leaf64(k), leaf64(v)
    r64 = attention_ref(q64, k64, v64, scale)
    r64.backward(do.double())
    ql, kl, vl = leaf(q), leaf(k), leaf(v)
    rl = attention_ref(ql, kl, vl, scale)   # PyTorch's own math in this dtype: sets the error budget
    rl.backward(do)
    tag = f"B={B} Lq={Lq} Lk={Lk} H={H} D={D} {dtype} cfg={cfg} {layout}"
    check(f"o {tag}", o, r64, rl, dtype)
    check(f"dq {tag}", qt.grad, q64.grad, ql.grad, dtype)
    check(f"dk {tag}", kt.grad, k64.grad, kl.grad, dtype)
    check(f"dv {tag}", vt.grad, v64.grad, vl.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 160])
def test_default_blocks(D, dtype):
    """The launch configs used on a GPU; lengths 33 / 77 are ragged for every block size."""
    run_case(2, 33, 77, 2, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [40, 80, 160])
def test_small_blocks_many_iterations(D, dtype):
    """16x16 blocks: several query and key blocks, ragged last ones, both loops iterate."""
    run_case(1, 37, 45, 2, D, dtype, cfg=(16, 16, 4, 1))


@pytest.mark.parametrize("Lq,Lk", [(1, 1), (1, 7), (7, 1), (32, 32)])
def test_edge_lengths(Lq, Lk):
    run_case(1, Lq, Lk, 3, 40, torch.float16, cfg=(16, 16, 4, 1))


@pytest.mark.parametrize("layout", ["packed", "transposed", "padded"])
@pytest.mark.parametrize("D", [40, 64])
def test_non_contiguous(layout, D):
    run_case(2, 21, 21, 2, D, torch.bfloat16, cfg=(16, 16, 4, 1), layout=layout)


@pytest.mark.parametrize("D", [8, 24, 96, 256])
def test_other_head_dims(D):
    run_case(1, 19, 23, 1, D, torch.float16, cfg=(16, 16, 4, 1), scale=0.3)


def test_large_logits_stay_finite():
    """A big scale makes the softmax nearly one-hot: the online max must keep exp2 in range."""
    run_case(1, 20, 50, 1, 64, torch.float32, cfg=(16, 16, 4, 1), scale=4.0)


def test_deterministic():
    from kernels.spatial import attention
    g = torch.Generator().manual_seed(1)
    q, k, v = (rand(2, 29, 2, 40, dtype=torch.bfloat16, gen=g) for _ in range(3))
    do = rand(2, 29, 2, 40, dtype=torch.bfloat16, gen=g)
    runs = []
    for _ in range(2):
        qt, kt, vt = leaf(q), leaf(k), leaf(v)
        o = attention(qt, kt, vt, fwd_config=(16, 16, 4, 1), bwd_config=(16, 16, 4, 1))
        o.backward(do)
        runs.append([o.detach(), qt.grad, kt.grad, vt.grad])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launcher_checks():
    from kernels.spatial import attention
    x = rand(1, 4, 1, 16)
    with pytest.raises(ValueError):
        attention(x, x, x.double())
    with pytest.raises(ValueError):
        attention(x, rand(1, 4, 2, 16), rand(1, 4, 2, 16))
    with pytest.raises(ValueError):
        attention(*(rand(1, 4, 1, 257),) * 3)


def test_stride_unit_only_where_alignment_is_proven():
    """The launchers pass UNIT = 8 (16-byte vector loads) only for unit head-dim strides, other strides
    multiples of 8 and 16-byte aligned pointers; every other input takes the unhinted variant (UNIT = 1),
    which test_non_contiguous runs ("transposed", "padded")."""
    from kernels._common import stride_unit, strides
    x = torch.empty(2, 33, 8, 40, dtype=torch.bfloat16)
    assert stride_unit(x) == 8 and strides(x, 8) == (33 * 40, 40, 5, 1)
    assert stride_unit(torch.empty(2, 33, 8, 41)[..., :40]) == 1          # row stride 41
    assert stride_unit(x.transpose(1, 3)) == 1                             # head-dim stride != 1
    assert stride_unit(torch.empty(2, 33, 8, 48, dtype=torch.bfloat16)[..., 1:41]) == 1   # pointer + 2 bytes
    assert stride_unit(x, torch.empty(2, 33, 8, 41)[..., :40]) == 1        # one misaligned input is enough


def test_split_head_dim():
    from kernels._common import split_head_dim
    assert split_head_dim(40) == (32, 16)   # 48 paid, not 64
    assert split_head_dim(80) == (64, 16)   # exact
    assert split_head_dim(160) == (128, 32)  # exact, not 256
    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(8) == (16, 0)
    assert split_head_dim(256) == (256, 0)


# ------------------------------------------------------------------------------ GPU only

@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("D,L", [(40, 1024), (80, 256), (160, 64), (64, 333)])
def test_matches_sdpa_on_gpu(D, L):
    import torch.nn.functional as F
    from kernels.spatial import attention
    q, k, v = (rand(4, L, 8, D, dtype=torch.bfloat16) for _ in range(3))
    o = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert (o.float() - ref.float()).abs().max().item() < 2e-2
    assert DEVICE == "cuda"
