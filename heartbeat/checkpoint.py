"""Checkpoints (atomic), EMA, RNG capture: the two kinds of checkpoint of EDM / improved-diffusion.

A run folder `runs/NNN-STAGE-PRESET/` holds, per saved step N (zero-padded to 7 digits):

    ckpt-000NNNN.safetensors   weights: `model.<name>` (the whole training module's state dict, frozen
                               parts included, so the file is self-contained) and `ema.<name>` (the EMA
                               of every parameter that trains); metadata: format, stage, preset, step
                               and the resolved config as JSON. This is what tools/sample.py loads.
    state-000NNNN.pt           resume state: optimizer, step, data position, every RNG state
                               (torch CPU/CUDA, numpy, python, and each rank's named generators).
                               Tensors and plain containers only: loaded with weights_only=True.
                               (States written before the GradScaler was dropped also hold a
                               `scaler` entry, always disabled; it is ignored.)

Both are written atomically (temporary file in the same folder, fsync, os.replace, fsync of the
folder), weights first, so a kill at any moment leaves the previous pair intact; a resume looks
for the newest step that has both files. The last `keep` pairs are kept.

    w = read_weights(path)                  # Weights(model=..., ema=..., meta=..., config=Config)
    check_compatible(w.meta, stage="finetune", preset="tiny", what="--resume")  # CheckpointError
    save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), cfg, resume_state)

Run folders themselves (numbering, the writer's lock) are heartbeat/runs.py's; building a model from
a checkpoint (load_for_sampling) is heartbeat/models.py's. This module depends on the config alone.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import Config
from .utils import atomic_write

FORMAT = "heartbeat-1"
_CKPT = re.compile(r"^ckpt-(\d+)\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: missing, corrupt, or from another stage / preset."""


# ----------------------------------------------------------------------------------- weights

def _dedupe(state: dict, prefix: str, tensors: dict, aliases: dict) -> None:
    """Copy state into tensors under prefix; a tensor that is another name's tensor (a module shared
    by two parents, e.g. the VAE encoder inside the image prior) is stored once, the other name in
    `aliases` (safetensors refuses shared storage)."""
    seen = {}
    for k, v in state.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype) \
            if v.numel() else None
        if key is not None and key in seen:
            aliases[prefix + k] = seen[key]
            continue
        tensors[prefix + k] = v.to("cpu").contiguous().clone()
        if key is not None:
            seen[key] = prefix + k


def save_weights(path, model_state: dict, ema_state: dict | None, cfg: Config, step: int,
                 extra: dict | None = None) -> None:
    """Write model (+ EMA) tensors with the resolved config, stage and preset as metadata."""
    tensors, aliases = {}, {}
    _dedupe(model_state, "model.", tensors, aliases)
    _dedupe(ema_state or {}, "ema.", tensors, aliases)
    meta = {"format": FORMAT, "stage": cfg.train.stage, "preset": cfg.model.preset, "step": str(int(step)),
            "config": cfg.to_json(), "aliases": json.dumps(aliases)}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


@dataclass
class Weights:
    model: dict
    ema: dict
    meta: dict
    config: Config | None
    path: Path

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def preset(self) -> str:
        return self.meta.get("preset", "?")

    def ema_model_state(self) -> dict:
        """The model state with every EMA'd parameter replaced by its EMA (what sampling uses)."""
        out = dict(self.model)
        out.update(self.ema)
        return out


def read_meta(path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {e}") from None


def read_weights(path) -> Weights:
    """Load a weights file written by save_weights (any safetensors file gives model = all tensors)."""
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint (truncated or corrupt?): {e}") from None
    if meta.get("format") != FORMAT:
        return Weights(model=tensors, ema={}, meta=meta, config=None, path=path)
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[name]
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    try:
        cfg = Config.from_dict(json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the config in its metadata is unreadable ({e})") from None
    return Weights(model=model, ema=ema, meta=meta, config=cfg, path=path)


def is_heartbeat_checkpoint(path) -> bool:
    try:
        return read_meta(path).get("format") == FORMAT
    except CheckpointError:
        return False


def check_compatible(meta: dict, stage, preset: str | None, what: str, path="") -> None:
    """Refuse a checkpoint from another stage (stage: a name or a tuple of accepted names) or preset."""
    stages = (stage,) if isinstance(stage, str) else tuple(stage)
    got_stage, got_preset = meta.get("stage", "?"), meta.get("preset", "?")
    where = f" ({path})" if path else ""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{what}{where} is not a HeartBeat checkpoint (no heartbeat metadata)")
    if got_stage not in stages:
        raise CheckpointError(f"{what}{where} is a '{got_stage}' checkpoint, but this needs a "
                              f"'{' or '.join(stages)}' checkpoint")
    if preset is not None and got_preset != preset:
        raise CheckpointError(f"{what}{where} was trained with preset '{got_preset}', but this run uses "
                              f"preset '{preset}'; pass --preset={got_preset} or another checkpoint")


# ----------------------------------------------------------------------------- run folders

def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, weights path) of a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        m = _CKPT.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def weights_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"ckpt-{step:07d}.safetensors"


def state_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"state-{step:07d}.pt"


def sharded_state_path(run_dir, step: int) -> Path:
    """The resume state of a sharded (FSDP) run: a torch.distributed.checkpoint folder."""
    return Path(run_dir) / f"state-{step:07d}"


def resume_state_of(run_dir, step: int) -> Path | None:
    """The resume state of a step, a state-N.pt file or a complete state-N/ folder, or None."""
    for p in (state_path(run_dir, step), sharded_state_path(run_dir, step)):
        if p.is_file() or (p.is_dir() and (p / ".metadata").is_file()):
            return p
    return None


def find_weights(path_or_run) -> Path:
    """A weights file: the file itself, or the newest ckpt-*.safetensors of a run folder."""
    p = Path(path_or_run)
    if p.is_file():
        return p
    if p.is_dir():
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise CheckpointError(f"{p} holds no checkpoint (ckpt-*.safetensors)")
        return ckpts[-1][1]
    raise CheckpointError(f"checkpoint or run folder {p} does not exist")


def find_resume(path_or_run) -> tuple[Path, Path]:
    """(weights, state) of the newest step that has both (the state a state-N.pt file or a sharded
    state-N/ folder); a file names its own step."""
    p = Path(path_or_run)
    if p.is_file():
        m = re.search(r"(\d+)\.(safetensors|pt)$", p.name)
        if not m:
            raise CheckpointError(f"--resume={p}: expected a run folder, ckpt-N.safetensors or state-N.pt")
        step, run = int(m.group(1)), p.parent
        pairs = [(step, weights_path(run, step))]
    elif p.is_dir():
        run, pairs = p, list_checkpoints(p)
    else:
        raise CheckpointError(f"--resume={p}: no such run folder or checkpoint")
    for step, w in reversed(pairs):
        state = resume_state_of(run, step)
        if w.exists() and state is not None:
            return w, state
    raise CheckpointError(f"--resume={p}: no step with both ckpt-N.safetensors and state-N.pt (or state-N/) in {run}")


def remove_checkpoints(run_dir, steps) -> None:
    """Delete the weights and resume state of the given steps (weights first: a resume never finds a
    state without its weights)."""
    for step in steps:
        for f in (weights_path(run_dir, step), state_path(run_dir, step)):
            f.unlink(missing_ok=True)
        if sharded_state_path(run_dir, step).is_dir():
            shutil.rmtree(sharded_state_path(run_dir, step))


def prune(run_dir, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint pairs (keep <= 0 keeps everything)."""
    if keep > 0:
        remove_checkpoints(run_dir, [step for step, _ in list_checkpoints(run_dir)[:-keep]])


def save_checkpoint(run_dir, step: int, model_state: dict, ema_state: dict, cfg: Config,
                    resume_state: dict | None, keep: int = 3, extra: dict | None = None) -> Path:
    """Weights then resume state (None: the caller writes a sharded one after), each atomic; then
    prune to the last `keep` pairs."""
    w = weights_path(run_dir, step)
    save_weights(w, model_state, ema_state, cfg, step, extra)
    if resume_state is not None:
        atomic_write(state_path(run_dir, step), lambda tmp: torch.save(resume_state, tmp))
        prune(run_dir, keep)
    return w


def load_state(path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"resume state {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a truncated file
        raise CheckpointError(f"resume state {path} is unreadable (truncated or corrupt?): {e}") from None


# --------------------------------------------------------------------------------------- EMA

class EMA:
    """EMA of the trainable parameters by half-life with ramp-up (EDM training_loop.py):
    halflife = min(halflife_steps, step * rampup); beta = 0.5 ** (1 / halflife); p_ema.lerp_(p, 1 - beta)."""

    def __init__(self, named_params, halflife_steps: float, rampup: float | None = 0.05):
        self.halflife, self.rampup = float(halflife_steps), rampup
        self.shadow = {n: p.detach().clone().float() for n, p in named_params}

    def beta(self, step: int) -> float:
        """Decay after `step` optimizer steps have been taken (step >= 1)."""
        h = self.halflife
        if self.rampup is not None and self.rampup > 0:
            h = min(h, step * self.rampup)
        return 0.5 ** (1.0 / max(h, 1e-8))

    @torch.no_grad()
    def update(self, named_params, step: int) -> None:
        beta = self.beta(step)
        for n, p in named_params:
            self.shadow[n].lerp_(p.detach().float(), 1.0 - beta)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        """Full tensors; into sharded shadows (DTensor, an FSDP run) each rank takes its shard."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n, s in self.shadow.items():
            v = state[n].float()
            if isinstance(s, DTensor) and not isinstance(v, DTensor):
                v = distribute_tensor(v.to(s.device), s.device_mesh, s.placements)
            s.copy_(v)


# --------------------------------------------------------------------------------------- RNG

def capture_rng(generators: dict | None = None) -> dict:
    """Every RNG state as tensors / plain containers (weights_only-loadable)."""
    st = np.random.get_state()
    py = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype(np.int64)), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "gauss": float(st[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    return out


def restore_rng(state: dict, generators: dict | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
