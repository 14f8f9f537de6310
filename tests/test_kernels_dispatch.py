"""kernels/dispatch.py (`attn_backend=auto`'s choice) and the dispatcher in heartbeat/attention.py:
the measured table's lookup, the first-use self-check and its fallback when a kernel is made to
fail on purpose, one input validation per call, the int32 guard."""
import pytest
import torch

from test_kernels_common import CUDA, need_runnable, rand


@pytest.fixture()
def dispatch(monkeypatch):
    need_runnable()
    import kernels.dispatch as D
    D.reset()
    yield D
    D.reset()


def table_with(D, tmp_path, entries, name="Fake GPU", cap="sm_90"):
    path = str(tmp_path / "dispatch.json")
    D.write_table(entries, name, cap, "test", path=path)
    return path


def test_table_lookup_by_name_then_capability(dispatch, tmp_path):
    D = dispatch
    rows = [dict(kernel="spatial", impl="triton", dtype="bf16", dim=40, shape="a", fwd_vs_best=1.4, fwdbwd_vs_best=0.9),
            dict(kernel="spatial", impl="triton", dtype="bf16", dim=40, shape="b", fwd_vs_best=1.2, fwdbwd_vs_best=1.1),
            dict(kernel="spatial", impl="sdpa_flash", dtype="bf16", dim=40, shape="a"),
            dict(kernel="group_norm_silu", impl="triton", dtype="bf16", dim=320, shape="c", error="OutOfResources")]
    entries = D.make_entries(rows)
    assert entries == {"attention bf16 40": {"fwd": 1.2, "fwdbwd": 0.9, "shapes": ["a", "b"]}}  # the worst shape
    path = table_with(D, tmp_path, entries)
    t = D.load_table(path)
    row = D.lookup(t, ("Fake GPU", "sm_90"), "attention", torch.bfloat16, 40)
    assert D.faster(row, grad=False) and not D.faster(row, grad=True)
    assert D.lookup(t, ("Other GPU", "sm_90"), "attention", torch.bfloat16, 40) == row   # by capability
    assert D.lookup(t, ("Other GPU", "sm_80"), "attention", torch.bfloat16, 40) is None  # no entry: SDPA
    assert D.lookup(t, ("Fake GPU",), "attention", torch.float16, 40) is None
    assert not D.faster(None, grad=False)
    with pytest.raises(FileExistsError, match="--force"):
        D.write_table(entries, "Fake GPU", "sm_90", "again", path=path)
    D.write_table({}, "Fake GPU", "sm_90", "again", path=path, force=True)
    assert D.lookup(D.load_table(path), ("Fake GPU",), "attention", torch.bfloat16, 40) is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="--write-dispatch --force"):
        D.load_table(str(tmp_path / "bad.json"))


def fake_device(D, monkeypatch, tmp_path, entries):
    path = table_with(D, tmp_path, entries)
    monkeypatch.setattr(D, "TABLE_PATH", path)
    monkeypatch.setattr(D, "device_keys", lambda device: ("Fake GPU", "sm_90"))


def test_self_check_passes_then_the_kernel_is_used(dispatch, monkeypatch, tmp_path):
    D = dispatch
    fake_device(D, monkeypatch, tmp_path, {"attention fp32 16": {"fwd": 1.5, "fwdbwd": 1.5}})
    x = rand(1, 4, 1, 16)
    assert D.use_kernel("attention", x, 16, grad=True)         # table says faster, self-check passes
    assert not D.use_kernel("attention", x, 40, grad=True)     # no entry for D=40: SDPA, nothing run
    assert not D.use_kernel("temporal_attention", x, 16, grad=False)


def test_a_failing_kernel_falls_back_to_sdpa_with_one_warning(dispatch, monkeypatch, tmp_path, capsys):
    D = dispatch
    import kernels
    fake_device(D, monkeypatch, tmp_path, {"attention fp32 16": {"fwd": 1.5, "fwdbwd": 1.5},
                                           "attention fp32 32": {"fwd": 1.5, "fwdbwd": 1.5}})
    calls = []
    real = kernels.attention

    def broken(q, k, v, scale=None):   # off by 1% everywhere: far past the budget
        calls.append(1)
        return real(q, k, v, scale=scale) * 1.01
    monkeypatch.setattr(kernels, "attention", broken)
    x = rand(1, 4, 1, 16)
    assert not D.use_kernel("attention", x, 16, grad=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attention kernel failed its self-check" in err and "using SDPA" in err
    n = len(calls)
    assert not D.use_kernel("attention", x, 16, grad=True)     # the whole op stays on SDPA,
    assert not D.use_kernel("attention", x, 32, grad=False)    # at every head dim, with no re-check
    assert len(calls) == n and capsys.readouterr().err == ""

    def raising(*a, **k):
        raise RuntimeError("out of resources: shared memory")
    D.reset()
    monkeypatch.setattr(kernels, "attention", raising)
    assert not D.use_kernel("attention", x, 16, grad=False)    # an exception is a failure too, not a crash
    assert "out of resources" in capsys.readouterr().err


def test_dispatcher_validates_once_and_reads_env_once(monkeypatch):
    need_runnable()
    import kernels.spatial as S
    from heartbeat import attention as A
    calls = []
    real = S.check_qkv

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(S, "check_qkv", counting)
    q = rand(1, 5, 1, 16)
    A.attention(q, q, q, backend="triton")
    assert len(calls) == 1
    monkeypatch.setenv("HEARTBEAT_ATTN_BACKEND", "math")
    assert A.resolve_backend("sdpa") == (A._ENV_BACKEND or "sdpa")   # the environment is read at import only
    if not CUDA:
        assert not A._auto("attention", q, 16, False)   # CPU tensors: never a kernel under auto


def test_int32_offsets_are_guarded():
    """A (batch, head) slice whose row offsets pass 2**31 is refused with the fix named (meta tensors:
    nothing is allocated); an ordinary one passes."""
    need_runnable()
    from kernels._common import check_int32_extent, check_qkv
    big = torch.empty_strided((1, 20000, 1, 16), (1, 2 ** 17, 1, 1), device="meta")
    small = torch.empty((1, 8, 1, 16), device="meta")
    with pytest.raises(ValueError, match=r"q \(1, 20000, 1, 16\).*int32 offsets.*attn_backend=sdpa"):
        if CUDA:   # meta tensors are not CUDA tensors: the guard alone
            check_int32_extent("attention", q=big, k=small, v=small)
        else:      # the launcher's whole check, which ends with the guard
            check_qkv(big, small, small)
    check_int32_extent("attention", q=torch.empty_strided((1, 16000, 1, 16), (1, 2 ** 17, 1, 1), device="meta"))
