"""The pieces of tools/sample.py: where conditions come from, one batched guided generation (also
what the training previews use), the HDF5 writer of a synthetic dataset. No CLI parsing here; the
GIF/PNG previews of a samples file are heartbeat/preview.py's.

    src = DatasetSource(cfg, h5_path, used, frames=F, video=True)   # or FileSource(cfg, used, F, video, conds)
    job = src.job(k, seed + k)                # sample k's conditions (pixel space) + what to record
    z0, video = generate(parts, cfg, [job_0, ..., job_B-1], steps=50, sampler="ddim", eta=0.0,
                         guidance=GuidanceSpec.parse("3.0"), used=("text", "mask"))
    z0 = sample_latents(parts, cfg, cond_batch, seeds, frames, video, steps=25, guidance=spec, used=used)
    with PartWriter(path, frames=F, size=S, used=used) as w: w.add(job, video_k, meta, "text,mask")
    merge_parts([part_0, part_1], final_path, attrs)   # sample k = part k % W, row k // W

Seeds (docs/ARCHITECTURE.md §Tensors, EDM generate.py): sample k draws x_T of shape (F, C, h, w) and
any sampler noise from its own CPU torch.Generator seeded with seed + k, so a sample depends only on its seed and its
conditions, not on the batch it shares or the rank it runs on. Stage-1 frames are independent: the
F frames of a sample are F rows of the batch and draw their noise from that sample's generator in
frame order.

Conditions absent from `used` are simply not put in the conditioner's batch: the Conditioner drops
them exactly as training's dropout does (docs/ARCHITECTURE.md §Conditions); guidance passes keep
masks for the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from .config import CONDITIONS, LOCAL_CONDITIONS
from .data import ClipDataset
from .diffusion import Schedule, sample
from .distill import check_request, student_scales
from .graphs import GraphedCall, compiled
from .guidance import GuidanceSpec, expand_for_sets, guided, repeat_sets
from .utils import atomic_write, autocast, to_device

SCHEMA = 1
COMPRESSION = "lzf"
MAPS = ("mask", "sketch", "mv")        # uint8 (N, F, H, W) in the file


class SampleError(Exception):
    """A user mistake (bad file, condition, size): tools/sample.py prints it as `error: ...`."""


# ---------------------------------------------------------------------------------- file inputs

def _read_grey(path: Path) -> np.ndarray:
    """A PNG/JPG/NPY as a 2-D array (first channel of a colour image)."""
    if path.suffix.lower() == ".npy":
        a = np.load(path, allow_pickle=False)
    else:
        try:
            a = iio.imread(path)
        except Exception as e:  # noqa: BLE001 - imageio raises many kinds for unreadable images
            raise SampleError(f"{path}: not a readable image ({e})") from None
    if a.ndim == 3 and a.shape[-1] in (3, 4) and path.suffix.lower() != ".npy":
        a = a[..., 0]
    return a


def load_mask_sequence(path, mask_classes: int, size: int) -> np.ndarray:
    """A folder of PNG/NPY label maps (sorted by name), one .npy (F, H, W) or (H, W), or one PNG ->
    uint8 (F, size, size); labels checked against 0..mask_classes-1, resized with nearest."""
    p = Path(path)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix.lower() in (".png", ".npy", ".bmp", ".tif", ".tiff"))
        if not files:
            raise SampleError(f"--mask={p}: the folder holds no .png or .npy label maps")
        frames = [_read_grey(q) for q in files]
        if len({f.shape for f in frames}) != 1:
            raise SampleError(f"--mask={p}: the label maps differ in size ({sorted({f.shape for f in frames})})")
        a = np.stack(frames)
    elif p.is_file():
        a = _read_grey(p)
    else:
        raise SampleError(f"--mask={p}: no such file or folder")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise SampleError(f"--mask={p}: expected label maps (F, H, W) or (H, W), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise SampleError(f"--mask={p}: label maps must hold integer labels")
    vals = np.unique(a)
    bad = [int(v) for v in vals if v < 0 or v >= mask_classes]
    if bad:
        hint = " (a PNG saved as 0/255? store the label values 0..3 themselves)" if 255 in bad else ""
        raise SampleError(f"--mask={p}: label values {bad[:8]} are outside 0..{mask_classes - 1}, the labels this "
                          f"checkpoint was trained with{hint}")
    a = a.astype(np.uint8)
    H, W = a.shape[-2:]
    if H != W:
        raise SampleError(f"--mask={p}: label maps are {H}x{W}; the model makes square {size}x{size} frames "
                          f"(crop or pad them to a square first)")
    if H != size:
        a = np.stack([cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST) for m in a])
    return a


def load_binary_image(path, size: int, what: str) -> np.ndarray:
    """A sketch PNG -> uint8 {0, 255} (size, size); downsizing by max-pooling keeps thin edges."""
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"--{what}={p}: no such file")
    a = _read_grey(p)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise SampleError(f"--{what}={p}: expected a square grey image, got shape {a.shape}")
    x = torch.from_numpy((a > 127).astype(np.float32))[None, None]
    if a.shape[0] > size:
        x = F.adaptive_max_pool2d(x, size)
    elif a.shape[0] < size:
        x = F.interpolate(x, size=(size, size), mode="nearest-exact")
    return (x[0, 0].numpy() * 255).astype(np.uint8)


def load_image(path, size: int, what: str = "prior") -> np.ndarray:
    """A grey image PNG -> uint8 (size, size), area-resized."""
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"--{what}={p}: no such file")
    a = _read_grey(p)
    if a.ndim != 2:
        raise SampleError(f"--{what}={p}: expected an image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise SampleError(f"--{what}={p}: expected an 8-bit image, got {a.dtype}")
    if a.shape != (size, size):
        interp = cv2.INTER_AREA if a.shape[0] > size else cv2.INTER_LINEAR
        a = cv2.resize(a, (size, size), interpolation=interp)
    return a


def load_flow(path, size: int) -> np.ndarray:
    """A .npy (F, 2, H, W) flow in pixels -> float32 (F, 2, size, size), vectors scaled with the size."""
    p = Path(path)
    if not p.is_file():
        raise SampleError(f"--flow={p}: no such file")
    a = np.load(p, allow_pickle=False).astype(np.float32)
    if a.ndim != 4 or a.shape[1] != 2 or a.shape[2] != a.shape[3]:
        raise SampleError(f"--flow={p}: expected (F, 2, H, W) with square frames, got {a.shape}")
    if a.shape[-1] != size:
        x = F.interpolate(torch.from_numpy(a), size=(size, size), mode="bilinear", align_corners=False)
        a = (x * (size / a.shape[-1])).numpy()
    return a


# ----------------------------------------------------------------------------------- sources

def _to_image(a: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W) -> float (..., 1, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(a)).float().div(127.5).sub(1.0).unsqueeze(-3)


def _to_binary(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a) > 127).float().unsqueeze(-3)


def make_job(k, seed, source_index, frames, *, text=None, prior=None, sketch=None, mask=None, mv=None,
             mv_points=None, flow=None, mask_valid=None, view="", patient="", source_meta=None, video=True):
    """One sample's conditions. Arrays are uint8 pixel maps at the model size, (F, H, W) per frame
    (sketch: (F, H, W), or one (1, H, W) / (H, W) map broadcast over the frames as stage 2 does);
    flow float32 (F, 2, H, W); prior uint8 (H, W) or float (1, H, W) in [-1, 1].
    Returns dict(cond=model inputs, record=what the HDF5 file keeps)."""
    Fr = frames
    cond, rec = {}, {"k": k, "seed": seed, "source_index": source_index, "view": view, "patient": patient,
                     "source_meta": source_meta or {}, "text": text or ""}
    if text is not None:
        cond["text"] = text
    if prior is not None:   # uint8 (H, W), or a float (1, H, W) tensor in [-1, 1]
        cond["prior"] = prior.float() if torch.is_tensor(prior) else _to_image(prior)
    if sketch is not None:
        if sketch.ndim == 2 or len(sketch) != Fr:              # one sketch for every frame
            sketch = np.broadcast_to(sketch.reshape(-1, *sketch.shape[-2:])[0], (Fr,) + sketch.shape[-2:])
        s = sketch
        cond["sketch"], rec["sketch"] = _to_binary(s), np.ascontiguousarray(s)
    if mask is not None:
        cond["mask"], rec["mask"] = torch.from_numpy(mask.astype(np.int64)), mask.astype(np.uint8)
    if mv is not None:
        cond["mv"], rec["mv"] = _to_binary(mv), mv.astype(np.uint8)
        rec["mv_points"] = (np.full((Fr, 2, 2), np.nan, np.float32) if mv_points is None
                            else np.asarray(mv_points, np.float32))
    if flow is not None:
        cond["flow"], rec["flow"] = torch.from_numpy(np.ascontiguousarray(flow, np.float32)), flow
    rec["mask_valid"] = (np.zeros(Fr, bool) if mask is None else
                         np.ones(Fr, bool) if mask_valid is None else np.asarray(mask_valid, bool))
    return {"cond": cond, "record": rec, "frames": Fr, "video": video}


class DatasetSource:
    """Sample k is driven by clip k % N of an HDF5 split (the §4 schema): its first F frames (their
    masks, MV, flow; stage 1: each frame its own sketch, stage 2: the first frame's); image prior =
    frame `prior_frame` of the clip (default: the middle one, a frame other than the first, as
    stage 1 trains with a prior that is another frame of the clip)."""

    def __init__(self, cfg, h5_path, used, frames: int | None, video: bool, prior_frame: int = -1):
        m = cfg.model
        self.used, self.video = tuple(used), video
        local = tuple(c for c in LOCAL_CONDITIONS if c in used)   # the prior is a frame of the clip's video
        self.ds = ClipDataset(h5_path, size=m.image_size, conditions=local)
        self.path, self.size = str(h5_path), m.image_size
        Fc = self.ds.frames
        self.frames = frames or (Fc if video else 1)
        if self.frames > Fc:
            raise SampleError(f"--frames={self.frames}: the clips of {h5_path} have only {Fc} frames")
        self.prior_frame = (Fc // 2 if prior_frame < 0 else prior_frame)
        if self.prior_frame >= Fc:
            raise SampleError(f"--prior_frame={prior_frame}: the clips have {Fc} frames")
        labels = [int(v) for v in self.ds.labels] if self.ds.labels else []
        if "mask" in used and labels and max(labels) >= m.mask_classes:
            raise SampleError(f"{h5_path}: its masks use labels up to {max(labels)} ({self.ds.labels}), but the "
                              f"checkpoint knows {m.mask_classes} classes (0..{m.mask_classes - 1})")
        with h5py.File(self.path, "r") as f:
            self.views = list(f["view"].asstr()[()]) if "view" in f else [""] * self.ds.num_clips
            self.patients = list(f["patient"].asstr()[()]) if "patient" in f else [""] * self.ds.num_clips
            self.metas = list(f["meta"].asstr()[()]) if "meta" in f else ["{}"] * self.ds.num_clips
            if "mv" in used and "mv_points" not in f:
                raise SampleError(f"{h5_path}: dataset 'mv_points' is missing; rewrite it with data_prep (--force)")
        self.overrides: dict = {}

    def __len__(self):
        return self.ds.num_clips

    def job(self, k: int, seed: int) -> dict:
        i = k % self.ds.num_clips
        item = self.ds[i]
        Fr = self.frames
        sl = slice(0, Fr)
        kw = {}
        if "text" in self.used:
            kw["text"] = item["text"]
        if "image" in self.used:
            kw["prior"] = item["video"][self.prior_frame]           # (1, H, W) in [-1, 1], as training reads it
        if "sketch" in self.used:
            sk = item["sketch"][:1] if self.video else item["sketch"][sl]   # stage 2: the first frame's, over time
            kw["sketch"] = (sk[:, 0].numpy() * 255).astype(np.uint8)
        if "mask" in self.used:
            kw["mask"] = item["mask"][sl].numpy().astype(np.uint8)
        if "mv" in self.used:
            kw["mv"] = (item["mv"][sl, 0].numpy() * 255).astype(np.uint8)
            with h5py.File(self.path, "r") as f:
                kw["mv_points"] = f["mv_points"][i, :Fr] * (self.size / self.ds.stored_size)
        if "flow" in self.used:
            kw["flow"] = item["flow"][sl].numpy()
        meta = json.loads(self.metas[i] or "{}")
        valid = item["mask_valid"][sl].numpy()
        for name, v in self.overrides.items():       # conditions given as files replace the clip's
            kw[name] = v[:Fr] if name in ("mask", "mv", "mv_points", "flow") else v
        if "mask" in self.overrides:
            valid = None                               # a user's mask is an annotation on every frame
        src = -1 if self.overrides else i
        return make_job(k, seed, src, Fr, mask_valid=valid, view=self.views[i],
                        patient=self.patients[i], source_meta={"clip": i, "file": self.path, **meta},
                        video=self.video, **kw)


class FileSource:
    """Every sample driven by the same conditions given as files / a prompt (source_index -1)."""

    def __init__(self, cfg, used, frames: int | None, video: bool, conds: dict):
        self.used, self.video, self.conds = tuple(used), video, dict(conds)
        mask = conds.get("mask")
        n = len(mask) if mask is not None else None
        if "flow" in conds:
            n = n or len(conds["flow"])
        default = n or (cfg.model.frames if video else 1)
        self.frames = frames or default
        for name in ("mask", "flow"):
            if name in conds and len(conds[name]) < self.frames:
                raise SampleError(f"--{name} gives {len(conds[name])} frames but {self.frames} are asked for (--frames)")
        if video and self.frames > cfg.model.max_frames:
            raise SampleError(f"--frames={self.frames}: the model's temporal layers take at most {cfg.model.max_frames}")

    def __len__(self):
        return 1

    def job(self, k: int, seed: int) -> dict:
        kw = {n: (v[: self.frames] if n in ("mask", "flow", "mv", "mv_points") else v)
              for n, v in self.conds.items()}
        return make_job(k, seed, -1, self.frames, video=self.video, **kw)


def derive_mv(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The MV skeleton of a mask sequence, as the data pipeline makes it: (mv uint8 (F, H, W), points (F, 2, 2))."""
    from data_prep.conditions import mv_image, mv_points
    pts = np.stack([mv_points(m) for m in mask])
    return np.stack([mv_image(p, mask.shape[-1]) for p in pts]), pts


# --------------------------------------------------------------------------------- generation

def collate_jobs(jobs: list[dict], video: bool) -> dict:
    """Model-input batch: 5-D clips (B, F, ...) for stage 2; for stage 1 the frames become batch
    rows (B*F, ...) with the global conditions repeated per frame."""
    B, Fr = len(jobs), jobs[0]["frames"]
    out = {}
    for name in jobs[0]["cond"]:
        vals = [j["cond"][name] for j in jobs]
        if name == "text":
            out["text"] = list(vals) if video else [v for v in vals for _ in range(Fr)]
        elif name == "prior":
            x = torch.stack(vals)                                  # (B, 1, H, W)
            out["prior"] = x if video else x.repeat_interleave(Fr, 0)
        else:
            x = torch.stack(vals)                                  # (B, F, ...)
            out[name] = x if video else x.reshape(B * Fr, *x.shape[2:])  # frames become batch rows
    return out


@torch.no_grad()
def sample_latents(parts: dict, cfg, cond: dict, seeds, frames: int, video: bool, *, steps: int, guidance: GuidanceSpec,
                   used, sampler: str = "ddim", eta: float = 0.0, device="cpu", spacing: str = "leading",
                   rescale: float = 0.0, compile: bool = False, cuda_graph: bool = False) -> torch.Tensor:
    """The one guided sampling path (tools/sample.py and the training previews): z0 float32
    (B, F, C, h, w) for the B = len(seeds) samples of the conditioner batch `cond` (on `device`; 5-D
    clips for a video model, else the B*F frames as rows, as collate_jobs makes them). `used`: the
    conditions guidance conditions on; classifier-free guidance by `guidance` (heartbeat/guidance.py),
    all its condition sets in one batched UNet call per step. The conditioner (text encoder, image
    prior, adapter, local encoders) runs once per batch, not per step. compile: the UNet through
    torch.compile; cuda_graph: each step's UNet call replayed from one CUDA graph (heartbeat/graphs.py)."""
    m = cfg.model
    unet, conditioner = parts["unet"], parts["conditioner"]
    B, Fr = len(seeds), frames
    C, h = m.latent_channels, m.latent_size
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_T = torch.stack([torch.randn((Fr, C, h, h), generator=g) for g in gens])   # (B, F, C, h, w)
    if not video:
        x_T = x_T.reshape(B * Fr, C, h, h)                        # frames become batch rows
        gens = [g for g in gens for _ in range(Fr)]               # row (b, f) draws from sample b's generator
    x_T = x_T.to(device)
    used = frozenset(used)
    contexts = {}   # the conditioner's output depends on the condition sets only: once per run, not per step
    graphs = {}     # condition sets -> the CUDA graph of one step's UNet call
    unet_fn = compiled(unet) if compile else unet
    scales = None   # a distilled student (sampler lcm): its guidance scales are an input, one call per step
    if sampler == "lcm":
        check_request(m, sampler, steps)
        scales = torch.tensor(student_scales(m, guidance), dtype=torch.float32, device=device)

    def model_fn_multi(z, t, cond_sets):
        z2, t2, keep = expand_for_sets(z, t, cond_sets)
        key = tuple(cond_sets)
        with autocast(device):
            if key not in contexts:
                rep = {k: repeat_sets(v, len(cond_sets)) for k, v in cond.items()}
                contexts[key] = conditioner(rep, keep, batch_size=z2.shape[0])
            ctx = contexts[key] if scales is None else dict(contexts[key], guidance=scales.expand(z2.shape[0], -1))
            if cuda_graph:
                if key not in graphs:
                    graphs[key] = GraphedCall(lambda zz, tt: unet_fn(zz, tt, **ctx), z2, t2)
                return graphs[key](z2, t2).float()
            out = unet_fn(z2, t2, **ctx)
        return out.float()

    if scales is not None:
        def model_fn(z, t):                                   # the student: every given condition, one call
            return model_fn_multi(z, t, [used])
    elif not guidance.compositional and (guidance.scale in (0.0, 1.0) or not used):
        only = used if (guidance.scale == 1.0 and used) else frozenset()   # w = 1: conditional; w = 0: unconditional

        def model_fn(z, t):                                   # one condition set: no guidance arithmetic
            return model_fn_multi(z, t, [only])
    else:
        model_fn = guided(model_fn_multi, guidance, rescale=rescale, given=used)
    z0 = sample(model_fn, x_T, steps=steps, sampler=sampler, schedule=Schedule.from_config(m),
                prediction=m.prediction, eta=eta, spacing=spacing, generator=gens, lcm_skip=m.lcm_skip)
    return z0.float().reshape(B, Fr, C, h, h)


@torch.no_grad()
def generate(parts: dict, cfg, jobs: list[dict], *, steps: int, sampler: str, eta: float,
             guidance: GuidanceSpec, used, device="cpu", spacing: str = "leading", rescale: float = 0.0,
             compile: bool = False, cuda_graph: bool = False):
    """Sample one batch of jobs (compile, cuda_graph: see sample_latents). Returns (z0 float32
    (B, F, C, h, w), video uint8 (B, F, H, W))."""
    m = cfg.model
    B, Fr, video = len(jobs), jobs[0]["frames"], jobs[0]["video"]
    cond = to_device(collate_jobs(jobs, video), device)
    z0 = sample_latents(parts, cfg, cond, [j["record"]["seed"] for j in jobs], Fr, video, steps=steps,
                        guidance=guidance, used=used, sampler=sampler, eta=eta, device=device, spacing=spacing,
                        rescale=rescale, compile=compile, cuda_graph=cuda_graph)
    frames = decode(parts["vae"], z0.reshape(B * Fr, *z0.shape[2:]), m.latent_scale)
    return z0.cpu(), frames.reshape(B, Fr, *frames.shape[-2:]).cpu()


@torch.no_grad()
def decode(vae, z: torch.Tensor, scale: float, chunk: int = 16) -> torch.Tensor:
    """Diffusion latents (N, C, h, w) -> uint8 grey frames (N, H, W) (colour VAEs: channel mean)."""
    out = []
    for i in range(0, z.shape[0], chunk):
        with autocast(z.device):
            x = vae.decode(z[i:i + chunk] / scale).float()
        x = x.mean(1) if x.shape[1] > 1 else x[:, 0]
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------- HDF5 files

def _datasets(frames: int, size: int, used, latent_shape=None) -> dict:
    """name -> (per-sample shape, dtype, chunks) of a samples file."""
    Fr, S = frames, size
    d = {"video": ((Fr, S, S), np.uint8, (1, 1, S, S)), "mask_valid": ((Fr,), bool, None)}
    for name in MAPS:
        if name in used:
            d[name] = ((Fr, S, S), np.uint8, (1, 1, S, S))
    if "mv" in used:
        d["mv_points"] = ((Fr, 2, 2), np.float32, None)
    if "flow" in used:
        d["flow"] = ((Fr, 2, S, S), np.float16, (1, 1, 2, S, S))
    if latent_shape is not None:
        d["latent_sample"] = (tuple(latent_shape), np.float32, None)
    d["source_index"] = ((), np.int64, None)
    for name in ("text", "view", "patient", "meta", "conditions"):
        d[name] = ((), h5py.string_dtype(), None)
    return d


class PartWriter:
    """One rank's samples in arrival order, appended to `path` (a temporary part file)."""

    def __init__(self, path, frames: int, size: int, used, latent_shape=None):
        self.path, self.n = Path(path), 0
        self.f = h5py.File(self.path, "w")
        for name, (shape, dtype, chunks) in _datasets(frames, size, used, latent_shape).items():
            self.f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                                  chunks=chunks or True, compression=COMPRESSION if chunks else None)
        self.f.attrs["schema"] = SCHEMA

    def add(self, job: dict, video: np.ndarray, meta: dict, conditions: str, latent=None) -> None:
        rec, i = job["record"], self.n
        for ds in self.f.values():
            ds.resize(i + 1, axis=0)
        f = self.f
        f["video"][i] = video
        f["mask_valid"][i] = rec["mask_valid"]
        for name in ("mask", "sketch", "mv", "mv_points"):
            if name in f:
                f[name][i] = rec[name]
        if "flow" in f:
            f["flow"][i] = rec["flow"].astype(np.float16)
        if "latent_sample" in f:
            f["latent_sample"][i] = latent
        f["source_index"][i] = rec["source_index"]
        f["text"][i], f["view"][i], f["patient"][i] = rec["text"], rec["view"], rec["patient"]
        f["meta"][i] = json.dumps(meta, sort_keys=True)
        f["conditions"][i] = conditions
        self.n += 1

    def close(self):
        self.f.attrs["count"] = self.n
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def merge_parts(parts: list, out_path, attrs: dict) -> Path:
    """Interleave rank parts into one file in sample order (sample k = part k % W, row k // W),
    written atomically (heartbeat.utils.atomic_write): a kill leaves the previous samples.h5 or none."""
    out_path = Path(out_path)
    W = len(parts)
    srcs = [h5py.File(p, "r") for p in parts]

    def write(tmp):
        counts = [int(s["video"].shape[0]) for s in srcs]
        N = sum(counts)
        for k in range(N):   # rank r holds k = r, r + W, ...: counts must be consistent
            if k // W >= counts[k % W]:
                raise RuntimeError(f"rank part files hold {counts} samples: not a round-robin split")
        with h5py.File(tmp, "w") as out:
            for name, ds in srcs[0].items():
                shape = (N, *ds.shape[1:])
                kw = {}
                if ds.chunks is not None:
                    kw["chunks"] = tuple(min(c, max(1, s)) for c, s in zip(ds.chunks, shape))
                    kw["compression"] = ds.compression
                o = out.create_dataset(name, shape=shape, dtype=ds.dtype, **kw)
                for k in range(N):
                    o[k] = srcs[k % W][name][k // W]
            out.attrs.update({k: (json.dumps(v) if isinstance(v, (dict, list, tuple)) else v)
                              for k, v in attrs.items()})
            out.attrs["schema"], out.attrs["count"] = SCHEMA, N
    try:
        atomic_write(out_path, write)
    finally:
        for s in srcs:
            s.close()
    return out_path


def conditions_label(used) -> str:
    """Comma-joined condition names in the canonical CONDITIONS order ("text,image,mask")."""
    return ",".join(c for c in CONDITIONS if c in used)
