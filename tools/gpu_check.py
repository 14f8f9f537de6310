"""The sections of tools/gpu_check.sh (one GPU window, < 8 minutes on an H200), one JSON each.

    python tools/gpu_check.py SECTION OUTDIR [--dry-run]      SECTION: env | kernels | e2e | clip | summary

env       versions (python, torch, CUDA, Triton, xformers), the device, its capability and SM count.
kernels   each kernel at the sd15 shapes (bf16; 256x256 video, 16 frames, guided batch 2) against every
          SDPA backend that runs (flash, efficient, cudnn, math), xformers when importable, and eager:
          median CUDA-event milliseconds of the forward and of forward+backward, the forward replayed
          from a CUDA graph, the max |error| of the forward against float64, and GB/s with L2 flushed
          before each timed call for the memory-bound kernels (temporal, GroupNorm). Ceilings (a
          device copy, a bf16 matmul) measured in the same run.
e2e       the sd15 video UNet training step (16 frames, 256x256, batch 1, bf16 autocast, AdamW on the
          temporal parameters), attn_backend triton against sdpa, with and without gradient
          checkpointing: median step time and peak memory. One UNet, built on the GPU once.
clip      a guided 16-frame 256x256 clip, triton and sdpa: the teacher (50 DDIM steps, classifier-free
          guidance 7.5, both rows in one call a step) and a student-shaped UNet (4 LCM steps, guidance an
          input), each eager and from a CUDA graph (--cuda_graph): seconds and peak memory.
summary   reads every section's JSON and writes summary.txt (< 10 KB), which it prints.

--dry-run: no GPU needed: every section writes its JSON with what it would measure (the CPU test
of the script's structure, tests/test_gpu_check.py).
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

SECTIONS = ("env", "tests", "kernels", "e2e", "clip")
SPATIAL = [(32, 1024, 8, 40), (32, 256, 8, 80), (32, 64, 8, 160)]          # (B*F, L, heads, head dim)
TEMPORAL = [(1024, 40), (256, 80), (64, 160)]   # (h*w, head dim): 2 clips of 16 frames, 8 heads, the UNet's views
GROUPNORM = [(320, 32), (640, 16), (1280, 8), (1280, 4)]                    # (C, h = w), N = 32, 32 groups
SUMMARY_LIMIT = 10_000


def write(outdir, name, data):
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)


# ----------------------------------------------------------------------------- timing

def events_ms(fn, reps=20, warmup=3, flush=None):
    """Median CUDA-event milliseconds of fn(); flush() (not timed) before each call when given."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_ms(fn, reps=20):
    """Median milliseconds of one replay of fn() captured in a CUDA graph (launch gaps removed)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return events_ms(g.replay, reps=reps, warmup=2)


def _err(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ----------------------------------------------------------------------------- sections

def section_env(dry):
    import platform
    import torch
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    for mod in ("triton", "xformers", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available() and not dry:
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        env.update(device=None, dry_run=dry)
    return env


def _impls_attention():
    """name -> f(q, k, v) on (B, L, H, D): triton, each SDPA backend, xformers when importable."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import kernels
    impls = {"triton": kernels.attention}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_math", SDPBackend.MATH)):
        def f(q, k, v, be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        impls[name] = f
    try:
        import xformers.ops as xops
        impls["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q.contiguous(), k.contiguous(),
                                                                          v.contiguous())
    except Exception:
        pass
    return impls


def _measure(kernel, shape, impls, make, ref64, nbytes=None, flush=None):
    """One row per impl: fwd / fwd+bwd / graph ms, max error of the forward against float64, GB/s."""
    import torch
    rows = []
    for name, f in impls.items():
        row = dict(kernel=kernel, shape=shape, impl=name)
        try:
            xs = make()
            out = f(*xs)
            row["max_err"] = float((out.double() - ref64).abs().max())
            with torch.no_grad():
                row["fwd_ms"] = round(events_ms(lambda: f(*xs), flush=flush), 4)
                try:   # a backend that cannot be captured keeps its other columns
                    row["graph_ms"] = round(graph_ms(lambda: f(*xs)), 4)
                except Exception as e:
                    row["graph_ms"], row["graph_error"] = None, _err(e)
            lx = [x.detach().requires_grad_() for x in xs]
            do = torch.randn_like(out)
            row["fwdbwd_ms"] = round(events_ms(lambda: torch.autograd.grad(f(*lx), lx, do), flush=flush), 4)
            if nbytes:
                row["fwd_gbps"] = round(nbytes / row["fwd_ms"] / 1e6, 1)
        except Exception as e:
            row["error"] = _err(e)
        rows.append(row)
        torch.cuda.empty_cache()
    base = [r for r in rows if r["impl"] != "triton" and "error" not in r]
    ours = next((r for r in rows if r["impl"] == "triton" and "error" not in r), None)
    if ours and base:
        for p in ("fwd", "fwdbwd", "graph"):
            timed = [r for r in base if r.get(f"{p}_ms")]
            if timed and ours.get(f"{p}_ms"):
                best = min(timed, key=lambda r: r[f"{p}_ms"])
                ours[f"{p}_vs_best"] = round(best[f"{p}_ms"] / ours[f"{p}_ms"], 2)
                ours[f"{p}_best"] = best["impl"]
    return rows


def section_kernels(dry):
    import torch
    if dry:
        return dict(dry_run=True, spatial=SPATIAL, temporal=TEMPORAL, groupnorm=GROUPNORM,
                    columns=["fwd_ms", "fwdbwd_ms", "graph_ms", "max_err", "fwd_gbps", "fwd_vs_best"])
    import torch.nn.functional as F
    import kernels
    from kernels.dual_cross import dual_cross_attention_ref
    from kernels.spatial import attention_ref
    bf = torch.bfloat16
    r = lambda *s: torch.randn(*s, device="cuda", dtype=bf)   # noqa: E731
    flush_buf = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")   # > L2 (50 MB)
    flush = flush_buf.zero_
    x, y = torch.empty(2 ** 28, dtype=bf, device="cuda"), torch.empty(2 ** 28, dtype=bf, device="cuda")
    copy_gbps = 2 * x.numel() * 2 / events_ms(lambda: y.copy_(x), reps=10) / 1e6
    del x, y
    a = r(8192, 8192)
    mm_tflops = 2 * 8192 ** 3 / events_ms(lambda: a @ a, reps=10) / 1e9
    del a
    rows = []
    for B, L, H, D in SPATIAL:
        q, k, v = r(B, L, H, D), r(B, L, H, D), r(B, L, H, D)
        ref = attention_ref(q.double(), k.double(), v.double())
        rows += _measure("spatial", f"B={B} L={L} H={H} D={D}", _impls_attention(), lambda: (q, k, v), ref)
        kt, vt, ki, vi = r(B, 77, H, D), r(B, 77, H, D), r(B, 16, H, D), r(B, 16, H, D)
        ref = dual_cross_attention_ref(*(t.double() for t in (q, kt, vt, q, ki, vi)))
        impls = {"triton": lambda q, kt, vt, ki, vi: kernels.dual_cross_attention(q, kt, vt, q, ki, vi)}
        for name, f in _impls_attention().items():
            if name != "triton":
                impls[f"2x {name} + add"] = lambda q, kt, vt, ki, vi, f=f: f(q, kt, vt) + f(q, ki, vi)
        rows += _measure("dual_cross", f"B={B} L={L} D={D} Lt=77 Li=16", impls, lambda: (q, kt, vt, ki, vi), ref)
        del q, k, v, kt, vt, ki, vi, ref
    for L, D in TEMPORAL:   # TemporalAttention's (B, F, h*w*heads, head_dim) views of its projections
        B, H, Fr = 2, 8, 16
        views = tuple(r(B, Fr, L * H, D) for _ in range(3))
        ref = attention_ref(*(t.double() for t in views))
        impls = {"triton": kernels.temporal_attention}
        for name, f in _impls_attention().items():
            if name != "triton":
                impls[f"{name} (views)"] = f
        rows += _measure("temporal", f"B={B} F={Fr} L={L} H={H} D={D}", impls, lambda: views, ref,
                         nbytes=4 * B * L * Fr * H * D * 2, flush=flush)
        del views, ref
    for C, hw in GROUPNORM:
        xg, w, b = r(32, C, hw, hw), torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        ref = F.silu(F.group_norm(xg.double(), 32, w.double(), b.double()))
        impls = {"triton": lambda x, w, b: kernels.group_norm_silu(x, w, b, 32),
                 "eager": lambda x, w, b: F.silu(F.group_norm(x, 32, w.to(x.dtype), b.to(x.dtype)))}
        rows += _measure("group_norm_silu", f"N=32 C={C} h=w={hw}", impls, lambda: (xg, w, b), ref,
                         nbytes=2 * xg.numel() * 2, flush=flush)
    for row in rows:
        if "fwd_gbps" in row:
            row["fwd_pct_copy"] = round(100 * row["fwd_gbps"] / copy_gbps, 1)
    return dict(ceilings=dict(copy_gbps=round(copy_gbps, 1), bf16_matmul_tflops=round(mm_tflops, 1)), rows=rows)


def _unet():
    import torch
    from heartbeat.config import get_config
    from heartbeat.unet import UNet
    cfg = get_config("sd15").model
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet(cfg)
    unet.inflate()
    unet.cuda()
    return unet, cfg


def _set_backend(unet, be):
    for m in unet.modules():
        if hasattr(m, "backend"):
            m.backend = be


def section_e2e(dry):
    if dry:
        return dict(dry_run=True, runs=[dict(backend=be, grad_checkpointing=ck, measures="step_ms, peak_gib")
                                        for be in ("triton", "sdpa") for ck in (False, True)])
    import torch
    import torch.nn.functional as F
    unet, cfg = _unet()
    opt = torch.optim.AdamW(unet.temporal_parameters(), lr=1e-4)
    Fr, h = 16, 32
    z = torch.randn(1, Fr, cfg.latent_channels, h, h, device="cuda")
    text = torch.randn(1, cfg.text_tokens, cfg.context_dim, device="cuda")
    image = torch.randn(1, cfg.prior_tokens, cfg.context_dim, device="cuda")
    t = torch.tensor([500], device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.mse_loss(unet(z, t, text=text, image=image).float(), z)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    runs = []
    for be in ("triton", "sdpa"):
        for ck in (False, True):
            row = dict(backend=be, grad_checkpointing=ck)
            try:
                _set_backend(unet, be)
                unet.cfg.grad_checkpointing = ck
                torch.cuda.reset_peak_memory_stats()
                row["step_ms"] = round(events_ms(step, reps=5, warmup=2), 1)
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            except Exception as e:
                row["error"] = _err(e)
            runs.append(row)
    ok = {(r["backend"], r["grad_checkpointing"]): r for r in runs if "error" not in r}
    for ck in (False, True):
        if ("triton", ck) in ok and ("sdpa", ck) in ok:
            ok[("triton", ck)]["speedup_vs_sdpa"] = round(ok[("sdpa", ck)]["step_ms"] / ok[("triton", ck)]["step_ms"], 2)
    return dict(frames=Fr, latent=h, runs=runs)


CLIP_RUNS = [("student", "lcm", 4, False), ("student", "lcm", 4, True),     # (model, sampler, steps, CUDA graph)
             ("teacher", "ddim", 50, False), ("teacher", "ddim", 50, True)]


def clip_rows(teacher, student, cfg, backends=("triton", "sdpa"), runs=CLIP_RUNS, frames=16, latent=32,
              device="cuda", save=None):
    """Time one guided `frames`-frame clip (sd15: 256x256, latent 32) per (backend, run): the teacher
    with classifier-free guidance 7.5 (the unconditional and conditional rows in one batched call a
    step) and a student-shaped UNet (guidance an input, one row a step: heartbeat/distill.py), each
    eagerly and replayed from a CUDA graph (heartbeat/graphs.py, what --cuda_graph does). Weights are
    random: the figures are speed, not quality. save(rows) after each row, so a timeout keeps them."""
    import torch
    from heartbeat.diffusion import Schedule, sample
    from heartbeat.graphs import GraphedCall
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, frames, cfg.latent_channels, latent, latent, generator=g).to(device)
    text = torch.randn(1, cfg.text_tokens, cfg.context_dim, generator=g).to(device)
    image = torch.randn(1, cfg.prior_tokens, cfg.context_dim, generator=g).to(device)
    scales = torch.zeros(1, student.guidance_inputs, device=device)
    scales[:, 0] = 7.5
    cuda = torch.device(device).type == "cuda"
    amp = dict(device_type="cuda", dtype=torch.bfloat16) if cuda else dict(device_type="cpu", enabled=False)
    pair = dict(text=torch.cat([torch.zeros_like(text), text]), image=torch.cat([torch.zeros_like(image), image]))

    def teacher_call(x, tt):
        return teacher(x, tt, **pair)

    def student_call(x, tt):
        return student(x, tt, text=text, image=image, guidance=scales)

    def sync():
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for model, sampler, steps, graphed in runs:
        for be in backends:
            row = dict(backend=be, model=model, sampler=sampler, steps=steps, cuda_graph=graphed,
                       unet_evals=steps * (2 if model == "teacher" else 1))
            try:
                _set_backend(teacher, be)
                _set_backend(student, be)
                if model == "teacher":
                    call, x_in = teacher_call, torch.cat([z, z])
                else:
                    call, x_in = student_call, z
                t_in = torch.zeros(x_in.shape[0], dtype=torch.long, device=device)
                if graphed:
                    call = GraphedCall(call, x_in, t_in)

                @torch.no_grad()
                def model_fn(x, tt):
                    with torch.autocast(**amp):
                        if model == "student":
                            return call(x, tt).float()
                        e = call(torch.cat([x, x]), torch.cat([tt, tt])).float()
                    u, c = e.chunk(2)
                    return u + 7.5 * (c - u)
                sample(model_fn, z, steps=2, sampler=sampler, schedule=Schedule.sd15())   # warm-up, JIT
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sync()
                t0 = time.perf_counter()
                out = sample(model_fn, z, steps=steps, sampler=sampler, schedule=Schedule.sd15())
                sync()
                row.update(seconds=round(time.perf_counter() - t0, 3), finite=bool(torch.isfinite(out).all()))
                if cuda:
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            except Exception as e:
                row["error"] = _err(e)
            rows.append(row)
            if save is not None:
                save(rows)
    return rows


def section_clip(dry, save=None):
    if dry:
        return dict(dry_run=True, frames=16, guidance=7.5,
                    runs=[dict(backend=be, model=m, sampler=s, steps=n, cuda_graph=gr, measures="seconds, peak_gib")
                          for m, s, n, gr in CLIP_RUNS for be in ("triton", "sdpa")])
    import dataclasses
    import torch
    from heartbeat.unet import UNet
    teacher, cfg = _unet()
    torch.manual_seed(1)
    with torch.device("cuda"):
        student = UNet(dataclasses.replace(cfg, guidance_inputs=len(cfg.conditions) + 1))
    student.inflate()
    student.cuda().eval()
    teacher.eval()
    rows = clip_rows(teacher, student, cfg, save=None if save is None else
                     (lambda r: save(dict(frames=16, guidance=7.5, partial=True, runs=r))))
    return dict(frames=16, guidance=7.5, runs=rows)


# ----------------------------------------------------------------------------- summary

def summarize(outdir) -> str:
    def load(name):
        try:
            with open(os.path.join(outdir, f"{name}.json")) as f:
                return json.load(f)
        except Exception as e:
            return dict(missing=_err(e))
    lines = []
    env = load("env")
    lines.append("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    tests = load("tests")
    lines.append("tests: " + ", ".join(f"{k}={v}" for k, v in tests.items() if k != "tail"))
    for name in ("kernels", "e2e", "clip"):
        d = load(name)
        st = load(f"{name}.status")
        lines.append(f"[{name}] status: " + ", ".join(f"{k}={v}" for k, v in st.items()))
        if "rows" in d:
            c = d.get("ceilings", {})
            lines.append(f"  ceilings: copy {c.get('copy_gbps')} GB/s, bf16 matmul {c.get('bf16_matmul_tflops')} TFLOP/s")
            for r in d["rows"]:
                if "error" in r:
                    lines.append(f"  {r['kernel']} {r['shape']} {r['impl']}: n/a ({r['error'][:80]})")
                    continue
                cell = (f"  {r['kernel']} {r['shape']} {r['impl']}: fwd {r['fwd_ms']} fwdbwd {r['fwdbwd_ms']} "
                        f"graph {r['graph_ms']} ms err {r['max_err']:.1e}")
                if "fwd_gbps" in r:
                    cell += f" {r['fwd_gbps']} GB/s ({r.get('fwd_pct_copy')}%)"
                if "fwd_vs_best" in r:
                    cell += (f" | x{r['fwd_vs_best']} fwd vs {r['fwd_best']}, x{r.get('fwdbwd_vs_best')} fwdbwd vs "
                             f"{r.get('fwdbwd_best')}, x{r.get('graph_vs_best')} graph")
                lines.append(cell)
        elif "runs" in d:
            for r in d["runs"]:
                lines.append("  " + ", ".join(f"{k}={v}" for k, v in r.items()))
        else:
            lines.append("  " + json.dumps(d)[:300])
    text = "\n".join(lines) + "\n"
    if len(text) > SUMMARY_LIMIT:   # the kernel rows of baselines are the first to go
        keep = [ln for ln in lines if "triton" in ln or not ln.startswith("  ") or "ceilings" in ln]
        text = "\n".join(keep)[:SUMMARY_LIMIT - 40] + "\n(summary cut to 10 KB; full rows in the JSON)\n"
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("section", choices=["env", "kernels", "e2e", "clip", "summary"])
    ap.add_argument("outdir")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: write what each section would measure")
    args = ap.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    if args.section == "summary":
        print(summarize(args.outdir), end="")
        return 0
    import torch
    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check {args.section}: no CUDA device; use --dry-run for the structure only")
        write(args.outdir, args.section, dict(error="no CUDA device"))
        return 1
    t0 = time.time()
    if args.section == "clip":    # rows are saved as they come: a timeout keeps the finished ones
        data = section_clip(args.dry_run, save=lambda d: write(args.outdir, "clip", d))
    else:
        data = dict(env=section_env, kernels=section_kernels, e2e=section_e2e)[args.section](args.dry_run)
    data["seconds"] = round(time.time() - t0, 1)
    write(args.outdir, args.section, data)
    print(f"gpu_check {args.section}: {data['seconds']} s -> {args.outdir}/{args.section}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
