"""What tools/train.py's loop is made of: the models of each stage, their losses, the data order,
the learning-rate function, preview grids. The loop itself stays in tools/train.py.

Models (`build_model(cfg)`):
    stage vae                       AutoencoderVAE: the AutoencoderKL alone.
    pretrain / finetune / cmr       LatentDiffusion: vae (frozen), text_encoder, image_prior (frozen),
                                    conditioner (local encoders + global adapter), unet. Its state
                                    dict is what checkpoints hold, so a checkpoint is self-contained.
Each has `loss(batch, generator) -> (loss, logs)` (wrapped by `LossModule` so DDP sees a forward),
`trainable_parameters()` and `freeze_for_stage(stage)`.

Data order (`EpochSampler`): epoch e is a permutation drawn from (seed, e); rank r of W takes
rows r::W of each global batch, so the data a step sees depends only on (seed, step) -- not on the
number of workers, and not on whether the run was resumed. Each item is read under its own seed
(`SeededItems`), so random choices inside the dataset (the image-prior frame) are reproducible too.
"""
from __future__ import annotations

import contextlib
import math
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import Config


# ------------------------------------------------------------------------------ learning rate

def lr_at(step: int, lr: float, warmup: int, max_steps: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at max_steps (SGDR's half cosine)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------- data order

class EpochSampler:
    """Yields, from global step `start`, lists of (dataset index, item seed) for this rank.

    Global batch g = per-rank batch * world. Epoch e = torch.randperm(N) with seed (seed, e);
    batches are consecutive g-slices of the concatenated epochs (wrapping across epoch ends), so
    step s covers positions [s*g, (s+1)*g) of the infinite sequence. One step yields `accum`
    micro-batches in a row (the loop consumes them in that order)."""

    def __init__(self, n: int, per_rank: int, world: int, rank: int, accum: int, seed: int, start_step: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.b, self.world, self.rank, self.accum = n, per_rank, world, rank, accum
        self.seed, self.start = seed, start_step
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm_cache[epoch]

    def position(self, step: int) -> dict:
        """Where in the data a global step starts (what the resume state records)."""
        pos = step * self.accum * self.b * self.world
        return {"epoch": pos // self.n, "offset": pos % self.n, "step": step}

    def __iter__(self):
        step = self.start
        while True:
            for micro in range(self.accum):
                g0 = (step * self.accum + micro) * self.b * self.world   # first position of this micro-step
                rows = []
                for k in range(self.rank, self.b * self.world, self.world):
                    pos = g0 + k
                    epoch, off = divmod(pos, self.n)
                    rows.append((int(self._perm(epoch)[off]), self.seed * 7919 + pos))
                yield rows
            step += 1


class SeededItems(torch.utils.data.Dataset):
    """dataset[(i, s)] = dataset[i] read with torch's global RNG seeded by s (restored afterwards)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, s = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            item = dict(self.dataset[i])
        item["seed"] = s
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors; lists for strings and ints."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if torch.is_tensor(vals[0]) else list(vals)
    return out


def make_loader(dataset, sampler: EpochSampler, num_workers: int, seed: int):
    g = torch.Generator().manual_seed(seed)        # worker base seeds never touch the global RNG
    return torch.utils.data.DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        generator=g, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None)


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------ models

class TrainError(RuntimeError):
    """A training run that cannot go on (bad run folder, diverged loss): printed as `error: ...`."""


def _per_sample_generators(seeds, device) -> list:
    """One generator per example, seeded by its data position: an example's noise, timestep and
    condition dropout depend on nothing else (not the batch split across ranks, not a resume)."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


class TrainModel(nn.Module):
    """Base of the per-stage models: freezing, trainable parameters, state loading."""

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def set_trainable(self, params) -> None:
        ids = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in ids)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:   # frozen modules stay in eval mode (e.g. BatchNorm statistics of a frozen adapter)
            for mod in self.modules():
                ps = list(mod.parameters())
                if ps and not any(p.requires_grad for p in ps):
                    mod.eval()
        return self

    def load_model_state(self, state: dict, what: str = "checkpoint", allow_missing=None, ignore_unexpected=None):
        """Strict load with one clear message; allow_missing / ignore_unexpected: predicates on names."""
        own = self.state_dict()
        missing = [k for k in own if k not in state and not (allow_missing and allow_missing(k))]
        unexpected = [k for k in state if k not in own and not (ignore_unexpected and ignore_unexpected(k))]
        bad_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
        if missing or unexpected or bad_shape:
            msg = [f"{what} does not fit this model ({self.describe()})"]
            if missing:
                msg.append(f"missing: {', '.join(sorted(missing)[:6])}{' ...' if len(missing) > 6 else ''} ({len(missing)})")
            if unexpected:
                msg.append(f"unexpected: {', '.join(sorted(unexpected)[:6])}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
            if bad_shape:
                k = bad_shape[0]
                msg.append(f"shape mismatch at {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)} ({len(bad_shape)} in all)")
            raise TrainError("; ".join(msg))
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def describe(self) -> str:
        return type(self).__name__

    def loss_module(self) -> nn.Module:
        return LossModule(self)


class LossModule(nn.Module):
    """forward(batch) -> (loss, logs): the module DDP wraps, so that its hooks see one forward."""

    def __init__(self, model: TrainModel):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


class VAEModel(TrainModel):
    """Stage vae: the AutoencoderKL and its from-scratch objective (heartbeat.vae.vae_loss)."""

    def __init__(self, cfg: Config):
        super().__init__()
        from .vae import AutoencoderKL
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.model)

    def describe(self):
        return f"VAE of preset {self.cfg.model.preset}"

    def loss(self, batch):
        from .vae import as_channels, vae_loss
        x = as_channels(batch["image"], self.vae.in_channels)    # grey frames into SD's RGB VAE
        # one generator for the posterior samples: seeded by the batch's first data position
        g = torch.Generator(device=x.device).manual_seed(int(batch["seed"][0]))
        return vae_loss(self.vae, x, generator=g)


class LatentDiffusion(TrainModel):
    """Stages pretrain / finetune / cmr: frozen VAE, text encoder, frozen image prior, conditioner, UNet.

    All condition encoders exist in every stage (one checkpoint layout); cfg.conditions says which
    are used. The text encoder and image prior live inside the conditioner (state-dict names
    `conditioner.text_encoder.*`, `conditioner.image_prior.*`, the latter sharing the VAE encoder)."""

    def __init__(self, cfg: Config):
        super().__init__()
        from .conditions import Conditioner
        from .image_prior import build_image_prior
        from .text import build_text_encoder
        from .unet import UNet
        from .vae import AutoencoderKL
        m = cfg.model
        self.cfg = cfg
        self.vae = AutoencoderKL(m)
        for field in ("text_weights", "prior_weights"):
            path = getattr(m, field)
            if path and not Path(path).exists():
                raise TrainError(f"--{field}={path} (recorded in this run's config) does not exist; "
                                 f"put the file back there or pass --{field}=PATH")
        # the frozen encoders' files are read here (the tokenizer lives only there); a checkpoint's own
        # weights are loaded over them afterwards
        text_encoder = build_text_encoder(m, m.text_weights or None)
        image_prior = build_image_prior(m, vae=self.vae, path=m.prior_weights or None)
        self.conditioner = Conditioner(m, text_encoder, image_prior)
        self.unet = UNet(m)
        from .diffusion import Schedule
        self.schedule = Schedule.from_config(m)

    @property
    def text_encoder(self):
        return self.conditioner.text_encoder

    @property
    def image_prior(self):
        return self.conditioner.image_prior

    def describe(self):
        m = self.cfg.model
        return f"{self.cfg.train.stage} model of preset {m.preset}, conditions {','.join(m.conditions)}"

    def freeze_for_stage(self, stage: str) -> None:
        """pretrain: UNet + condition encoders (+ text encoder if text_trainable); finetune: temporal
        layers + flow encoder; cmr: the whole UNet + mask (and flow) encoders. VAE, prior: frozen.
        Encoders of conditions outside cfg.conditions (and the UNet's image branch without `image`) too."""
        from .unet import UNet
        if stage == "pretrain":
            params = list(self.unet.parameters())
        elif stage == "finetune":
            params = list(self.unet.temporal_parameters())
        elif stage == "cmr":
            params = list(self.unet.parameters())
        else:
            raise ValueError(f"LatentDiffusion has no stage {stage!r}")
        params += self.conditioner.trainable_parameters(stage)
        # what no step of this stage uses stays frozen, so every trainable weight is in every step's graph
        # (the conditioner runs its conditions in training even when all are dropped): DDP needs no
        # find_unused_parameters, and no optimizer state is kept for weights that never learn
        used = set(self.cfg.model.conditions)
        unused = [p for n in self.conditioner.local if n not in used for p in self.conditioner.local[n].parameters()]
        if "image" not in used:
            unused += list(self.conditioner.adapter.parameters())
            unused += [p for n, p in self.unet.named_parameters() if UNet.is_image_branch_name(n)]
        unused = {id(p) for p in unused}
        self.set_trainable([p for p in params if id(p) not in unused])

    def condition_batch(self, batch: dict) -> dict:
        """The conditioner's inputs among a data batch (only the conditions this model uses)."""
        used = set(self.cfg.model.conditions)
        out = {}
        for name in ("text", "sketch", "mask", "mv", "flow"):
            if name in used and batch.get(name) is not None:
                out[name] = batch[name]
        if "image" in used:
            for name in ("prior_tokens", "prior"):
                if batch.get(name) is not None:
                    out[name] = batch[name]
                    break
        return out

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, C, H, W) or clips (B, F, C, H, W) in [-1, 1] -> scaled latent means."""
        return self.encode_with_prior(x)[0]

    @torch.no_grad()
    def encode_with_prior(self, x: torch.Tensor, prior: bool = False):
        """(encode(x), image_prior tokens of the same frames or None), the VAE encoder run once when the
        prior shares it (what the encoder cache stores per frame)."""
        from .vae import as_channels
        lead = x.shape[:-3]
        x = as_channels(x.reshape(-1, *x.shape[-3:]), self.vae.in_channels)
        post, h = self.vae.encode_with_features(x)
        z = post.mean * self.cfg.model.latent_scale
        tokens = None
        if prior:
            ip = self.image_prior
            tokens = ip.from_vae_features(h) if ip.kind == "vae" and ip.encoder is self.vae.encoder else ip(x)
            tokens = tokens.float().reshape(*lead, *tokens.shape[1:])
        return z.reshape(*lead, *z.shape[-3:]), tokens

    def loss(self, batch):
        m = self.cfg.model
        x = batch["video"] if "video" in batch else batch["image"]
        z0 = batch["latent"] if batch.get("latent") is not None else self.encode(x)
        B = z0.shape[0]
        gens = _per_sample_generators(batch["seed"], z0.device)
        keeps = [self.conditioner.sample_keep(1, g) for g in gens]
        keep = {k: torch.cat([kk[k] for kk in keeps]).to(z0.device) for k in keeps[0]}
        ctx = self.conditioner(self.condition_batch(batch), keep, batch_size=B)
        from .diffusion import training_loss
        loss, info = training_loss(lambda z, t: self.unet(z, t, **ctx), z0.float(), self.schedule,
                                   prediction=m.prediction, generator=gens,
                                   min_snr_gamma=self.cfg.train.min_snr_gamma)
        return loss, {"mse": info["mse"].mean()}


def build_model(cfg: Config) -> TrainModel:
    """The training module of cfg.train.stage, freshly initialised (call under torch.manual_seed)."""
    if cfg.train.stage == "vae":
        return VAEModel(cfg)
    if cfg.train.stage in ("pretrain", "finetune", "cmr"):
        model = LatentDiffusion(cfg)
        model.freeze_for_stage(cfg.train.stage)
        return model
    raise ValueError(f"no model for stage {cfg.train.stage!r}")


def load_model_state(model: TrainModel, state: dict, strict: bool = True, what: str = "checkpoint") -> None:
    model.load_model_state(state, what=what)


def find_run(out, stage: str, preset: str):
    """The newest run folder out/NNN-STAGE-PRESET that holds a checkpoint, or None."""
    from .checkpoint import list_checkpoints
    out = Path(out)
    if not out.is_dir():
        return None
    runs = sorted((p for p in out.iterdir() if p.is_dir() and p.name.endswith(f"-{stage}-{preset}")
                   and p.name.split("-")[0].isdigit()), key=lambda p: int(p.name.split("-")[0]))
    for p in reversed(runs):
        if list_checkpoints(p):
            return p
    return None


PREVIOUS_STAGE = {"finetune": ("pretrain", "finetune"), "cmr": ("finetune", "cmr")}


def heartbeat_weights(path) -> Path | None:
    """The HeartBeat checkpoint at `path` (a file, or a run folder's newest), or None for other weights
    (an SD1.5 single file, a diffusers folder)."""
    from . import checkpoint as ckpt
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--init={path} does not exist")
    if p.is_dir():
        return ckpt.find_weights(p) if ckpt.list_checkpoints(p) else None
    return p if ckpt.is_heartbeat_checkpoint(p) else None


def init_source(cfg: Config) -> str | None:
    """finetune / cmr: what the stage starts from (--init, else the newest previous-stage run in --out);
    None when resuming or for other stages."""
    t = cfg.train
    if t.stage not in PREVIOUS_STAGE or t.resume:
        return None
    if t.init:
        return t.init
    prev = PREVIOUS_STAGE[t.stage][0]
    run = find_run(t.out, prev, cfg.model.preset)
    if run is None:
        raise TrainError(f"stage {t.stage} starts from a '{prev}' checkpoint: pass --init=RUN_OR_FILE, or train one "
                         f"first with `bash train.sh {prev}` (none found in {t.out})")
    return str(run)


def resolve_encoder_files(cfg: Config, log=print) -> None:
    """Stage 1 from an SD1.5 --init (single file or diffusers folder): its CLIP text model too, unless
    --text_weights names one (the tokenizer is looked for beside it). Stages 2 / cmr inherit
    text_weights / prior_weights with the rest of the model options (tools/train.py resolve_config)."""
    t, m = cfg.train, cfg.model
    if t.stage == "pretrain" and t.init and m.text_encoder == "clip" and not m.text_weights \
            and heartbeat_weights(t.init) is None:
        m.text_weights = t.init
        log(f"text encoder: CLIP from --init={t.init} (--text_weights=PATH to use another)")


def init_model(model: TrainModel, cfg: Config, log=print) -> None:
    """Load --vae / --init weights (or the newest previous-stage run in --out) before training."""
    from . import checkpoint as ckpt
    t, stage = cfg.train, cfg.train.stage
    if stage == "vae":
        if t.init:
            src = _load_vae_weights(t.init, cfg)
            model.vae.load_state_dict(src.state_dict())
            log(f"VAE initialised from {t.init}")
        return
    if stage == "pretrain":
        if t.vae:
            model.vae.load_state_dict(_load_vae_weights(t.vae, cfg).state_dict())
            log(f"VAE: {t.vae}")
        elif not t.init and not t.resume:
            log("warning: no --vae given: the VAE is randomly initialised (latents are meaningless)")
        if t.init:
            w_path = heartbeat_weights(t.init)
            if w_path is not None:
                w = ckpt.read_weights(w_path)
                ckpt.check_compatible(w.meta, "pretrain", cfg.model.preset, what=f"--init={t.init}", path=w_path)
                model.load_model_state(w.ema_model_state(), what=f"--init={w_path}")
            else:     # SD1.5 (single file or diffusers folder): its UNet, and its VAE unless --vae names one
                from .weights import WeightsError, load_unet, load_vae
                model.unet.load_state_dict(load_unet(t.init, cfg.model).state_dict())
                if not t.vae:
                    try:
                        model.vae.load_state_dict(load_vae(t.init, cfg.model).state_dict())
                        log(f"VAE: from {t.init}")
                    except WeightsError as e:
                        log(f"warning: --init={t.init} holds no usable VAE ({e}); pass --vae=PATH")
            log(f"initialised from {t.init}")
        return
    # finetune / cmr: the previous stage's checkpoint (EMA weights)
    src = init_source(cfg)
    if not src:
        return
    w_path = ckpt.find_weights(src)
    w = ckpt.read_weights(w_path)
    ckpt.check_compatible(w.meta, PREVIOUS_STAGE[stage], cfg.model.preset, what=f"--init={src}", path=w_path)
    from .unet import UNet
    fresh = w.stage == "pretrain"     # stage 1 -> 2: temporal layers and the flow encoder are new
    model.load_model_state(w.ema_model_state(), what=f"--init={w_path}",
                           allow_missing=(lambda k: UNet.is_temporal_name(k)) if fresh else None)
    if fresh and "flow" in cfg.model.conditions:
        # The flow encoder is new in stage 2. Its output conv starts at zero so stage 2 begins exactly
        # at the stage-1 model; it still trains, because conv_in's local channels learned in stage 1.
        last = [m for m in model.conditioner.local["flow"].modules() if isinstance(m, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    log(f"initialised from {w_path} ({w.stage}, step {w.meta.get('step')})")


def _load_vae_weights(path, cfg: Config):
    """An AutoencoderKL from a heartbeat VAE run/checkpoint (its EMA) or an SD1.5/diffusers VAE file."""
    from . import checkpoint as ckpt
    from .vae import AutoencoderKL
    p = Path(path)
    if p.is_dir() and ckpt.list_checkpoints(p):          # a heartbeat run folder
        p = ckpt.find_weights(p)
    if p.is_file() and ckpt.is_heartbeat_checkpoint(p):
        w = ckpt.read_weights(p)
        if w.stage not in ("vae", "pretrain", "finetune", "cmr"):
            raise TrainError(f"--vae={path}: a '{w.stage}' checkpoint holds no VAE")
        state = {k[4:]: v for k, v in w.ema_model_state().items() if k.startswith("vae.")}
        vae = AutoencoderKL(cfg.model)
        own = vae.state_dict()
        if set(state) != set(own) or any(own[k].shape != state[k].shape for k in own):
            raise TrainError(f"--vae={path}: its VAE (preset {w.preset}) does not fit this model's VAE (preset "
                             f"{cfg.model.preset}: vae_channels={cfg.model.vae_channels}, "
                             f"latent_channels={cfg.model.latent_channels})")
        vae.load_state_dict(state)
        return vae
    from .weights import load_vae
    return load_vae(str(p), cfg.model)


# -------------------------------------------------------------------------------------- data

def prepare_data(cfg: Config, d, phantoms: dict, log=print) -> None:
    """Build the phantom when --data is one of the default phantom folders and its splits are absent
    (rank 0 builds, the others wait). Any other folder must already hold train.h5 / test.h5."""
    import os
    data = Path(cfg.train.data)
    key = os.path.normpath(cfg.train.data)
    # rank 0 decides for all: another rank looking later could see the files rank 0 just built and skip
    # the barrier below, pairing its next collective with the wrong one
    todo = d.broadcast(key in phantoms and not (data / "train.h5").exists() and not (data / "test.h5").exists())
    if not todo:
        return
    spec = phantoms[key]
    if d.main:
        from data_prep.phantom import build
        size = max(64, cfg.model.image_size)
        log(f"building the phantom dataset in {data} ({spec['clips']} clips, {cfg.model.frames} frames, "
            f"{size}x{size}{', CMR' if spec['cmr'] else ''}); python -m data_prep.phantom does the same")
        build(data, clips=spec["clips"], frames=cfg.model.frames, size=size, cmr=spec["cmr"],
              workers=min(8, os.cpu_count() or 1), seed=0, progress=False)
    d.barrier()


def make_dataset(cfg: Config, split: str, cache: str | None = None):
    """FrameDataset (vae, pretrain) or ClipDataset (finetune, cmr) of cfg.train.data/<split>.h5,
    reading only the conditions the model uses (and the encoder cache `cache`, a key from ensure_cache)."""
    from .data import ClipDataset, FrameDataset, find_split
    m, stage = cfg.model, cfg.train.stage
    path = find_split(cfg.train.data, split)
    conds = (["prior"] if "image" in m.conditions else []) + [c for c in ("sketch", "mask", "mv") if c in m.conditions]
    if stage == "vae":
        ds = FrameDataset(path, size=m.image_size, conditions=())
        ds.frames_per_item = 1
    elif stage == "pretrain":
        ds = FrameDataset(path, size=m.image_size, conditions=conds, cache=cache)
        ds.frames_per_item = 1
    else:
        ds = ClipDataset(path, size=m.image_size, conditions=conds, with_flow="flow" in m.conditions, cache=cache)
        if ds.frames > m.max_frames:
            raise TrainError(f"{path}: clips of {ds.frames} frames exceed --max_frames={m.max_frames}")
        ds.frames_per_item = ds.frames
    return ds


# ------------------------------------------------------------------------------- encoder cache

def state_digest(*parts) -> str:
    """A short content hash of modules (their state dicts, names and values) and plain values."""
    import hashlib
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, nn.Module):
            for k, v in sorted(part.state_dict().items()):
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(np.ascontiguousarray(v.detach().cpu().float().numpy()).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def cache_key(model: "LatentDiffusion") -> str:
    """Identifies what the cache holds: the VAE, the image prior, the frame size and the prior's layout."""
    m = model.cfg.model
    prior = model.image_prior
    return state_digest(model.vae, prior, ("latent_scale", m.latent_scale, "size", m.image_size,
                                           "prior", prior.kind, prior.feature, prior.tokens, prior.dim))


@torch.no_grad()
def ensure_cache(model: "LatentDiffusion", cfg: Config, d, log=print, batch_frames: int = 64) -> str | None:
    """The cache key of cfg.train.data/train.h5 for this model, writing the cache first if needed (rank 0;
    the others wait). None when the cache is switched off or cannot be written (training then encodes
    every step). Stored as float32, computed as the training step would (bf16 autocast on GPU, float32 on
    CPU), one VAE encoder pass per frame when the prior shares the VAE encoder:
    `latent` (N, F, C, h, w) = latent_scale * VAE mean, `prior_tokens` (N, F, T, D) = image_prior(frame).
    Rank 0 writes it while the others wait (a large split with the MedSAM prior takes minutes)."""
    from .checkpoint import atomic_write
    from .data import ClipDataset, cache_path, cache_status, find_split, source_stamp
    if not cfg.train.cache:
        return None
    path = find_split(cfg.train.data, "train")
    key = cache_key(model)
    ds = ClipDataset(path, size=cfg.model.image_size, conditions=(), with_flow=False)
    # rank 0's view decides for all: another rank looking later could find the file rank 0 just wrote
    # and skip the broadcast below, pairing its next collective with the wrong one
    why = d.broadcast(cache_status(path, key, ds.num_clips, ds.frames) if d.main else None)
    if not why:
        log(f"encoder cache: {cache_path(path, key)}")
        return key
    ok = True
    if d.main:
        target = cache_path(path, key)
        log(f"writing the encoder cache {target} ({ds.num_clips} clips x {ds.frames} frames; was {why}); "
            f"--cache=false skips it")
        device = next(model.unet.parameters()).device
        was_training = model.training
        model.eval()
        stamp = source_stamp(path)     # before reading: a file changed meanwhile makes the cache stale
        # as the training step would compute them: bf16 autocast on GPU, float32 on CPU
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())

        def write(tmp):
            import h5py
            m, Fr, N = cfg.model, ds.frames, ds.num_clips
            with h5py.File(tmp, "w") as f:
                lat = f.create_dataset("latent", (N, Fr, m.latent_channels, m.latent_size, m.latent_size),
                                       dtype="float32", chunks=(1, Fr, m.latent_channels, m.latent_size, m.latent_size))
                tok = f.create_dataset("prior_tokens", (N, Fr, m.prior_tokens, m.prior_dim), dtype="float32",
                                       chunks=(1, Fr, m.prior_tokens, m.prior_dim))
                per = max(1, batch_frames // Fr)
                for c0 in range(0, N, per):
                    clips = range(c0, min(N, c0 + per))
                    x = torch.stack([ds[c]["video"] for c in clips]).to(device)     # (n, F, C, H, W)
                    with autocast:
                        z, tokens = model.encode_with_prior(x, prior=True)
                    lat[c0:c0 + len(clips)] = z.float().cpu().numpy()
                    tok[c0:c0 + len(clips)] = tokens.cpu().numpy()
                f.attrs.update(dict(stamp, num_clips=N, frames=Fr, key=key, source=str(path),
                                    size=m.image_size, complete=True))
        t0 = time.time()
        try:
            atomic_write(target, write)
            log(f"encoder cache written in {time.time() - t0:.0f} s")
        except OSError as e:
            ok = False
            log(f"warning: could not write the encoder cache {target} ({e}); the frozen encoders run every step")
        model.train(was_training)
    ok = d.broadcast(ok)
    return key if ok else None


# ------------------------------------------------------------------------------- preview images

# label -> RGB, for masks (0 background, 1 LV cavity / LV, 2 myocardium, 3 LA / RV)
PALETTE = torch.tensor([[0, 0, 0], [230, 60, 60], [60, 200, 90], [70, 120, 240], [240, 200, 40],
                        [200, 80, 220]], dtype=torch.uint8)


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, 3, H, W)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def mask_rgb(m: torch.Tensor) -> torch.Tensor:
    """(N, H, W) int labels -> uint8 (N, 3, H, W)."""
    return PALETTE[m.long().clamp(0, len(PALETTE) - 1).cpu()].permute(0, 3, 1, 2).contiguous()


def binary_rgb(b: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) {0, 1} -> uint8 (N, 3, H, W) white on black."""
    return (b.float().clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).cpu()


def grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """rows: list of uint8 (N, 3, H, W) with equal N, H, W -> one uint8 (3, R*(H+pad)+pad, N*(W+pad)+pad)."""
    R, (N, _, H, W) = len(rows), rows[0].shape
    out = torch.full((3, R * (H + pad) + pad, N * (W + pad) + pad), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        for n in range(N):
            y, x = pad + r * (H + pad), pad + n * (W + pad)
            out[:, y:y + H, x:x + W] = row[n].cpu()
    return out


def write_png(path, img: torch.Tensor) -> None:
    """uint8 (3, H, W) -> PNG (plain zlib + struct, no imaging library)."""
    import struct
    arr = img.permute(1, 2, 0).contiguous().numpy()
    H, W, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    from .checkpoint import atomic_write

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(png)
    atomic_write(Path(path), write)


# ---------------------------------------------------------------------------------- previews

PREVIEW_GUIDANCE = 2.0      # classifier-free guidance scale of the preview samples (1 = conditional only)


@contextlib.contextmanager
def ema_weights(model: TrainModel, ema):
    """Temporarily put the EMA weights into the trainable parameters (and eval mode)."""
    saved = {}
    named = dict(model.named_parameters())
    was_training = model.training
    with torch.no_grad():
        for n, v in (ema.shadow.items() if ema is not None else []):
            saved[n] = named[n].detach().clone()
            named[n].copy_(v)
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                named[n].copy_(v)
        model.train(was_training)


@torch.no_grad()
def sample_latents(model: "LatentDiffusion", cond: dict, shape, seeds, steps: int = 25,
                   guidance: float = PREVIEW_GUIDANCE, device="cpu") -> torch.Tensor:
    """DDIM from per-sample noise (one generator per seed) given the conditions in `cond`, with
    classifier-free guidance pred = u + w (c - u) when guidance != 1."""
    from .diffusion import sample
    m = model.cfg.model
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_T = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    B = x_T.shape[0]
    c = model.conditioner(cond, None, batch_size=B)
    u = model.conditioner(cond, {}, batch_size=B)

    def model_fn(z, t):
        pc = model.unet(z, t, **c).float()
        if guidance == 1.0:
            return pc
        pu = model.unet(z, t, **u).float()
        return pu + guidance * (pc - pu)
    return sample(model_fn, x_T, steps=steps, sampler="ddim", schedule=model.schedule, prediction=m.prediction)


@torch.no_grad()
def preview(model: TrainModel, ema, cfg: Config, device, final: bool = False):
    """A uint8 (3, H, W) grid from the test split with the EMA weights, or None without a test split.
    vae: originals over reconstructions; pretrain: mask, sketch, real frame, generated frame (one
    column per test frame); finetune / cmr: per clip the mask row, the real and the generated clip."""
    from .data import DataError
    stage = cfg.train.stage
    try:
        ds = make_dataset(cfg, "test")
    except (DataError, FileNotFoundError):
        return None
    video = stage in ("finetune", "cmr")
    n = (2 if not final else 3) if video else (8 if final else 6)
    n = min(n, len(ds))
    stride = max(1, len(ds) // n)
    offset = 0 if video else ds.frames // 2 if hasattr(ds, "frames") else 0
    idx = [min(len(ds) - 1, i * stride + (offset if stride > offset else 0)) for i in range(n)]
    items = SeededItems(ds)
    batch = to_device(collate([dict(items[(i, 10_000 + i)], seed=i) for i in idx]), device)
    with ema_weights(model, ema):
        if stage == "vae":
            from .vae import as_channels
            x = batch["image"]
            rec = model.vae.decode(model.vae.encode(as_channels(x, model.vae.in_channels)).mean)
            return grid([to_rgb(x), to_rgb(rec)])
        m = cfg.model
        steps = 50 if final else 25
        cond = model.condition_batch(batch)
        if not video:
            shape = (m.latent_channels, m.latent_size, m.latent_size)
            z = sample_latents(model, cond, shape, seeds=idx, steps=steps, device=device)
            gen = model.vae.decode(z / m.latent_scale)
            rows = []
            if "mask" in batch:
                rows.append(mask_rgb(batch["mask"]))
            if "sketch" in batch:
                rows.append(binary_rgb(batch["sketch"]))
            if "mv" in batch:
                rows.append(binary_rgb(batch["mv"]))
            rows += [to_rgb(batch["image"]), to_rgb(gen)]
            return grid(rows)
        Fr = batch["video"].shape[1]
        shape = (Fr, m.latent_channels, m.latent_size, m.latent_size)
        z = sample_latents(model, cond, shape, seeds=idx, steps=steps, device=device)
        gen = model.vae.decode(z.flatten(0, 1) / m.latent_scale).view(len(idx), Fr, -1, m.image_size, m.image_size)
        rows = []
        for b in range(len(idx)):
            if "mask" in batch:
                rows.append(mask_rgb(batch["mask"][b]))
            rows += [to_rgb(batch["video"][b]), to_rgb(gen[b])]
        return grid(rows)

