"""Copies of patients: how close each synthetic clip is to the nearest real training clip
(docs/METRICS.md §Privacy).

Feature space (stated): the segmenter's encoder (heartbeat/segmenter.py, `SegUNet.encode`, the
deepest map, 64 channels at 1/4 of the segmenter's size), average-pooled to a 4 x 4 grid and
flattened (1024-d, so where the chambers are still counts), per frame; a clip's feature is the
mean over its frames, scaled to unit length. Distance: Euclidean between clip features (0 = the
same clip; at most 2). A real clip of F frames is compared over its first F_fake frames, the ones
tools/sample.py generates from it.

Threshold: the `quantile` % (default 1) of the real test clips' distances to their nearest real
training clip, patients never shared between the splits: a synthetic clip closer to a training
clip than almost every unseen real patient is a likely copy.

    model = load_segmenter(FILE) (or train_segmenter(train.h5))
    rep = copy_report(fake_video, "data/phantom/train.h5", "data/phantom/test.h5", model)
    rep["distance"], rep["nearest"], rep["flagged"], rep["threshold"], rep["rate"]
    filter_file("out/samples.h5", "data/phantom", model)   # drops flagged clips, records them
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from .utils import atomic_write

GRID = 4
FEATURE_SPACE = (f"segmenter encoder (deepest map, {GRID}x{GRID} average pool, per frame, mean over "
                 "frames, unit length), Euclidean distance")


class PrivacyError(ValueError):
    """Bad input for the copy check: the message names the file and the fix."""


@torch.no_grad()
def clip_features(model, videos, frames: int | None = None, batch: int = 64) -> np.ndarray:
    """videos: (N, F, H, W) uint8 array or h5py dataset -> (N, D) float32 unit vectors; with
    `frames`, only each clip's first `frames` frames."""
    from .segmenter import _resize
    size = model.config["size"]
    out = []
    for i in range(len(videos)):
        v = np.asarray(videos[i])[:frames]
        x = torch.from_numpy(_resize(v, size, False)).float().div(127.5).sub(1)[:, None]
        fmap = torch.cat([model.encode(x[j:j + batch]) for j in range(0, len(x), batch)])
        f = F.adaptive_avg_pool2d(fmap, GRID).flatten(1).mean(0)
        out.append(f / f.norm().clamp_min(1e-12))
    return torch.stack(out).numpy().astype(np.float32)


def nearest(feats: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance (N,), index (N,)) of each row's nearest row of `ref`."""
    d = torch.cdist(torch.from_numpy(feats).double(), torch.from_numpy(ref).double())
    dist, idx = d.min(1)
    return dist.numpy(), idx.numpy()


def _open(path, what: str) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise PrivacyError(f"{what} {path} not found: the copy check needs the real folder's train.h5 "
                           f"and test.h5 (made by data_prep)")
    f = h5py.File(path, "r")
    if "video" not in f or "patient" not in f:
        f.close()
        raise PrivacyError(f"{path} has no 'video' or 'patient' dataset (docs/ARCHITECTURE.md §Data)")
    return f


def check_reference(real_dir, quantile: float = 1.0) -> None:
    """Before any sampling: the real folder has train.h5 and test.h5 with disjoint patients."""
    real_dir = Path(real_dir)
    if not 0 < quantile < 100:
        raise PrivacyError(f"copy quantile {quantile}: a percentage in (0, 100), e.g. 1")
    with _open(real_dir / "train.h5", "real training split") as tr, _open(real_dir / "test.h5", "real test split") as te:
        both = sorted(set(tr["patient"].asstr()[()]) & set(te["patient"].asstr()[()]))
    if both:
        raise PrivacyError(f"{real_dir}: train.h5 and test.h5 share patients {both[:5]}: the threshold needs "
                           "unseen test patients (split by patient)")


def copy_report(fake_video, train_path, test_path, model, quantile: float = 1.0) -> dict:
    """Distances of each fake clip to the nearest real training clip, and the threshold from the real
    test clips' own nearest-training distances (test and training patients must not overlap)."""
    if not 0 < quantile < 100:
        raise PrivacyError(f"copy quantile {quantile}: a percentage in (0, 100), e.g. 1")
    Ff = np.asarray(fake_video[0]).shape[0] if len(fake_video) else 1
    with _open(train_path, "real training split") as tr, _open(test_path, "real test split") as te:
        p_tr, p_te = set(tr["patient"].asstr()[()]), set(te["patient"].asstr()[()])
        both = sorted(p_tr & p_te)
        if both:
            raise PrivacyError(f"{train_path} and {test_path} share patients {both[:5]}: the threshold needs "
                               "unseen test patients (split by patient)")
        patients = list(tr["patient"].asstr()[()])
        f_tr = clip_features(model, tr["video"], Ff)
        f_te = clip_features(model, te["video"], Ff)
    d_te, _ = nearest(f_te, f_tr)
    threshold = float(np.percentile(d_te, quantile))
    f_fake = clip_features(model, fake_video) if len(fake_video) else np.zeros((0, f_tr.shape[1]), np.float32)
    dist, idx = nearest(f_fake, f_tr) if len(f_fake) else (np.zeros(0), np.zeros(0, int))
    flagged = dist < threshold
    return dict(distance=dist, nearest=idx, nearest_patient=[patients[j] for j in idx], flagged=flagged,
                threshold=threshold, quantile=quantile, rate=float(flagged.mean()) if len(flagged) else 0.0,
                test_distances=d_te, feature_space=FEATURE_SPACE, frames=Ff,
                train=str(train_path), test=str(test_path))


def summary(rep: dict) -> str:
    return (f"copies: {int(rep['flagged'].sum())} of {len(rep['flagged'])} clips closer to a training clip than "
            f"{rep['threshold']:.4g} (percentile {rep['quantile']:g} of {len(rep['test_distances'])} "
            f"real test clips' nearest-training distances; {rep['feature_space']})")


def filter_file(samples_path, real_dir, model, quantile: float = 1.0, record=None) -> dict:
    """Drop the flagged clips of a samples.h5 in place (atomically), store `copy_distance` for those
    kept and root attribute `copy_filter` (JSON: threshold, feature space, every dropped clip's index,
    seed, distance, nearest training patient); the same record goes to `record` (a JSON path) if given."""
    samples_path, real_dir = Path(samples_path), Path(real_dir)
    with h5py.File(samples_path, "r") as f:
        rep = copy_report(f["video"], real_dir / "train.h5", real_dir / "test.h5", model, quantile)
        metas = list(f["meta"].asstr()[()]) if "meta" in f else ["{}"] * len(rep["flagged"])
    keep = np.flatnonzero(~rep["flagged"])
    dropped = [dict(index=int(i), seed=json.loads(metas[i] or "{}").get("seed"),
                    distance=round(float(rep["distance"][i]), 6), nearest_train_patient=rep["nearest_patient"][i])
               for i in np.flatnonzero(rep["flagged"])]
    info = dict(threshold=rep["threshold"], quantile=quantile, feature_space=rep["feature_space"],
                real=str(real_dir), before=len(rep["flagged"]), kept=len(keep), dropped=dropped,
                rate_before=rep["rate"])

    def write(tmp):
        with h5py.File(samples_path, "r") as src, h5py.File(tmp, "w") as out:
            for name, ds in src.items():
                shape = (len(keep), *ds.shape[1:])
                kw = {}
                if ds.chunks is not None:
                    kw = dict(chunks=tuple(min(c, max(1, s)) for c, s in zip(ds.chunks, shape)),
                              compression=ds.compression)
                o = out.create_dataset(name, shape=shape, dtype=ds.dtype, **kw)
                for j, i in enumerate(keep):
                    o[j] = ds[i]
            out.create_dataset("copy_distance", data=rep["distance"][keep].astype(np.float32))
            out.attrs.update(src.attrs)
            out.attrs["count"] = len(keep)
            out.attrs["copy_filter"] = json.dumps(info)

    atomic_write(samples_path, write)
    if record is not None:
        atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2)))
    rep["info"] = info
    return rep
