"""Our UNet beside diffusers' UNet2DConditionModel on the same weights, in one process.

    python tools/bench_e2e.py                                  # sd15 shapes, batch 2, 32x32 latent, fp32, CPU
    python tools/bench_e2e.py --device=cuda --dtype=bf16       # on a GPU (bf16 autocast, as training runs)
    python tools/bench_e2e.py --quick                          # narrow sd15-shaped UNet, seconds on a CPU
    options: --repeats=N --batch=B --latent=S --attn_backend=NAME --memory_format=NAME --json=PATH [--force]

Both models have the structure of the preset (sd15: widths 320/640/1280/1280, two ResBlocks per
level, attention on the first three, 8 heads, 768-wide text context; --quick divides the widths by
10 and the context to 64) and the same random weights: diffusers' UNet is built, and ours takes its
tensors by name (heartbeat.weights.diffusers_unet_to_ldm; shared, not copied, while both use NCHW).
Ours has local_channels=0 so conv_in matches; the image branch exists but is skipped (image=None).
Inputs: z (B, 4, S, S), one timestep per sample, text (B, 77, context). Each repeat times, for each
model in turn (the order alternates between repeats), one forward under no_grad and one
forward + backward of mean(out^2) with parameter gradients; the report gives medians and the ratio
diffusers / ours (> 1: ours is faster), in wall time and, on the CPU, in process CPU time (steadier
on a shared machine). The outputs of the two models are compared once (max |difference|).
--memory_format=channels_last runs ours under the other layout policy (heartbeat/nn.py MEMORY_FORMAT:
its own channels-last copy of the weights, made once); diffusers stays NCHW, the yardstick of both runs.

diffusers is a test/reference dependency: it is imported here only, and its absence is one message.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import heartbeat.nn  # noqa: E402
from heartbeat.config import get_config  # noqa: E402
from heartbeat.unet import UNet  # noqa: E402
from heartbeat.utils import autocast  # noqa: E402
from heartbeat.weights import diffusers_unet_to_ldm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise SystemExit("tools/bench_e2e.py: diffusers is not installed; it is the reference UNet here "
                         "(a test dependency): pip install diffusers") from None
    return diffusers


def model_config(quick: bool):
    """The sd15 ModelConfig; --quick: the same structure at a tenth of the width and a 64-wide context."""
    cfg = get_config("sd15").model
    cfg.local_channels = 0
    if quick:
        cfg.unet_channels, cfg.norm_groups, cfg.context_dim = (32, 64, 128, 128), 8, 64
    return cfg


def build_pair(cfg, device):
    """(diffusers' UNet, ours) with the same weights on `device`, eval mode (dropout is 0 in both)."""
    diffusers = _diffusers()
    attn = ["CrossAttn" if a else "" for a in cfg.attn_levels]
    ref = diffusers.UNet2DConditionModel(
        sample_size=32, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
        layers_per_block=cfg.unet_layers, block_out_channels=tuple(cfg.unet_channels),
        down_block_types=tuple(f"{a}DownBlock2D" for a in attn),
        up_block_types=tuple(f"{a}UpBlock2D" for a in reversed(attn)),
        norm_num_groups=cfg.norm_groups, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.heads,  # SD1.5's config calls the number of heads attention_head_dim
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5).to(device).eval()
    with torch.device("meta"):
        ours = UNet(cfg)
    fmt = heartbeat.nn.MEMORY_FORMAT
    state = diffusers_unet_to_ldm(ref.state_dict(keep_vars=fmt == torch.contiguous_format))  # NCHW: shared
    if fmt != torch.contiguous_format:  # ours gets its own conv weights, laid out once; diffusers' stay NCHW
        state = {k: v.contiguous(memory_format=fmt) if v.ndim == 4 else v for k, v in state.items()}
    missing, unexpected = ours.load_state_dict(state, strict=False, assign=True)
    if unexpected or not all(UNet.is_new_parameter(k) for k in missing):
        raise RuntimeError(f"weights do not map: unexpected {unexpected[:5]}, missing {missing[:5]}")
    for name in missing:  # the image branch (skipped with image=None): zeros
        mod, leaf = name.rsplit(".", 1)
        m = ours.get_submodule(mod)
        setattr(m, leaf, torch.nn.Parameter(torch.zeros(getattr(m, leaf).shape, device=device)))
    ours.to(memory_format=fmt)  # already so: a no-op
    return ref, ours.eval()


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w, time.process_time() - c


def run(a) -> dict:
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/bench_e2e.py: --device=cuda but CUDA is not available; use --device=cpu")
    if a.dtype == "bf16" and device.type != "cuda":
        raise SystemExit("tools/bench_e2e.py: --dtype=bf16 is the GPU path (bf16 autocast); on the CPU use fp32")
    heartbeat.nn.MEMORY_FORMAT = FORMATS[a.memory_format]  # read by as_layout at every call
    cfg = model_config(a.quick)
    cfg.attn_backend = a.attn_backend
    torch.manual_seed(0)
    ref, ours = build_pair(cfg, device)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(a.batch, cfg.latent_channels, a.latent, a.latent, generator=g).to(device)
    t = torch.randint(0, 1000, (a.batch,), generator=g).to(device)
    text = torch.randn(a.batch, 77, cfg.context_dim, generator=g).to(device)
    calls = {"diffusers": lambda: ref(z, t, encoder_hidden_states=text).sample,
             "ours": lambda: ours(z, t, text=text)}
    models = {"diffusers": ref, "ours": ours}

    def forward(name):
        with torch.no_grad(), autocast(device):
            calls[name]()

    def step(name):
        with autocast(device):
            out = calls[name]()
        out.float().square().mean().backward()
        models[name].zero_grad(set_to_none=True)

    with torch.no_grad(), autocast(device):
        a_out, b_out = calls["diffusers"]().float(), calls["ours"]().float()
    diff = (a_out - b_out).abs().max().item()
    for name in calls:  # warm-up: allocator, oneDNN / cuDNN plans, Triton JIT
        step(name)
    times = {(m, k): [] for m in calls for k in ("fwd", "fwd+bwd")}
    cpu = {key: [] for key in times}
    for r in range(a.repeats):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for kind, fn in (("fwd", forward), ("fwd+bwd", step)):
            for name in order:
                w, c = _timed(lambda: fn(name), device)
                times[(name, kind)].append(w)
                cpu[(name, kind)].append(c)
    rows = {}
    for kind in ("fwd", "fwd+bwd"):
        row = {}
        for name in calls:
            row[f"{name}_s"] = statistics.median(times[(name, kind)])
            row[f"{name}_cpu_s"] = statistics.median(cpu[(name, kind)])
            row[f"{name}_all_s"] = [round(x, 4) for x in times[(name, kind)]]
        row["ratio"] = row["diffusers_s"] / row["ours_s"]
        row["ratio_cpu"] = row["diffusers_cpu_s"] / row["ours_cpu_s"]
        rows[kind] = row
    return {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": a.dtype, "torch": torch.__version__, "diffusers": _diffusers().__version__,
            "threads": torch.get_num_threads(), "quick": a.quick, "batch": a.batch, "latent": a.latent,
            "widths": list(cfg.unet_channels), "context_dim": cfg.context_dim, "repeats": a.repeats,
            "attn_backend": a.attn_backend, "memory_format": a.memory_format, "max_abs_diff": diff,
            "max_abs_out": a_out.abs().max().item(), "rows": rows}


def report(res) -> str:
    lines = [f"UNet ours vs diffusers {res['diffusers']} | {res['name']} {res['dtype']} torch {res['torch']} "
             f"threads {res['threads']} | widths {res['widths']} batch {res['batch']} latent {res['latent']}^2 "
             f"| {res['repeats']} repeats, medians | memory format {res['memory_format']}",
             f"outputs: max |diffusers - ours| = {res['max_abs_diff']:.3g} (max |out| {res['max_abs_out']:.3g})",
             f"{'':8} {'diffusers s':>12} {'ours s':>10} {'ratio':>7}" + (
                 f" {'diffusers cpu s':>16} {'ours cpu s':>11} {'ratio cpu':>10}" if res["device"] == "cpu" else "")]
    for kind, r in res["rows"].items():
        line = f"{kind:8} {r['diffusers_s']:12.4f} {r['ours_s']:10.4f} {r['ratio']:7.2f}"
        if res["device"] == "cpu":
            line += f" {r['diffusers_cpu_s']:16.4f} {r['ours_cpu_s']:11.4f} {r['ratio_cpu']:10.2f}"
        lines.append(line)
    lines.append("ratio = diffusers time / our time: above 1, ours is faster")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="widths / 10, 16x16 latent, 2 repeats (CI time)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (2 with --quick)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=None, help="latent side; default 32 (16 with --quick)")
    ap.add_argument("--attn_backend", default="auto", help="our attention backend (auto: sdpa on the CPU)")
    ap.add_argument("--memory_format", default="nchw", choices=sorted(FORMATS),
                    help="our layout policy for this run (the library's is heartbeat/nn.py MEMORY_FORMAT = nchw)")
    ap.add_argument("--json", default=None, help="also write the result as JSON to this path")
    ap.add_argument("--force", action="store_true", help="overwrite --json if it exists")
    a = ap.parse_args(argv)
    a.repeats = a.repeats or (2 if a.quick else 3)
    a.latent = a.latent or (16 if a.quick else 32)
    if a.repeats < 1 or a.batch < 1 or a.latent % 8:
        ap.error("--repeats and --batch must be >= 1 and --latent a multiple of 8 (three downsamplings)")
    if a.json and Path(a.json).exists() and not a.force:
        ap.error(f"--json {a.json} exists; pass --force to overwrite it")
    res = run(a)
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
