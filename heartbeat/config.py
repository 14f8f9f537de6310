"""Configs as dataclasses, named presets, and `--key=value` overrides.

A run is described by one `Config` = `ModelConfig` + `TrainConfig`. A preset fills both; command-line
overrides (`--key=value`) address fields of either by name (names are unique across the two).

    cfg = get_config("tiny", ["--lr=3e-4", "--attn_backend=sdpa"])
    print(cfg.to_json())

Presets (docs/ARCHITECTURE.md §Public API):
    tiny  64x64 frames, small VAE (factor 4) and UNet; CPU tests and the default newcomer run.
    small 128x128; a GPU demo that trains in minutes.
    sd15  256x256, the paper's model: SD1.5's VAE (factor 8) and UNet, CLIP ViT-L/14 text width 768.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field

CONDITIONS = ("text", "image", "sketch", "mask", "mv", "flow")  # every condition name, in order
LOCAL_CONDITIONS = ("sketch", "mask", "mv", "flow")
GLOBAL_CONDITIONS = ("text", "image")
STAGES = ("vae", "pretrain", "finetune", "cmr", "distill", "seg")
ATTN_BACKENDS = ("auto", "triton", "xformers", "sdpa", "math")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    image_size: int = 64            # pixel frames are image_size x image_size
    in_channels: int = 1            # image channels into the VAE: 1 (grey, from scratch) or 3 (SD)
    frames: int = 16                # frames per clip (stage 2)

    # VAE (AutoencoderKL); downsampling factor = 2 ** (len(vae_channels) - 1)
    vae_channels: tuple = (32, 64, 128)
    vae_layers: int = 2             # res blocks per level
    latent_channels: int = 4
    latent_scale: float = 0.18215   # z = scale * vae.encode(x).mean (SD1.5's value for sd15)
    vae_norm_groups: int = 32

    # UNet (SD1.5 structure: input_blocks / middle_block / output_blocks)
    unet_channels: tuple = (64, 128, 128)
    unet_layers: int = 2            # res blocks per level
    attn_levels: tuple = (False, True, True)  # which levels carry transformer blocks
    heads: int = 4                  # attention heads (SD1.5: 8 heads -> head dims 40/80/160)
    transformer_depth: int = 1
    norm_groups: int = 32
    context_dim: int = 128          # width of the cross-attention context (text tokens)
    share_image_q: bool = False     # the image-prior branch reuses the text branch's queries
    temporal: bool = False          # True after inflate(): temporal attention in every transformer
    max_frames: int = 64            # frame-position embedding size of the temporal layers

    # text encoder: "clip" (CLIP ViT-L/14 text transformer, BPE) or "byte" (byte-level, small)
    text_encoder: str = "byte"
    text_tokens: int = 77
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_trainable: bool = True     # the small byte-level encoder trains with the model
    text_weights: str = ""          # clip: CLIP text weights and/or tokenizer (SD1.5 single file with tokenizer/
                                    # beside it, diffusers or HF folder, OpenAI CLIP file, or a tokenizer folder)

    # image prior: "vae" (our frozen VAE encoder, offline default) or "medsam" (SAM ViT-B)
    prior: str = "vae"
    prior_tokens: int = 16          # tokens after pooling, before the global adapter
    prior_dim: int = 128            # channels of the prior features: VAE prior vae_channels[-1] (its last
                                    # hidden map) or latent_channels (its latent mean); MedSAM 256
    prior_weights: str = ""         # medsam: the SAM / MedSAM ViT-B checkpoint (.pth)

    # local conditions
    mask_classes: int = 4           # label values 0..mask_classes-1, one-hot in the encoder
    cond_channels: tuple = (16, 32, 64)  # hidden widths of each local-condition encoder
    local_channels: int = 4         # channels the fused local features add to conv_in
    conditions: tuple = ("text", "image", "sketch", "mask", "mv")  # those the model is trained with

    # condition dropout (training), see heartbeat/conditions.py
    drop_prob: float = 0.1          # each condition independently
    drop_all_prob: float = 0.1      # all conditions at once (unconditional)

    # diffusion
    prediction: str = "eps"         # eps | v | x0
    schedule: str = "scaled_linear"
    timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = False

    # a distilled few-step student (heartbeat/distill.py); guidance_inputs = 0: an ordinary model
    guidance_inputs: int = 0        # scales the student's UNet takes: 1 joint + one per condition of `conditions`
    guidance_max: float = 8.0       # the student learned scales in [0, guidance_max]
    student_steps: int = 4          # the most sampling steps the student was trained for
    lcm_skip: int = 0               # LCD skipping interval k in timesteps (0: timesteps // 50, LCM's N = 50)
    teacher_stage: str = ""         # the stage of the checkpoint a student was distilled from

    # execution
    attn_backend: str = "auto"      # auto | triton | xformers | sdpa | math (env HEARTBEAT_ATTN_BACKEND wins)
    grad_checkpointing: bool = False

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae_factor


@dataclass
class TrainConfig:
    stage: str = "pretrain"
    data: str = "data/phantom"      # folder of <split>.h5 files
    out: str = "runs"               # runs/<NNN>-<stage>-<preset> is created inside
    resume: str = ""                # a run folder (or checkpoint) to continue exactly
    init: str = ""                  # weights to start from: previous stage / SD1.5 / CLIP / MedSAM
    vae: str = ""                   # a trained VAE checkpoint (stages after `vae`)
    max_steps: int = 2000
    batch_size: int = 16            # global batch = per-rank batch x grad_accum x world size
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_halflife_steps: float = 500.0
    ema_rampup: float = 0.05
    min_snr_gamma: float = 0.0      # 0 = plain MSE
    seed: int = 0
    num_workers: int = 2
    ckpt_every: int = 500
    keep_ckpts: int = 3
    log_every: int = 10
    sample_every: int = 500
    max_bad_steps: int = 20         # consecutive non-finite steps before training stops
    cache: bool = True              # latent + prior-token cache beside the split file (frozen encoders run
                                    # once per frame, not every step); false: encode every step
    shard: str = "ddp"              # ddp: every rank holds the model; fsdp: FSDP2 shards weights, gradients and
                                    # optimiser state over the ranks (heartbeat/sharding.py)
    spatial: str = ""               # distill of a video teacher, AnimateLCM's decoupled way: the spatial UNet weights
                                    # of this distilled stage-1 student are kept, the temporal layers (and the
                                    # guidance embedding) learn
    student: str = ""               # distill: the student starts from this student (a distillation of a teacher of
                                    # the same stage and model, e.g. a --spatial run), all its UNet weights learning
    compile: bool = False           # the UNet's forward through torch.compile (nn.Module.compile: names kept)
    lcd_loss: str = "l2"            # distill: l2 (LCM) or huber (iCT's pseudo-Huber, heartbeat/distill.py (4))
    force: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "Config":
        return Config(model=_from_dict(ModelConfig, d.get("model", {})),
                      train=_from_dict(TrainConfig, d.get("train", {})))


def _from_dict(cls, d: dict):
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if hints[f.name] is tuple and isinstance(v, list) else v
    return cls(**kw)


# ----------------------------------------------------------------------------------- presets

def _tiny() -> Config:
    return Config(ModelConfig(preset="tiny"), TrainConfig(batch_size=16, lr=2e-4, warmup_steps=100))


def _small() -> Config:
    m = ModelConfig(
        preset="small", image_size=128, vae_channels=(64, 128, 256, 256), vae_layers=2,
        unet_channels=(128, 256, 512, 512), unet_layers=2, attn_levels=(True, True, True, False),
        heads=8, context_dim=512, text_width=512, text_layers=4, text_heads=8,
        cond_channels=(16, 32, 96, 256), local_channels=4, prior_tokens=16, prior_dim=256)
    return Config(m, TrainConfig(batch_size=32, lr=1e-4))


def _sd15() -> Config:
    m = ModelConfig(
        preset="sd15", image_size=256, in_channels=3, vae_channels=(128, 256, 512, 512),
        vae_layers=2, latent_channels=4, latent_scale=0.18215,
        unet_channels=(320, 640, 1280, 1280), unet_layers=2,
        attn_levels=(True, True, True, False), heads=8, transformer_depth=1, context_dim=768,
        text_encoder="clip", text_tokens=77, text_width=768, text_layers=12, text_heads=12,
        text_trainable=False, prior="vae", prior_tokens=16, prior_dim=512, cond_channels=(16, 32, 96, 256),
        local_channels=4)
    return Config(m, TrainConfig(batch_size=64, lr=1e-4, warmup_steps=500))


PRESETS = {"tiny": _tiny, "small": _small, "sd15": _sd15}


# --------------------------------------------------------------------------------- overrides

class ConfigError(ValueError):
    """A user mistake in the configuration: the message names the key and the valid choices."""


def _coerce(name: str, hint, text: str):
    try:
        if hint is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on", ""):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(float(text)) if "e" in text.lower() else int(text)
        if hint is float:
            return float(text)
        if hint is tuple:
            items = [s for s in text.replace(" ", "").split(",") if s]
            out = []
            for s in items:
                low = s.lower()
                if low in ("true", "false"):
                    out.append(low == "true")
                else:
                    try:
                        out.append(int(s))
                    except ValueError:
                        try:
                            out.append(float(s))
                        except ValueError:
                            out.append(s)
            return tuple(out)
        return text
    except ValueError:
        raise ConfigError(f"--{name}={text}: expected a value of type {getattr(hint, '__name__', hint)}") from None


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)] + [f.name for f in dataclasses.fields(TrainConfig)]


def apply_overrides(cfg: Config, args: list[str]) -> Config:
    """Apply `--key=value` (or `--flag` for booleans) to cfg in place; unknown keys raise ConfigError."""
    mhints, thints = typing.get_type_hints(ModelConfig), typing.get_type_hints(TrainConfig)
    for arg in args:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key=value")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in mhints:
            target, hint = cfg.model, mhints[key]
        elif key in thints:
            target, hint = cfg.train, thints[key]
        else:
            raise ConfigError(f"unknown option --{key}. Valid options: " + ", ".join("--" + n for n in field_names()))
        if not eq and hint is not bool:
            raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        setattr(target, key, _coerce(key, hint, val))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
    if m.attn_backend not in ATTN_BACKENDS:
        raise ConfigError(f"--attn_backend={m.attn_backend}: choose one of {', '.join(ATTN_BACKENDS)}")
    if t.shard not in ("ddp", "fsdp"):
        raise ConfigError(f"--shard={t.shard}: choose one of ddp, fsdp")
    if t.lcd_loss not in ("l2", "huber"):
        raise ConfigError(f"--lcd_loss={t.lcd_loss}: choose one of l2, huber")
    if t.stage not in STAGES:
        raise ConfigError(f"--stage={t.stage}: choose one of {', '.join(STAGES)}")
    if t.spatial and t.student:
        raise ConfigError(f"--spatial={t.spatial} and --student={t.student}: choose one (--spatial starts a video "
                          f"student from an image student's spatial weights, --student from a whole student)")
    bad = [c for c in m.conditions if c not in CONDITIONS]
    if bad:
        raise ConfigError(f"--conditions: unknown condition(s) {', '.join(bad)}; valid: {', '.join(CONDITIONS)}")
    if m.prediction not in ("eps", "v", "x0"):
        raise ConfigError(f"--prediction={m.prediction}: choose one of eps, v, x0")
    if m.text_encoder not in ("clip", "byte"):
        raise ConfigError(f"--text_encoder={m.text_encoder}: choose one of clip, byte")
    if m.prior not in ("vae", "medsam"):
        raise ConfigError(f"--prior={m.prior}: choose one of vae, medsam")
    if len(m.attn_levels) != len(m.unet_channels):
        raise ConfigError(f"--attn_levels has {len(m.attn_levels)} entries but --unet_channels has {len(m.unet_channels)}")
    if m.image_size % m.vae_factor:
        raise ConfigError(f"--image_size={m.image_size} is not divisible by the VAE factor {m.vae_factor}")


def get_config(preset: str = "tiny", overrides: list[str] | None = None) -> Config:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    return apply_overrides(cfg, list(overrides or []))
