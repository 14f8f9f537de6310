"""CAMUS (both releases) -> HDF5 clips (docs/ARCHITECTURE.md §Data).

    python -m data_prep.camus --src DIR --out DIR [--frames 16] [--size 256]
        [--split official|random] [--seed 0] [--workers N] [--skip-bad] [--force]

Layouts, detected from the files under --src (or --src itself being the inner folder):
    2019 challenge release   training/patientXXXX/patientXXXX_{2CH,4CH}_sequence.mhd (+ .raw),
                             _ED.mhd, _ED_gt.mhd, _ES.mhd, _ES_gt.mhd, Info_{2CH,4CH}.cfg.
                             Only ED and ES are annotated: mask_valid is True on the first (ED)
                             and last (ES) output frames; the other frames' masks are ZEROS
                             (never a guess), so their mv is empty and mv_points NaN.
    2023 public release      database_nifti/patientXXXX/patientXXXX_{2CH,4CH}_half_sequence.nii.gz
                             + _half_sequence_gt.nii.gz (every frame annotated), Info_*.cfg, and
                             database_split/subgroup_{training,validation,testing}.txt.

Reading: SimpleITK returns (frames, H, W) with the sector apex at the top: frames are kept as
stored (upright). Info cfg "ED"/"ES" are 1-based frame numbers; the clip runs ED -> ES (reversed
if ES comes first) with --frames indices sampled uniformly (rounded; repeated when the sequence
is shorter). Frames are resized to --size x --size (area for images, nearest for masks; the
aspect ratio is not kept, as in the paper). Labels stay 0 bg, 1 LV cavity, 2 myocardium, 3 LA.
meta: the Info cfg values (ED, ES, NbFrame, EF from "EF" or "LVef", ImageQuality, Sex, Age,
FrameRate, ...), pixel spacing before/after resizing, source file, frame indices, release.

Split: --split official uses the 2023 split files (-> train.h5, val.h5, test.h5); when they are
absent (2019) or with --split random, a seeded patient-level split of about 90/10 (train, test).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import SimpleITK as sitk

from . import conditions
from .h5io import ECHO_LABELS, DataPrepError, add_cli_args, convert, run_cli

VIEWS = ("2CH", "4CH")
TEXT = {"2CH": "An ECHO with 2-chamber view.", "4CH": "An ECHO with 4-chamber view."}
SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}


# ----------------------------------------------------------------------------- discovery

def detect(src) -> tuple[str, Path, Path | None]:
    """-> (release "2019" | "2023", folder of patient folders, split folder or None)."""
    src = Path(src)
    if not src.is_dir():
        raise DataPrepError(f"--src {src}: not a folder")
    if (src / "database_nifti").is_dir():
        return "2023", src / "database_nifti", src / "database_split"
    if (src / "training").is_dir():
        return "2019", src / "training", None
    pats = sorted(p for p in src.glob("patient*") if p.is_dir())
    for p in pats:
        if list(p.glob("*_half_sequence.nii*")):
            return "2023", src, src.parent / "database_split"
        if list(p.glob("*_sequence.mhd")):
            return "2019", src, None
    raise DataPrepError(f"--src {src}: no CAMUS layout found: expected database_nifti/patientXXXX/"
                        f"*_half_sequence.nii.gz (2023 release) or training/patientXXXX/*_sequence.mhd "
                        f"(2019 release)")


def find_cases(root: Path, release: str) -> list[tuple]:
    """-> [(release, patient folder, view)] for every view whose sequence file exists."""
    cases = []
    for p in sorted(q for q in root.glob("patient*") if q.is_dir()):
        for v in VIEWS:
            seq = _seq_path(p, v, release)
            if seq.exists():
                cases.append((release, str(p), v))
    if not cases:
        raise DataPrepError(f"{root}: no patient folder holds a {'*_half_sequence.nii.gz' if release == '2023' else '*_sequence.mhd'} file")
    return cases


def _seq_path(p: Path, view: str, release: str) -> Path:
    return p / (f"{p.name}_{view}_half_sequence.nii.gz" if release == "2023" else f"{p.name}_{view}_sequence.mhd")


def read_info(path: Path) -> dict:
    """Info_*.cfg "Key: value" lines -> dict (numbers converted)."""
    if not path.exists():
        raise DataPrepError(f"{path.parent.name}: {path} is missing (needed for ED/ES)")
    info = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, val = line.partition(":")
        if not sep:
            continue
        val = val.strip()
        try:
            num = float(val)
            val = int(num) if num.is_integer() and "." not in val else num
        except ValueError:
            pass
        info[key.strip()] = val
    for key in ("ED", "ES"):
        if not isinstance(info.get(key), int):
            raise DataPrepError(f"{path.parent.name}: {path} has no integer '{key}:' line")
    return info


def read_image(path: Path, patient: str) -> tuple[np.ndarray, tuple]:
    """SimpleITK read -> (array (frames, H, W) or (H, W), spacing (x, y))."""
    if not path.exists():
        raise DataPrepError(f"{patient}: {path} is missing")
    try:
        with _StderrCapture() as cap:           # MetaIO prints its reasons to C stderr
            img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        lines = [ln.strip() for ln in (cap.text + "\n" + str(e)).splitlines()
                 if ln.strip() and "ITK ERROR" not in ln and not ln.startswith(("Exception", "Reason"))]
        why = "; ".join(lines[:2]) or "unreadable"
        raise DataPrepError(f"{patient}: {path} cannot be read by SimpleITK ({why})") from None
    a = sitk.GetArrayFromImage(img)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    return a, tuple(float(s) for s in img.GetSpacing()[:2])


class _StderrCapture:
    """Collect what C/C++ code writes to file descriptor 2 (not shown to the user; used in errors)."""

    def __enter__(self):
        self.text = ""
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._tmp = tempfile.TemporaryFile()
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._tmp.seek(0)
            self.text = self._tmp.read().decode(errors="replace")
            self._tmp.close()
        return False


# ----------------------------------------------------------------------------- one clip

def sample_indices(ed: int, es: int, frames: int) -> np.ndarray:
    """0-based indices from ED to ES (both included), `frames` of them, uniformly."""
    return np.round(np.linspace(ed, es, frames)).astype(int)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.uint8 else np.clip(a, 0, 255).astype(np.uint8)


def make_clip(case, frames: int = 16, size: int = 256) -> dict:
    """case = (release, patient folder, view[, frames, size]) -> clip dict for ClipWriter."""
    release, pdir, view = case[:3]
    if len(case) > 3:
        frames, size = case[3], case[4]
    cv2.setNumThreads(1)
    p = Path(pdir)
    pat = p.name
    info = read_info(p / f"Info_{view}.cfg")
    seq_path = _seq_path(p, view, release)
    seq, spacing = read_image(seq_path, pat)
    if seq.ndim != 3:
        raise DataPrepError(f"{pat}: {seq_path} has shape {seq.shape}; expected (frames, H, W)")
    T, H, W = seq.shape
    ed, es = info["ED"] - 1, info["ES"] - 1
    for key, i in (("ED", ed), ("ES", es)):
        if not 0 <= i < T:
            raise DataPrepError(f"{pat}: Info_{view}.cfg {key}={i + 1} is outside the {T} frames of {seq_path.name}")
    idx = sample_indices(ed, es, frames)
    if release == "2023":
        gt_path = p / f"{pat}_{view}_half_sequence_gt.nii.gz"
        gt, _ = read_image(gt_path, pat)
        if gt.shape != seq.shape:
            raise DataPrepError(f"{pat}: {gt_path.name} has {gt.shape[0] if gt.ndim == 3 else 1} frames of "
                                f"{gt.shape[-2:]} but {seq_path.name} has {T} frames of {(H, W)}")
        masks = gt[idx]
        valid = np.ones(frames, bool)
    else:
        masks = np.zeros((frames, H, W), np.uint8)
        valid = np.zeros(frames, bool)
        for phase, pos in (("ED", 0), ("ES", frames - 1)):
            gt_path = p / f"{pat}_{view}_{phase}_gt.mhd"
            gt, _ = read_image(gt_path, pat)
            if gt.shape != (H, W):
                raise DataPrepError(f"{pat}: {gt_path.name} is {gt.shape}, the frames of {seq_path.name} are {(H, W)}")
            masks[pos], valid[pos] = gt, True
    if masks.max() > 3:
        raise DataPrepError(f"{pat}: {view} masks hold label {int(masks.max())}; CAMUS labels are 0..3")
    video = np.stack([cv2.resize(_to_uint8(seq[i]), (size, size), interpolation=cv2.INTER_AREA
                                 if size < min(H, W) else cv2.INTER_LINEAR) for i in idx])
    mask = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
                     for m in masks])
    mask[~valid] = 0
    derived = conditions.extract(video, mask)
    derived["mv_points"][~valid] = np.nan
    ef = info.get("EF", info.get("LVef"))
    meta = dict(info, EF=ef, patient=pat, view=view, release=release, source_file=str(seq_path),
                frame_indices=idx.tolist(), annotated=valid.tolist(), spacing=list(spacing),
                spacing_resized=[spacing[0] * W / size, spacing[1] * H / size], size_orig=[H, W])
    return dict(video=video, mask=mask, mask_valid=valid, text=TEXT[view], view=view, patient=pat,
                meta=meta, **derived)


def _make(case):
    return make_clip(case)


# ----------------------------------------------------------------------------- splits

def random_split(patients: list[str], seed: int, test_frac: float = 0.1) -> dict:
    """Seeded patient-level split, about 90/10 (at least one test patient when there are two)."""
    pats = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(pats))
    n_test = max(1 if len(pats) >= 2 else 0, round(test_frac * len(pats)))
    test = {pats[i] for i in order[:n_test]}
    return {"train": [p for p in pats if p not in test], "test": sorted(test)}


def official_split(split_dir: Path | None) -> dict | None:
    if split_dir is None or not split_dir.is_dir():
        return None
    out = {}
    for split, name in SPLIT_FILES.items():
        f = split_dir / name
        if f.exists():
            out[split] = [s.strip() for s in f.read_text().split() if s.strip()]
    return out or None


def build(src, out, frames=16, size=256, split="official", seed=0, workers=1, skip_bad=False,
          force=False, log=None):
    release, root, split_dir = detect(src)
    cases = find_cases(root, release)
    pats = [Path(c[1]).name for c in cases]
    groups = official_split(split_dir) if split == "official" else None
    if groups is None:
        groups = random_split(pats, seed)
    else:
        unknown = sorted(set(pats) - {p for g in groups.values() for p in g})
        if unknown:
            raise DataPrepError(f"{split_dir}: patients {', '.join(unknown[:5])} are in no split file")
    where = {p: s for s, g in groups.items() for p in g}
    splits = {s: [(*c, frames, size) for c in cases if where[Path(c[1]).name] == s] for s in groups}
    splits = {s: c for s, c in splits.items() if c}
    return convert(splits, _make, out, frames=frames, size=size, labels=ECHO_LABELS,
                   source=f"camus{release}", workers=workers, skip_bad=skip_bad, force=force, log=log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    add_cli_args(ap, "cases")
    a = ap.parse_args(argv)
    return run_cli(lambda log: build(a.src, a.out, a.frames, a.size, a.split, a.seed, max(1, a.workers),
                                     a.skip_bad, a.force, log=log))


if __name__ == "__main__":
    sys.exit(main())
