"""Data parallelism for the training loop: DDP, where every rank holds the whole model, or FSDP2
(`torch.distributed.fsdp.fully_shard`), where weights, gradients and optimiser state are sharded
over the ranks; and the resume state of a sharded run. docs/ARCHITECTURE.md §Training.

    par = Parallel(model, d, shard="fsdp")      # wraps model.loss_module()
    with par.sync(last_micro_step): loss, _ = par.net(batch)
    weights = par.gather(model.state_dict())     # full tensors on rank 0 ({} elsewhere)
    save_sharded_state(folder, model, opt, meta, d)  /  load_optimizer_state(state, model, opt, names)

FSDP2 units (one all-gather / reduce-scatter each): every UNet block (input_blocks[i], middle_block,
output_blocks[i]), the UNet's own remaining layers, and each condition encoder that has a trainable
weight (adapter, local encoders, a trainable text encoder); for the vae stage the VAE encoder and
decoder. Modules with nothing to train (the frozen VAE, the image prior that shares its encoder, a
frozen CLIP text encoder, stage 2's frozen local encoders) are FSDP's ignored parameters: replicated
on every rank and never communicated, so the encoder cache and the frozen encoders work unchanged.
The UNet's frozen spatial weights of stage 2 are sharded with their blocks, so only the temporal
layers carry (sharded) optimiser state. On a GPU: bf16 compute with fp32 master weights and fp32
gradient reduction (MixedPrecisionPolicy); gradient checkpointing recomputes inside a unit, which
FSDP2 supports. On the CPU (gloo): fp32.

Resume states: a DDP (or one-process) run writes `state-N.pt` (the optimizer's own state dict); an
FSDP run writes the folder `state-N/` with torch.distributed.checkpoint (each rank its shard of the
optimizer state, keyed by parameter name) and `meta.pt` (step, data position, RNG), renamed into
place once complete. Either loads into either, at any world size: sharded states are resharded by
torch.distributed.checkpoint, and a DDP state is keyed by name and distributed.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

SHARDS = ("ddp", "fsdp")
META = "meta.pt"


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def fsdp_units(model) -> tuple[list, list]:
    """(modules to shard, innermost first; modules to leave replicated) of a training module."""
    units, frozen = [], []
    unet = getattr(model, "unet", None)
    if unet is not None:
        units += list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks) + [unet]
        cond = model.conditioner
        parts = [cond.adapter] + list(cond.local.values()) + ([cond.text_encoder] if cond.text_encoder else [])
        units += [m for m in parts if _trains(m)]
        frozen += [m for m in parts if not _trains(m)] + [model.vae]
        if cond.image_prior is not None:
            frozen.append(cond.image_prior)
    else:                                                  # the vae stage
        units += [model.vae.encoder, model.vae.decoder]
    return units, frozen


class Parallel:
    """The loss module as the loop calls it, under no wrapper (one process), DDP or FSDP2."""

    def __init__(self, model, d, shard: str = "ddp"):
        if shard not in SHARDS:
            raise ValueError(f"--shard={shard}: choose one of {', '.join(SHARDS)}")
        self.model, self.d, self.shard = model, d, shard
        self.loss_module = model.loss_module()
        self.net = self.loss_module
        self.sharded = shard == "fsdp" and d.enabled      # one process has nothing to shard: plain, as ddp
        if self.sharded:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if d.device.type == "cuda" else MixedPrecisionPolicy())
            units, frozen = fsdp_units(model)
            ignored = {p for m in frozen for p in m.parameters()}
            trainable = {p for p in model.parameters() if p.requires_grad}
            if ignored & trainable:
                raise ValueError("FSDP: a trainable weight lies in a module left unsharded")
            for m in units:
                fully_shard(m, mp_policy=mp, ignored_params=ignored)
            fully_shard(self.loss_module, mp_policy=mp, ignored_params=ignored)
            plain = [n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
            if plain:
                raise ValueError(f"FSDP: trainable weights outside every shard unit: {plain[:4]}")
        elif d.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                find_unused_parameters=False)    # every trainable weight is in every step's graph (freeze_for_stage)

    @contextlib.contextmanager
    def sync(self, enabled: bool):
        """Gradients are reduced across ranks only when `enabled` (the last micro-step of a step)."""
        if self.sharded:
            self.loss_module.set_requires_gradient_sync(enabled)
            yield
        elif enabled or not self.d.enabled:
            yield
        else:
            with self.net.no_sync():
                yield

    @property
    def collective_previews(self) -> bool:
        """Sharded weights: every rank takes part in a preview's forward passes (rank 0 writes it)."""
        return self.sharded and self.d.world > 1

    def gather(self, state: dict) -> dict:
        """Full CPU tensors of a state dict on rank 0, {} elsewhere (every rank calls it: collective)."""
        out = {}
        for k, v in state.items():
            if isinstance(v, DTensor):
                v = v.full_tensor()
            if self.d.main:
                out[k] = v.detach().cpu()
        return out


def grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over plain or sharded (DTensor) gradients; the total norm as a plain tensor."""
    n = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return n.full_tensor() if isinstance(n, DTensor) else n


# ----------------------------------------------------------------------------- resume states

def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """A torch optimizer state dict keyed by parameter index -> keyed by name (the order of `names` is
    the order the parameters were given to the optimizer)."""
    return {"state": {names[int(i)]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}


def save_sharded_state(folder, model, opt, meta: dict, d) -> None:
    """Every rank writes its shard of the optimizer state to a temporary folder beside `folder`, rank 0
    adds `meta.pt`; once all are done rank 0 renames it onto `folder` (atomic: a kill leaves no state-N/)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    if d.main and tmp.exists():
        shutil.rmtree(tmp)
    d.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp))
    if d.main:
        torch.save(meta, tmp / META)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fd = os.open(folder.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    d.barrier()


def load_sharded_meta(folder) -> dict:
    return torch.load(str(Path(folder) / META), map_location="cpu", weights_only=True)


def load_optimizer_state(state, model, opt, names: list[str]) -> None:
    """Load a resume state's optimizer state (a state-N/ folder, or the dict of a state-N.pt) into
    `opt`, whatever the wrapping and world size now."""
    if isinstance(state, (str, Path)):                     # torch.distributed.checkpoint folder
        target = {"optimizer": get_optimizer_state_dict(model, opt)}
        with warnings.catch_warnings():           # one process reading a sharded state: expected here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=str(state))
        set_optimizer_state_dict(model, opt, target["optimizer"])
        return
    if not any(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]):
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(model, opt, optimizer_state_by_name(state, names),
                             options=StateDictOptions(full_state_dict=True))
