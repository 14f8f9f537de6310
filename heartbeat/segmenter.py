"""A small UNet segmenter for the mask-agreement metric (needs no download).

Trained on the real split's frames and masks, it segments generated frames; agreement with the
conditioning masks (Dice per structure), the annulus points and the LV-area EF are read from its
output (heartbeat/metrics.py, tools/eval.py).

    model = train_segmenter("data/phantom/train.h5", steps=300, size=64, seed=0)
    save_segmenter(model, "seg.safetensors"); model = load_segmenter("seg.safetensors")
    labels = segment(model, frames)      # frames (N, H, W) uint8 -> (N, H, W) uint8 labels

Deterministic for a given (file, steps, size, seed) and thread count: seeded init and batch order,
no dropout; the global RNG state is left as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class SegUNet(nn.Module):
    """forward(x (N, 1, S, S) in [-1, 1]) -> logits (N, classes, S, S); S divisible by 2^(levels-1)."""

    def __init__(self, classes: int = 4, channels=(16, 32, 64), size: int = 64):
        super().__init__()
        self.config = dict(classes=classes, channels=list(channels), size=size)
        self.down = nn.ModuleList()
        cin = 1
        for c in channels:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList(_block(channels[i + 1] + channels[i], channels[i])
                                for i in reversed(range(len(channels) - 1)))
        self.out = nn.Conv2d(channels[0], classes, 1)

    def encode(self, x):
        """The encoder's deepest feature map (N, channels[-1], S / 2^(levels-1), ...), the feature
        space of the copy check (heartbeat/privacy.py)."""
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
        return x

    def forward(self, x):
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for blk in self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = blk(torch.cat([x, skips.pop()], 1))
        return self.out(x)


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size)."""
    if a.shape[-1] == size and a.shape[-2] == size:
        return a
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in a])


def load_frames(h5_path, size: int, max_frames: int = 4096, seed: int = 0, clips=None):
    """The annotated frames of an HDF5 split (docs/ARCHITECTURE.md §Data) -> frames, masks
    (M, size, size) uint8.
    Uses mask_valid when present; only the clip indices `clips` when given; at most max_frames
    frames, a seeded choice over clips."""
    path = Path(h5_path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter training data {path} not found: pass an HDF5 split "
                                "(e.g. data/phantom/train.h5, made by data_prep)")
    with h5py.File(path, "r") as f:
        for k in ("video", "mask"):
            if k not in f:
                raise KeyError(f"{path} has no '{k}' dataset: the segmenter needs video and mask")
        N, Fr = f["video"].shape[:2]
        valid = f["mask_valid"][()] if "mask_valid" in f else np.ones((N, Fr), bool)
        if clips is not None:
            valid = valid & np.isin(np.arange(N), np.asarray(clips, int))[:, None]
        pairs = np.argwhere(valid)
        if len(pairs) == 0:
            raise ValueError(f"{path}: no frame has mask_valid=True, nothing to train on")
        rng = np.random.default_rng(seed)
        if len(pairs) > max_frames:
            pairs = pairs[np.sort(rng.choice(len(pairs), max_frames, replace=False))]
        frames, masks = [], []
        for n in np.unique(pairs[:, 0]):
            fs = pairs[pairs[:, 0] == n, 1]
            frames.append(_resize(f["video"][n][fs], size, False))
            masks.append(_resize(f["mask"][n][fs], size, True))
    return np.concatenate(frames), np.concatenate(masks)


def train_segmenter(h5_path, steps: int = 300, size: int = 64, seed: int = 0, batch_size: int = 16,
                    lr: float = 2e-3, classes: int = 4, channels=(16, 32, 64),
                    log=None) -> SegUNet:
    """Train a SegUNet on an HDF5 split's annotated frames for `steps` Adam steps (cross-entropy),
    with seeded brightness/contrast/noise augmentation so it transfers to generated frames."""
    frames, masks = load_frames(h5_path, size, seed=seed)
    if masks.max() >= classes:
        raise ValueError(f"{h5_path}: mask label {int(masks.max())} >= classes={classes}")
    return fit_segmenter(frames, masks, steps, size, seed, batch_size, lr, classes, channels, log)


def fit_segmenter(frames: np.ndarray, masks: np.ndarray, steps: int = 300, size: int = 64, seed: int = 0,
                  batch_size: int = 16, lr: float = 2e-3, classes: int = 4, channels=(16, 32, 64),
                  log=None) -> SegUNet:
    """The training loop of train_segmenter on frames, masks (M, size, size) uint8 already loaded
    (tools/utility.py trains every arm through it)."""
    x_all = torch.from_numpy(frames).float().div(127.5).sub(1)[:, None]
    y_all = torch.from_numpy(masks).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SegUNet(classes, channels, size)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for step in range(steps):
            idx = torch.randint(len(x_all), (batch_size,), generator=g)
            x, y = x_all[idx], y_all[idx]
            gain = 1 + 0.3 * (torch.rand(batch_size, 1, 1, 1, generator=g) - 0.5)
            bias = 0.2 * (torch.rand(batch_size, 1, 1, 1, generator=g) - 0.5)
            x = (x * gain + bias + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
            lr_now = lr * 0.5 * (1 + np.cos(np.pi * step / max(1, steps)))  # cosine decay
            for group in opt.param_groups:
                group["lr"] = lr_now
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if log is not None and (step % 50 == 0 or step == steps - 1):
                log(f"segmenter step {step + 1}/{steps} loss {loss.item():.4f}")
    return model.eval()


@torch.no_grad()
def segment(model: SegUNet, frames, batch_size: int = 64) -> np.ndarray:
    """frames (N, H, W) uint8 -> (N, H, W) uint8 labels, predicted at the model's size and
    brought back to H x W (bilinear logits, then argmax)."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"segment: frames must be uint8 (N, H, W), got {frames.dtype} {frames.shape}")
    N, H, W = frames.shape
    size = model.config["size"]
    out = []
    for i in range(0, N, batch_size):
        x = torch.from_numpy(_resize(frames[i:i + batch_size], size, False)).float()
        logits = model(x.div(127.5).sub(1)[:, None])
        if (H, W) != (size, size):
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        out.append(logits.argmax(1).to(torch.uint8))
    return torch.cat(out).numpy()


def save_segmenter(model: SegUNet, path) -> None:
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"heartbeat": "segmenter", "config": json.dumps(model.config)})


def load_segmenter(path) -> SegUNet:
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter {path} not found: omit --segmenter to train one inline, "
                                "or save one with heartbeat.segmenter.save_segmenter")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("heartbeat") != "segmenter":
        raise ValueError(f"{path} is not a HeartBeat segmenter (no 'heartbeat: segmenter' metadata)")
    cfg = json.loads(meta["config"])
    model = SegUNet(cfg["classes"], tuple(cfg["channels"]), cfg["size"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
