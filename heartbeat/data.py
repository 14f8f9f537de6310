"""Data: the HDF5 datasets of frames (stage 1) and clips (stage 2), the order training reads them
in, the loader, and the encoder cache. The batch contract is docs/ARCHITECTURE.md §Batches.

    ds = FrameDataset(find_split("data/phantom", "train"), size=64)
    b = ds[0]   # image (1,H,W) [-1,1], prior (1,H,W), sketch (1,H,W) {0,1}, mask (H,W) int64,
                # mv (1,H,W) {0,1}, mask_valid () bool, text str, clip int, frame int
    cs = ClipDataset(path, size=64)
    c = cs[0]   # video (F,1,H,W), sketch/mv (F,1,H,W), mask (F,H,W), flow (F,2,H,W) pixels,
                # mask_valid (F,), prior (1,H,W), text, clip
    ds = make_dataset(cfg, "train", cache=ensure_cache(model, cfg, d))    # what a stage trains on
    batches = iter(make_loader(ds, EpochSampler(len(ds), per_rank, world, rank, accum, seed), workers, seed))

Datasets. Files are opened lazily, one h5py handle per process: the dataset pickles without a
handle and opens the file at its first __getitem__ in each DataLoader worker. The constructor
validates the file (schema, datasets, shapes) and raises DataError naming the file, the dataset and
the fix. `conditions=` names the conditions to read (heartbeat.config.CONDITIONS; the arrays are
heartbeat.conditions.DATASET_ARRAY's); text is always returned, the others are neither read nor
returned. `size=` resizes on load: images with area (down) or bilinear (up) interpolation, masks
nearest, binary maps by max-pooling (down; so thin edges survive) or nearest (up), flow bilinearly
with its vectors scaled by the size ratio. `frames_per_item` is 1 for frames, F for clips.

Data order (`EpochSampler`): epoch e is a permutation drawn from (seed, e); rank r of W takes
rows r::W of each global batch, so the data a step sees depends only on (seed, step) -- not on the
number of workers, and not on whether the run was resumed. Each item is read under its own seed
(`SeededItems`), so random choices inside the dataset (the image-prior frame) are reproducible too.

Encoder cache: `ensure_cache` writes `latent` (the frozen VAE's scaled means) and `prior_tokens`
of every training frame to `<split>.cache-KEY.h5` beside the split file, once per VAE + image prior
+ size (KEY = `cache_key(model)` hashes them); `cache=KEY` makes the datasets read it: items then
carry `latent` ((C, h, w) or (F, C, h, w)) and `prior_tokens` (T, D) instead of the `prior` image;
the prior frame is drawn exactly as without the cache. The cache is a separate file so that writing
it can never damage the data file; `cache_status` says whether one is usable (it records the source
file's size, modification time, clip and frame counts, and is ignored when any differs).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from .conditions import DATASET_ARRAY
from .config import CONDITIONS, Config
from .stages import model_stage
from .utils import atomic_write, autocast

SCHEMA = 1
# the built-in phantom folders: built on first use when a stage's --data names one of them
PHANTOMS = {"data/phantom": dict(clips=256, cmr=False), "data/phantom_cmr": dict(clips=64, cmr=True)}


class DataError(Exception):
    """A dataset file that cannot be used: the message names the file, the dataset and the fix."""


def find_split(data_dir, split: str) -> Path:
    """data_dir/<split>.h5, or DataError listing the splits that exist."""
    d = Path(data_dir)
    p = d / f"{split}.h5"
    if p.is_file():
        return p
    if not d.is_dir():
        raise DataError(f"data folder {d} does not exist; create it with "
                        f"`python -m data_prep.phantom --out {d}` (or data_prep.camus / data_prep.mnms)")
    have = sorted(q.stem for q in d.glob("*.h5"))
    raise DataError(f"{p} not found; splits in {d}: {', '.join(have) if have else 'none (no .h5 files)'}")


def cache_path(h5_path, key: str) -> Path:
    """Where the encoder cache of split file `h5_path` for cache key `key` lives."""
    p = Path(h5_path)
    return p.with_name(f"{p.stem}.cache-{key}.h5")


def source_stamp(h5_path) -> dict:
    """What identifies a split file's contents for its caches: byte size and modification time."""
    st = os.stat(h5_path)
    return {"source_bytes": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def cache_status(h5_path, key: str, num_clips: int, frames: int) -> str:
    """'' when the cache of (h5_path, key) is complete and matches the file, else why it is not usable."""
    p = cache_path(h5_path, key)
    if not p.is_file():
        return "absent"
    try:
        with h5py.File(p, "r") as f:
            a = dict(f.attrs)
            if not bool(a.get("complete", False)) or "latent" not in f:
                return "incomplete"
            want = dict(source_stamp(h5_path), num_clips=num_clips, frames=frames, key=key)
            for k, v in want.items():
                if k not in a or str(a[k]) != str(v):
                    return f"stale ({k} differs: the split file changed since the cache was written)"
            if f["latent"].shape[:2] != (num_clips, frames):
                return "stale (shape)"
    except OSError as e:
        return f"unreadable ({e})"
    return ""


class _H5Dataset(torch.utils.data.Dataset):
    frames_per_item = 1

    def __init__(self, h5_path, size: int | None = None, conditions=CONDITIONS, cache: str | None = None):
        self.path = str(h5_path)
        bad = [c for c in conditions if c not in CONDITIONS]
        if bad:
            raise ValueError(f"conditions: unknown {', '.join(bad)}; choose from {', '.join(CONDITIONS)}")
        # text is always returned; the arrays of the others are read only when asked for
        self.conditions = tuple(c for c in CONDITIONS if c in conditions and c != "text")
        self._h5 = None
        self._cache_h5 = None
        self._pid = None
        self._validate()
        self.size = int(size) if size else self.stored_size
        self.cache = None
        if cache:
            why = cache_status(self.path, cache, self.num_clips, self.frames)
            if why:
                raise DataError(f"{cache_path(self.path, cache)}: encoder cache {why}; rebuild it "
                                f"(training does so itself) or pass --cache=false")
            self.cache = str(cache_path(self.path, cache))
            with h5py.File(self.cache, "r") as f:
                self.cache_has_prior = "prior_tokens" in f

    def _validate(self):
        p = self.path
        if not os.path.isfile(p):
            raise DataError(f"{p}: file not found; write it with `python -m data_prep.phantom --out "
                            f"{os.path.dirname(p) or '.'}` (or data_prep.camus / data_prep.mnms)")
        try:
            f = h5py.File(p, "r")
        except OSError as e:
            raise DataError(f"{p}: not a readable HDF5 file ({e}); rewrite it with data_prep --force") from None
        with f:
            schema = f.attrs.get("schema")
            if schema is None or str(schema) != str(SCHEMA):
                found = "no 'schema' attribute" if schema is None else f"schema {schema}"
                raise DataError(f"{p}: {found}, this code reads schema {SCHEMA}; "
                                f"rewrite the file with data_prep (--force)")
            need = list(dict.fromkeys(["video", "text", "mask_valid"] + [DATASET_ARRAY[c] for c in self.conditions]))
            for name in need:
                if name not in f:
                    fix = ("drop 'flow' from the conditions (a model without flow)" if name == "flow"
                           else "rewrite the file with data_prep (--force)")
                    raise DataError(f"{p}: dataset '{name}' is missing; {fix}")
            N, Fr, H, W = f["video"].shape
            if H != W:
                raise DataError(f"{p}: video frames are {H}x{W}; expected square frames")
            for name in need:
                if f[name].shape[0] != N:
                    raise DataError(f"{p}: dataset '{name}' has {f[name].shape[0]} clips, video has {N}; "
                                    f"the file is inconsistent, rewrite it with data_prep (--force)")
            if N == 0:
                raise DataError(f"{p}: holds no clips; rewrite it with data_prep")
            self.num_clips, self.frames, self.stored_size = N, Fr, H
            self.texts = [t.decode() if isinstance(t, bytes) else str(t) for t in f["text"][:]]
            self.labels = json.loads(f.attrs.get("labels", "{}"))
            self.source = str(f.attrs.get("source", ""))

    # --- one handle per process
    def _file(self):
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._cache_h5 = h5py.File(self.cache, "r") if self.cache else None
            self._pid = os.getpid()
        return self._h5

    def _prior(self, out, video, c, j):
        """The image prior of frame j of clip c: cached tokens, or the frame itself."""
        if self._cache_h5 is not None and self.cache_has_prior:
            out["prior_tokens"] = torch.from_numpy(self._cache_h5["prior_tokens"][c, j])
        else:
            out["prior"] = video(j)

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_h5"], d["_cache_h5"], d["_pid"] = None, None, None
        return d

    # --- conversion helpers, x: (..., H, W) numpy
    def _image(self, a):
        """uint8 (..., H, W) -> float32 tensor (..., 1, h, w) in [-1, 1]."""
        x = torch.from_numpy(np.ascontiguousarray(a)).float().div_(127.5).sub_(1.0)
        return self._resize(x.unsqueeze(-3), "image")

    def _binary(self, a):
        x = torch.from_numpy(np.ascontiguousarray(a) > 127).float()
        return self._resize(x.unsqueeze(-3), "binary")

    def _mask(self, a):
        x = torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))
        if self.size == self.stored_size:
            return x
        y = F.interpolate(x.unsqueeze(-3).float().reshape(-1, 1, *x.shape[-2:]), size=(self.size, self.size),
                          mode="nearest-exact")
        return y.reshape(*x.shape[:-2], self.size, self.size).long()

    def _flow(self, a):
        x = torch.from_numpy(np.ascontiguousarray(a)).float()
        return self._resize(x, "flow") * (self.size / self.stored_size)

    def _resize(self, x, kind):
        """x (..., C, H, W) -> (..., C, size, size)."""
        if self.size == self.stored_size:
            return x
        lead = x.shape[:-3]
        y = x.reshape(-1, *x.shape[-3:])
        s, down = (self.size, self.size), self.size < self.stored_size
        if kind == "binary":
            y = F.adaptive_max_pool2d(y, s) if down else F.interpolate(y, size=s, mode="nearest-exact")
        elif down and kind == "image":
            y = F.interpolate(y, size=s, mode="area")
        else:
            y = F.interpolate(y, size=s, mode="bilinear", align_corners=False, antialias=down)
        return y.reshape(*lead, *y.shape[-3:])


class FrameDataset(_H5Dataset):
    """Stage 1: item i is frame i % F of clip i // F, with one other frame of the clip as prior.
    Frames carry no flow: "flow" among `conditions` is ignored."""

    def __init__(self, h5_path, size=None, conditions=CONDITIONS, cache=None):
        super().__init__(h5_path, size, tuple(c for c in conditions if c != "flow"), cache=cache)

    def __len__(self):
        return self.num_clips * self.frames

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = self._file()
        c, t = divmod(int(i), self.frames)
        out = dict(image=self._image(f["video"][c, t]),
                   mask_valid=torch.tensor(bool(f["mask_valid"][c, t])),
                   text=self.texts[c], clip=c, frame=t)
        if self._cache_h5 is not None:
            out["latent"] = torch.from_numpy(self._cache_h5["latent"][c, t])
        if "image" in self.conditions:
            j = t
            if self.frames > 1:     # a different frame, uniformly
                j = int(torch.randint(self.frames - 1, ()).item())
                j += j >= t
            self._prior(out, lambda j: self._image(f["video"][c, j]), c, j)
        for name in ("sketch", "mv"):
            if name in self.conditions:
                out[name] = self._binary(f[name][c, t])
        if "mask" in self.conditions:
            out["mask"] = self._mask(f["mask"][c, t])
        return out


class ClipDataset(_H5Dataset):
    """Stage 2: item i is clip i, every frame; the prior is one random frame of the clip."""

    def __init__(self, h5_path, size=None, conditions=CONDITIONS, cache=None):
        super().__init__(h5_path, size, conditions, cache=cache)
        self.frames_per_item = self.frames

    def __len__(self):
        return self.num_clips

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        f = self._file()
        c = int(i)
        video = f["video"][c]
        out = dict(video=self._image(video),
                   mask_valid=torch.from_numpy(f["mask_valid"][c].astype(bool)),
                   text=self.texts[c], clip=c)
        if self._cache_h5 is not None:
            out["latent"] = torch.from_numpy(self._cache_h5["latent"][c])
        if "image" in self.conditions:
            self._prior(out, lambda j: out["video"][j].clone(), c, int(torch.randint(self.frames, ()).item()))
        for name in ("sketch", "mv"):
            if name in self.conditions:
                out[name] = self._binary(f[name][c])
        if "mask" in self.conditions:
            out["mask"] = self._mask(f["mask"][c])
        if "flow" in self.conditions:
            out["flow"] = self._flow(f["flow"][c])
        return out


def make_dataset(cfg: Config, split: str, cache: str | None = None):
    """What cfg.train.stage trains on from cfg.train.data/<split>.h5: frames or clips (the stage's
    `items`), reading the model's conditions when the stage uses them, and the encoder cache `cache`
    (a key from ensure_cache)."""
    stage, m = model_stage(cfg.train.stage, cfg.model), cfg.model
    path = find_split(cfg.train.data, split)
    conditions = m.conditions if stage.reads_conditions else ()
    if stage.items == "frames":
        return FrameDataset(path, size=m.image_size, conditions=conditions, cache=cache)
    ds = ClipDataset(path, size=m.image_size, conditions=conditions, cache=cache)
    if ds.frames > m.max_frames:
        raise DataError(f"{path}: clips of {ds.frames} frames exceed --max_frames={m.max_frames}")
    return ds


def prepare_data(cfg: Config, d, phantoms: dict = PHANTOMS, log=print) -> None:
    """Build the phantom when --data is one of the default phantom folders and its splits are absent
    (rank 0 builds, the others wait). Any other folder must already hold train.h5 / test.h5.
    The folder must be on storage every node sees (docs/ARCHITECTURE.md §Training)."""
    data = Path(cfg.train.data)
    key = os.path.normpath(cfg.train.data)
    # rank 0 decides for all: another rank looking later could see the files rank 0 just built and skip
    # the barrier below, pairing its next collective with the wrong one
    todo = d.broadcast(key in phantoms and not (data / "train.h5").exists() and not (data / "test.h5").exists())
    if not todo:
        return
    spec = phantoms[key]
    if d.main:
        from data_prep.phantom import build       # data_prep imports nothing of heartbeat's at module level
        size = max(64, cfg.model.image_size)
        log(f"building the phantom dataset in {data} ({spec['clips']} clips, {cfg.model.frames} frames, "
            f"{size}x{size}{', CMR' if spec['cmr'] else ''}); python -m data_prep.phantom does the same")
        build(data, clips=spec["clips"], frames=cfg.model.frames, size=size, cmr=spec["cmr"],
              workers=min(8, os.cpu_count() or 1), seed=0, progress=False)
    d.barrier()


# ---------------------------------------------------------------------------------- data order

class EpochSampler:
    """Yields, from global step `start`, lists of (dataset index, item seed) for this rank.

    Global batch g = per-rank batch * world. Epoch e = torch.randperm(N) with seed (seed, e);
    batches are consecutive g-slices of the concatenated epochs (wrapping across epoch ends), so
    step s covers positions [s*g, (s+1)*g) of the infinite sequence. One step yields `accum`
    micro-batches in a row (the loop consumes them in that order)."""

    def __init__(self, n: int, per_rank: int, world: int, rank: int, accum: int, seed: int, start_step: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.b, self.world, self.rank, self.accum = n, per_rank, world, rank, accum
        self.seed, self.start = seed, start_step
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = {epoch: torch.randperm(self.n, generator=g)}
        return self._perm_cache[epoch]

    def position(self, step: int) -> dict:
        """Where in the data a global step starts (what the resume state records)."""
        pos = step * self.accum * self.b * self.world
        return {"epoch": pos // self.n, "offset": pos % self.n, "step": step}

    def __iter__(self):
        step = self.start
        while True:
            for micro in range(self.accum):
                g0 = (step * self.accum + micro) * self.b * self.world   # first position of this micro-step
                rows = []
                for k in range(self.rank, self.b * self.world, self.world):
                    pos = g0 + k
                    epoch, off = divmod(pos, self.n)
                    rows.append((int(self._perm(epoch)[off]), self.seed * 7919 + pos))
                yield rows
            step += 1


class SeededItems(torch.utils.data.Dataset):
    """dataset[(i, s)] = dataset[i] read with torch's global RNG seeded by s (restored afterwards)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, s = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            item = dict(self.dataset[i])
        item["seed"] = s
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors; lists for strings and ints."""
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if torch.is_tensor(vals[0]) else list(vals)
    return out


def make_loader(dataset, sampler: EpochSampler, num_workers: int, seed: int):
    g = torch.Generator().manual_seed(seed)        # worker base seeds never touch the global RNG
    return torch.utils.data.DataLoader(
        SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        generator=g, persistent_workers=False, pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None)


# ------------------------------------------------------------------------------- encoder cache

def state_digest(*parts) -> str:
    """A short content hash of modules (their state dicts, names and values) and plain values."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        if isinstance(part, torch.nn.Module):
            for k, v in sorted(part.state_dict().items()):
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(np.ascontiguousarray(v.detach().cpu().float().numpy()).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def cache_key(model) -> str:
    """Identifies what the cache of a LatentDiffusion model holds: the VAE, the image prior, the frame
    size and the prior's layout."""
    m = model.cfg.model
    prior = model.image_prior
    return state_digest(model.vae, prior, ("latent_scale", m.latent_scale, "size", m.image_size,
                                           "prior", prior.kind, prior.feature, prior.tokens, prior.dim))


@torch.no_grad()
def ensure_cache(model, cfg: Config, d, log=print, batch_frames: int = 64) -> str | None:
    """The cache key of cfg.train.data/train.h5 for a LatentDiffusion model, writing the cache first if
    needed. None when the cache is switched off or cannot be written (training then encodes every
    step). Stored as float32, computed as the training step would (bf16 autocast on GPU, float32 on
    CPU), one VAE encoder pass per frame when the prior shares the VAE encoder:
    `latent` (N, F, C, h, w) = latent_scale * VAE mean, `prior_tokens` (N, F, T, D) = image_prior(frame).
    Rank 0 writes it while the others wait (a large split with the MedSAM prior takes minutes); the
    folder must be on storage every node sees."""
    if not cfg.train.cache:
        return None
    path = find_split(cfg.train.data, "train")
    key = cache_key(model)
    ds = ClipDataset(path, size=cfg.model.image_size, conditions=())
    # rank 0's view decides for all: another rank looking later could find the file rank 0 just wrote
    # and skip the broadcast below, pairing its next collective with the wrong one
    why = d.broadcast(cache_status(path, key, ds.num_clips, ds.frames) if d.main else None)
    if not why:
        log(f"encoder cache: {cache_path(path, key)}")
        return key
    ok = True
    if d.main:
        target = cache_path(path, key)
        log(f"writing the encoder cache {target} ({ds.num_clips} clips x {ds.frames} frames; was {why}); "
            f"--cache=false skips it")
        device = next(model.unet.parameters()).device
        was_training = model.training
        model.eval()
        stamp = source_stamp(path)     # before reading: a file changed meanwhile makes the cache stale

        def write(tmp):
            m, Fr, N = cfg.model, ds.frames, ds.num_clips
            with h5py.File(tmp, "w") as f:
                lat = f.create_dataset("latent", (N, Fr, m.latent_channels, m.latent_size, m.latent_size),
                                       dtype="float32", chunks=(1, Fr, m.latent_channels, m.latent_size, m.latent_size))
                tok = f.create_dataset("prior_tokens", (N, Fr, m.prior_tokens, m.prior_dim), dtype="float32",
                                       chunks=(1, Fr, m.prior_tokens, m.prior_dim))
                per = max(1, batch_frames // Fr)
                for c0 in range(0, N, per):
                    clips = range(c0, min(N, c0 + per))
                    x = torch.stack([ds[c]["video"] for c in clips]).to(device)     # (n, F, C, H, W)
                    with autocast(device):          # as the training step computes them
                        z, tokens = model.encode_with_prior(x, prior=True)
                    lat[c0:c0 + len(clips)] = z.float().cpu().numpy()
                    tok[c0:c0 + len(clips)] = tokens.cpu().numpy()
                f.attrs.update(dict(stamp, num_clips=N, frames=Fr, key=key, source=str(path),
                                    size=m.image_size, complete=True))
        t0 = time.time()
        try:
            atomic_write(target, write)
            log(f"encoder cache written in {time.time() - t0:.0f} s")
        except OSError as e:
            ok = False
            log(f"warning: could not write the encoder cache {target} ({e}); the frozen encoders run every step")
        model.train(was_training)
    ok = d.broadcast(ok)
    return key if ok else None
