"""M&Ms short-axis cine MRI -> HDF5 clips: the ED and ES volumes, slices as frames.

    python -m data_prep.mnms --src DIR --csv FILE --out DIR [--frames 16] [--size 256]
        [--split official|random] [--seed 0] [--workers N] [--skip-bad] [--force]

Input: every `<code>_sa.nii.gz` under --src (4D: x, y, z, t; SimpleITK gives (t, z, y, x)) with
its `<code>_sa_gt.nii.gz` (labels 1 LV, 2 MYO, 3 RV) beside it, and the M&Ms information CSV with
the columns External code, VendorName, Vendor, Centre, ED, ES (ED/ES: 0-based time indices).
Each subject gives two clips, ED and ES: the z slices in stored order become the frames,
resampled to --frames by nearest-slice sampling (images and masks alike, so they stay aligned),
each slice resized to --size x --size (area / nearest). Intensities: per volume, 0 .. the 99.5th
percentile -> 0..255. Text: "A cardiac MRI short-axis volume at end-diastole." (or end-systole).
Split: official when the files sit under at least two of Training/, Validation/, Testing/ (-> train,
val, test), else a seeded patient-level ~90/10 split (train, test).
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import cv2
import numpy as np

from . import conditions
from .camus import random_split, read_image
from .h5io import CMR_LABELS, DataPrepError, add_cli_args, convert, run_cli
from .phantom import CMR_TEXT

COLUMNS = ("External code", "VendorName", "Vendor", "Centre", "ED", "ES")
OFFICIAL = {"training": "train", "validation": "val", "testing": "test"}


def read_csv(path) -> dict:
    """-> {code: row dict}; DataPrepError when the file or a needed column is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataPrepError(f"--csv {path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in COLUMNS if c not in cols]
        if missing:
            raise DataPrepError(f"--csv {path}: missing column(s) {', '.join(missing)}; "
                                f"found {', '.join(cols) or 'no header'}")
        rows = {}
        for r in reader:
            r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
            rows[r["External code"]] = r
    return rows


def find_subjects(src) -> list[Path]:
    src = Path(src)
    if not src.is_dir():
        raise DataPrepError(f"--src {src}: not a folder")
    files = sorted(src.rglob("*_sa.nii.gz"))
    if not files:
        raise DataPrepError(f"--src {src}: no <code>_sa.nii.gz file found")
    return files


def official_group(path: Path, src: Path) -> str | None:
    for part in path.relative_to(src).parts:
        if part.lower() in OFFICIAL:
            return OFFICIAL[part.lower()]
    return None


def _index(row, key, code):
    try:
        return int(float(row[key]))
    except ValueError:
        raise DataPrepError(f"{code}: CSV column {key} is {row[key]!r}, not a frame index") from None


def make_clip(case) -> dict:
    """case = (code, sa file, csv row, phase "ED"|"ES", frames, size) -> clip dict."""
    code, sa, row, phase, frames, size = case
    cv2.setNumThreads(1)
    sa = Path(sa)
    gt_path = sa.with_name(f"{code}_sa_gt.nii.gz")
    img, spacing = read_image(sa, code)
    gt, _ = read_image(gt_path, code)
    if img.ndim != 4:
        raise DataPrepError(f"{code}: {sa.name} has shape {img.shape}; expected 4D (t, z, y, x)")
    if gt.shape != img.shape:
        raise DataPrepError(f"{code}: {gt_path.name} has shape {gt.shape} but {sa.name} has {img.shape}")
    t = _index(row, phase, code)
    if not 0 <= t < img.shape[0]:
        raise DataPrepError(f"{code}: CSV {phase}={t} is outside the {img.shape[0]} time frames of {sa.name}")
    vol, lab = img[t].astype(np.float32), gt[t]
    if lab.max() > 3:
        raise DataPrepError(f"{code}: {gt_path.name} holds label {int(lab.max())}; M&Ms labels are 0..3")
    Z, H, W = vol.shape
    idx = np.round(np.linspace(0, Z - 1, frames)).astype(int)
    hi = float(np.percentile(vol, 99.5)) or 1.0
    vol8 = np.clip(vol / hi * 255, 0, 255).astype(np.uint8)
    interp = cv2.INTER_AREA if size < min(H, W) else cv2.INTER_LINEAR
    video = np.stack([cv2.resize(vol8[z], (size, size), interpolation=interp) for z in idx])
    mask = np.stack([cv2.resize(lab[z].astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) for z in idx])
    meta = dict(patient=code, phase=phase, time_index=t, ED=_index(row, "ED", code), ES=_index(row, "ES", code),
                VendorName=row["VendorName"], Vendor=row["Vendor"], Centre=row["Centre"],
                slice_indices=idx.tolist(), slices=Z, spacing=list(spacing), size_orig=[H, W],
                source_file=str(sa), order="stored z order")
    return dict(video=video, mask=mask, mask_valid=np.ones(frames, bool), text=CMR_TEXT[phase],
                view="SA", patient=code, meta=meta, **conditions.extract(video, mask))


def build(src, csv_path, out, frames=16, size=256, split="official", seed=0, workers=1,
          skip_bad=False, force=False, log=None):
    src = Path(src)
    rows = read_csv(csv_path)
    files = find_subjects(src)
    cases, skipped, groups = [], [], {}
    for sa in files:
        code = sa.name[: -len("_sa.nii.gz")]
        if code not in rows:
            msg = f"{code}: {sa} has no row in {csv_path}"
            if not skip_bad:
                raise DataPrepError(msg + " (use --skip-bad to skip such cases)")
            skipped.append(msg)
            continue
        groups[code] = official_group(sa, src) if split == "official" else None
        for phase in ("ED", "ES"):
            cases.append((code, str(sa), rows[code], phase, frames, size))
    if not cases:
        raise DataPrepError(f"--src {src}: no subject is listed in {csv_path}")
    if any(g is None for g in groups.values()) or len(set(groups.values())) < 2:
        rs = random_split(list(groups), seed)
        groups = {c: s for s, cs in rs.items() for c in cs}
    splits = {}
    for c in cases:
        splits.setdefault(groups[c[0]], []).append(c)
    order = [s for s in ("train", "val", "test") if s in splits]
    paths, bad = convert({s: splits[s] for s in order}, make_clip, out, frames=frames, size=size,
                         labels=CMR_LABELS, source="mnms", workers=workers, skip_bad=skip_bad,
                         force=force, log=log)
    return paths, skipped + bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True)
    ap.add_argument("--csv", required=True)
    add_cli_args(ap, "subjects")
    a = ap.parse_args(argv)
    return run_cli(lambda log: build(a.src, a.csv, a.out, a.frames, a.size, a.split, a.seed, max(1, a.workers),
                                     a.skip_bad, a.force, log=log))


if __name__ == "__main__":
    sys.exit(main())
