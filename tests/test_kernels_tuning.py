"""kernels/tuning.py: opt-in autotuning picks the fastest candidate per shape key, remembers it, skips
candidates that fail, and the tuned attention kernels still compute the right thing (interpreter).
The timer is replaced by a fake one here: on CPU there are no CUDA events to time with."""
import pytest
import torch

from test_kernels_common import DTYPES, check, leaf, leaf64, need_runnable, rand


@pytest.fixture()
def tuning(monkeypatch):
    need_runnable()
    from kernels import tuning as T
    T.reset()
    monkeypatch.setattr(T, "ENABLED", True)   # HEARTBEAT_AUTOTUNE=1, read at import
    yield T
    T.reset()


def fake_timer(times):
    """Runs each candidate once (so a broken one raises) and reports the next time from `times`."""
    it = iter(times)

    def timer(fn):
        fn()
        return next(it)
    return timer


def test_choose_takes_the_fastest_once_and_skips_failures(tuning):
    ran = []

    def launch(c):
        ran.append(c)
        if c == "broken":
            raise RuntimeError("out of resources")
    best = tuning.choose("k", (1,), ["a", "broken", "b", "c"], launch, timer=fake_timer([3.0, 1.0, 2.0]))
    assert best == "b" and ran == ["a", "broken", "b", "c"]
    again = tuning.choose("k", (1,), ["a", "broken", "b", "c"], launch, timer=fake_timer([]))
    assert again == "b" and len(ran) == 4                          # remembered: nothing is re-timed
    assert "k (1,): b" in tuning.report() and "a: 3.000 ms" in tuning.report()
    with pytest.raises(RuntimeError, match="out of resources"):
        tuning.choose("k", (2,), ["broken"], launch, timer=fake_timer([]))
    assert tuning.pow2_bucket(77) == 128 and tuning.pow2_bucket(64) == 64 and tuning.pow2_bucket(1) == 1


def test_off_by_default(monkeypatch):
    need_runnable()
    from kernels import tuning as T
    monkeypatch.setattr(T, "ENABLED", False)
    T.reset()
    from kernels.spatial import attention
    q = rand(1, 9, 2, 40, dtype=torch.bfloat16)
    attention(q, q, q)
    assert T.report() == ""


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=lambda d: str(d)[6:])
def test_tuned_spatial_and_dual_attention_are_correct(tuning, monkeypatch, dtype):
    """With tuning on, each kernel times its candidates (fake times: the last candidate wins, a
    non-default config) and the result, forward and backward, still matches float64."""
    from kernels import spatial as A
    from kernels.dual_cross import dual_cross_attention, dual_cross_attention_ref
    monkeypatch.setattr(tuning, "cuda_time_ms", fake_timer([5.0, 4.0, 3.0, 2.0] * 8))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (rand(1, 19, 2, 40, dtype=dtype, gen=g) for _ in range(4))
    ki, vi = rand(1, 5, 2, 40, dtype=dtype, gen=g), rand(1, 5, 2, 40, dtype=dtype, gen=g)
    for name, fn, ref, inputs in (
            ("attention", A.attention, A.attention_ref, (q, k, v)),
            ("dual", dual_cross_attention, dual_cross_attention_ref, (q, k, v, q.clone(), ki, vi))):
        xs = [leaf(x) for x in inputs]
        out = fn(*xs)
        out.backward(do)
        x64 = [leaf64(x) for x in inputs]
        r64 = ref(*x64)
        r64.backward(do.double())
        xl = [leaf(x) for x in inputs]
        rl = ref(*xl)
        rl.backward(do)
        check(f"{name} o", out, r64, rl, dtype)
        for i, (a, b, c) in enumerate(zip(xs, x64, xl)):
            check(f"{name} grad {i}", a.grad, b.grad, c.grad, dtype)
    rep = tuning.report()
    for name in ("attention.fwd", "attention.bwd", "dual.fwd", "dual.bwd"):
        assert name in rep, rep
    assert str(A.FWD_CANDIDATES[64][-1]) in rep and str(A.BWD_CANDIDATES[64][-1]) in rep
