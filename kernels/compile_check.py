"""Offline compilation of every kernel variant for sm_90 / sm_80, with no GPU (docs/ARCHITECTURE.md, "Kernels").

    python -m kernels.compile_check [--arch 90 80] [--only attention ...] [--all] [--json FILE]

Each kernel module exposes `compile_variants(full: bool)` -> list of Variant: the jit kernel, the
argument types, the constexpr values and num_warps / num_stages exactly as its launcher would use
them. `full=False` gives the set the tests compile (every config and every flag combination the
launchers use, over a representative set of head dims and dtypes); `full=True` the whole product.

Each compile runs Triton's full pipeline down to a cubin (ptxas included), so a kernel that would
not compile on a GPU fails here. Recorded per variant: shared memory (bytes), whether the PTX uses
wgmma (Hopper warp-group MMA), mma.sync (Ampere MMA), and registers / spill-store bytes from
`ptxas -v` run on the PTX (Triton does not report them offline; None if ptxas cannot run).

This must run in a process where TRITON_INTERPRET is unset (under the interpreter @triton.jit gives
interpreter objects that cannot be compiled); the tests call it in a subprocess.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

SMEM_LIMIT = {90: 232448, 80: 166912}     # bytes of shared memory one block may use (228 KB / 163 KB)
MODULES = ("spatial", "temporal", "dual_cross", "group_norm")
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass
class Variant:
    name: str                 # human-readable: kernel + the parameters that matter
    kernel: object            # the @triton.jit function
    signature: dict           # arg name -> "*bf16" / "i32" / "fp32" / "constexpr"
    constexprs: dict          # arg name -> value (constexpr args, and ints specialised to 1)
    num_warps: int = 4
    num_stages: int = 3
    expect_mma: bool = False  # matmul-heavy: expect wgmma on sm_90 (mma.sync on sm_80)


def ptr(dtype) -> str:
    """'*bf16' etc. for a torch dtype or a short name."""
    name = str(dtype).replace("torch.", "")
    return "*" + TYPES.get(name, name)


def make_signature(kernel, pointers: dict, floats=(), constexprs: dict = None):
    """Signature for `kernel`: pointers (name -> '*type'), float scalars, constexprs; the rest i32."""
    sig = {}
    for name in kernel.arg_names:
        if constexprs and name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(v: Variant, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    src = ASTSource(fn=v.kernel, signature=v.signature, constexprs=v.constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    ptx = k.asm.get("ptx", "")
    md = k.metadata
    regs, spills = getattr(k, "n_regs", None), getattr(k, "n_spills", None)
    if regs is None:
        regs, spills = ptxas_usage(ptx, arch)
    return dict(
        name=v.name, arch=arch, num_warps=v.num_warps, num_stages=v.num_stages,
        shared=int(getattr(md, "shared", 0)), smem_limit=SMEM_LIMIT[arch],
        wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx, cubin="cubin" in k.asm,
        n_regs=regs, n_spills=spills, expect_mma=v.expect_mma, seconds=round(time.time() - t0, 2))


def ptxas_usage(ptx: str, arch: int):
    """(registers, spill-store bytes) from `ptxas -v` (the ptxas Triton bundles) on the kernel's PTX;
    (None, None) when it cannot run. Offline, Triton itself does not report them."""
    import re
    import subprocess
    import tempfile
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not ptx or not os.path.exists(ptxas):
        return None, None
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        try:
            r = subprocess.run([ptxas, "-v", "--gpu-name", gpu, path, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True, timeout=300)
        except Exception:
            return None, None
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spills = re.search(r"(\d+) bytes spill stores", r.stderr)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def variants(only=None, full=False):
    out = []
    for mod in MODULES:
        if only and mod not in only:
            continue
        m = importlib.import_module(f"kernels.{mod}")
        out += m.compile_variants(full)
    return out


_VARIANTS = []


def _compile_job(job):
    """(variant index, arch) -> record; a failure is recorded, not raised (all are reported)."""
    i, arch = job
    v = _VARIANTS[i]
    try:
        return compile_variant(v, arch)
    except Exception as e:
        return dict(name=v.name, arch=arch, error=f"{type(e).__name__}: {str(e)[:2000]}")


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--only", nargs="+", choices=MODULES)
    ap.add_argument("--all", action="store_true", help="the whole product of flags, not the test set")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = ap.parse_args(argv)
    vs = variants(args.only, args.all)
    if args.list:
        for v in vs:
            print(v.name, f"warps={v.num_warps} stages={v.num_stages}")
        return 0
    jobs = [(i, arch) for i in range(len(vs)) for arch in args.arch]
    global _VARIANTS
    _VARIANTS = vs
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            records = pool.map(_compile_job, jobs, chunksize=1)
    else:
        records = [_compile_job(j) for j in jobs]
    failures = sum("error" in r for r in records)
    for r in records:
        if "error" in r:
            print(f"FAIL sm_{r['arch']} {r['name']}: {r['error'][:300]}", flush=True)
        else:
            print(f"ok   sm_{r['arch']} {r['name']} warps={r['num_warps']} stages={r['num_stages']} "
                  f"smem={r['shared']} wgmma={r['wgmma']} mma.sync={r['mma_sync']} "
                  f"regs={r['n_regs']} spills={r['n_spills']} ({r['seconds']}s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
