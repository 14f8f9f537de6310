"""Run folders: numbering, the one-writer lock, finding a previous stage's run, and starting a model
from the weights a stage names (--init / --vae). docs/ARCHITECTURE.md §Training.

    run_dir, lock = open_run(cfg, d)          # runs/NNN-STAGE-PRESET (or --out with --force), locked by rank 0
    init_model(model, cfg)                    # --vae / --init weights, or the newest previous-stage run
    lock.release()

A run folder has one writer at a time. Rank 0 holds `run_dir/.lock` (JSON: host, pid, start time,
the process's kernel start tick) while it trains; a second writer (a second `--resume=RUN`, or
`--force` into it) is refused with one line naming the holder. A lock left by a process that is gone
(same host: its pid no longer runs, or runs a different process) is taken over with a warning; a lock
from another host cannot be checked from here, and the message says how to remove it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config
from .stages import get_stage
from .unet import UNet
from .vae import AutoencoderKL
from .weights import WeightsError, check_fit, load_unet, load_vae

LOCK = ".lock"


class TrainError(RuntimeError):
    """A training run that cannot go on (a locked or bad run folder, a missing start, a diverged
    loss): tools/train.py prints it as `error: ...`."""


# -------------------------------------------------------------------------------- run folders

def run_number(path) -> int | None:
    """NNN of a run folder NNN-STAGE-PRESET, or None for any other name."""
    head = Path(path).name.split("-")[0]
    return int(head) if head.isdigit() else None


def find_run(out, stage: str, preset: str):
    """The newest run folder out/NNN-STAGE-PRESET that holds a checkpoint, or None."""
    out = Path(out)
    if not out.is_dir():
        return None
    runs = sorted((p for p in out.iterdir() if p.is_dir() and p.name.endswith(f"-{stage}-{preset}")
                   and run_number(p) is not None), key=run_number)
    for p in reversed(runs):
        if ckpt.list_checkpoints(p):
            return p
    return None


def _new_run_dir(out: Path, stage: str, preset: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    n = max((run_number(p) for p in out.iterdir() if p.is_dir() and run_number(p) is not None), default=-1) + 1
    while True:
        p = out / f"{n:03d}-{stage}-{preset}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            n += 1


def open_run(cfg: Config, d, resume: Path | None = None, log=print):
    """(run folder, RunLock or None): the folder of --resume, else a new runs/NNN-STAGE-PRESET inside
    --out; an --out that is itself a run folder needs --force (its old checkpoints are then deleted).
    Rank 0 takes the folder's lock before anything is written there; every rank raises the same
    TrainError when it cannot (d: rank / broadcast / barrier, as tools/train.py's Dist)."""
    out = Path(cfg.train.out)
    name, lock, err = None, None, None
    if d.main:
        try:
            if resume is not None:
                run_dir = Path(resume)
                lock = RunLock(run_dir, log).acquire()
            elif (out / "config.json").exists():
                if not cfg.train.force:
                    raise TrainError(f"--out={out} already holds {_describe_run(out)} (config.json); continue it "
                                     f"with --resume={out}, choose another --out (a parent folder such as runs), "
                                     f"or pass --force to train into it")
                run_dir = out
                lock = RunLock(run_dir, log).acquire()
                old = [step for step, _ in ckpt.list_checkpoints(out)]
                if old:     # --force: a new run here; its old checkpoints must not be taken for this run's
                    log(f"--force: deleting {len(old)} checkpoint(s) of the previous run in {out}")
                    ckpt.remove_checkpoints(out, old)
            else:
                if out.exists() and not out.is_dir():
                    raise TrainError(f"--out={out} is a file, not a folder")
                run_dir = _new_run_dir(out, cfg.train.stage, cfg.model.preset)
                lock = RunLock(run_dir, log).acquire()
            name = str(run_dir)
        except TrainError as e:
            err = str(e)
    name, err = d.broadcast((name, err))
    if err:
        raise TrainError(err)
    return Path(name), lock


def _describe_run(folder: Path) -> str:
    try:
        return f"a '{json.loads((folder / 'config.json').read_text())['train'].get('stage')}' run"
    except (OSError, ValueError, KeyError):
        return "a run"


def _proc_start(pid: int) -> str | None:
    """The kernel's start tick of process `pid` (Linux /proc), or None where it cannot be read: with
    the pid it identifies one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = holder.get("proc_start")
    now = _proc_start(pid)
    return start is None or now is None or start == now


class RunLock:
    """The lock of one run folder (see the module docstring). acquire() raises TrainError when another
    live process holds it; release() removes it if it is still ours."""

    def __init__(self, run_dir, log=print):
        self.path = Path(run_dir) / LOCK
        self.log = log
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held, self.me = True, me
            return self
        raise TrainError(f"{self.path.parent}: could not take the run folder's lock {self.path}")

    def _take_over_if_stale(self, me: dict) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return                                   # released meanwhile: try again
        except (OSError, ValueError):
            holder = None                            # being written right now, or damaged
        if holder is None:
            age = time.time() - self.path.stat().st_mtime
            if age < 60:
                raise TrainError(f"{self.path.parent} is being opened by another process right now (lock "
                                 f"{self.path}); try again in a minute")
            self.log(f"warning: {self.path} is unreadable and {age:.0f} s old: taking it over")
        else:
            who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if holder.get("host") != me["host"]:
                raise TrainError(f"{self.path.parent} is locked by {who} (lock {self.path}): another machine may "
                                 f"still be writing it. If that process is gone, delete {self.path}")
            if _alive(holder):
                raise TrainError(f"{self.path.parent} is being written by another process: {who} (lock "
                                 f"{self.path}); wait for it to end or stop it; two writers would mix their "
                                 f"checkpoints")
            self.log(f"warning: taking over the lock of {self.path.parent}: its holder ({who}) is gone")
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------------- starting weights

def heartbeat_weights(path) -> Path | None:
    """The HeartBeat checkpoint at `path` (a file, or a run folder's newest), or None for other weights
    (an SD1.5 single file, a diffusers folder)."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--init={path} does not exist")
    if p.is_dir():
        return ckpt.find_weights(p) if ckpt.list_checkpoints(p) else None
    return p if ckpt.is_heartbeat_checkpoint(p) else None


def init_source(cfg: Config) -> str | None:
    """What a stage that starts from a previous one starts from (--init, else the newest run of its
    first `starts_from` stage in --out); None when resuming or for other stages."""
    t, stage = cfg.train, get_stage(cfg.train.stage)
    if stage.init != "previous" or t.resume:
        return None
    if t.init:
        return t.init
    prev = stage.starts_from[0]
    run = find_run(t.out, prev, cfg.model.preset)
    if run is None:
        raise TrainError(f"stage {stage.name} starts from a '{prev}' checkpoint: pass --init=RUN_OR_FILE, or train "
                         f"one first with `bash train.sh {prev}` (none found in {t.out})")
    return str(run)


def resolve_encoder_files(cfg: Config, log=print) -> None:
    """A stage that starts from foreign weights (an SD1.5 single file or diffusers folder as --init)
    takes its CLIP text model too, unless --text_weights names one (the tokenizer is looked for beside
    it). Later stages inherit text_weights / prior_weights with the rest of the model options."""
    t, m = cfg.train, cfg.model
    if get_stage(t.stage).init == "weights" and t.init and m.text_encoder == "clip" and not m.text_weights \
            and heartbeat_weights(t.init) is None:
        m.text_weights = t.init
        log(f"text encoder: CLIP from --init={t.init} (--text_weights=PATH to use another)")


def load_vae_weights(path, cfg: Config) -> AutoencoderKL:
    """An AutoencoderKL from a HeartBeat run/checkpoint (its EMA) or an SD1.5/diffusers VAE file."""
    p = Path(path)
    if p.is_dir() and ckpt.list_checkpoints(p):          # a heartbeat run folder
        p = ckpt.find_weights(p)
    if not (p.is_file() and ckpt.is_heartbeat_checkpoint(p)):
        return load_vae(str(p), cfg.model)
    w = ckpt.read_weights(p)
    state = {k[4:]: v for k, v in w.ema_model_state().items() if k.startswith("vae.")}
    if not state:
        raise TrainError(f"--vae={path}: a '{w.stage}' checkpoint holds no VAE")
    vae = AutoencoderKL(cfg.model)
    own = vae.state_dict()
    if set(state) != set(own) or any(own[k].shape != state[k].shape for k in own):
        raise TrainError(f"--vae={path}: its VAE (preset {w.preset}) does not fit this model's VAE (preset "
                         f"{cfg.model.preset}: vae_channels={cfg.model.vae_channels}, "
                         f"latent_channels={cfg.model.latent_channels})")
    vae.load_state_dict(state)
    return vae


def load_spatial_student(model, cfg: Config, log=print) -> None:
    """--spatial=RUN (AnimateLCM's decoupled distillation): a video student starts from the spatial
    UNet weights of a distilled image student (stage distill of a pretrain checkpoint); its guidance
    embedding's columns of the conditions both know are copied, those of the video's new conditions
    (flow) start at zero. Only the temporal layers and the guidance embedding then learn."""
    t, m = cfg.train, cfg.model
    w_path = ckpt.find_weights(t.spatial)
    w = ckpt.read_weights(w_path)
    ckpt.check_compatible(w.meta, t.stage, m.preset, what=f"--spatial={t.spatial}", path=w_path)
    s = w.config.model
    if not m.temporal or s.temporal or tuple(m.conditions[:len(s.conditions)]) != tuple(s.conditions):
        raise TrainError(f"--spatial={t.spatial}: needs a student of a stage-1 (pretrain) teacher whose conditions "
                         f"({','.join(s.conditions)}) begin those of this video teacher ({','.join(m.conditions)})")
    state = {k[5:]: v for k, v in w.ema_model_state().items() if k.startswith("unet.") and not UNet.is_temporal_name(k)}
    own = model.unet.state_dict()
    c0 = m.unet_channels[0]
    with torch.no_grad():
        for k, v in state.items():
            if k == "guidance_embed.0.weight":
                own[k].zero_()
                own[k][:, :v.shape[1]].copy_(v)                  # joint + the shared conditions' columns
            elif k not in own or own[k].shape != v.shape:
                raise TrainError(f"--spatial={t.spatial}: its UNet does not fit this model at {k}")
            else:
                own[k].copy_(v)
    assert own["guidance_embed.0.weight"].shape[1] == m.guidance_inputs * c0
    log(f"spatial weights: {w_path} (a student of a '{s.teacher_stage}' checkpoint); temporal layers learn")


def load_student(model, cfg: Config, teacher_stage: str, log=print) -> None:
    """--student=RUN: the student starts from all the UNet weights (EMA) of RUN, a student of a teacher of
    the same stage and model (say a --spatial run, for a joint phase after AnimateLCM's decoupled one:
    heartbeat/distill.py). The teacher and the frozen conditioner stay --init's."""
    t = cfg.train
    w_path = ckpt.find_weights(t.student)
    w = ckpt.read_weights(w_path)
    ckpt.check_compatible(w.meta, t.stage, cfg.model.preset, what=f"--student={t.student}", path=w_path)
    if w.config.model.teacher_stage != teacher_stage:
        raise TrainError(f"--student={t.student}: a student of a '{w.config.model.teacher_stage}' checkpoint, but "
                         f"--init={t.init} is a '{teacher_stage}' checkpoint; pass a student of a '{teacher_stage}' "
                         f"checkpoint, or start from the teacher (no --student)")
    state = {k[5:]: v for k, v in w.ema_model_state().items() if k.startswith("unet.")}
    check_fit(model.unet, state, "HeartBeat UNet", what=f"--student={w_path}")
    model.unet.load_state_dict(state)
    log(f"student weights: {w_path} (step {w.meta.get('step')}); all UNet weights learn")


def init_model(model, cfg: Config, log=print) -> None:
    """Load the weights the stage starts from (its `init`), before training."""
    t, stage = cfg.train, get_stage(cfg.train.stage)
    for name in ("spatial", "student"):
        if getattr(t, name) and not stage.distils:
            raise TrainError(f"--{name}={getattr(t, name)} only applies to a distillation (bash train.sh distill), "
                             f"not to --stage={stage.name}")
    if stage.init == "vae":
        if t.init:
            model.vae.load_state_dict(load_vae_weights(t.init, cfg).state_dict())
            log(f"VAE initialised from {t.init}")
        return
    if stage.init == "weights":
        if t.vae:
            model.vae.load_state_dict(load_vae_weights(t.vae, cfg).state_dict())
            log(f"VAE: {t.vae}")
        elif not t.init and not t.resume:
            log("warning: no --vae given: the VAE is randomly initialised (latents are meaningless)")
        if t.init:
            w_path = heartbeat_weights(t.init)
            if w_path is not None:
                w = ckpt.read_weights(w_path)
                ckpt.check_compatible(w.meta, stage.starts_from, cfg.model.preset, what=f"--init={t.init}",
                                      path=w_path)
                model.load_model_state(w.ema_model_state(), what=f"--init={w_path}")
            else:     # SD1.5 (single file or diffusers folder): its UNet, and its VAE unless --vae names one
                model.unet.load_state_dict(load_unet(t.init, cfg.model).state_dict())
                if not t.vae:
                    try:
                        model.vae.load_state_dict(load_vae(t.init, cfg.model).state_dict())
                        log(f"VAE: from {t.init}")
                    except WeightsError as e:
                        log(f"warning: --init={t.init} holds no usable VAE ({e}); pass --vae=PATH")
            log(f"initialised from {t.init}")
        return
    if stage.init == "teacher":                # distill: the teacher always, the student from it unless resuming
        w_path = ckpt.find_weights(t.init)
        w = ckpt.read_weights(w_path)
        ckpt.check_compatible(w.meta, stage.starts_from, cfg.model.preset, what=f"--init={t.init}", path=w_path)
        state = w.ema_model_state()
        model.load_teacher({k[5:]: v for k, v in state.items() if k.startswith("unet.")}, what=f"--init={w_path}")
        if not t.resume:
            model.load_model_state(state, what=f"--init={w_path}", allow_missing=UNet.is_guidance_name)
            if t.spatial:
                load_spatial_student(model, cfg, log)
            elif t.student:
                load_student(model, cfg, w.stage, log)
        log(f"teacher: {w_path} ({w.stage}, step {w.meta.get('step')})")
        return
    src = init_source(cfg)
    if not src:
        return
    w_path = ckpt.find_weights(src)
    w = ckpt.read_weights(w_path)
    ckpt.check_compatible(w.meta, stage.starts_from, cfg.model.preset, what=f"--init={src}", path=w_path)
    before = w.config.model
    fresh = cfg.model.temporal and not before.temporal        # an image model inflated: temporal layers are new
    model.load_model_state(w.ema_model_state(), what=f"--init={w_path}",
                           allow_missing=UNet.is_temporal_name if fresh else None)
    for name in set(cfg.model.conditions) - set(before.conditions) - {"text", "image"}:
        # An encoder new in this stage (stage 2's flow) starts at zero output, so the stage begins exactly
        # at the model it starts from; it still trains, because conv_in's local channels learned before.
        last = [mod for mod in model.conditioner.local[name].modules() if isinstance(mod, torch.nn.Conv2d)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    log(f"initialised from {w_path} ({w.stage}, step {w.meta.get('step')})")
