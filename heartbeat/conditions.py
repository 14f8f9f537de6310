"""Conditions -> UNet inputs: local-condition encoders, the global adapter, condition dropout.

    cond = Conditioner(cfg, text_encoder, image_prior)
    keep = cond.sample_keep(B, generator)          # training dropout: name -> bool (B,)
    ctx = cond(batch, keep)                        # dict(text=, image=, local=) -> unet(z_t, t, **ctx)

Local conditions (pixel space, 4-D frames or 5-D clips):
    sketch (B[, F], 1, H, W) {0, 1}; mask (B[, F], H, W) int labels (one-hot, mask_classes);
    mv (B[, F], 1, H, W) {0, 1}; flow (B[, F], 2, H, W) in pixels (scaled by 32 / image_size).
Each has its own `LocalEncoder` (conv widths cfg.cond_channels, SiLU, stride-2 convs down to the
latent size); the outputs are summed -> (B[, F], local_channels, h, w).
Encoders exist for all four conditions (checkpoints keep one layout across stages); only those in
cfg.conditions are ever used. A 5-D sketch is reduced to its first frame here and broadcast over
time (stage 2 uses one sketch per clip, docs/ARCHITECTURE.md §What the system does); any 4-D
condition given alongside 5-D ones is broadcast over the frames.

Global conditions: text (list[str]) through the injected text encoder; the image prior from
`prior` (B, C, H, W) in [-1, 1] through the injected frozen image prior, or precomputed
`prior_tokens` (B, prior_tokens, prior_dim) (HDF5 cache), then the GlobalAdapter.

"Absent" has one representation, used for a dropped condition and for one never given, in
training and sampling alike:
    text   the encoding of the empty prompt "" (SD convention)
    image  zero context tokens for that sample (the image branch then adds exactly zero, since its
           projections have no bias); None when no sample of the batch has an image
    local  that encoder's output zeroed for that sample; local=None when no sample has any
In training mode the encoders of conditions the batch holds run even when every sample drops them
(zeros: the same UNet input as None), so every trainable weight is in every step's graph and DDP
needs no find_unused_parameters; in eval mode a condition no sample keeps is skipped.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F

from .config import CONDITIONS, LOCAL_CONDITIONS

# The conditions contract, one mapping used by the data, the model and sampling: the batch keys that
# carry each condition, in the order they are looked for (the image prior arrives as cached encoder
# tokens or as a frame), and the dataset array each condition is read from (docs/ARCHITECTURE.md).
INPUT_KEYS = {"text": ("text",), "image": ("prior_tokens", "prior"), "sketch": ("sketch",), "mask": ("mask",),
              "mv": ("mv",), "flow": ("flow",)}
DATASET_ARRAY = {"text": "text", "image": "video", "sketch": "sketch", "mask": "mask", "mv": "mv", "flow": "flow"}
assert tuple(INPUT_KEYS) == tuple(DATASET_ARRAY) == CONDITIONS


def condition_inputs(batch: dict, names) -> dict:
    """The conditioner's inputs in `batch` for the conditions `names`: for each, the first of its
    INPUT_KEYS the batch holds (not None); conditions the batch lacks are left out (= absent)."""
    out = {}
    for name in names:
        for key in INPUT_KEYS[name]:
            if batch.get(key) is not None:
                out[key] = batch[key]
                break
    return out


def given_conditions(batch: dict) -> tuple:
    """The condition names a conditioner batch carries, in CONDITIONS order."""
    return tuple(n for n in CONDITIONS if any(batch.get(k) is not None for k in INPUT_KEYS[n]))

LOCAL_IN = {"sketch": 1, "mv": 1, "flow": 2}  # mask: cfg.mask_classes (one-hot)


def _local_in_channels(name: str, cfg) -> int:
    return cfg.mask_classes if name == "mask" else LOCAL_IN[name]


class LocalEncoder(nn.Module):
    """Conv encoder of one local condition to latent resolution.

    (N, cin, H, W) -> (N, local_channels, H / f, W / f), f = cfg.vae_factor. Widths cfg.cond_channels:
    conv3x3 cin->w0, then per extra width a stride-2 conv3x3 and a conv3x3, SiLU after each, then a
    conv3x3 to local_channels. Needs len(cond_channels) - 1 == log2(vae_factor).

    The last conv is NOT zero-initialised: the UNet's extra conv_in channels already start at zero
    (so a fresh model ignores local conditions exactly), and two zero-initialised layers in series
    never train: each one's gradient is proportional to the other's weights, so both stay exactly 0.
    """

    def __init__(self, cin: int, cfg):
        super().__init__()
        widths = tuple(cfg.cond_channels)
        downs = int(round(math.log2(cfg.vae_factor)))
        if len(widths) != downs + 1:
            raise ValueError(f"cond_channels={widths} has {len(widths)} entries; the VAE factor {cfg.vae_factor} "
                             f"needs {downs + 1} (one per resolution, {downs} stride-2 steps)")
        layers = [nn.Conv2d(cin, widths[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1), nn.SiLU()]
        layers.append(nn.Conv2d(widths[-1], cfg.local_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch: under data parallelism
    (DDP, FSDP) every process's per-channel sum, sum of squares and count are all-reduced, through
    the differentiable all_reduce so the backward is the global batch's too. One process (or eval
    mode) is exactly nn.BatchNorm1d. torch's SyncBatchNorm does the same on GPUs only; this one runs
    wherever torch.distributed does (gloo on the CPU too), with the same state-dict names."""

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        C = x.shape[1]
        dims = [0] + list(range(2, x.ndim))
        xf = x.float()
        count = torch.full((1,), x.numel() // C, dtype=torch.float32, device=x.device)
        stats = dist_nn.all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)      # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1)).to(self.running_var.dtype), m)
        shape = [1, C] + [1] * (x.ndim - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


class GlobalAdapter(nn.Module):
    """Image-prior tokens -> text-context tokens (the paper's BatchNorm -> Conv -> Linear -> LayerNorm).

    (B, prior_tokens, prior_dim) -> (B, text_tokens, context_dim):
        norm  BatchNorm1d(prior_dim) over the feature axis (statistics over batch and tokens);
        conv  Conv1d(prior_tokens, text_tokens, 1): each output token mixes the prior tokens;
        proj  Linear(prior_dim, context_dim);  ln  LayerNorm(context_dim).
    BatchNorm makes training-mode outputs depend on the batch; eval mode does not. Under data
    parallelism its statistics are the global batch's (GlobalBatchNorm1d), so N processes train the
    same model as one process with the whole batch: the paper's BatchNorm is kept, and a small
    per-GPU batch does not make it noisy.
    """

    def __init__(self, cfg):
        super().__init__()
        self.prior_tokens, self.prior_dim = cfg.prior_tokens, cfg.prior_dim
        self.norm = GlobalBatchNorm1d(cfg.prior_dim)
        self.conv = nn.Conv1d(cfg.prior_tokens, cfg.text_tokens, 1)
        self.proj = nn.Linear(cfg.prior_dim, cfg.context_dim)
        self.ln = nn.LayerNorm(cfg.context_dim)

    def forward(self, tokens):
        if tokens.ndim != 3 or tokens.shape[1:] != (self.prior_tokens, self.prior_dim):
            raise ValueError(f"prior_tokens must have shape (B, {self.prior_tokens}, {self.prior_dim}) "
                             f"(batch, prior_tokens, prior_dim); got {tuple(tokens.shape)}")
        x = self.norm(tokens.transpose(1, 2)).transpose(1, 2)  # BatchNorm over prior_dim
        x = self.conv(x)  # (B, text_tokens, prior_dim): tokens as channels
        return self.ln(self.proj(x))  # (B, text_tokens, context_dim)


class Conditioner(nn.Module):
    """Raw conditions -> dict(text=, image=, local=) for UNet.forward (docs/ARCHITECTURE.md §Conditions).

    Submodules: text_encoder (injected, may be None), image_prior (injected, frozen, may be None),
    adapter (GlobalAdapter), local (ModuleDict name -> LocalEncoder for sketch, mask, mv, flow).
    """

    def __init__(self, cfg, text_encoder=None, image_prior=None):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = text_encoder
        self.image_prior = image_prior
        if image_prior is not None:
            image_prior.requires_grad_(False)
        self.adapter = GlobalAdapter(cfg)
        self.local = nn.ModuleDict({n: LocalEncoder(_local_in_channels(n, cfg), cfg) for n in LOCAL_CONDITIONS})

    # ------------------------------------------------------------------------ dropout

    def sample_keep(self, B: int, generator: torch.Generator | None = None, device=None) -> dict:
        """Training dropout: name -> bool (B,). Each condition dropped with cfg.drop_prob, all at once
        with cfg.drop_all_prob; names outside cfg.conditions are always dropped."""
        cfg = self.cfg
        keep_all = torch.rand(B, generator=generator) >= cfg.drop_all_prob
        keep = {}
        for name in ("text", "image") + LOCAL_CONDITIONS:
            k = torch.rand(B, generator=generator) >= cfg.drop_prob  # drawn for every name: stable streams
            keep[name] = (k & keep_all & (name in cfg.conditions)).to(device)
        return keep

    def parameters_of(self, parts) -> list:
        """The parameters of the named parts (a stage's `trains_encoders`): local condition names,
        "adapter", and "text" (the text encoder, only when cfg.text_trainable)."""
        mods = []
        for part in parts:
            if part in self.local:
                mods.append(self.local[part])
            elif part == "adapter":
                mods.append(self.adapter)
            elif part == "text":
                if self.text_encoder is not None and self.cfg.text_trainable:
                    mods.append(self.text_encoder)
            else:
                raise ValueError(f"Conditioner has no part {part!r}")
        return [p for m in mods for p in m.parameters()]

    # ------------------------------------------------------------------------ forward

    def forward(self, batch: dict, keep: dict | None = None, batch_size: int | None = None) -> dict:
        """batch: any of text, prior | prior_tokens, sketch, mask, mv, flow. keep: name -> bool (B,);
        None keeps every condition of cfg.conditions that is given. batch_size: needed only when the
        batch holds no condition at all (unconditional). Returns dict(text, image, local)."""
        B = batch_size if batch_size is not None else self._batch_size(batch)
        device = self._device()
        keep = self._resolve_keep(batch, keep, B, device)
        image = self._image_context(batch, keep, B, device)
        maps = self._local_maps(batch, keep, B, device)
        return dict(text=self._text(batch, keep["text"], B, device),
                    image=None if image is None else _absent_as_zero(image, keep["image"]),
                    local=_sum_kept(maps, keep))

    def for_sets(self, batch: dict, keep: dict, sets, batch_size: int | None = None) -> dict:
        """forward() of the batch repeated over K condition sets, set-major: row k*B + b is example b
        keeping the conditions it keeps (keep: name -> bool (B,)) that are in sets[k]; what a batched
        guided call over the sets needs (heartbeat/guidance.py, heartbeat/distill.py). Each condition
        is encoded on its own and "absent" is a fixed value (the empty prompt, zero tokens, zero
        features), so every encoder runs once on the B examples, not on the K*B rows, and the sets
        only choose among the encodings. Equals forward(repeat_sets(batch, K), rows, K*B) up to float
        rounding. batch_size: as in forward()."""
        B = batch_size if batch_size is not None else self._batch_size(batch)
        K, device = len(sets), self._device()
        keep = self._resolve_keep(batch, keep, B, device)
        in_set = {n: torch.tensor([n in s for s in sets], device=device) for n in keep}
        rows = {n: (in_set[n][:, None] & keep[n][None]).flatten() for n in keep}          # (K*B,)
        enc = {n: keep[n] & bool(in_set[n].any()) for n in keep}   # what forward's encoders would see
        text = self._text(batch, keep["text"], B, device)
        if text is not None:
            empty = self._text({}, torch.zeros(1, dtype=torch.bool), 1, device)
            pick = torch.where(rows["text"], torch.arange(B, device=device).repeat(K), B)   # B: the "" row
            text = torch.cat([text, empty])[pick]
        image = self._image_context(batch, enc, B, device)
        if image is not None:
            image = _absent_as_zero(torch.cat([image] * K), rows["image"])
        maps = {n: torch.cat([f] * K) for n, f in self._local_maps(batch, enc, B, device).items()}
        return dict(text=text, image=image, local=_sum_kept(maps, rows))

    def _device(self):
        return next(self.adapter.parameters()).device

    def _batch_size(self, batch):
        for name in CONDITIONS[1:]:              # the tensor conditions (text is a list)
            for key in INPUT_KEYS[name]:
                if batch.get(key) is not None:
                    return batch[key].shape[0]
        if batch.get("text") is not None:
            return len(batch["text"])
        raise ValueError("Conditioner: the batch holds no condition; pass at least one of "
                         "text, prior, prior_tokens, sketch, mask, mv, flow, or pass batch_size=B")

    def _used(self, batch, name) -> bool:
        """Condition `name` is one of cfg.conditions and the batch holds it."""
        return name in self.cfg.conditions and any(batch.get(k) is not None for k in INPUT_KEYS[name])

    def _runs(self, batch, keep, name) -> bool:
        """Whether condition `name`'s encoder runs: when a sample keeps it, and in training whenever the
        batch holds it (dropped samples then get zeros, the same values as skipping it), so the set of
        parameters in the graph never depends on the dropout draw: DDP needs no find_unused_parameters."""
        return bool(keep[name].any()) or (self.training and self._used(batch, name))

    def _resolve_keep(self, batch, keep, B, device):
        out = {}
        for name in ("text", "image") + LOCAL_CONDITIONS:
            if not self._used(batch, name):
                k = torch.zeros(B, dtype=torch.bool, device=device)
            elif keep is None:
                k = torch.ones(B, dtype=torch.bool, device=device)
            elif name not in keep:
                k = torch.zeros(B, dtype=torch.bool, device=device)
            else:
                k = torch.as_tensor(keep[name], device=device).bool()
                if k.shape != (B,):
                    raise ValueError(f"keep[{name!r}] must have shape ({B},); got {tuple(k.shape)}")
            out[name] = k
        return out

    def _text(self, batch, keep, B, device):
        if self.text_encoder is None:
            return None
        texts = batch.get("text")
        if texts is not None and len(texts) != B:
            raise ValueError(f"text has {len(texts)} prompts but the batch size is {B}")
        prompts = [texts[b] if (texts is not None and bool(keep[b])) else "" for b in range(B)]
        ids = self.text_encoder.tokenize(prompts).to(device)
        return self.text_encoder(ids)  # (B, text_tokens, context_dim); "" = absent

    def _image_context(self, batch, keep, B, device):
        """The adapter's (B, text_tokens, context_dim) tokens of every example (absent not yet zeroed),
        or None when the image encoder does not run."""
        if not self._runs(batch, keep, "image"):
            return None
        tokens = batch.get("prior_tokens")
        if tokens is None:
            x = batch["prior"]
            if x.ndim != 4 or x.shape[0] != B:
                raise ValueError(f"prior must have shape ({B}, C, H, W) in [-1, 1]; got {tuple(x.shape)}")
            if self.image_prior is None:
                raise ValueError("batch has `prior` images but the Conditioner has no image_prior; "
                                 "pass image_prior= or precomputed `prior_tokens`")
            with torch.no_grad():
                tokens = self.image_prior(x.to(device))
        elif tokens.shape[0] != B:
            raise ValueError(f"prior_tokens must have shape ({B}, {self.cfg.prior_tokens}, {self.cfg.prior_dim}); "
                             f"got {tuple(tokens.shape)}")
        return self.adapter(tokens.to(device).float())

    def _local_maps(self, batch, keep, B, device) -> dict:
        """name -> the (B[, F], local_channels, h, w) features of each local condition whose encoder
        runs (absent not yet zeroed); a per-image map is repeated over the frames of a clip batch."""
        names = [n for n in LOCAL_CONDITIONS if self._runs(batch, keep, n)]
        inputs = {n: self._local_input(n, batch[n], B) for n in names}
        Fr = max((x.shape[1] for x in inputs.values() if x.ndim == 5), default=None)
        maps = {}
        for n, x in inputs.items():
            x = x.to(device)
            if x.ndim == 5 and n == "sketch":
                x = x[:, 0]  # stage 2: the first frame's sketch, broadcast over time below
            if x.ndim == 5:
                if x.shape[1] != Fr:
                    raise ValueError(f"{n} has {x.shape[1]} frames but another condition has {Fr}")
                f = self.local[n](x.flatten(0, 1))  # (B*F, local, h, w): frames become batch
                f = f.view(B, Fr, *f.shape[1:])
            else:
                f = self.local[n](x)  # (B, local, h, w)
                if Fr is not None:
                    f = f[:, None].expand(B, Fr, *f.shape[1:])  # one map for every frame
            maps[n] = f
        return maps

    def _local_input(self, name, x, B):
        """Validate and convert one raw local condition to float (B[, F], cin, H, W)."""
        S, cfg = self.cfg.image_size, self.cfg
        cin = _local_in_channels(name, cfg)
        if name == "mask":
            if x.ndim not in (3, 4) or x.shape[0] != B or tuple(x.shape[-2:]) != (S, S):
                raise ValueError(f"mask must have shape ({B}, {S}, {S}) or ({B}, F, {S}, {S}) integer labels; "
                                 f"got {tuple(x.shape)}")
            if x.is_floating_point():
                raise ValueError(f"mask must hold integer labels 0..{cfg.mask_classes - 1}; got dtype {x.dtype}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= cfg.mask_classes):
                raise ValueError(f"mask labels must lie in 0..{cfg.mask_classes - 1} (mask_classes); "
                                 f"got {int(x.min())}..{int(x.max())}")
            oh = F.one_hot(x.long(), cfg.mask_classes).float()  # (..., H, W, classes)
            return oh.movedim(-1, -3)  # (B[, F], classes, H, W)
        if x.ndim not in (4, 5) or x.shape[0] != B or x.shape[-3] != cin or tuple(x.shape[-2:]) != (S, S):
            raise ValueError(f"{name} must have shape ({B}, {cin}, {S}, {S}) or ({B}, F, {cin}, {S}, {S}); "
                             f"got {tuple(x.shape)}")
        x = x.float()
        return x * (32.0 / S) if name == "flow" else x  # flow: 1/32 of the image width -> 1.0


def _absent_as_zero(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (N, ...) with the rows keep (N,) drops set to zero (the absent representation)."""
    return torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros_like(x))


def _sum_kept(maps: dict, keep: dict):
    """The local conditions' features summed over the kept ones (dropped = zero), or None."""
    total = None
    for n, f in maps.items():
        f = _absent_as_zero(f, keep[n])
        total = f if total is None else total + f
    return total  # (B[, F], local_channels, h, w)
