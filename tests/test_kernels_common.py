"""Shared helpers for the kernel tests (tests/test_kernels_*.py), and the package-level tests:
kernels/ imports cleanly, supports() answers, every kernel variant compiles offline for sm_90/sm_80.

Where the kernels run: on a machine without CUDA, the kernel test files set TRITON_INTERPRET=1
before Triton is imported (only then; on a GPU machine they run on CUDA tensors instead), so the
kernels execute in Triton's CPU interpreter. Offline compiles run in a subprocess without it.
"""
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first `import triton` in this process; harmless for torch-only tests
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if CUDA else "cpu"
LOWP = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def triton_ok():
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def need_runnable():
    """Skip unless kernels can run here: CUDA, or the interpreter active in this process."""
    if not triton_ok():
        pytest.skip("triton is not importable")
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    import importlib
    import kernels
    kernels._interpreter_compat()
    ks = importlib.import_module("kernels.spatial")
    if not CUDA and type(ks._attn_fwd).__name__ != "InterpretedFunction":
        pytest.skip("kernels were imported before TRITON_INTERPRET was set in this process")
    importlib.import_module("kernels._common").POISON = True  # outputs start as NaN: an element the kernel forgets to write fails the test


def rand(*shape, dtype=torch.float32, gen=None, scale=1.0):
    """Random (never zero-filled) test input on the test device."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
    return x.to(DEVICE, dtype)


def leaf64(x):
    return x.detach().to(torch.float64).requires_grad_()


def leaf(x):
    return x.detach().clone().requires_grad_()


def max_err(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def check(name, out, ref64, ref_lowp, dtype, mult=3.0):
    """|out - ref64| <= mult * |torch_in_dtype - ref64| + a floor of a few ulps of the output scale.

    The budget is what PyTorch itself makes computing the same thing in this dtype (ref_lowp), times
    a small factor, as flash-attention's tests do; the floor only matters where PyTorch happens to be
    (near) exact, e.g. fp32 on tiny problems."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (unwritten output?)"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    scale = max(1.0, ref64.abs().max().item())
    budget = mult * base + 8 * EPS[dtype] * scale
    assert err <= budget, f"{name}: max error {err:.3e} > budget {budget:.3e} (torch in {dtype}: {base:.3e})"
    return err, base


# ------------------------------------------------------------------------------ package tests

def test_import_without_side_effects():
    code = ("import sys; import kernels; assert 'triton' not in sys.modules, 'kernels imported triton'; "
            "print(kernels.supports('attention'), kernels.supports('nope'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


def test_missing_triton_is_a_clear_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "x = torch.randn(1, 4, 1, 16)\n"
            "assert not kernels.supports('attention', x, x, x)\n"
            "try:\n    kernels.attention(x, x, x)\nexcept RuntimeError as e:\n    print('needs Triton' in str(e))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_interpreter_dot_does_not_depend_on_summation_order():
    """The forward's Q K^T and the backward's K Q^T must give each logit the same fp32 value, or a
    large softmax scale amplifies the difference into the recomputed P (test_large_logits_stay_finite
    failed on another CPU this way). NumPy's BLAS matmul rounds by its kernel's summation order; the
    interpreter fix in kernels/__init__.py accumulates in float64 and rounds once."""
    need_runnable()
    if CUDA:
        pytest.skip("interpreter only")
    import numpy as np
    from triton.runtime import interpreter as ti
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((16, 64)) * 4).astype(np.float32)
    b = (rng.standard_normal((64, 16)) * 4).astype(np.float32)
    perm = rng.permutation(64)
    zero = ti.TensorHandle(np.zeros((16, 16), np.float32), ti.tl.float32)

    def dot(x, y):
        h = ti.InterpreterBuilder().create_dot(ti.TensorHandle(x, ti.tl.float32), ti.TensorHandle(y, ti.tl.float32),
                                               zero, "ieee", 0)
        return h.data
    plain_differs = not np.array_equal(a @ b, a[:, perm] @ b[perm, :])
    assert np.array_equal(dot(a, b), dot(a[:, perm], b[perm, :]))
    assert np.array_equal(dot(a, b), dot(b.T.copy(), a.T.copy()).T)
    print("plain np.matmul depends on the order here:", plain_differs)


def test_supports_rejects_cpu_and_bad_shapes():
    need_runnable()
    import kernels
    x = rand(1, 8, 2, 40)
    assert not kernels.supports("attention", x, x, x) or CUDA  # CPU tensors: never for `auto`
    assert not kernels.supports("attention", *(rand(1, 8, 2, 300),) * 3)
    assert not kernels.supports("temporal_attention", *(rand(4, 65, 2, 16),) * 3)  # F > 64
    assert not kernels.supports("group_norm_silu", rand(2, 6, 4, 4, dtype=torch.float64))
    if CUDA:
        assert kernels.supports("attention", x, x, x)
        assert kernels.supports("temporal_attention", *(rand(4, 16, 2, 40),) * 3)
        assert kernels.supports("group_norm_silu", rand(2, 64, 8, 8))


def compile_records(tmp_path, *args):
    """Run `python -m kernels.compile_check ARGS --json` in a subprocess (no interpreter) -> records."""
    out = tmp_path / f"compile{len(list(tmp_path.iterdir()))}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.compile_check", *args, "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    print(r.stdout[-20000:])
    records = json.loads(out.read_text()) if out.exists() else []
    errors = [f"sm_{x['arch']} {x['kernel']} [{x['case']}]: {x['error'][:500]}" for x in records if "error" in x]
    assert r.returncode == 0 and not errors, "\n".join(errors) or r.stderr[-5000:]
    assert records
    return records


@pytest.mark.skipif(not triton_ok(), reason="triton is not importable")
def test_offline_compile_sm90_sm80(tmp_path):
    """What the launchers really launch (captured through the JIT, kernels/compile_check.py) compiles:
    the sd15 shapes for sm_90 and sm_80, the coverage set (other dtypes, head dims, ragged lengths,
    every tuning candidate) for sm_90; within the shared-memory limits; low-precision attention
    kernels use wgmma on sm_90 and mma.sync on sm_80."""
    sd15 = compile_records(tmp_path, "--set", "sd15", "--arch", "90", "80")
    records = sd15 + compile_records(tmp_path, "--set", "coverage", "--arch", "90")
    for x in records:
        name = f"sm_{x['arch']} {x['kernel']} [{x['case']}]"
        assert x["shared"] <= x["smem_limit"], f"{name}: smem {x['shared']} over the limit"
        if x["expect_mma"]:
            assert x["wgmma"] if x["arch"] == 90 else x["mma_sync"], f"{name}: no tensor-core MMA in the PTX"
    # what the sd15 shapes must compile to on Hopper (issue 13): no spills; at D = 40 no scalar 2-byte
    # global loads (the head dim is a constexpr and the launcher's stride proof gives 16-byte vectors),
    # except the dual kernel's 16-token image context, whose masked 16x16 head-dim tail spreads one
    # element per thread over 8 warps (at most 4 such loads); at least 2 CTAs per SM for every forward.
    for x in sd15:
        if x["arch"] != 90:
            continue
        name = f"sm_90 {x['kernel']} [{x['case']}]"
        assert x["n_spills"] == 0, f"{name}: {x['n_spills']} bytes of spills"
        if x["head_dim"] == 40:
            scalar = x["global_loads"].get("2B", 0)
            assert scalar <= (4 if x["module"] == "dual_cross" and x["kernel"] != "attn_bwd_dkdv" else 0), \
                f"{name}: {scalar} scalar 2-byte global loads"
        if "_fwd" in x["kernel"]:                        # _gn_fwd_onepass too
            assert x["ctas_per_sm"] >= 2, f"{name}: {x['ctas_per_sm']} CTA/SM ({x['n_regs']} registers, {x['shared']} B smem)"


def test_dispatcher_reaches_the_kernels():
    """heartbeat.attention with backend="triton" runs these kernels (interpreted on CPU) and agrees
    with the math backend; the package's functions stay functions once the kernel files are imported."""
    need_runnable()
    import kernels
    import kernels._common
    import kernels.dual_cross
    import kernels.spatial
    import kernels.temporal  # noqa: F401
    from heartbeat import attention as A
    assert kernels._common.POISON
    assert all(type(f).__name__ == "function" for f in (kernels.attention, kernels.temporal_attention,
                                                           kernels.dual_cross_attention, kernels.group_norm_silu))
    g = torch.Generator().manual_seed(0)
    q, k, v = rand(1, 19, 2, 40, gen=g), rand(1, 9, 2, 40, gen=g), rand(1, 9, 2, 40, gen=g)
    ki, vi = rand(1, 5, 2, 40, gen=g), rand(1, 5, 2, 40, gen=g)
    x = rand(2, 8, 3, 5, gen=g)
    w, b = rand(8, gen=g), rand(8, gen=g)
    pairs = [
        (A.attention(q, k, v, backend="triton"), A.attention(q, k, v, backend="math")),
        (A.temporal_attention(q, q, q, backend="triton"), A.temporal_attention(q, q, q, backend="math")),
        (A.dual_cross_attention(q, k, v, q, ki, vi, backend="triton"),
         A.dual_cross_attention(q, k, v, q, ki, vi, backend="math")),
        (A.group_norm(x, w, b, 4, silu=True, backend="triton"), A.group_norm(x, w, b, 4, silu=True, backend="math")),
    ]
    for ours, ref in pairs:
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-5


def test_bench_script_runs_on_cpu(tmp_path):
    """tools/bench.py: the plain command exits 0 without a GPU (and says so); --dry-run drives the
    kernel-table code on tiny shapes, so a broken bench fails here rather than on the GPU machine."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "tools/bench.py", "--dry-run", "--only", "spatial", "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if CUDA:
        return
    rows = json.loads(out.read_text())["rows"]
    ours = [x for x in rows if x["impl"] == "triton"]
    assert ours and "fwd_vs_best" in ours[0] and "bwd_ms" in ours[0]
