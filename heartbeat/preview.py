"""Pictures of what a model makes: preview grids during training (PNG, TensorBoard) and the GIF /
MP4 / PNG previews of a samples file. Generation itself is heartbeat.sampling's (one guided path).

    img = preview(model, ema, cfg, device)          # uint8 (3, H, W) from the test split, EMA weights
    write_png("runs/003-pretrain-tiny/samples.png", img)
    write_previews("out/samples.h5", "out")         # sample_00000.gif (or .mp4) ..., grid.png

Training previews, by the stage's `preview` (heartbeat/stages.py), one column per test item:
    reconstruction   originals over VAE reconstructions
    frames           the mask, sketch and MV rows the model is given, the real frame, the generated frame
    clips            per clip: the mask row, the real clip, the generated clip
"""
from __future__ import annotations

import contextlib
import importlib.util
import struct
import zlib
from pathlib import Path

import h5py
import imageio.v2 as imageio
import numpy as np
import torch

from .config import Config
from .conditions import given_conditions
from .data import DataError, SeededItems, collate, make_dataset
from .guidance import GuidanceSpec
from .sampling import sample_latents
from .stages import model_stage
from .utils import PALETTE, atomic_write, atomic_write_bytes, to_device
from .vae import as_channels

PREVIEW_GUIDANCE = 2.0      # classifier-free guidance scale of the preview samples (1 = conditional only)


# ------------------------------------------------------------------------------------- grids

def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> uint8 (N, 3, H, W)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def mask_rgb(m: torch.Tensor) -> torch.Tensor:
    """(N, H, W) int labels -> uint8 (N, 3, H, W)."""
    palette = torch.from_numpy(PALETTE)
    return palette[m.long().clamp(0, len(PALETTE) - 1).cpu()].permute(0, 3, 1, 2).contiguous()


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
    """uint8 (3, H, W) -> PNG (plain zlib + struct, no imaging library), written atomically."""
    arr = img.permute(1, 2, 0).contiguous().numpy()
    H, W, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    atomic_write_bytes(Path(path), png)


# ---------------------------------------------------------------------------- training previews

@contextlib.contextmanager
def ema_weights(model, ema):
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
def preview(model, ema, cfg: Config, device, final: bool = False):
    """A uint8 (3, H, W) grid from the test split with the EMA weights, or None without a test split
    (or for a stage without previews). Generated with heartbeat.sampling.sample_latents: DDIM, 25 steps
    (50 for the final picture), guidance PREVIEW_GUIDANCE on every condition the model is given."""
    kind = model_stage(cfg.train.stage, cfg.model).preview
    if not kind:
        return None
    try:
        ds = make_dataset(cfg, "test")
    except (DataError, FileNotFoundError):
        return None
    video = kind == "clips"
    n = (2 if not final else 3) if video else (8 if final else 6)
    n = min(n, len(ds))
    stride = max(1, len(ds) // n)
    offset = 0 if video else ds.frames // 2
    idx = [min(len(ds) - 1, i * stride + (offset if stride > offset else 0)) for i in range(n)]
    items = SeededItems(ds)
    batch = to_device(collate([dict(items[(i, 10_000 + i)], seed=i) for i in idx]), device)
    with ema_weights(model, ema):
        if kind == "reconstruction":
            x = batch["image"]
            rec = model.vae.decode(model.vae.encode(as_channels(x, model.vae.in_channels)).mean)
            return grid([to_rgb(x), to_rgb(rec)])
        m = cfg.model
        cond = model.condition_batch(batch)
        parts = {"unet": model.unet, "conditioner": model.conditioner}
        Fr = batch["video"].shape[1] if video else 1
        steps, sampler = (m.student_steps, "lcm") if m.guidance_inputs else (50 if final else 25, "ddim")
        z = sample_latents(parts, cfg, cond, idx, Fr, video, steps=steps, sampler=sampler,
                           guidance=GuidanceSpec.parse(PREVIEW_GUIDANCE), used=given_conditions(cond), device=device)
        gen = model.vae.decode(z.flatten(0, 1) / m.latent_scale)
        if not video:
            rows = [mask_rgb(batch["mask"])] if "mask" in batch else []
            rows += [binary_rgb(batch[k]) for k in ("sketch", "mv") if k in batch]
            return grid(rows + [to_rgb(batch["image"]), to_rgb(gen)])
        gen = gen.view(len(idx), Fr, -1, m.image_size, m.image_size)
        rows = []
        for b in range(len(idx)):
            if "mask" in batch:
                rows.append(mask_rgb(batch["mask"][b]))
            rows += [to_rgb(batch["video"][b]), to_rgb(gen[b])]
        return grid(rows)


# ----------------------------------------------------------------------------- sample previews

def preview_frames(f: h5py.File, i: int) -> np.ndarray:
    """Sample i of a samples file as RGB frames (F, H, W', 3): generated | mask overlay | sketch | MV
    (the panels of the conditions the file holds)."""
    v = f["video"][i]
    rgb = np.repeat(v[..., None], 3, -1)
    panels = [rgb]
    if "mask" in f:
        m = np.clip(f["mask"][i], 0, len(PALETTE) - 1)
        col = PALETTE[m].astype(np.float32)
        a = np.where(m[..., None] > 0, 0.45, 0.0)
        panels.append((rgb * (1 - a) + col * a).round().astype(np.uint8))
    for name in ("sketch", "mv"):
        if name in f:
            panels.append(np.repeat(f[name][i][..., None], 3, -1))
    sep = np.full((*v.shape[:2], 2, 3), 255, np.uint8)
    out = [panels[0]]
    for p in panels[1:]:
        out += [sep, p]
    return np.concatenate(out, axis=2)


def write_gif(h5_path, path, index: int = 0, min_height: int = 256, fps: int = 8) -> Path:
    """Sample `index` of a samples file as one looping GIF (Pillow): the generated clip beside its
    conditions (preview_frames' panels), enlarged by a whole factor (nearest) to at least min_height
    pixels, written atomically."""
    from PIL import Image
    with h5py.File(h5_path, "r") as f:
        if not 0 <= index < f["video"].shape[0]:
            raise ValueError(f"{h5_path} holds {f['video'].shape[0]} samples; no sample {index}")
        frames = preview_frames(f, index)
    k = max(1, -(-min_height // frames.shape[1]))
    frames = frames.repeat(k, axis=1).repeat(k, axis=2)
    images = [Image.fromarray(a) for a in frames]

    def write(tmp):
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    atomic_write(Path(path), write)
    return Path(path)


def write_previews(h5_path, out_dir, count: int = 4, grid_rows: int = 16, grid_cols: int = 8) -> list:
    """GIF (MP4 when imageio-ffmpeg is installed) of the first `count` samples with their conditions
    side by side, and grid.png: one row per sample (at most grid_rows), grid_cols frames spread over
    the clip. Returns the paths written."""
    out_dir, written = Path(out_dir), []
    mp4 = importlib.util.find_spec("imageio_ffmpeg") is not None
    with h5py.File(h5_path, "r") as f:
        N, Fr = f["video"].shape[:2]
        for i in range(min(count, N)):
            frames = preview_frames(f, i)
            if mp4 and Fr > 1:
                p = out_dir / f"sample_{i:05d}.mp4"
                imageio.mimwrite(p, list(frames), fps=8, macro_block_size=1)
            else:
                p = out_dir / f"sample_{i:05d}.gif"
                imageio.mimwrite(p, list(frames), duration=125, loop=0)
            written.append(p)
        rows = []
        cols = np.unique(np.linspace(0, Fr - 1, min(grid_cols, Fr)).round().astype(int))
        for i in range(min(grid_rows, N)):
            v = f["video"][i][cols]                                    # (c, H, W)
            pad = np.full((v.shape[1], 2), 255, np.uint8)
            rows.append(np.concatenate([x for c in v for x in (c, pad)][:-1], axis=1))
        if rows:
            padr = np.full((2, rows[0].shape[1]), 255, np.uint8)
            img = np.concatenate([x for r in rows for x in (r, padr)][:-1], axis=0)
            p = out_dir / "grid.png"
            imageio.imwrite(p, img)
            written.append(p)
    return written
