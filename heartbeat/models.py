"""The training modules of each stage, built from a config, and loading a checkpoint for sampling.

    model = build_model(cfg)              # fresh, frozen as cfg.train.stage says (call under torch.manual_seed)
    loss, logs = model.loss(batch)        # one training step's objective on a data batch
    cfg, parts, ema = load_for_sampling("runs/003-pretrain-tiny")   # unet, conditioner, vae, ... in eval mode

Models (heartbeat/stages.py's `model` field picks one):
    vae    VAEModel: the AutoencoderKL alone, its from-scratch objective (heartbeat.vae.vae_loss).
    ldm    LatentDiffusion: vae (frozen), conditioner (text encoder, frozen image prior, global adapter,
           local encoders), unet.
    ldm with the stage's `distils`: DistillModel, a LatentDiffusion whose unet is a student (cfg.model.guidance_inputs > 0) that
           learns from `teacher`, a frozen UNet kept out of the state dict (heartbeat/distill.py); a
           student checkpoint is then an ordinary one, sampled as a LatentDiffusion. Its state dict is what checkpoints hold, so a checkpoint is
           self-contained; the text encoder and image prior live inside the conditioner
           (`conditioner.text_encoder.*`, `conditioner.image_prior.*`, the latter sharing the VAE encoder).
Each has `loss(batch) -> (loss, logs)` (wrapped by `LossModule` so DDP sees one forward),
`trainable_parameters()` and `load_model_state(state)`. The constructors do no I/O: build_model
reads the encoders' files (heartbeat/weights.py) and passes the built modules in.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import CheckpointError, find_weights, read_weights
from .conditions import Conditioner, condition_inputs
from .config import Config
from .diffusion import Schedule, training_loss
from .distill import draw_guidance, lcd_loss, needed_sets, teacher_sets
from .stages import get_stage
from .unet import UNet
from .vae import AutoencoderKL, as_channels, vae_loss
from .weights import WeightsError, build_image_prior, build_text_encoder, check_fit


def per_sample_generators(seeds) -> list:
    """One CPU generator per example, seeded by its data position: an example's noise, timestep and
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

    def load_model_state(self, state: dict, what: str = "checkpoint", allow_missing=None) -> None:
        """Strict load (every key, no extra key, equal shapes) with one clear WeightsError otherwise;
        allow_missing: a predicate on names that may be absent (they keep their current values)."""
        check_fit(self, state, "HeartBeat checkpoint", allow_missing=allow_missing, what=what)
        self.load_state_dict(state, strict=False)

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
        self.cfg = cfg
        self.vae = AutoencoderKL(cfg.model)

    def describe(self):
        return f"VAE of preset {self.cfg.model.preset}"

    def loss(self, batch):
        x = as_channels(batch["image"], self.vae.in_channels)    # grey frames into SD's RGB VAE
        # one generator for the posterior samples: seeded by the batch's first data position
        g = torch.Generator(device=x.device).manual_seed(int(batch["seed"][0]))
        return vae_loss(self.vae, x, generator=g)


class LatentDiffusion(TrainModel):
    """Stages pretrain / finetune / cmr: frozen VAE, conditioner (text encoder, frozen image prior,
    adapter, local encoders), UNet. All condition encoders exist in every stage (one checkpoint
    layout); cfg.model.conditions says which are used."""

    def __init__(self, cfg: Config, vae: AutoencoderKL, text_encoder, image_prior):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.vae = vae
        self.conditioner = Conditioner(m, text_encoder, image_prior)
        self.unet = UNet(m)
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

    def freeze_for_stage(self, stage) -> None:
        """What `stage` trains (its trains_unet and trains_encoders) learns; the VAE, the image prior
        and everything else stay frozen, and so do the encoders of conditions outside
        cfg.model.conditions (and the UNet's image branch and the adapter without `image`)."""
        params = {"all": lambda: list(self.unet.parameters()),
                  "temporal": lambda: list(self.unet.temporal_parameters())}[stage.trains_unet]()
        params += self.conditioner.parameters_of(stage.trains_encoders)
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
        return condition_inputs(batch, self.cfg.model.conditions)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (N, C, H, W) or clips (B, F, C, H, W) in [-1, 1] -> scaled latent means."""
        return self.encode_with_prior(x)[0]

    @torch.no_grad()
    def encode_with_prior(self, x: torch.Tensor, prior: bool = False):
        """(encode(x), image_prior tokens of the same frames or None), the VAE encoder run once when the
        prior shares it (what the encoder cache stores per frame)."""
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
        """The denoising loss of a data batch (frames or clips), with per-sample condition dropout."""
        m = self.cfg.model
        if batch.get("latent") is not None:          # the encoder cache
            z0 = batch["latent"]
        else:
            z0 = self.encode(batch["video"] if "video" in batch else batch["image"])
        B = z0.shape[0]
        gens = per_sample_generators(batch["seed"])
        keeps = [self.conditioner.sample_keep(1, g) for g in gens]
        keep = {k: torch.cat([kk[k] for kk in keeps]).to(z0.device) for k in keeps[0]}
        ctx = self.conditioner(self.condition_batch(batch), keep, batch_size=B)
        loss, info = training_loss(lambda z, t: self.unet(z, t, **ctx), z0.float(), self.schedule,
                                   prediction=m.prediction, generator=gens,
                                   min_snr_gamma=self.cfg.train.min_snr_gamma)
        return loss, {"mse": info["mse"].mean()}


class DistillModel(LatentDiffusion):
    """Stage distill: this model's unet is the student, `teacher` the frozen UNet of the checkpoint it
    distils (loaded by heartbeat.runs.init_model, not saved); the conditioner and VAE are the
    teacher's and stay frozen, so a dropped condition is what it was in the teacher's training."""

    def __init__(self, cfg: Config, vae, text_encoder, image_prior):
        super().__init__(cfg, vae, text_encoder, image_prior)
        self.teacher = UNet(dataclasses.replace(cfg.model, guidance_inputs=0)).requires_grad_(False)

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for k in [k for k in sd if k.startswith(prefix + "teacher.")]:
            del sd[k]
        return sd

    def load_teacher(self, unet_state: dict, what: str) -> None:
        check_fit(self.teacher, unet_state, "HeartBeat UNet", what=what)
        self.teacher.load_state_dict(unet_state)

    def freeze_for_stage(self, stage) -> None:
        super().freeze_for_stage(stage)
        if self.cfg.train.spatial:        # AnimateLCM: a distilled image student's spatial weights are kept
            self.set_trainable(self.unet.temporal_parameters()
                               + [p for n, p in self.unet.named_parameters() if UNet.is_guidance_name(n)])
        self.teacher.requires_grad_(False)

    def loss(self, batch):
        """heartbeat/distill.py's LCD loss: per example its kept conditions, scales, timestep, noise."""
        m = self.cfg.model
        z0 = batch["latent"] if batch.get("latent") is not None else \
            self.encode(batch["video"] if "video" in batch else batch["image"])
        z0 = z0.float()
        B = z0.shape[0]
        gens = per_sample_generators(batch["seed"])
        keeps = [self.conditioner.sample_keep(1, g) for g in gens]
        keep = {k: torch.cat([kk[k] for kk in keeps]).to(z0.device) for k in keeps[0]}
        g = draw_guidance(keep, m.conditions, m.guidance_max, gens).to(z0.device)
        sets = teacher_sets(m.conditions)
        K = len(sets)
        with torch.no_grad():                     # the teacher's encoders, once per example: row k*B + b
            ctx = self.conditioner.for_sets(self.condition_batch(batch), keep, sets, batch_size=B)
        own = {k: (None if v is None else v[B:2 * B]) for k, v in ctx.items()}   # set 1: every kept condition

        idx = needed_sets(g).flatten().nonzero().squeeze(1)                      # set-major, set 0 first
        sub = {k: _rows(v, idx, K * B) for k, v in ctx.items()}

        def teacher_fn(z, t):       # only the (set, example) pairs equation (1) weighs; the rest = u
            out = self.teacher(torch.cat([z] * K)[idx], t.repeat(K)[idx], **sub)
            preds = torch.cat([out[:B]] * K)
            preds[idx] = out
            return preds.view(K, *z.shape)

        def student_fn(z, t):
            return self.unet(z, t, guidance=g, **own)

        loss, info = lcd_loss(student_fn, teacher_fn, z0, self.schedule, g, gens, prediction=m.prediction,
                              skip=m.lcm_skip, loss=self.cfg.train.lcd_loss)
        return loss, {"mse": info["mse"].mean()}


def _rows(value, idx: torch.Tensor, n: int):
    """Rows idx of a context whose dim 0 holds n items, each m >= 1 consecutive rows (frames)."""
    if value is None:
        return None
    m = value.shape[0] // n
    return value.unflatten(0, (n, m))[idx].flatten(0, 1)


def build_model(cfg: Config, sampling: bool = False) -> TrainModel:
    """The training module of cfg.train.stage, freshly initialised and frozen as the stage says (call
    under torch.manual_seed); sampling=True builds a distilled student without its teacher. The frozen encoders' files named in the config are read here (the CLIP
    tokenizer lives only there); a checkpoint's own weights are loaded over them afterwards."""
    stage = get_stage(cfg.train.stage)
    if stage.model == "vae":
        return VAEModel(cfg)
    if stage.model != "ldm":
        raise ValueError(f"stage {stage.name} trains no diffusion model")
    m = cfg.model
    for field in ("text_weights", "prior_weights"):
        path = getattr(m, field)
        if path and not Path(path).exists():
            raise WeightsError(f"--{field}={path} (recorded in this run's config) does not exist; "
                               f"put the file back there or pass --{field}=PATH")
    vae = AutoencoderKL(m)                     # the construction order fixes the initial weights of a seed
    text_encoder = build_text_encoder(m, m.text_weights or None)
    image_prior = build_image_prior(m, vae=vae, path=m.prior_weights or None)
    cls = DistillModel if stage.distils and not sampling else LatentDiffusion
    model = cls(cfg, vae, text_encoder, image_prior)
    model.freeze_for_stage(stage)
    return model


def load_for_sampling(path_or_run, use_ema: bool = True, device="cpu"):
    """(cfg, parts, ema) for sampling: `parts` is a dict of the built modules (unet, conditioner, vae,
    text_encoder, image_prior; None where the stage has none) in eval mode on `device`, loaded with the
    EMA weights when use_ema (else the raw weights); `ema` is the EMA tensor dict as stored."""
    w = read_weights(find_weights(path_or_run))
    if w.config is None:
        raise CheckpointError(f"{w.path} is not a HeartBeat checkpoint (no heartbeat metadata)")
    cfg = w.config
    model = build_model(cfg, sampling=True)
    model.load_model_state(w.ema_model_state() if use_ema else w.model, what=str(w.path))
    model.to(device).eval()
    parts = {k: getattr(model, k, None) for k in ("unet", "conditioner", "vae", "text_encoder", "image_prior")}
    return cfg, parts, w.ema
