"""Offline compile of exactly what the launchers run, for sm_90 / sm_80, with no GPU
(docs/ARCHITECTURE.md, "Kernels").

    python -m kernels.compile_check [--set sd15 coverage] [--arch 90 80] [--only spatial ...] [--json FILE]

How: a stand-in CUDA driver (target sm_90, no device) and Triton's JIT cache hook. Each launcher is
called on CPU tensors of the real shapes and strides; the JIT binds the arguments and specialises
them as it would on a GPU (ints equal to 1 become constants, ints and pointers divisible by 16 get
the `tt.divisibility` attribute, the constexprs, num_warps, num_stages), then calls the hook, which
records that specialisation and stops the launch. Each record is compiled by Triton's full pipeline
for every --arch, and `ptxas -v` runs on its PTX. Nothing is written by hand, so what is compiled
here is what a GPU compiles.

Sets: `sd15` the shapes of the sd15 video UNet at 256x256 (16 frames, guided batch 2): the table
and the tests' assertions; `coverage` ragged lengths, other head dims and dtypes, every autotuning
candidate (kernels/tuning.py), odd frame counts, channels-last GroupNorm: these must compile too.

Per record and arch: registers and spill bytes (ptxas), shared memory, wgmma / mma.sync shapes,
global loads by width in bytes (16B = ld.global.v4.b32; 2B = a scalar ld.global.b16), cp.async and
TMA (cp.async.bulk.tensor) counts, and the CTAs per SM these imply (registers, shared memory,
threads). Runs without TRITON_INTERPRET (the tests call it in a subprocess).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import re
import sys
import time

SMEM_LIMIT = {90: 232448, 80: 166912}       # bytes one block may use (227 KB / 163 KB)
SMEM_PER_SM = {90: 233472, 80: 167936}      # bytes per SM (228 KB / 164 KB); 1 KB reserved per block
MODULES = ("spatial", "temporal", "dual_cross", "group_norm")


@dataclasses.dataclass
class Spec:
    kernel: str               # jit function name
    case: str                 # the launch it came from (module, shape)
    module: str               # spatial / temporal / dual_cross / group_norm
    fn: object                # the JITFunction
    signature: dict
    constexprs: dict          # {(arg index,): value}, as the JIT passes them
    attrs: dict               # {(arg index,): [["tt.divisibility", 16]]}, as the JIT passes them
    num_warps: int
    num_stages: int
    head_dim: int = 0

    def key(self):
        return (self.kernel, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), self.num_warps, self.num_stages)


# ----------------------------------------------------------------------------- capture

class _StandInDriver:
    """What JITFunction.run asks of the active driver, for a device that is not there."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def capture(sets=("sd15",), only=None) -> list:
    """Run the launchers of every case in `sets` (CPU tensors, stand-in sm_90 driver) and return the
    distinct specialisations the JIT produced, in launch order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    from triton import knobs
    from triton.runtime.driver import driver
    records, seen, where = [], set(), {}

    def hook(*, fn, compile, **_):
        j = fn.jit_function
        spec = Spec(j.__name__, where["case"], where["module"], j, dict(compile["signature"]),
                    dict(compile["constants"]), dict(compile["configs"][0]), compile["num_warps"],
                    compile["num_stages"], where["D"])
        if spec.key() not in seen:
            seen.add(spec.key())
            records.append(spec)
        return True          # recorded: do not compile or launch

    old_hook, old_driver = knobs.runtime.jit_cache_hook, driver._active
    driver.set_active(_StandInDriver(90))
    knobs.runtime.jit_cache_hook = hook
    try:
        for s in sets:
            for module, case, D, launch in CASES[s]():
                if only and module not in only:
                    continue
                where.update(module=module, case=case, D=D)
                launch()
    finally:
        knobs.runtime.jit_cache_hook = old_hook
        driver._active = old_driver
    return records


def _cases_sd15():
    import torch
    from . import dual_cross, group_norm, spatial, temporal
    bf = torch.bfloat16
    e = torch.empty
    out = []
    for L, D in ((1024, 40), (256, 80), (64, 160)):      # 8 heads; batch 2 x 16 frames
        B, H, Lt, Li = 32, 8, 77, 16
        q, k, v, o, do = (e(B, L, H, D, dtype=bf) for _ in range(5))
        lse = e(B, H, L)
        out.append(("spatial", f"self L={L} D={D}", D, lambda q=q, k=k, v=v: spatial.attention_fwd(q, k, v, 0.1)))
        out.append(("spatial", f"self L={L} D={D}", D, lambda q=q, k=k, v=v, o=o, lse=lse, do=do:
                    spatial.attention_bwd(q, k, v, o, lse, do, 0.1)))
        kt, vt, ki, vi = e(B, Lt, H, D, dtype=bf), e(B, Lt, H, D, dtype=bf), e(B, Li, H, D, dtype=bf), e(B, Li, H, D, dtype=bf)
        lse2 = e(2, B, H, L)
        out.append(("dual_cross", f"L={L} D={D} Lt={Lt} Li={Li}", D,
                    lambda q=q, kt=kt, vt=vt, ki=ki, vi=vi: dual_cross.dual_fwd(q, kt, vt, q, ki, vi, 0.1)))
        out.append(("dual_cross", f"L={L} D={D} Lt={Lt} Li={Li}", D, lambda q=q, kt=kt, vt=vt, ki=ki, vi=vi, lse2=lse2,
                    do=do: dual_cross.dual_bwd(q, kt, vt, q, ki, vi, lse2, do, 0.1, True)))
        # temporal: the UNet's (B, F, h*w*heads, head_dim) views of its projections (TemporalAttention)
        Bc, Fr = 2, 16
        tq, tk, tv, tdo = (e(Bc, Fr, L * H * D, dtype=bf).view(Bc, Fr, L * H, D) for _ in range(4))
        out.append(("temporal", f"B={Bc} F={Fr} L={L} D={D}", D,
                    lambda q=tq, k=tk, v=tv: temporal.temporal_fwd(q, k, v, 0.1)))
        out.append(("temporal", f"B={Bc} F={Fr} L={L} D={D}", D,
                    lambda q=tq, k=tk, v=tv, do=tdo: temporal.temporal_bwd(q, k, v, do, 0.1)))
    for C, hw in ((320, 32), (640, 16), (1280, 8), (1280, 4), (960, 32), (1920, 16)):   # GroupNorm32, 32 frames
        x = e(32, C, hw, hw, dtype=bf)
        w, b = e(C), e(C)
        out.append(("group_norm", f"N=32 C={C} h=w={hw}", 0, lambda x=x, w=w, b=b: _gn_both(group_norm, x, w, b, 32)))
    return out


def _gn_both(gn, x, w, b, G, split=None):
    y, mean, rstd, split = gn.gn_fwd(x, w, b, G, 1e-5, True, split)
    gn.gn_bwd(x, y, w, b, mean, rstd, G, True, split)


def _cases_coverage():
    import torch
    from . import _common, dual_cross, group_norm, spatial, temporal
    e = torch.empty
    bf, fp, f32 = torch.bfloat16, torch.float16, torch.float32
    out = []

    def attn(D, dt, Lq=33, Lk=77, fcfg=None, bcfg=None, tag=""):
        q, o, do = (e(1, Lq, 2, D, dtype=dt) for _ in range(3))
        k, v = e(1, Lk, 2, D, dtype=dt), e(1, Lk, 2, D, dtype=dt)
        lse = e(1, 2, Lq)
        case = f"Lq={Lq} Lk={Lk} D={D} {str(dt)[6:]}{tag}"
        if bcfg is None:
            out.append(("spatial", case, D, lambda: spatial.attention_fwd(q, k, v, 0.1, fcfg)))
        if fcfg is None:
            out.append(("spatial", case, D, lambda: spatial.attention_bwd(q, k, v, o, lse, do, 0.1, bcfg)))
    for D, dt in ((16, bf), (64, fp), (256, bf), (40, f32), (96, fp)):
        attn(D, dt)
    attn(40, bf, 64, 64, tag=" even")
    for D in (40, 80, 160):   # every autotuning candidate that is not a default
        b = _common.bucket(D)
        for c in _common.FWD_CANDIDATES[b][1:]:
            attn(D, bf, fcfg=c, tag=f" fwd {c}")
        for c in _common.BWD_CANDIDATES[b][1:]:
            attn(D, bf, bcfg=c, tag=f" bwd {c}")
    for D in (40, 80, 160):   # the dual kernel's candidates (its forward and dQ kernels; dK/dV as above)
        b = _common.bucket(D)
        q, do = e(2, 64, 2, D, dtype=bf), e(2, 64, 2, D, dtype=bf)
        kt, ki, lse2 = e(2, 77, 2, D, dtype=bf), e(2, 16, 2, D, dtype=bf), e(2, 2, 2, 64)
        for c in _common.FWD_CANDIDATES[b][1:]:
            out.append(("dual_cross", f"L=64 D={D} fwd {c}", D,
                        lambda q=q, kt=kt, ki=ki, c=c: dual_cross.dual_fwd(q, kt, kt, q, ki, ki, 0.1, c)))
        for c in _common.BWD_CANDIDATES[b][1:]:
            out.append(("dual_cross", f"L=64 D={D} bwd {c}", D, lambda q=q, kt=kt, ki=ki, lse2=lse2, do=do, c=c:
                        dual_cross.dual_bwd(q, kt, kt, q, ki, ki, lse2, do, 0.1, True, c)))
    for F, D, dt in ((7, 40, bf), (1, 80, bf), (64, 160, bf), (16, 40, fp), (16, 40, f32), (33, 64, bf)):
        q, k, v, do = (e(5, F, 2, D, dtype=dt) for _ in range(4))
        out.append(("temporal", f"F={F} D={D} {str(dt)[6:]}", D, lambda q=q, k=k, v=v: temporal.temporal_fwd(q, k, v, 0.1)))
        out.append(("temporal", f"F={F} D={D} {str(dt)[6:]}", D,
                    lambda q=q, k=k, v=v, do=do: temporal.temporal_bwd(q, k, v, do, 0.1)))
    for D, dt in ((40, f32), (64, fp)):
        q, o = e(1, 33, 2, D, dtype=dt), e(1, 33, 2, D, dtype=dt)
        kt, ki = e(1, 7, 2, D, dtype=dt), e(1, 130, 2, D, dtype=dt)
        lse2 = e(2, 1, 2, 33)
        qi = e(1, 33, 2, D, dtype=dt)
        out.append(("dual_cross", f"ragged D={D} {str(dt)[6:]}", D, lambda q=q, kt=kt, ki=ki, qi=qi:
                    dual_cross.dual_fwd(q, kt, kt, qi, ki, ki, 0.1)))
        out.append(("dual_cross", f"ragged D={D} {str(dt)[6:]}", D, lambda q=q, kt=kt, ki=ki, qi=qi, lse2=lse2, o=o:
                    dual_cross.dual_bwd(q, kt, kt, qi, ki, ki, lse2, o, 0.1, False)))
    for shape, dt, cl in (((2, 96, 37, 1), f32, False), ((4, 640, 16, 16), bf, True), ((1, 320, 64, 64), fp, False)):
        x = e(*shape, dtype=dt)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        w, b = e(shape[1]), e(shape[1])
        out.append(("group_norm", f"{shape} {str(dt)[6:]}{' channels-last' if cl else ''}", 0,
                    lambda x=x, w=w, b=b: _gn_both(group_norm, x, w, b, 32)))
    return out


CASES = {"sd15": _cases_sd15, "coverage": _cases_coverage}


# ----------------------------------------------------------------------------- compile and measure

def compile_spec(s: Spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.time()
    src = ASTSource(fn=s.fn, signature=s.signature, constexprs=s.constexprs, attrs=s.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=s.num_warps, num_stages=s.num_stages))
    ptx = k.asm.get("ptx", "")
    regs, spills = ptxas_usage(ptx, arch)
    shared = int(getattr(k.metadata, "shared", 0))
    rec = dict(kernel=s.kernel, case=s.case, module=s.module, head_dim=s.head_dim, arch=arch,
               num_warps=s.num_warps, num_stages=s.num_stages, shared=shared, smem_limit=SMEM_LIMIT[arch],
               n_regs=regs, n_spills=spills, seconds=round(time.time() - t0, 1), **ptx_facts(ptx))
    rec["ctas_per_sm"] = ctas_per_sm(arch, s.num_warps, regs, shared)
    rec["expect_mma"] = s.module != "group_norm" and s.signature[s.fn.arg_names[0]] != "*fp32"
    rec["constexprs"] = {s.fn.arg_names[p[0]]: v for p, v in s.constexprs.items()
                         if not isinstance(v, int) or s.signature.get(s.fn.arg_names[p[0]]) == "constexpr"}
    rec["divisible_by_16"] = sorted(s.fn.arg_names[p[0]] for p in s.attrs)
    return rec


def ptx_facts(ptx: str) -> dict:
    """wgmma / mma.sync shapes, global loads by bytes per instruction, cp.async and TMA counts."""
    loads = collections.Counter()
    for vec, ty in re.findall(r"\bld\.global[.\w:]*?(?:\.v([248]))?\.[bfsu](8|16|32|64)\s", ptx):
        loads[int(vec or 1) * int(ty) // 8] += 1
    return dict(
        wgmma=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        mma_sync=sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        global_loads={f"{b}B": n for b, n in sorted(loads.items(), reverse=True)},
        cp_async=len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global", ptx)),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)))


def ctas_per_sm(arch: int, warps: int, regs, shared: int) -> int:
    """Resident blocks per SM from threads (64 warps), registers (64K, allocated per warp in units
    of 256) and shared memory (per-SM capacity, 1 KB reserved per block); at most 32."""
    by_threads = 64 // warps
    by_regs = 32 if not regs else (65536 // (math.ceil(regs * 32 / 256) * 256)) // warps
    by_smem = SMEM_PER_SM[arch] // (shared + 1024)
    return min(by_threads, by_regs, by_smem, 32)


def ptxas_usage(ptx: str, arch: int):
    """(registers, spill-store bytes) from `ptxas -v` (the ptxas Triton bundles); (None, None) when
    it cannot run. Offline, Triton itself does not report them."""
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


_SPECS = []


def _compile_job(job):
    """(spec index, arch) -> record; a failure is recorded, not raised (all are reported)."""
    i, arch = job
    s = _SPECS[i]
    try:
        return compile_spec(s, arch)
    except Exception as e:
        return dict(kernel=s.kernel, case=s.case, module=s.module, arch=arch, error=f"{type(e).__name__}: {str(e)[:2000]}")


def row(r: dict) -> str:
    if "error" in r:
        return f"FAIL sm_{r['arch']} {r['kernel']} [{r['case']}]: {r['error'][:300]}"
    mma = ",".join(r["wgmma"]) or ("mma " + ",".join(r["mma_sync"]) if r["mma_sync"] else "-")
    loads = " ".join(f"{k}x{v}" for k, v in r["global_loads"].items()) or "-"
    return (f"sm_{r['arch']} {r['kernel']:15s} {r['case']:28s} w{r['num_warps']} s{r['num_stages']} "
            f"regs={r['n_regs']} spill={r['n_spills']} smem={r['shared']} ctas/sm={r['ctas_per_sm']} "
            f"mma={mma} loads={loads} cp.async={r['cp_async']} tma={r['tma']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", nargs="+", default=["sd15"], choices=list(CASES))
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--only", nargs="+", choices=MODULES)
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--list", action="store_true", help="list the captured specialisations, compile nothing")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = ap.parse_args(argv)
    try:
        specs = capture(args.set, args.only)
    except RuntimeError as e:
        sys.exit(str(e))
    if args.list:
        for s in specs:
            print(f"{s.kernel} [{s.case}] warps={s.num_warps} stages={s.num_stages}")
        return 0
    global _SPECS
    _SPECS = specs
    jobs = [(i, arch) for i in range(len(specs)) for arch in args.arch]
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            records = pool.map(_compile_job, jobs, chunksize=1)
    else:
        records = [_compile_job(j) for j in jobs]
    for r in sorted(records, key=lambda r: (r["arch"] != 90, MODULES.index(r["module"]))):
        print(row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
