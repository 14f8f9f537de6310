"""kernels/dual_cross.py: two softmaxes, one output, gradients for all six inputs, vs float64."""
import pytest
import torch

from test_kernels_common import CUDA, DTYPES, check, leaf, leaf64, need_runnable, rand


@pytest.fixture(autouse=True)
def _runnable():
    need_runnable()


def run_case(B, Lq, H, D, Lt, Li, dtype, shared=False, cfg=None, strided=False, seed=0):
    from kernels.dual_cross import dual_cross_attention, dual_cross_attention_ref
    g = torch.Generator().manual_seed(seed)
    if strided:   # queries and contexts sliced out of wider projections: non-contiguous views
        q_t = rand(B, Lq, H, 2 * D, dtype=dtype, gen=g)[..., :D]
        q_i = q_t if shared else rand(B, Lq, 2, H, D, dtype=dtype, gen=g)[:, :, 1]
        kv_t = rand(B, Lt, 2, H, D, dtype=dtype, gen=g)
        kv_i = rand(B, Li, 2, H, D, dtype=dtype, gen=g)
        k_t, v_t, k_i, v_i = kv_t[:, :, 0], kv_t[:, :, 1], kv_i[:, :, 0], kv_i[:, :, 1]
    else:
        q_t = rand(B, Lq, H, D, dtype=dtype, gen=g)
        q_i = q_t if shared else rand(B, Lq, H, D, dtype=dtype, gen=g)
        k_t, v_t = rand(B, Lt, H, D, dtype=dtype, gen=g), rand(B, Lt, H, D, dtype=dtype, gen=g)
        k_i, v_i = rand(B, Li, H, D, dtype=dtype, gen=g), rand(B, Li, H, D, dtype=dtype, gen=g)
    do = rand(B, Lq, H, D, dtype=dtype, gen=g)

    def leaves(make):
        xs = [make(x) for x in (q_t, k_t, v_t, q_i, k_i, v_i)]
        if shared:
            xs[3] = xs[0]   # q_i is q_t: one tensor, one gradient
        return xs
    ours, r64, rl = leaves(leaf), leaves(leaf64), leaves(leaf)
    o = dual_cross_attention(*ours, fwd_config=cfg, bwd_config=cfg)
    o.backward(do)
    ref64 = dual_cross_attention_ref(*r64)
    ref64.backward(do.double())
    refl = dual_cross_attention_ref(*rl)
    refl.backward(do)
    tag = f"B={B} Lq={Lq} H={H} D={D} Lt={Lt} Li={Li} {dtype} shared={shared} cfg={cfg}"
    check(f"o {tag}", o, ref64, refl, dtype)
    names = ["dq_t", "dk_t", "dv_t", "dq_i", "dk_i", "dv_i"]
    for i, name in enumerate(names):
        if shared and name == "dq_i":
            continue
        L = Lt if name.endswith("_t") else Li
        if L == 1 and name.startswith(("dq", "dk")) and not (shared and name == "dq_t"):
            # one key: the softmax is constant, dq and dk are 0 up to rounding of delta's two sums
            assert ours[i].grad.abs().max().item() <= 64 * 2.0 ** -23 * (1 + ref64.abs().max().item()) or dtype != torch.float32
            continue
        check(f"{name} {tag}", ours[i].grad, r64[i].grad, rl[i].grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("D", [16, 40, 64, 80, 160])
def test_sweep(D, dtype):
    run_case(1, 33, 2, D, 77, 16, dtype, shared=True)


@pytest.mark.parametrize("Lt,Li", [(1, 77), (77, 1), (1, 1), (154, 33)])
def test_contexts(Lt, Li):
    run_case(1, 20, 2, 40, Lt, Li, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_separate_queries_small_blocks(dtype):
    run_case(2, 37, 1, 80, 45, 19, dtype, shared=False, cfg=(16, 16, 4, 1))


@pytest.mark.parametrize("shared", [False, True])
def test_strided_inputs(shared):
    run_case(1, 21, 2, 40, 77, 9, torch.bfloat16, shared=shared, strided=True, cfg=(16, 16, 4, 1))


def test_same_memory_different_tensors():
    """q_i a different tensor object viewing q_t's memory: read once, but each gets its own grad."""
    from kernels.dual_cross import dual_cross_attention
    g = torch.Generator().manual_seed(5)
    base = rand(1, 17, 2, 40, gen=g).requires_grad_()
    q_t, q_i = base.view(1, 17, 2, 40), base.view(1, 17, 2, 40)
    kv = [rand(1, L, 2, 40, gen=g) for L in (7, 7, 5, 5)]
    o = dual_cross_attention(q_t, kv[0], kv[1], q_i, kv[2], kv[3])
    o.sum().backward()
    b64 = base.detach().double().requires_grad_()
    from kernels.dual_cross import dual_cross_attention_ref
    dual_cross_attention_ref(b64, kv[0].double(), kv[1].double(), b64, kv[2].double(), kv[3].double()).sum().backward()
    assert (base.grad.double() - b64.grad).abs().max().item() < 1e-5


def test_deterministic():
    from kernels.dual_cross import dual_cross_attention
    g = torch.Generator().manual_seed(1)
    q = rand(1, 29, 2, 40, dtype=torch.bfloat16, gen=g)
    ctx = [rand(1, L, 2, 40, dtype=torch.bfloat16, gen=g) for L in (77, 77, 16, 16)]
    do = rand(1, 29, 2, 40, dtype=torch.bfloat16, gen=g)
    runs = []
    for _ in range(2):
        xs = [leaf(x) for x in [q] + ctx]
        o = dual_cross_attention(xs[0], xs[1], xs[2], xs[0], xs[3], xs[4])
        o.backward(do)
        runs.append([o.detach()] + [x.grad for x in xs])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_matches_two_sdpa_calls_on_gpu():
    import torch.nn.functional as F
    from kernels.dual_cross import dual_cross_attention
    q = rand(4, 1024, 8, 40, dtype=torch.bfloat16)
    kt, vt, ki, vi = (rand(4, L, 8, 40, dtype=torch.bfloat16) for L in (77, 77, 64, 64))
    sd = lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    ref = sd(q, kt, vt) + sd(q, ki, vi)
    assert (dual_cross_attention(q, kt, vt, q, ki, vi).float() - ref.float()).abs().max().item() < 3e-2
