"""Benchmarks of the Triton kernels against SDPA (each backend), xformers and eager math, on the sd15 shapes.

    python tools/bench.py [--kernels] [--e2e] [--json FILE] [--reps N] [--only ...] [--autotune]

--kernels (the default when neither is given): every kernel at the sd15 shapes, forward, backward and
forward+backward, medians of CUDA-event timings after warm-up, in the same run as:
  ceilings   a large device copy (GB/s = 2 * bytes / t) and a large bf16 matmul (TFLOP/s = 2 n^3 / t)
  baselines  SDPA per backend (flash, efficient, cudnn, math: each that runs), xformers when
             importable, and eager math (heartbeat.attention.attention_math / F.group_norm + silu)
Each row: milliseconds, TFLOP/s from the useful-FLOP count below, GB/s from the byte count below,
percentage of the ceiling and the ratio to the best baseline (best baseline time / ours, > 1 = faster).
--e2e: the sd15 video UNet (heartbeat/unet.py) training step (16 frames, 256x256, batch 1, bf16
autocast, AdamW on the temporal parameters; triton / sdpa, with and without gradient checkpointing)
and a guided 50-step DDIM clip, with peak memory: tools/gpu_check.py's e2e and clip sections.
--reference [tools/bench_e2e.py options]: our UNet beside diffusers' UNet2DConditionModel on the same
weights, forward and forward+backward, interleaved (CPU or GPU; tools/bench_e2e.py does it).
--write-dispatch: record which kernels beat the best baseline on this GPU in kernels/dispatch.json.
Output: our rows only (with the ratio to the best baseline); --verbose prints every baseline row.

Useful FLOPs (softmax and recomputation not counted):
  attention   fwd 4 B H Lq Lk D (QK^T and PV);  bwd 8 B H Lq Lk D (dV, dP, dQ, dK)
  temporal    the same with Lq = Lk = F, B H = sequences x heads
  dual cross  fwd 4 B H Lq (Lt + Li) D;         bwd 8 B H Lq (Lt + Li) D
  group norm  not FLOP-bound: GB/s only
Bytes (each tensor counted once, element size e):
  attention   fwd e (|q| + |k| + |v| + |o|);    bwd e (|q| + |k| + |v| + |o| + |do| + |dq| + |dk| + |dv|)
  group norm  fwd e (|x| + |y|);                bwd e (|x| + |dy| + |dx|)
(the logsumexp / statistics side arrays are O(rows) and left out).

Without CUDA this runs a small CPU correctness smoke of the kernels in Triton's interpreter and
says that the timing rows need a GPU; it exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

CUDA = torch.cuda.is_available()
if not CUDA:  # before anything imports triton: the kernels then run in the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

BF16 = torch.bfloat16
DEVICE = "cuda" if CUDA else "cpu"

# sd15 video UNet at 256x256 (latent 32x32), 8 heads: head dims 40 / 80 / 160 at 32 / 16 / 8
SPATIAL = [(32, 1024, 8, 40), (32, 256, 8, 80), (32, 64, 8, 160), (4, 4096, 8, 64)]   # (B*F, L, H, D)
TEMPORAL = [(1024, 320), (256, 640), (64, 1280), (16, 1280)]   # (h*w, C) per level (+ mid), F = 16
DUAL = [(b, l, h, d, 77, 16) for (b, l, h, d) in SPATIAL[:3]]
# (C, h = w), N = 32: the sd15 UNet's GroupNorm widths per level (one JIT specialisation each)
GROUPNORM = [(320, 32), (960, 32), (640, 16), (1920, 16), (1280, 8), (2560, 8), (1280, 4)]


# ----------------------------------------------------------------------------- timing

def cuda_ms(fn, warmup=5, reps=20):
    """Median milliseconds of fn() over reps CUDA-event timings, after warmup calls.
    (--dry-run on CPU: wall-clock instead, meaningless as a speed, there to exercise this script.)"""
    if not CUDA:
        times = []
        for _ in range(1 + reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times[1:])
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ceilings(reps, n=1 << 28, m=8192):
    """n bf16 elements copied (512 MiB), an m x m x m bf16 matmul."""
    x = torch.empty(n, device=DEVICE, dtype=BF16)
    y = torch.empty_like(x)
    ms = cuda_ms(lambda: y.copy_(x), reps=reps)
    gbps = 2 * n * 2 / ms / 1e6
    x = y = None   # free before the matmul
    a = torch.randn(m, m, device=DEVICE, dtype=BF16)
    b = torch.randn(m, m, device=DEVICE, dtype=BF16)
    ms = cuda_ms(lambda: a @ b, reps=reps)
    tflops = 2 * m ** 3 / ms / 1e9
    return dict(copy_gbps=gbps, matmul_tflops=tflops)


def time_impl(fwd, inputs, grad_out_like=True, reps=20):
    """(fwd_ms, bwd_ms, fwdbwd_ms) of out = fwd(); grads w.r.t. inputs by autograd.grad."""
    out = fwd()
    do = torch.randn_like(out)
    t_f = cuda_ms(fwd, reps=reps)
    t_b = cuda_ms(lambda: torch.autograd.grad(out, inputs, do, retain_graph=True), reps=reps)
    t_fb = cuda_ms(lambda: torch.autograd.grad(fwd(), inputs, do), reps=reps)
    return t_f, t_b, t_fb


def _try(fn):
    try:
        return fn()
    except Exception as e:  # a backend that does not support the shape: recorded, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


# ----------------------------------------------------------------------------- impls

def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_math": SDPBackend.MATH}


def attention_impls(layout="blhd"):
    """name -> f(q, k, v) on (B, L, H, D) inputs; layout 'bhld' for pre-permuted SDPA inputs."""
    import kernels
    from heartbeat.attention import attention_math
    from torch.nn.attention import sdpa_kernel
    impls = {"triton": kernels.attention}
    for name, be in sdpa_backends().items():
        def f(q, k, v, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        impls[name] = f
    try:
        import xformers.ops as xops
        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    except Exception:
        pass
    impls["math"] = attention_math
    return impls


def rows_for(kind, shape, impls, make_inputs, flops, nbytes, reps, ceil, ours=("triton",), dim=None):
    """Time every impl on fresh inputs; return rows with TFLOP/s, GB/s and ratios to the best baseline."""
    rows = []
    for name, f in impls.items():
        inputs = make_inputs(name)
        res = _try(lambda: time_impl(lambda: f(*inputs[0]), inputs[1], reps=reps))
        row = dict(kernel=kind, shape=shape, impl=name, dtype="bf16", dim=dim)
        if isinstance(res, str):
            row["error"] = res
        else:
            for key, ms, fl, by in zip(("fwd", "bwd", "fwdbwd"), res, flops, nbytes):
                row[f"{key}_ms"] = round(ms, 4)
                if fl:
                    row[f"{key}_tflops"] = round(fl / ms / 1e9, 2)
                    row[f"{key}_pct_matmul"] = round(100 * fl / ms / 1e9 / ceil["matmul_tflops"], 1)
                row[f"{key}_gbps"] = round(by / ms / 1e6, 1)
                row[f"{key}_pct_copy"] = round(100 * by / ms / 1e6 / ceil["copy_gbps"], 1)
        rows.append(row)
        if CUDA:
            torch.cuda.empty_cache()
    base = [r for r in rows if r["impl"] not in ours and "error" not in r]
    for r in rows:
        if r["impl"] in ours and "error" not in r and base:
            for key in ("fwd", "bwd", "fwdbwd"):
                best = min(base, key=lambda b: b[f"{key}_ms"])
                r[f"{key}_vs_best"] = round(best[f"{key}_ms"] / r[f"{key}_ms"], 2)
                r[f"{key}_best_baseline"] = best["impl"]
    return rows


def bench_spatial(reps, ceil):
    rows = []
    for B, L, H, D in SPATIAL:
        impls = attention_impls()
        if L > 1024:
            impls.pop("math")   # eager math at L=4096 costs seconds of a short GPU window and says nothing new

        def make(name):
            xs = [torch.randn(B, L, H, D, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(3)]
            return xs, xs
        f = 4 * B * H * L * L * D
        e = 2 * B * L * H * D
        rows += rows_for("spatial", f"B={B} L={L} H={H} D={D}", impls, make, (f, 2 * f, 3 * f),
                         (4 * e, 8 * e, 12 * e), reps, ceil, dim=D)
    return rows


def bench_temporal(reps, ceil):
    import kernels
    from heartbeat.attention import attention_math
    from torch.nn.attention import sdpa_kernel
    rows, Fr, H, B = [], 16, 8, 1
    for hw, C in TEMPORAL:
        D = C // H
        N = B * hw   # sequences of F frames, each with H heads

        def views():
            # the UNet's layout (TemporalAttention): (B, F, h*w*heads, D) views of three projections
            xs = [torch.randn(B, Fr, hw * H, D, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(3)]
            return xs, xs

        def sdpa_best(q, k, v):   # the default SDPA dispatch on strided views
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        def rearranged(q, k, v):  # rearrange + SDPA + rearrange: explicit copies around the call
            q, k, v = (x.permute(0, 2, 1, 3).contiguous() for x in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).contiguous()

        impls = {"triton": kernels.temporal_attention, "rearrange+sdpa+rearrange": rearranged,
                 "sdpa_views": sdpa_best, "math": attention_math}
        for name, be in sdpa_backends().items():
            def pre(q, k, v, be=be):   # already (N, H, F, D) contiguous: no layout cost at all
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v)
            impls[f"{name}_prepermuted"] = pre
        try:
            import xformers.ops as xops
            impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())
        except Exception:
            pass

        def make(name):
            if name.endswith("_prepermuted"):
                xs = [torch.randn(N, H, Fr, D, device=DEVICE, dtype=BF16, requires_grad=True) for _ in range(3)]
                return xs, xs
            return views()
        f = 4 * N * H * Fr * Fr * D
        e = 2 * N * Fr * H * D
        rows += rows_for("temporal", f"N={N} F={Fr} H={H} D={D}", impls, make, (f, 2 * f, 3 * f),
                         (4 * e, 8 * e, 12 * e), reps, ceil, dim=D)
    return rows


def bench_dual(reps, ceil):
    import kernels
    from heartbeat.attention import attention_math
    rows = []
    for B, L, H, D, Lt, Li in DUAL:
        att = attention_impls()
        impls = {"triton": lambda q, kt, vt, ki, vi: kernels.dual_cross_attention(q, kt, vt, q, ki, vi)}
        for name, f in att.items():
            if name != "triton":
                impls[f"2x {name} + add"] = lambda q, kt, vt, ki, vi, f=f: f(q, kt, vt) + f(q, ki, vi)
        impls["math"] = lambda q, kt, vt, ki, vi: attention_math(q, kt, vt) + attention_math(q, ki, vi)
        impls.pop("2x math + add", None)

        def make(name):
            xs = [torch.randn(B, n, H, D, device=DEVICE, dtype=BF16, requires_grad=True) for n in (L, Lt, Lt, Li, Li)]
            return xs, xs
        f = 4 * B * H * L * (Lt + Li) * D
        e = 2 * H * D * B
        rd = e * (L + 2 * Lt + 2 * Li + L)      # q, k_t, v_t, k_i, v_i, o
        rows += rows_for("dual_cross", f"B={B} L={L} H={H} D={D} Lt={Lt} Li={Li}", impls, make,
                         (f, 2 * f, 3 * f), (rd, 2 * rd, 3 * rd), reps, ceil, dim=D)
    return rows


GN_BATCH = 32


def bench_groupnorm(reps, ceil):
    import kernels
    rows, N = [], GN_BATCH
    for C, hw in GROUPNORM:
        impls = {"triton": lambda x, w, b: kernels.group_norm_silu(x, w, b, 32),
                 "eager": lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)),
                 "eager_fp32_stats": lambda x, w, b: F.silu(F.group_norm(x.float(), 32, w, b).to(x.dtype))}

        def make(name):
            x = torch.randn(N, C, hw, hw, device=DEVICE, dtype=BF16, requires_grad=True)
            w = torch.randn(C, device=DEVICE, requires_grad=True)
            b = torch.randn(C, device=DEVICE, requires_grad=True)
            return (x, w, b), (x, w, b)
        e = 2 * N * C * hw * hw
        rows += rows_for("group_norm_silu", f"N={N} C={C} h=w={hw}", impls, make, (0, 0, 0),
                         (2 * e, 3 * e, 5 * e), reps, ceil, dim=C)
    return rows


# ----------------------------------------------------------------------------- end to end

def bench_e2e(reps):
    """The training step (triton / sdpa, with and without gradient checkpointing) and the guided
    50-step clip, as tools/gpu_check.py measures them (one UNet built on the GPU, one definition)."""
    from tools import gpu_check
    rows = []
    for section, label in ((gpu_check.section_e2e, "train"), (gpu_check.section_clip, "clip")):
        try:
            runs = section(False)["runs"]
        except Exception as e:
            rows.append(dict(kernel="e2e", impl=label, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        for r in runs:
            impl = f"{label} {r['backend']}" + (" checkpointing" if r.get("grad_checkpointing") else "")
            rows.append(dict(kernel="e2e", impl=impl, **{k: v for k, v in r.items()
                                                          if k not in ("backend", "grad_checkpointing")}))
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- CPU smoke

def cpu_smoke():
    """Tiny forward+backward of each kernel in Triton's interpreter vs a float64 reference."""
    import kernels
    kernels._interpreter_compat()
    from kernels.spatial import attention_ref
    from kernels.dual_cross import dual_cross_attention_ref
    from kernels.group_norm import group_norm_silu_ref
    from kernels.temporal import temporal_attention_ref
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    cases = {
        "attention": (kernels.attention, attention_ref, [r(1, 33, 2, 40), r(1, 17, 2, 40), r(1, 17, 2, 40)], {}),
        "temporal_attention": (kernels.temporal_attention, temporal_attention_ref,
                               [r(5, 7, 2, 40), r(5, 7, 2, 40), r(5, 7, 2, 40)], {}),
        "dual_cross_attention": (kernels.dual_cross_attention, dual_cross_attention_ref,
                                 [r(1, 20, 2, 40), r(1, 77, 2, 40), r(1, 77, 2, 40), r(1, 20, 2, 40),
                                  r(1, 16, 2, 40), r(1, 16, 2, 40)], {}),
        "group_norm_silu": (kernels.group_norm_silu, group_norm_silu_ref, [r(2, 8, 5, 5), r(8), r(8)],
                            {"num_groups": 4}),
    }
    out = []
    for name, (fn, ref, xs, kw) in cases.items():
        t0 = time.time()
        a = [x.clone().requires_grad_() for x in xs]
        b = [x.double().requires_grad_() for x in xs]
        y, y64 = fn(*a, **kw), ref(*b, **kw)
        do = torch.randn(y.shape, generator=g)
        y.backward(do)
        y64.backward(do.double())
        errs = [(y.double() - y64).abs().max().item()] + [(p.grad.double() - q.grad).abs().max().item()
                                                            for p, q in zip(a, b)]
        out.append(dict(kernel=name, max_err_out=errs[0], max_err_grads=max(errs[1:]),
                        seconds=round(time.time() - t0, 2), ok=max(errs) < 1e-4))
        print(f"  {name:22s} fp32 fwd+bwd vs float64: out {errs[0]:.1e}, grads {max(errs[1:]):.1e} "
              f"[{'ok' if out[-1]['ok'] else 'FAIL'}] ({out[-1]['seconds']}s in the interpreter)")
    return out


# ----------------------------------------------------------------------------- main

def print_rows(rows, verbose=False):
    """Our rows (with the ratio to the best baseline); every baseline row too with --verbose."""
    for r in rows:
        if not verbose and r.get("impl") not in ("triton", None) and r.get("kernel") != "e2e":
            continue
        if "error" in r:
            print(f"  {r['kernel']:15s} {r.get('shape', ''):36s} {r['impl']:28s} n/a ({r['error']})")
            continue
        if r["kernel"] == "e2e":
            print(f"  e2e {r['impl']:10s} " + " ".join(f"{k}={v}" for k, v in r.items() if k not in ("kernel", "impl")))
            continue
        cells = []
        for key in ("fwd", "bwd", "fwdbwd"):
            c = f"{key} {r[f'{key}_ms']:.3f} ms"
            if f"{key}_tflops" in r:
                c += f" {r[f'{key}_tflops']:.0f} TF/s ({r[f'{key}_pct_matmul']:.0f}%)"
            c += f" {r[f'{key}_gbps']:.0f} GB/s ({r[f'{key}_pct_copy']:.0f}%)"
            if f"{key}_vs_best" in r:
                c += f" x{r[f'{key}_vs_best']} vs {r[f'{key}_best_baseline']}"
            cells.append(c)
        print(f"  {r['kernel']:15s} {r['shape']:36s} {r['impl']:28s} " + " | ".join(cells))


def environment():
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), torch=torch.__version__,
               cuda=torch.version.cuda, device=torch.cuda.get_device_name() if CUDA else "cpu",
               command=" ".join([os.path.basename(sys.executable)] + sys.argv))
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import xformers
        env["xformers"] = xformers.__version__
    except Exception:
        env["xformers"] = None
    if CUDA:
        try:
            import subprocess
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:
            env["driver"] = None
    return env


def write_dispatch(result, env, force):
    """--write-dispatch: this run's kernel rows -> kernels/dispatch.json, under this GPU's name and
    compute capability (kernels/dispatch.py)."""
    from kernels import dispatch
    if not CUDA:
        print("--write-dispatch: needs a GPU run (no CUDA here); nothing written")
        return
    entries = dispatch.make_entries(result["rows"])
    major, minor = torch.cuda.get_device_capability()
    measured = f"{env['date']}, torch {env['torch']}, triton {env['triton']}: {env['command']}"
    try:
        path = dispatch.write_table(entries, env["device"], f"sm_{major}{minor}", measured, force=force)
    except FileExistsError as e:
        print(f"--write-dispatch: {e}")
        return
    result["dispatch"] = entries
    print(f"--write-dispatch: {len(entries)} entries for {env['device']} in {path}: " +
          ", ".join(f"{k} fwd x{v.get('fwd')} fwdbwd x{v.get('fwdbwd')}" for k, v in sorted(entries.items())))


def dry_run_shapes():
    global SPATIAL, TEMPORAL, DUAL, GROUPNORM, GN_BATCH
    SPATIAL = [(1, 33, 2, 40)]
    TEMPORAL = [(5, 16)]
    DUAL = [(1, 33, 2, 40, 77, 16)]
    GROUPNORM = [(64, 4)]
    GN_BATCH = 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--reference" in argv:                       # ours against diffusers' UNet: its own tool and options
        from tools import bench_e2e
        bench_e2e.main([a for a in argv if a != "--reference"])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", action="store_true",
                    help="our UNet beside diffusers' on the same weights (tools/bench_e2e.py; CPU or GPU)")
    ap.add_argument("--kernels", action="store_true", help="kernel tables (default when no flag)")
    ap.add_argument("--e2e", action="store_true", help="sd15 video UNet training step and 50-step DDIM")
    ap.add_argument("--json", help="write the environment and every row here")
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per measurement (median)")
    ap.add_argument("--only", nargs="+", choices=["spatial", "temporal", "dual", "groupnorm"])
    ap.add_argument("--verbose", action="store_true", help="print every baseline row, not only ours")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: run the kernel tables' code on tiny shapes in the interpreter (checks this "
                         "script; the numbers mean nothing)")
    ap.add_argument("--write-dispatch", action="store_true",
                    help="GPU: record in kernels/dispatch.json which kernels beat the best baseline on this GPU "
                         "(per op, dtype and dim; what attn_backend=auto reads, kernels/dispatch.py)")
    ap.add_argument("--force", action="store_true", help="--write-dispatch: replace this GPU's existing entry")
    ap.add_argument("--autotune", action="store_true",
                    help="HEARTBEAT_AUTOTUNE=1: the attention kernels time their candidate configs per shape "
                         "first (kernels/tuning.py); the choices are printed and stored under 'tuning'")
    args = ap.parse_args(argv)
    if args.autotune:
        os.environ["HEARTBEAT_AUTOTUNE"] = "1"
        from kernels import tuning
        tuning.ENABLED = True
    if not args.kernels and not args.e2e:
        args.kernels = True
    env = environment()
    print("bench:", ", ".join(f"{k}={v}" for k, v in env.items()))
    result = dict(env=env, rows=[])
    if args.dry_run and not CUDA:
        dry_run_shapes()
        print("--dry-run: tiny shapes on CPU, Triton interpreted, wall-clock: the numbers are meaningless")
        ceil = ceilings(1, n=1 << 16, m=64)
        result["ceilings"] = ceil
        for name, fn in (("spatial", bench_spatial), ("temporal", bench_temporal), ("dual", bench_dual),
                         ("groupnorm", bench_groupnorm)):
            if args.only and name not in args.only:
                continue
            rows = fn(1, ceil)
            print(f"[{name}]")
            print_rows(rows, args.verbose)
            result["rows"] += rows
    elif not CUDA:
        print("No CUDA device: every timing row (kernels, ceilings, baselines, --e2e) needs a GPU and is "
              "not measured here. Running the CPU correctness smoke in Triton's interpreter instead:")
        try:
            result["cpu_smoke"] = cpu_smoke()
        except Exception as e:
            print(f"  smoke could not run: {type(e).__name__}: {e}")
            result["cpu_smoke_error"] = str(e)
    else:
        if args.kernels:
            ceil = ceilings(args.reps)
            result["ceilings"] = ceil
            print(f"ceilings: copy {ceil['copy_gbps']:.0f} GB/s, bf16 matmul {ceil['matmul_tflops']:.1f} TFLOP/s")
            for name, fn in (("spatial", bench_spatial), ("temporal", bench_temporal), ("dual", bench_dual),
                             ("groupnorm", bench_groupnorm)):
                if args.only and name not in args.only:
                    continue
                rows = fn(args.reps, ceil)
                print(f"[{name}]")
                print_rows(rows, args.verbose)
                result["rows"] += rows
        if args.e2e:
            rows = bench_e2e(args.reps)
            print("[e2e]")
            print_rows(rows, args.verbose)
            result["rows"] += rows
    if args.write_dispatch:
        write_dispatch(result, env, args.force)
    if args.autotune:
        from kernels import tuning
        result["tuning"] = tuning.report()
        print("[autotune choices]\n" + (result["tuning"] or "(none: no tuned kernel ran)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
