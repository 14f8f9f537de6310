"""Train HeartBeat: one stage per run, one plain loop (nanoGPT train.py / EDM training_loop.py).

    bash train.sh pretrain                                 # the newcomer's run: phantom -> VAE -> stage 1
    python tools/train.py --stage=finetune --preset=sd15 --plan=1,4,8   # per-rank memory, ddp vs fsdp
    python tools/train.py --stage=vae --preset=tiny --max_steps=800
    torchrun --standalone --nproc_per_node=8 tools/train.py --stage=pretrain --preset=sd15 \
        --data=data/camus --vae=sd15/vae.safetensors --batch_size=64
    python tools/train.py --stage=finetune --init=runs/004-pretrain-tiny
    python tools/train.py --stage=pretrain --resume=runs/004-pretrain-tiny --max_steps=4000

Options: --stage, --preset, and every config field as --key=value (heartbeat/config.py; an
unknown key is an error listing the valid ones). Stages (heartbeat/stages.py, docs/ARCHITECTURE.md):
    vae        the AutoencoderKL from scratch on frames.
    pretrain   stage 1, image LDM with every condition of --conditions and condition dropout; the
               VAE (--vae, else the newest runs/NNN-vae-PRESET, else one is trained first) and the
               image prior are frozen; the byte-level text encoder trains when --text_trainable.
    finetune   stage 2: the stage-1 UNet (--init, else the newest pretrain run) is inflated; only
               temporal layers and the new flow encoder train, on clips.
    cmr        few-shot CMR: from a stage-2 checkpoint (--init, else the newest finetune run), mask
               volumes as the only condition, on --data (default data/phantom_cmr, built if absent).
    distill    a 1-4 step student of the pretrain / finetune / cmr checkpoint --init (required), its
               guidance scales an input (heartbeat/distill.py); sample it with --sampler=lcm.
    seg        the segmenter of the mask-agreement metric (heartbeat/segmenter.py).

Each run writes runs/NNN-STAGE-PRESET/: config.json (the resolved config), ckpt-N.safetensors
(weights + EMA + config; what tools/sample.py loads), state-N.pt (the resume state), tb/ (TensorBoard),
samples/ (preview grids), and samples.png at the end; .lock while a process writes it. Defaults per
stage and preset that differ from the config's (e.g. fewer steps for the tiny CPU run) are the stage's
`preset_defaults` and are printed; anything on the command line wins.

One batch from HDF5 to the loss: heartbeat/data.py (make_dataset, EpochSampler, make_loader) ->
heartbeat/models.py (LatentDiffusion.loss) -> heartbeat/conditions.py (Conditioner) and
heartbeat/diffusion.py (training_loss) -> heartbeat/unet.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from heartbeat import checkpoint as ckpt  # noqa: E402
from heartbeat.config import PRESETS, ConfigError, Config, apply_overrides, get_config  # noqa: E402
from heartbeat.distributed import Dist, check_shared_storage  # noqa: E402
from heartbeat.data import EpochSampler, ensure_cache, find_split, make_dataset, make_loader, prepare_data  # noqa: E402
from heartbeat.models import build_model  # noqa: E402
from heartbeat.preview import preview, write_png  # noqa: E402
from heartbeat.segmenter import save_segmenter, train_segmenter  # noqa: E402
from heartbeat.sharding import (Parallel, grad_norm, load_optimizer_state, load_sharded_meta,  # noqa: E402
                                save_sharded_state)
from heartbeat.runs import TrainError, find_run, init_model, open_run, resolve_encoder_files  # noqa: E402
from heartbeat.stages import get_stage, stage_overrides  # noqa: E402
from heartbeat.utils import atomic_write_text, autocast, to_device  # noqa: E402


def lr_at(step: int, lr: float, warmup: int, max_steps: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at max_steps (SGDR's half cosine)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------- output

def log(d: Dist, *args):
    if d.main:
        print(*args, flush=True)


# -------------------------------------------------------------------------------- config

def parse_args(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """-> (stage, preset or None, the other --key=value overrides). --plan[=1,4,8] is kept in the
    overrides for run() to see."""
    stage, preset, rest = None, None, []
    for a in argv:
        key = a[2:].partition("=")[0].replace("-", "_") if a.startswith("--") else ""
        if key == "plan":
            rest.append(a)
        elif key == "stage":
            stage = a.partition("=")[2]
        elif key == "preset":
            preset = a.partition("=")[2]
        elif a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        else:
            rest.append(a)
    if not stage:
        raise ConfigError("--stage is required: --stage=vae|pretrain|finetune|cmr|distill|seg")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return stage, preset, rest


def resolve_config(stage: str, preset: str | None, overrides: list[str]) -> Config:
    """preset + stage options + command line. With --resume: the run's own config + command line.
    finetune / cmr take the model options of the checkpoint they start from (--init, else the
    newest previous-stage run in --out)."""
    probe = apply_overrides(get_config(preset or "tiny"), [f"--stage={stage}"] + overrides)
    if probe.train.resume:
        w, _ = ckpt.find_resume(probe.train.resume)
        meta = ckpt.read_meta(w)
        ckpt.check_compatible(meta, stage, preset, what=f"--resume={probe.train.resume}", path=w)
        saved = ckpt.read_weights(w).config
        cfg = apply_overrides(Config.from_dict(saved.to_dict()), [f"--stage={stage}"] + overrides)
        changed = [k for k, v in cfg.to_dict()["model"].items() if saved.to_dict()["model"][k] != v]
        if changed:
            raise ConfigError(f"--resume: the model options {', '.join('--' + k for k in changed)} differ from "
                              f"the run's; a resumed run keeps its model (start a new run with --init instead)")
        return cfg
    preset = preset or "tiny"
    st = get_stage(stage)
    base = get_config(preset)
    if st.init in ("previous", "teacher"):
        src = probe.train.init or (find_run(probe.train.out, st.starts_from[0], preset) if st.init == "previous"
                                   else None)
        if st.init == "teacher" and not src:
            raise ConfigError(f"stage {stage} needs --init=RUN: the {' / '.join(st.starts_from)} run folder or "
                              f"ckpt-N.safetensors to distil")
        if src:
            w = ckpt.find_weights(src)
            if not ckpt.is_heartbeat_checkpoint(w):
                raise ConfigError(f"--init={src}: {w} is not a HeartBeat checkpoint; pass a run folder or "
                                  f"ckpt-N.safetensors written by tools/train.py ({' / '.join(st.starts_from)})")
            meta = ckpt.read_meta(w)
            ckpt.check_compatible(meta, st.starts_from, preset, what=f"--init={src}", path=w)
            saved = ckpt.read_weights(w).config
            base = Config.from_dict({"model": saved.to_dict()["model"], "train": base.to_dict()["train"]})
            overrides = [f"--init={src}"] + overrides
            if st.distils:       # the student learns on its teacher's data, and samples as its teacher's stage
                overrides = [f"--teacher_stage={meta['stage']}", f"--data={saved.train.data}"] + overrides
    args = ([f"--stage={stage}"] + stage_overrides(st, base.model.conditions) + list(st.preset_defaults.get(preset, ()))
            + overrides)
    return apply_overrides(base, args)


def check_batch(cfg: Config, world: int) -> int:
    """Per-rank micro-batch; global batch = per-rank x grad_accum x world, asserted."""
    t = cfg.train
    if t.batch_size < 1 or t.grad_accum < 1:
        raise ConfigError(f"--batch_size={t.batch_size} and --grad_accum={t.grad_accum} must be >= 1")
    denom = t.grad_accum * world
    if t.batch_size % denom:
        raise ConfigError(f"--batch_size={t.batch_size} (global) is not divisible by grad_accum x world size = "
                          f"{t.grad_accum} x {world} = {denom}; choose a multiple of {denom}")
    per_rank = t.batch_size // denom
    assert per_rank * t.grad_accum * world == t.batch_size
    return per_rank


def describe_params(model, trainable) -> str:
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for _, p in trainable)
    return f"{n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters"


# ---------------------------------------------------------------------------------- the loop

def train(cfg: Config, d: Dist) -> Path:
    """Train one stage; returns the run folder."""
    t, m = cfg.train, cfg.model
    per_rank = check_batch(cfg, d.world)
    resume = ckpt.find_resume(t.resume) if t.resume else None
    stage = get_stage(t.stage)
    dataset = make_dataset(cfg, "train")                         # check the data before building anything
    if resume is None:
        resolve_encoder_files(cfg, log=lambda *a: log(d, *a))    # CLIP / MedSAM files (tokenizer) by stage
    torch.manual_seed(t.seed)                                    # same init on every rank
    model = build_model(cfg)
    if (stage.model == "ldm" and "text" in m.conditions and m.text_encoder == "clip"
            and model.text_encoder.tokenizer is None):
        raise TrainError("the CLIP text encoder has no tokenizer: pass --text_weights=PATH, where PATH (or a tokenizer/ "
                         "folder beside it) holds vocab.json + merges.txt, e.g. an SD1.5 diffusers folder")
    init_model(model, cfg, log=lambda *a: log(d, *a))            # --init / --vae weights, then freezing
    if resume is not None:              # the run's own weights: before the encoder cache is keyed on its VAE
        model.load_model_state(ckpt.read_weights(resume[0]).model, what=str(resume[0]))
    model.to(d.device)
    if t.compile and getattr(model, "unet", None) is not None:   # opt-in; parameter names are unchanged
        model.unet.compile()
    if stage.model == "ldm":                                     # latents + prior tokens once, not every step
        key = ensure_cache(model, cfg, d, log=lambda *a: log(d, *a))
        if key is not None:
            dataset = make_dataset(cfg, "train", cache=key)
    par = Parallel(model, d, t.shard)                            # DDP, or FSDP2 units sharded over the ranks
    trainable = model.trainable_parameters()
    if not trainable:
        raise TrainError(f"stage {t.stage}: nothing to train (no parameter requires grad)")
    opt = torch.optim.AdamW([p for _, p in trainable], lr=t.lr, betas=tuple(t.adam_betas),
                            weight_decay=t.weight_decay)
    ema = ckpt.EMA(trainable, t.ema_halflife_steps, t.ema_rampup)
    step, bad_total = 0, 0                                       # (bf16 needs no GradScaler)
    gen = torch.Generator(device=d.device).manual_seed(t.seed + 1_000 * d.rank)  # anything not per-sample
    run_dir, lock = open_run(cfg, d, resume[0].parent if resume else None, log=lambda *a: log(d, *a))
    try:
        if resume is not None:
            step, bad_total = _resume(resume, model, ema, opt, gen, d, [n for n, _ in trainable])
        return _fit(cfg, d, model, par, dataset, trainable, opt, ema, gen, step, bad_total, run_dir, per_rank)
    finally:
        if lock is not None:
            lock.release()


def _resume(resume, model, ema, opt, gen, d, names) -> tuple[int, int]:
    """Load a resume state (EMA, optimizer, RNG; the weights are in already); returns (step, non-finite
    steps so far). A state-N.pt (DDP, one process) or state-N/ (FSDP) state, at any world size."""
    ema.load_state_dict(ckpt.read_weights(resume[0]).ema)
    if resume[1].is_dir():
        state = load_sharded_meta(resume[1])
        load_optimizer_state(resume[1], model, opt, names)
    else:
        state = ckpt.load_state(resume[1])
        load_optimizer_state(state["optimizer"], model, opt, names)   # a "scaler" entry of older states is ignored
    step, bad_total = int(state["step"]), int(state.get("bad_steps", 0))
    rng = state["rng"]
    if state.get("world", 1) != d.world:
        log(d, f"note: resumed with {d.world} processes, saved with {state.get('world')}: RNG streams differ")
    ckpt.restore_rng(rng[min(d.rank, len(rng) - 1)], {"gen": gen})
    log(d, f"resumed {resume[0]} at step {step}")
    return step, bad_total


def _fit(cfg: Config, d: Dist, model, par, dataset, trainable, opt, ema, gen, step, bad_total, run_dir, per_rank) -> Path:
    """The loop: from `step` to max_steps, checkpoints, logs and previews into run_dir."""
    t, m = cfg.train, cfg.model
    if d.main:
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
    log(d, f"run {run_dir}  stage={t.stage} preset={m.preset}  {describe_params(model, trainable)}")
    log(d, f"batch {t.batch_size} = {per_rank} per rank x {t.grad_accum} accumulation x {d.world} processes; "
           f"{len(dataset)} training items; device {d.device}")

    net = par.net
    sampler = EpochSampler(len(dataset), per_rank, d.world, d.rank, t.grad_accum, t.seed, start_step=step)
    batches = iter(make_loader(dataset, sampler, t.num_workers, t.seed))
    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tb"))
    bar = None
    if d.main:
        from tqdm import tqdm
        bar = tqdm(total=t.max_steps, initial=step, desc=t.stage, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
    params = [p for _, p in trainable]
    bad_run, last_log, t_log = 0, step, time.time()
    loss_sum = torch.zeros((), device=d.device)
    items_per_step = t.batch_size * dataset.frames_per_item
    losses = []
    model.train()
    while step < t.max_steps:
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_acc = torch.zeros((), device=d.device)
        for micro in range(t.grad_accum):
            batch = to_device(next(batches), d.device)
            with par.sync(micro == t.grad_accum - 1):
                with autocast(d.device):
                    loss, _ = net(batch)
                (loss / t.grad_accum).backward()
            loss_acc += loss.detach().float() / t.grad_accum
        gnorm = grad_norm(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        finite = bool(torch.isfinite(gnorm)) and bool(torch.isfinite(loss_acc))
        if d.enabled:                                     # every rank takes the same decision
            flag = torch.tensor([0.0 if finite else 1.0], device=d.device)
            dist.all_reduce(flag)
            finite = flag.item() == 0
        if finite:
            opt.step()
            ema.update(trainable, step + 1)
            bad_run = 0
        else:
            bad_run += 1
            bad_total += 1
            log(d, f"\nstep {step}: non-finite loss or gradient (loss {loss_acc.item():.4g}, grad norm "
                   f"{gnorm.item():.4g}); update skipped ({bad_run} in a row, {bad_total} in total)")
            if bad_run >= t.max_bad_steps:
                raise TrainError(f"{bad_run} consecutive steps had a non-finite loss or gradient (step {step}); "
                                 f"training stopped. Lower --lr (now {t.lr}), check the data, or resume from "
                                 f"the last checkpoint in {run_dir} with --resume={run_dir}")
        opt.zero_grad(set_to_none=True)
        step += 1
        if finite:
            loss_sum += loss_acc
        if bar is not None:
            bar.update(1)

        if step % t.log_every == 0 or step == t.max_steps:
            if d.enabled:
                dist.all_reduce(loss_sum)
                loss_sum /= d.world
            n = max(1, step - last_log)
            mean_loss = loss_sum.item() / n
            dt = time.time() - t_log
            ips = items_per_step * n / max(dt, 1e-9)
            losses.append((step, mean_loss))
            if d.main:
                peak = (torch.cuda.max_memory_allocated(d.device) / 2 ** 30 if d.device.type == "cuda"
                        else _peak_rss_gib())
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", gnorm.item(), step)
                writer.add_scalar("train/items_per_s", ips, step)
                writer.add_scalar("train/peak_mem_gib", peak, step)
                writer.add_scalar("train/bad_steps", bad_total, step)
                bar.set_postfix_str(f"loss {mean_loss:.4f} lr {lr:.2e} {ips:.1f} img/s", refresh=False)
            loss_sum.zero_()
            last_log, t_log = step, time.time()

        if step % t.ckpt_every == 0 or step == t.max_steps:
            rng = ckpt.capture_rng({"gen": gen})
            if d.enabled:
                rngs = [None] * d.world
                dist.all_gather_object(rngs, rng)
            else:
                rngs = [rng]
            meta = {"step": step, "data": sampler.position(step), "rng": rngs, "world": d.world,
                    "bad_steps": bad_total}
            weights, ema_state = model.state_dict(), ema.state_dict()
            if par.sharded:                       # full tensors gathered on rank 0 (every rank takes part)
                weights, ema_state = par.gather(weights), par.gather(ema_state)
            if d.main:
                ckpt.save_checkpoint(run_dir, step, weights, ema_state, cfg,
                                     None if par.sharded else dict(meta, optimizer=opt.state_dict()), keep=t.keep_ckpts)
            if par.sharded:                       # each rank its shard of the optimizer state
                save_sharded_state(ckpt.sharded_state_path(run_dir, step), model, opt, meta, d)
                if d.main:
                    ckpt.prune(run_dir, t.keep_ckpts)
            del weights, ema_state
            d.barrier()
        previews = d.main or par.collective_previews
        if previews and t.sample_every > 0 and step % t.sample_every == 0 and step < t.max_steps:
            img = preview(model, ema, cfg, d.device)
            if img is not None and d.main:
                write_png(run_dir / "previews" / f"step-{step:07d}.png", img)   # RUN/samples is sample.py's
                writer.add_image("samples", img, step)
    if bar is not None:
        bar.close()
    img = preview(model, ema, cfg, d.device, final=True) if (d.main or par.collective_previews) else None
    if d.main:                                    # the final picture, from the EMA weights
        if img is not None:
            write_png(run_dir / "samples.png", img)
            writer.add_image("samples", img, step)
            log(d, f"wrote {run_dir / 'samples.png'}")
    if writer is not None:
        writer.close()
    if d.main:
        atomic_write_text(run_dir / "loss.json", json.dumps(losses) + "\n")
        if losses:
            shown = losses[:: max(1, len(losses) // 12)]
            shown += [losses[-1]] if shown[-1] != losses[-1] else []
            log(d, "loss (step:value): " + "  ".join(f"{s}:{v:.4f}" for s, v in shown))
    d.barrier()
    return run_dir


def _peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux: KiB


# ------------------------------------------------------------------------------------- main

def run(argv: list[str]) -> int:
    stage, preset, overrides = parse_args(argv)
    plan = [a for a in overrides if a.split("=")[0] == "--plan"]
    overrides = [a for a in overrides if a not in plan]
    cfg = resolve_config(stage, preset, overrides)
    if plan:                                      # the memory model: nothing is trained or written
        from heartbeat.memory import format_plan, memory_plan
        worlds = tuple(int(w) for w in (plan[-1].partition("=")[2] or "1,4,8").split(","))
        print(format_plan(memory_plan(cfg), worlds))
        return 0
    d = Dist()
    try:
        t0 = time.time()
        check_batch(cfg, d.world)                 # before any work (the VAE of a pretrain run too)
        log(d, f"config ({stage}, preset {cfg.model.preset}): " + json.dumps(cfg.to_dict(), separators=(",", ":")))
        if get_stage(stage).model == "seg":
            return _train_segmenter(cfg, d)
        if d.enabled:                             # rank 0 decides for all what is on disk: one storage for all
            check_shared_storage([cfg.train.data, cfg.train.out], d)
        prepare_data(cfg, d, log=lambda *a: log(d, *a))
        if get_stage(stage).vae_first and not cfg.train.vae and not cfg.train.resume and not cfg.train.init:
            # rank 0 decides for all, as with every look at the disk that leads to a collective
            vae_run = d.broadcast(find_run(cfg.train.out, "vae", cfg.model.preset) if d.main else None)
            if vae_run is None:
                if cfg.model.preset == "sd15":
                    raise TrainError("no VAE: pass --vae=PATH (SD1.5's VAE or a `train.sh vae` run) for preset sd15")
                log(d, f"no VAE run found in {cfg.train.out}: training the {cfg.model.preset} VAE first "
                       f"(bash train.sh vae); pass --vae=PATH to use another")
                vcfg = resolve_config("vae", cfg.model.preset, _vae_overrides(cfg, overrides))
                vae_run = train(vcfg, d)
            cfg.train.vae = str(vae_run)
        run_dir = train(cfg, d)
        log(d, f"done in {time.time() - t0:.0f} s: {run_dir}")
        return 0
    finally:
        d.close()


def _vae_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    """The model/data options of a pretrain command line that also shape its VAE."""
    keep = {"data", "out", "seed", "num_workers", "image_size", "in_channels", "vae_channels", "vae_layers",
            "latent_channels", "vae_norm_groups", "attn_backend", "force"}
    return [a for a in overrides if a[2:].partition("=")[0].replace("-", "_") in keep]


def _train_segmenter(cfg: Config, d: Dist) -> int:
    if d.world > 1:
        raise TrainError("the seg stage runs on one process; use python tools/train.py --stage=seg")
    prepare_data(cfg, d, log=print)
    run_dir, lock = open_run(cfg, d)
    try:
        atomic_write_text(run_dir / "config.json", cfg.to_json() + "\n")
        model = train_segmenter(find_split(cfg.train.data, "train"), steps=cfg.train.max_steps,
                                size=cfg.model.image_size, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                                classes=cfg.model.mask_classes, log=print)
        save_segmenter(model, run_dir / "segmenter.safetensors")
    finally:
        lock.release()
    print(f"wrote {run_dir / 'segmenter.safetensors'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_prep.h5io import DataPrepError
    from heartbeat.data import DataError
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except (ConfigError, ckpt.CheckpointError, DataError, DataPrepError, TrainError, ValueError,
            FileNotFoundError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is intact (continue with --resume=RUN)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
