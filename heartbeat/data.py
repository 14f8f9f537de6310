"""HDF5 datasets for frames (stage 1) and clips (stage 2); the batch contract is docs/INTERFACES.md.

    ds = FrameDataset(find_split("data/phantom", "train"), size=64)
    b = ds[0]   # image (1,H,W) [-1,1], prior (1,H,W), sketch (1,H,W) {0,1}, mask (H,W) int64,
                # mv (1,H,W) {0,1}, mask_valid () bool, text str, clip int, frame int
    cs = ClipDataset(path, size=64, with_flow=True)
    c = cs[0]   # video (F,1,H,W), sketch/mv (F,1,H,W), mask (F,H,W), flow (F,2,H,W) pixels,
                # mask_valid (F,), prior (1,H,W), text, clip

Files are opened lazily, one h5py handle per process: the dataset pickles without a handle and
opens the file at its first __getitem__ in each DataLoader worker. The constructor validates the
file (schema, datasets, shapes) and raises DataError naming the file, the dataset and the fix.
`conditions=` lists the optional arrays to read (any of prior, sketch, mask, mv, flow; the model's
names from ModelConfig.conditions work too: "image" means prior, "text" is always returned); the
others are neither read nor returned. `size=` resizes on load: images with area (down) or bilinear (up)
interpolation, masks nearest, binary maps by max-pooling (down; so thin edges survive) or nearest
(up), flow bilinearly with its vectors scaled by the size ratio.

Encoder cache (DESIGN.md §4): `cache=KEY` reads `latent` (the frozen VAE's scaled means) and
`prior_tokens` from `<split>.cache-KEY.h5` beside the split file, written by
heartbeat.trainer.ensure_cache for one VAE + image prior + size (KEY hashes them). Items then carry
`latent` ((C, h, w) or (F, C, h, w)) and `prior_tokens` (T, D) instead of the `prior` image; the prior
frame is drawn exactly as without the cache. The cache is a separate file so that writing it can never
damage the data file; `cache_status` says whether one is usable (it records the source file's size,
modification time, clip and frame counts, and is ignored when any differs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

SCHEMA = 1
OPTIONAL = ("prior", "sketch", "mask", "mv", "flow")
_DATASET_OF = {"sketch": "sketch", "mask": "mask", "mv": "mv", "flow": "flow", "prior": "video"}


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
    def __init__(self, h5_path, size: int | None = None, conditions=OPTIONAL, with_flow: bool = False,
                 cache: str | None = None):
        self.path = str(h5_path)
        # the model's condition names (config.CONDITIONS) are accepted too: image = prior, text always
        conditions = tuple(dict.fromkeys("prior" if c == "image" else c for c in conditions if c != "text"))
        bad = [c for c in conditions if c not in OPTIONAL]
        if bad:
            raise ValueError(f"conditions: unknown {', '.join(bad)}; choose from {', '.join(OPTIONAL)}")
        if with_flow and "flow" not in conditions:
            conditions = conditions + ("flow",)
        if not with_flow:
            conditions = tuple(c for c in conditions if c != "flow")
        self.conditions = conditions
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
            need = ["video", "text", "mask_valid"] + [_DATASET_OF[c] for c in self.conditions]
            for name in need:
                if name not in f:
                    fix = ("pass with_flow=False / drop 'flow' from conditions" if name == "flow"
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
    """Stage 1: item i is frame i % F of clip i // F, with one other frame of the clip as prior."""

    def __init__(self, h5_path, size=None, conditions=("prior", "sketch", "mask", "mv"), cache=None):
        super().__init__(h5_path, size, conditions, with_flow=False, cache=cache)

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
        if "prior" in self.conditions:
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

    def __init__(self, h5_path, size=None, conditions=("prior", "sketch", "mask", "mv"), with_flow=True,
                 cache=None):
        super().__init__(h5_path, size, conditions, with_flow=with_flow, cache=cache)

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
        if "prior" in self.conditions:
            self._prior(out, lambda j: out["video"][j].clone(), c, int(torch.randint(self.frames, ()).item()))
        for name in ("sketch", "mv"):
            if name in self.conditions:
                out[name] = self._binary(f[name][c])
        if "mask" in self.conditions:
            out["mask"] = self._mask(f["mask"][c])
        if "flow" in self.conditions:
            out["flow"] = self._flow(f["flow"][c])
        return out
