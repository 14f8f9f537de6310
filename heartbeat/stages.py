"""One description per training stage, read by the training loop, the model builder, the data
and tools/sample.py; nothing else branches on a stage's name (EDM builds its loop from one
description the same way). docs/ARCHITECTURE.md §Stages has the story; this table is the rule.

    stage = get_stage("finetune")
    stage.items            -> "clips"            what one training item is
    stage.starts_from      -> ("pretrain", "finetune")   checkpoints --init may name
    stage.trains_unet      -> "temporal"         which UNet parameters learn
    stage.trains_encoders  -> ("flow",)          which conditioner parts learn
    model_stage("distill", cfg.model) -> the teacher's stage (a student's items, previews, modality)
    stage_overrides(stage, conditions) -> ["--temporal=true", "--conditions=...,flow"]
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import STAGES, ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    model: str                          # what trains: "vae" (the autoencoder), "ldm" (latent diffusion), "seg"
    items: str                          # one training item: "frames" (stage 1, vae, seg) or "clips"
    modality: str = "echo"              # "echo" or "cmr": the label names of its masks (data_prep/h5io.py)
    reads_conditions: bool = True       # the dataset reads the model's conditions (the vae stage reads none)
    init: str = ""                      # what --init names: "vae" (VAE weights), "weights" (optional: this
                                        # stage's checkpoint or SD1.5 weights), "previous" (required: a
                                        # checkpoint of `starts_from`, else the newest such run in --out),
                                        # "teacher" (required: a checkpoint of `starts_from` to distil)
    starts_from: tuple = ()             # checkpoint stages --init may name; the first is looked for in --out
    trains_unet: str = ""               # "all" | "temporal" | "" (no UNet)
    trains_encoders: tuple = ()         # conditioner parts that learn: local condition names, "adapter", "text"
    overrides: tuple = ()               # options of every preset, before the preset's defaults and the command line
    adds_conditions: tuple = ()         # conditions added to those of the checkpoint it starts from
    preset_defaults: dict = field(default_factory=dict, compare=False)  # preset -> options (short CPU runs)
    preview: str = ""                   # training previews: "reconstruction" | "frames" | "clips" | ""
    vae_first: bool = False             # no --vae/--init/--resume: the newest VAE run, else train one first
    samples: bool = False               # tools/sample.py samples its checkpoints
    distils: bool = False               # a student distilled from its --init (heartbeat/distill.py): its items,
                                        # previews and modality are those of its teacher's stage (`model_stage`)

    @property
    def video(self) -> bool:
        return self.items == "clips"


# The tiny defaults make the newcomer's `bash train.sh pretrain` (VAE + stage 1) finish in about 8
# minutes on 2 CPU cores (12.5 on a 1.7x slower pair; a third fewer steps costs stage 1 much of its
# control: BENCHMARKS.md); the sd15 ones follow the paper (batch 64 in stage 1, 16 in stage 2).
_VAE = Stage(
    "vae", "the AutoencoderKL from scratch on frames", model="vae", items="frames", reads_conditions=False,
    init="vae", preview="reconstruction",
    preset_defaults={"tiny": ("--max_steps=200", "--batch_size=8", "--lr=1e-3", "--warmup_steps=20",
                              "--ckpt_every=100", "--sample_every=100", "--ema_halflife_steps=50")})
_PRETRAIN = Stage(
    "pretrain", "stage 1: the image LDM with every condition of --conditions and condition dropout",
    model="ldm", items="frames", init="weights", starts_from=("pretrain",), trains_unet="all",
    trains_encoders=("sketch", "mask", "mv", "adapter", "text"), preview="frames", vae_first=True, samples=True,
    preset_defaults={"tiny": ("--max_steps=360", "--batch_size=16", "--lr=1e-3", "--warmup_steps=40",
                              "--ckpt_every=180", "--sample_every=180", "--ema_halflife_steps=90")})
_FINETUNE = Stage(
    "finetune", "stage 2: the inflated stage-1 UNet; temporal layers and the new flow encoder learn, on clips",
    model="ldm", items="clips", init="previous", starts_from=("pretrain", "finetune"), trains_unet="temporal",
    trains_encoders=("flow",), overrides=("--temporal=true",), adds_conditions=("flow",), preview="clips",
    samples=True,
    preset_defaults={"tiny": ("--max_steps=400", "--batch_size=4", "--lr=5e-4", "--warmup_steps=50",
                              "--ckpt_every=200", "--sample_every=200", "--ema_halflife_steps=50"),
                     "sd15": ("--batch_size=16",)})
_CMR = Stage(
    "cmr", "few-shot cardiac MRI from a stage-2 checkpoint: the whole UNet and the mask encoder learn, "
    "mask volumes are the only condition", model="ldm", items="clips", modality="cmr", init="previous",
    starts_from=("finetune", "cmr"),
    trains_unet="all", trains_encoders=("mask",),
    overrides=("--temporal=true", "--conditions=mask", "--data=data/phantom_cmr"), preview="clips", samples=True,
    preset_defaults={"tiny": ("--max_steps=300", "--batch_size=4", "--lr=3e-4", "--warmup_steps=30",
                              "--ckpt_every=150", "--sample_every=150", "--ema_halflife_steps=30")})
_DISTILL = Stage(
    "distill", "a 1-4 step student with guidance built in, distilled from a pretrain, finetune or cmr checkpoint "
    "(latent consistency distillation, heartbeat/distill.py)", model="ldm", items="frames", init="teacher",
    starts_from=("pretrain", "finetune", "cmr"), trains_unet="all", distils=True, preview="frames", samples=True,
    preset_defaults={"tiny": ("--max_steps=300", "--batch_size=4", "--lr=2e-4", "--warmup_steps=20",
                              "--ckpt_every=150", "--sample_every=150", "--ema_halflife_steps=30")})
_SEG = Stage("seg", "the segmenter of the mask-agreement metric (heartbeat/segmenter.py)", model="seg",
             items="frames")

STAGE = {s.name: s for s in (_VAE, _PRETRAIN, _FINETUNE, _CMR, _DISTILL, _SEG)}
assert tuple(STAGE) == STAGES, "heartbeat.config.STAGES and the stage table disagree"


def get_stage(name: str) -> Stage:
    if name not in STAGE:
        raise ConfigError(f"--stage={name}: choose one of {', '.join(STAGE)}")
    return STAGE[name]


def model_stage(name: str, model_cfg) -> Stage:
    """The stage whose items, previews and modality a model of stage `name` has: its own, or for a
    distilled student (`distils`) its teacher's (model_cfg.teacher_stage)."""
    stage = get_stage(name)
    if not stage.distils:
        return stage
    if model_cfg.teacher_stage not in STAGE or not STAGE[model_cfg.teacher_stage].samples:
        raise ConfigError(f"a '{name}' model needs --teacher_stage, the stage of the checkpoint it distils "
                          f"(one of {', '.join(stage.starts_from)}); got {model_cfg.teacher_stage!r}")
    return STAGE[model_cfg.teacher_stage]


def sampling_stages() -> tuple:
    return tuple(s.name for s in STAGE.values() if s.samples)


def stage_overrides(stage: Stage, conditions: tuple) -> list[str]:
    """The options every preset gets for `stage`, given the conditions of the model it starts from."""
    out = list(stage.overrides)
    if stage.adds_conditions:
        added = tuple(conditions) + tuple(c for c in stage.adds_conditions if c not in conditions)
        out.append("--conditions=" + ",".join(added))
    if stage.distils:                   # the student's scales: one joint + one per condition
        out.append(f"--guidance_inputs={1 + len(conditions)}")
    return out
