"""When `attn_backend=auto` uses a Triton kernel instead of SDPA (docs/ARCHITECTURE.md, "Kernels").

    use_kernel(op, x, dim, grad, extra=None) -> bool     the decision for this call (cached per key)
    kernels/dispatch.json                                the measured table (tools/bench.py --write-dispatch)

A kernel is used for an (op, dtype, dim) on a GPU only when both hold:
1. the dispatch table records it as faster than the best baseline on this GPU, for the pass the
   call will run: `fwd` for inference, `fwdbwd` when a gradient will be taken. The table is keyed
   by device name ("NVIDIA H200"), else by compute capability ("sm_90"), and written by
   `python tools/bench.py --write-dispatch` from a GPU run. No entry: SDPA.
2. a first-use self-check on this device passed: the kernel's output and input gradients on a
   small problem of this (dtype, dim) agree with a float64 reference within the tests' budget (three
   times the error SDPA / eager PyTorch makes in the same dtype, plus 8 ulps of the output scale;
   tests/test_kernels_common.py's `check`). On a failure (wrong numbers, or any exception, e.g. a
   compile error on this GPU): one warning line on stderr, and SDPA for that op for the rest of the
   process.
`dim` is the head dim for the attention ops and the channel count for group_norm_silu. After the
first call of a key, a decision costs one dict lookup. `--attn_backend=triton` does not come here.
Nothing here imports Triton: the self-check calls the kernels, which import it on first use.
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch

OPS = ("attention", "temporal_attention", "dual_cross_attention", "group_norm_silu")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

_decisions: dict = {}
_failed: dict = {}          # op -> the self-check's failure, for the rest of the process
_checked: dict = {}         # (op, device, dtype, dim, extra) -> bool
_table = None


# ----------------------------------------------------------------------------- the table

def load_table(path: str = None) -> dict:
    """The dispatch table ({} when the file does not exist); read once per process for the default path."""
    global _table
    if path is None and _table is not None:
        return _table
    p = path or TABLE_PATH
    if not os.path.exists(p):
        table = {}
    else:
        try:
            with open(p) as f:
                table = json.load(f)
            if not isinstance(table.get("devices", {}), dict):
                raise ValueError("'devices' is not an object")
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not a dispatch table ({e}); rewrite it with "
                             "`python tools/bench.py --write-dispatch --force` or delete it") from None
    if path is None:
        _table = table
    return table


def device_keys(device) -> tuple:
    """Table keys for a CUDA device, most specific first: its name, then its compute capability."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"sm_{major}{minor}"


def lookup(table: dict, keys, op: str, dtype, dim: int):
    """The table's row for (op, dtype, dim) under the first of `keys` the table has, or None."""
    devices = table.get("devices", {})
    for key in keys:
        if key in devices:
            return devices[key].get("entries", {}).get(f"{op} {SHORT.get(dtype, dtype)} {int(dim)}")
    return None


def faster(row, grad: bool) -> bool:
    """A table row says the kernel wins the pass this call runs (> 1: faster than the best baseline)."""
    if not row:
        return False
    ratio = row.get("fwdbwd" if grad else "fwd")
    return ratio is not None and ratio > 1.0


def make_entries(rows) -> dict:
    """tools/bench.py rows -> table entries: per (op, dtype, dim) the smallest ratio to the best baseline
    over the measured shapes (a kernel must win at every sd15 shape of that key to be chosen)."""
    out = {}
    for r in rows:
        op = _BENCH_OPS.get(r.get("kernel"))
        if r.get("impl") != "triton" or op is None or "error" in r or "fwd_vs_best" not in r:
            continue
        key = f"{op} {r.get('dtype', 'bf16')} {int(r['dim'])}"
        e = out.setdefault(key, {})
        for p, col in (("fwd", "fwd_vs_best"), ("fwdbwd", "fwdbwd_vs_best")):
            if r.get(col) is not None:
                e[p] = min(e.get(p, math.inf), float(r[col]))
        e.setdefault("shapes", []).append(r.get("shape"))
    return out


_BENCH_OPS = {"spatial": "attention", "temporal": "temporal_attention", "dual_cross": "dual_cross_attention",
              "group_norm_silu": "group_norm_silu"}


def write_table(entries: dict, device_name: str, capability: str, measured: str, path: str = None,
                force: bool = False) -> str:
    """Record this device's entries (under its name and its capability) in the table file. An
    existing entry for this device is replaced only with force."""
    p = path or TABLE_PATH
    table = load_table(p)
    devices = table.setdefault("devices", {})
    if (device_name in devices or capability in devices) and not force:
        raise FileExistsError(f"{p} already has an entry for {device_name} / {capability}; "
                              "pass --force to replace it")
    row = dict(measured=measured, entries=entries)
    devices[device_name] = row
    devices[capability] = dict(row, measured=f"{measured} (on {device_name})")
    table["_doc"] = ("Measured by tools/bench.py --write-dispatch: per 'op dtype dim', the kernel's "
                     "speed ratio to the best baseline (> 1 = faster) for the forward and forward+backward; "
                     "read by kernels/dispatch.py")
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, p)
    global _table
    _table = None
    return p


# ----------------------------------------------------------------------------- the decision

def use_kernel(op: str, x: torch.Tensor, dim: int, grad: bool, extra=None) -> bool:
    """`auto`'s decision for a call of `op` on x's device and dtype at this dim: table, then self-check."""
    key = (op, x.device.index, x.dtype, dim, grad, extra)
    d = _decisions.get(key)
    if d is None:
        d = _decide(op, x.device, x.dtype, dim, grad, extra)
        _decisions[key] = d
    return d


def _decide(op, device, dtype, dim, grad, extra) -> bool:
    if op in _failed or not faster(lookup(load_table(), device_keys(device), op, dtype, dim), grad):
        return False
    return passes_self_check(op, device, dtype, dim, extra)


def passes_self_check(op, device, dtype, dim, extra=None) -> bool:
    """Run the self-check once per (op, device, dtype, dim, extra); a failure disables the op."""
    if op in _failed:
        return False
    key = (op, str(device), dtype, dim, extra)
    if key not in _checked:
        try:
            err = self_check(op, device, dtype, dim, extra)
        except Exception as e:   # a compile error, out of resources, ...: the op falls back, it does not crash
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        _checked[key] = err is None
        if err is not None:
            _failed[op] = err
            _decisions.clear()
            sys.stderr.write(f"heartbeat: the Triton {op} kernel failed its self-check on {device} "
                             f"({SHORT.get(dtype, dtype)}, dim {dim}): {err}; using SDPA for {op} from now on\n")
    return _checked[key]


def reset() -> None:
    """Forget every decision, failure and the cached table (tests)."""
    global _table
    _decisions.clear()
    _failed.clear()
    _checked.clear()
    _table = None


# ----------------------------------------------------------------------------- self-checks

def _max_err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _compare(name, ours, ref64, base, dtype):
    """None when within budget, else a one-line description (the tests' rule)."""
    if not torch.isfinite(ours.detach()).all():
        return f"{name}: non-finite values"
    err, floor = _max_err(ours, ref64), _max_err(base, ref64)
    budget = 3.0 * floor + 8 * EPS[dtype] * max(1.0, ref64.abs().max().item())
    return None if err <= budget else f"{name}: max error {err:.2e} > budget {budget:.2e}"


def _run(fn, inputs, do):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, do)
    return out, grads


def self_check(op, device, dtype, dim, extra=None):
    """Compare the kernel with float64 on a small problem; None on success, else the first failure."""
    import kernels
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(1234)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    if op == "attention":
        inputs, ours, ref = [r(2, 77, 2, dim), r(2, 45, 2, dim), r(2, 45, 2, dim)], kernels.attention, sdpa
    elif op == "temporal_attention":
        frames = extra or 16
        inputs, ours, ref = [r(6, frames, 2, dim) for _ in range(3)], kernels.temporal_attention, sdpa
    elif op == "dual_cross_attention":
        inputs = [r(1, 40, 2, dim), r(1, 77, 2, dim), r(1, 77, 2, dim), r(1, 40, 2, dim), r(1, 16, 2, dim),
                  r(1, 16, 2, dim)]
        ours = kernels.dual_cross_attention

        def ref(qt, kt, vt, qi, ki, vi):
            return sdpa(qt, kt, vt) + sdpa(qi, ki, vi)
    elif op == "group_norm_silu":
        groups = extra or 32
        inputs = [r(2, dim, 6, 5), r(dim).float(), r(dim).float()]

        def ours(x, w, b):
            return kernels.group_norm_silu(x, w, b, groups)

        def ref(x, w, b):
            return F.silu(F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype)))
    else:
        raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS)}")
    do = r(*ref(*inputs).shape)
    out, grads = _run(ours, inputs, do)
    base, base_grads = _run(ref, inputs, do)
    out64, grads64 = _run(ref, [x.double() for x in inputs], do.double())
    for name, a, b64, b in [("output", out, out64, base)] + [
            (f"grad {i}", ga, g64, gb) for i, (ga, g64, gb) in enumerate(zip(grads, grads64, base_grads))]:
        msg = _compare(name, a, b64, b, dtype)
        if msg:
            return msg
    return None
