"""Triton kernels (docs/ARCHITECTURE.md, "Kernels"): spatial, temporal and dual cross-attention,
GroupNorm(+SiLU).

    attention(q, k, v, scale=None)                         kernels/spatial.py
    temporal_attention(q, k, v, scale=None)                kernels/temporal.py
    dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=None)   kernels/dual_cross.py
    group_norm_silu(x, weight, bias, num_groups, eps=1e-5, silu=True) kernels/group_norm.py
    supports(op, *tensors) -> bool                         the dispatcher's question for `auto`
    kernels/_common.py                                     what the kernel files share (private)
    kernels/dispatch.py, kernels/dispatch.json             when attn_backend=auto takes a kernel
    HEARTBEAT_AUTOTUNE=1                                   launch-config autotuning, kernels/tuning.py

Importing this package has no side effects and does not import Triton: the kernel modules load on
first use. Without Triton, supports() is False and calling a kernel raises a clear RuntimeError.
On CPU tensors the kernels run only under TRITON_INTERPRET=1 (set before Triton is imported).
"""
from __future__ import annotations

import importlib

_MODULES = {
    "attention": "spatial",
    "temporal_attention": "temporal",
    "dual_cross_attention": "dual_cross",
    "group_norm_silu": "group_norm",
}
_compat_done = False


def _module(op: str):
    """Import kernels/<file>.py for an op, with a clear error when Triton is missing."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise RuntimeError(f"kernels.{op} needs Triton, which cannot be imported here ({e!r}); "
                           "install triton or use attn_backend=sdpa") from None
    _interpreter_compat()
    return importlib.import_module(f"{__name__}.{_MODULES[op]}")


def _interpreter_compat():
    """Three fixes to Triton 3.6's CPU interpreter, applied under TRITON_INTERPRET=1 only (idempotent;
    nothing changes when compiling for a GPU):
    - it calls int() on 1-element arrays for range() bounds, which NumPy >= 2.3 rejects ("only
      0-dimensional arrays can be converted"): __index__ now reads the element;
    - its tl.dot multiplies bf16 operands as their raw uint16 bits (garbage): bf16 operands are now
      widened to fp32 first, which is what a bf16 tensor-core dot with fp32 accumulation computes;
    - its fp32-accumulating tl.dot is np.matmul, whose rounding depends on the BLAS kernel that
      OpenBLAS picks for the CPU and on the operand order: the forward's Q K^T and the backward's
      K Q^T then round the same logit differently, and a large softmax scale turns that difference
      into an error in the recomputed P (the backward's P = exp2(s * scale - lse) no longer sums to
      one; measured: dV error 3e-5..8e-5 instead of 8e-6 at scale 4, D 64 when the two dots sum in
      different orders). On a GPU each logit is one ordered accumulation over the head dim in both
      kernels. The interpreter now accumulates in float64 and rounds once, so a logit has the same
      value whichever kernel, operand order or CPU computes it."""
    global _compat_done
    import os
    if _compat_done or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    _compat_done = True
    try:
        from triton.runtime import interpreter as ti
    except Exception:
        return
    original = getattr(ti, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_heartbeat_compat", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._heartbeat_compat = True
    ti._patch_lang_tensor = patched

    builder = ti.InterpreterBuilder
    create_dot = builder.create_dot

    def widened(x):
        if x.dtype == ti.tl.bfloat16:
            data = ti._convert_float(x.data, ti.tl.bfloat16, ti.tl.float32, None).view(ti.np.float32)
            return ti.TensorHandle(data, ti.tl.float32)
        return x

    def create_dot_exact(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = widened(a), widened(b)
        np = ti.np
        if d.data.dtype == np.float32 and a.data.dtype.kind == "f" and b.data.dtype.kind == "f":
            acc = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data.astype(np.float64)
            return ti.TensorHandle(acc.astype(np.float32), d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot_exact


def supports(op: str, *tensors) -> bool:
    """True when Triton imports and the named kernel handles these CUDA tensors' shapes/dtypes."""
    if op not in _MODULES or not tensors or not all(getattr(t, "is_cuda", False) for t in tensors if t is not None):
        return False
    try:
        mod = _module(op)
    except Exception:
        return False
    try:
        return bool(mod.supports(*tensors))
    except Exception:
        return False


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v; q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D)."""
    return _module("attention").attention(q, k, v, scale=scale)


def temporal_attention(q, k, v, scale=None):
    """Attention along frames; q/k/v (N, F, H, D), possibly strided views -> (N, F, H, D)."""
    return _module("temporal_attention").temporal_attention(q, k, v, scale=scale)


def dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=None):
    """attn(q_t, k_t, v_t) + attn(q_i, k_i, v_i), two softmaxes, one output (B, Lq, H, D)."""
    return _module("dual_cross_attention").dual_cross_attention(q_t, k_t, v_t, q_i, k_i, v_i, scale=scale)


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, silu=True):
    """GroupNorm with fp32 statistics, optionally fused with SiLU; x (N, C, *spatial)."""
    return _module("group_norm_silu").group_norm_silu(x, weight, bias, num_groups, eps=eps, silu=silu)


__all__ = ["supports", "attention", "temporal_attention", "dual_cross_attention", "group_norm_silu"]
