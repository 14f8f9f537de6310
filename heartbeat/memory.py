"""A per-rank memory model of a training step: weights, gradients, optimiser state (+ EMA) and
activations, with and without gradient checkpointing, under DDP and FSDP at a world size.
`python tools/train.py --stage=finetune --preset=sd15 --plan` prints it (docs/ARCHITECTURE.md §Training).

    plan = memory_plan(cfg)                  # counts + activations measured on the CPU (below)
    print(format_plan(plan, worlds=(1, 4, 8)))

Counts: every parameter is float32 (master weights); AdamW keeps two float32 moments and the EMA one
float32 copy of each trainable weight. DDP: every rank holds all of it, plus the gradient buckets
(a second float32 copy of the trainable gradients). FSDP2 (heartbeat/sharding.py): the shard units'
weights, gradients, moments and EMA are divided by the world size; the frozen encoders it ignores
stay whole; while a unit computes, its bf16 copy is unsharded (two units at once: FSDP2 prefetches
the next), and in the backward its bf16 gradient before the float32 reduce-scatter.

Activations are measured, not guessed: one training step's forward runs on the CPU under bf16
autocast (the dtypes a GPU step saves) for one sample (stage 2: one and two frames, extrapolated
linearly to the clip's frames), and every tensor autograd saves for the backward is counted once
(by storage; parameters excluded). With checkpointing, what is saved is the block inputs, and the
backward adds the largest block's own activations while it recomputes. Not counted: the CUDA
context and allocator slack (often 1-3 GB), temporary buffers inside kernels, the data loader.
Attention runs as SDPA (no attention matrix saved), as the GPU backends do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .config import Config
from .stages import model_stage

GIB = 2 ** 30


@dataclass
class Plan:
    stage: str
    preset: str
    batch: int                         # global batch (clips for clip stages)
    frames: int                        # frames per item
    params_trainable: int = 0
    params_frozen_sharded: int = 0     # frozen weights inside FSDP units (stage 2's spatial UNet)
    params_frozen_replicated: int = 0  # frozen encoders FSDP ignores (VAE, image prior, frozen text/encoders)
    unit_params_max: int = 0           # the largest FSDP unit
    unit_trainable_max: int = 0
    act_per_item: float = 0.0          # bytes saved for backward per item, no checkpointing
    act_ckpt_per_item: float = 0.0     # block inputs per item, with checkpointing
    act_block_max_per_item: float = 0.0  # the largest block's own activations per item
    notes: list = field(default_factory=list)


def _random_model(cfg: Config):
    """The stage's training module with random weights (no file is read), frozen as the stage says."""
    from .image_prior import ImagePrior, SAMImageEncoder
    from .models import build_model
    m = copy.deepcopy(cfg)
    m.model.text_weights, m.model.prior_weights = "", ""
    medsam = m.model.prior == "medsam"
    if medsam:
        m.model.prior, m.model.prior_dim = "vae", m.model.vae_channels[-1]
    m.model.attn_backend = "sdpa"
    model = build_model(m)
    if medsam:       # the SAM ViT-B architecture in place of the VAE prior, for its parameter count
        model.conditioner.image_prior = ImagePrior("medsam", cfg.model.prior_tokens, 256, sam=SAMImageEncoder())
    te = model.conditioner.text_encoder
    if te is not None and te.tokenizer is None:     # CLIP without its vocabulary files: any ids will do
        te.tokenizer = lambda texts: torch.zeros(len(texts), te.tokens, dtype=torch.long)
    return model, m


def _count(model):
    from .sharding import fsdp_units
    units, frozen = fsdp_units(model)
    ignored = {id(p) for mod in frozen for p in mod.parameters()}
    seen, trainable, sharded_frozen, replicated = set(), 0, 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        elif id(p) in ignored:
            replicated += p.numel()
        else:
            sharded_frozen += p.numel()
    own = []
    claimed = set(ignored)
    for u in units:                                        # innermost first: a unit owns what no inner unit took
        ps = [p for p in u.parameters() if id(p) not in claimed]
        claimed |= {id(p) for p in ps}
        own.append((sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)))
    return trainable, sharded_frozen, replicated, max(n for n, _ in own), max(t for _, t in own)


def _fake_batch(cfg: Config, frames: int) -> dict:
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    lead = (1, frames) if model_stage(cfg.train.stage, cfg.model).video else (1,)
    S, s = m.image_size, m.latent_size
    b = {"latent": torch.randn(*lead, m.latent_channels, s, s, generator=g), "seed": [0], "text": ["an echo"]}
    if "image" in m.conditions:
        b["prior_tokens"] = torch.randn(1, m.prior_tokens, m.prior_dim, generator=g)
    if "mask" in m.conditions:
        b["mask"] = torch.randint(0, m.mask_classes, (*lead, S, S), generator=g)
    for name in ("sketch", "mv"):
        if name in m.conditions:
            b[name] = (torch.rand(*lead, 1, S, S, generator=g) > 0.9).float()
    if "flow" in m.conditions and model_stage(cfg.train.stage, cfg.model).video:
        b["flow"] = torch.randn(*lead, 2, S, S, generator=g)
    return b


def _saved_bytes(model, batch, checkpointing: bool) -> tuple[float, dict]:
    """Bytes autograd saves in one loss forward (each storage once, parameters excluded), and the
    share of each UNet block (its own activations, without checkpointing)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total, per_block, current = set(), [0.0], {}, [None]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in params and key not in seen:
            seen.add(key)
            total[0] += st.nbytes()
            if current[0] is not None:
                per_block[current[0]] = per_block.get(current[0], 0.0) + st.nbytes()
        return t

    unet = model.unet
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    hooks = []
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i)))
        hooks.append(blk.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)))
    was = unet.cfg.grad_checkpointing
    unet.cfg.grad_checkpointing = checkpointing
    try:
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(batch)
        del loss
    finally:
        unet.cfg.grad_checkpointing = was
        for h in hooks:
            h.remove()
    return total[0], per_block


def memory_plan(cfg: Config) -> Plan:
    stage = model_stage(cfg.train.stage, cfg.model)
    if stage.model != "ldm":
        raise ValueError(f"--plan models the diffusion stages; {stage.name} trains a {stage.model}")
    torch.manual_seed(0)
    model, mcfg = _random_model(cfg)
    trainable, sharded_frozen, replicated, unit_max, unit_train_max = _count(model)
    frames = cfg.model.frames if stage.video else 1
    plan = Plan(stage.name, cfg.model.preset, cfg.train.batch_size, frames, trainable, sharded_frozen, replicated,
                unit_max, unit_train_max)
    if stage.video:
        a1, b1 = _saved_bytes(model, _fake_batch(mcfg, 1), False)
        a2, b2 = _saved_bytes(model, _fake_batch(mcfg, 2), False)
        c1, _ = _saved_bytes(model, _fake_batch(mcfg, 1), True)
        c2, _ = _saved_bytes(model, _fake_batch(mcfg, 2), True)
        lin = lambda x1, x2: x1 + (x2 - x1) * (frames - 1)          # noqa: E731
        plan.act_per_item, plan.act_ckpt_per_item = lin(a1, a2), lin(c1, c2)
        plan.act_block_max_per_item = max(lin(b1.get(k, 0.0), b2.get(k, 0.0)) for k in b2)
        plan.notes.append(f"activations measured at 1 and 2 frames, extrapolated linearly to {frames}")
    else:
        a, blocks = _saved_bytes(model, _fake_batch(mcfg, 1), False)
        c, _ = _saved_bytes(model, _fake_batch(mcfg, 1), True)
        plan.act_per_item, plan.act_ckpt_per_item, plan.act_block_max_per_item = a, c, max(blocks.values())
    return plan


def per_rank(plan: Plan, world: int, shard: str, checkpointing: bool) -> dict:
    """GiB per rank of each part, for a global batch split over `world` ranks (no accumulation)."""
    W = world
    items = max(1, plan.batch // W)
    T, Fs, Fr = plan.params_trainable, plan.params_frozen_sharded, plan.params_frozen_replicated
    if shard == "ddp" or W == 1:                                 # one process shards nothing (sharding.py)
        weights = 4 * (T + Fs + Fr)
        grads = 4 * T * (2 if W > 1 else 1)                     # + DDP's bucket copy
        states = 12 * T                                           # AdamW moments + EMA
    else:
        weights = 4 * (T + Fs) / W + 4 * Fr + 2 * 2 * plan.unit_params_max
        grads = 4 * T / W + 6 * plan.unit_trainable_max         # sharded fp32 + one unit's bf16 and fp32 grads
        states = 12 * T / W
    if checkpointing:
        act = items * (plan.act_ckpt_per_item + plan.act_block_max_per_item)
    else:
        act = items * plan.act_per_item
    out = {"weights": weights / GIB, "grads": grads / GIB, "optimizer+ema": states / GIB, "activations": act / GIB}
    out["total"] = sum(out.values())
    out["items"] = items
    return out


def format_plan(plan: Plan, worlds=(1, 4, 8)) -> str:
    lines = [f"memory per rank (GiB): stage {plan.stage}, preset {plan.preset}, global batch {plan.batch}"
             f"{f' clips x {plan.frames} frames' if plan.frames > 1 else ''}, AdamW + EMA, bf16 activations",
             f"parameters: {plan.params_trainable / 1e6:.1f}M trainable, {plan.params_frozen_sharded / 1e6:.1f}M "
             f"frozen in shard units, {plan.params_frozen_replicated / 1e6:.1f}M frozen encoders; "
             f"activations per item {plan.act_per_item / GIB:.2f} GiB (checkpointing: "
             f"{plan.act_ckpt_per_item / GIB:.2f} + largest block {plan.act_block_max_per_item / GIB:.2f})",
             "",
             "| world | shard | ckpt | items/rank | weights | grads | optim+EMA | activations | total |",
             "|---|---|---|---|---|---|---|---|---|"]
    for W in worlds:
        for shard in ("ddp", "fsdp"):
            for ck in (False, True):
                r = per_rank(plan, W, shard, ck)
                lines.append(f"| {W} | {shard} | {'yes' if ck else 'no'} | {r['items']} | {r['weights']:.2f} | "
                             f"{r['grads']:.2f} | {r['optimizer+ema']:.2f} | {r['activations']:.2f} | "
                             f"**{r['total']:.2f}** |")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("not counted: CUDA context and allocator slack (often 1-3 GiB), kernel workspaces, the data loader")
    return "\n".join(lines)
