"""Exports of a synthetic dataset (samples.h5, or any file in the docs/ARCHITECTURE.md §Data schema)
into the formats other tools read (docs/ARCHITECTURE.md §Sampling):

    export(h5, out, "nnunet")   nnU-Net v2 raw dataset: imagesTr/CASE_0000.nii.gz, labelsTr/CASE.nii.gz
                                (one 2-D case per annotated frame, stored as H x W x 1 NIfTI with the
                                pixel spacing), dataset.json (channel_names, labels, numTraining,
                                file_ending)
    export(h5, out, "camus")    the CAMUS 2023 release layout: database_nifti/patientNNNN/
                                patientNNNN_{2CH,4CH}_half_sequence[_gt].nii.gz + Info_{view}.cfg
                                (ED 1, ES F; heart-model clips: EF = their
                                area-length volume EF, AreaEF = the requested area EF),
                                database_split/subgroup_training.txt; one patient per
                                clip; `python -m data_prep.camus --src OUT` reads it back
    export(h5, out, "mp4")      clip_NNNNN.mp4 (OpenCV mp4v; MJPG .avi where that codec is missing):
                                generated | mask overlay | sketch | MV, for viewing

Everything is written into a temporary sibling folder and renamed into place at the end, so a
failure leaves nothing half-written; an existing non-empty OUT is replaced only with force=True.
Spacing: the clip's source meta `spacing_resized` (CAMUS-driven samples), else `spacing` (mm).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np

FORMATS = ("nnunet", "camus", "mp4")
VIEWS = ("2CH", "4CH")


class ExportError(ValueError):
    """Bad input for an export: the message names the file or option and the fix."""


def _metas(f) -> list[dict]:
    out = []
    for s in (f["meta"].asstr()[()] if "meta" in f else [""] * len(f["video"])):
        try:
            out.append(json.loads(s) if s else {})
        except ValueError:
            out.append({})
    return out


def _spacing(meta: dict, default: float) -> tuple[float, float]:
    src = meta.get("source") if isinstance(meta.get("source"), dict) else meta
    sp = src.get("spacing_resized") or meta.get("spacing_resized")
    return (float(sp[0]), float(sp[1])) if sp else (default, default)


def _labels(f) -> dict:
    try:
        lab = json.loads(f.attrs.get("labels", ""))
    except (ValueError, TypeError):
        lab = {}
    return {int(k): v for k, v in lab.items()} or {0: "background", 1: "LV cavity", 2: "myocardium", 3: "LA"}


def _nifti(a: np.ndarray, spacing, path: Path) -> None:
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(np.ascontiguousarray(a))
    img.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(img, str(path), useCompression=True)


def _nnunet(f, out: Path, spacing: float, name: str) -> int:
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    N, Fr = f["video"].shape[:2]
    valid = f["mask_valid"][()] if "mask_valid" in f else np.ones((N, Fr), bool)
    n = 0
    for i, meta in enumerate(_metas(f)):
        sx, sy = _spacing(meta, spacing)
        video, mask = f["video"][i], f["mask"][i]
        for fr in np.flatnonzero(valid[i]):
            case = f"{name}_{i:05d}_{fr:02d}"
            # 2-D as a one-slice volume (array (1, H, W) = image x W, y H, z 1), spacing (x, y, z)
            _nifti(video[fr][None], (sx, sy, 1.0), out / "imagesTr" / f"{case}_0000.nii.gz")
            _nifti(mask[fr][None], (sx, sy, 1.0), out / "labelsTr" / f"{case}.nii.gz")
            n += 1
    labels = {v: k for k, v in sorted(_labels(f).items())}
    ds = {"channel_names": {"0": "US"}, "labels": labels, "numTraining": n, "file_ending": ".nii.gz",
          "name": name, "description": f"HeartBeat synthetic echo frames from {f.filename}"}
    (out / "dataset.json").write_text(json.dumps(ds, indent=2))
    return n


def _camus(f, out: Path, spacing: float, view_default: str) -> int:
    root, split = out / "database_nifti", out / "database_split"
    root.mkdir()
    split.mkdir()
    views = list(f["view"].asstr()[()]) if "view" in f else [""] * len(f["video"])
    patients = []
    for i, meta in enumerate(_metas(f)):
        view = (views[i] or view_default).upper()
        if view not in VIEWS:
            raise ExportError(f"clip {i} has view '{views[i]}'; the CAMUS layout holds 2CH / 4CH only")
        pat = f"patient{i + 1:04d}"
        d = root / pat
        d.mkdir()
        video, mask = f["video"][i], f["mask"][i]
        sx, sy = _spacing(meta, spacing)
        _nifti(video, (sx, sy, 1.0), d / f"{pat}_{view}_half_sequence.nii.gz")
        _nifti(mask, (sx, sy, 1.0), d / f"{pat}_{view}_half_sequence_gt.nii.gz")
        src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        info = {"ED": 1, "ES": len(video), "NbFrame": len(video), "ImageQuality": "Synthetic"}
        if src.get("ef_area_length") is not None:        # heart-model clips: a volume EF, as CAMUS's EF is
            info["EF"] = round(100 * float(src["ef_area_length"]), 2)
        if src.get("ef_requested") is not None:
            info["AreaEF"] = round(100 * float(src["ef_requested"]), 2)
        (d / f"Info_{view}.cfg").write_text("".join(f"{k}: {v}\n" for k, v in info.items()))
        patients.append(pat)
    (split / "subgroup_training.txt").write_text("\n".join(patients) + "\n")
    return len(patients)


def _video_writer(path: Path, fps: int, size):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if w.isOpened():
        return w, path
    w.release()
    path.unlink(missing_ok=True)
    avi = path.with_suffix(".avi")
    return cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), fps, size), avi


def _mp4(f, out: Path, fps: int) -> int:
    from .preview import preview_frames
    for i in range(len(f["video"])):
        frames = preview_frames(f, i)                       # (F, H, W', 3) RGB
        w, _ = _video_writer(out / f"clip_{i:05d}.mp4", fps, (frames.shape[2], frames.shape[1]))
        for fr in frames:
            w.write(np.ascontiguousarray(fr[..., ::-1]))     # OpenCV wants BGR
        w.release()
    return len(f["video"])


def export(h5_path, out, fmt: str, *, force: bool = False, spacing: float = 1.0, view: str = "4CH",
           name: str = "HeartBeatSynthetic", fps: int = 8) -> tuple[Path, int]:
    """Write `fmt` into folder `out`; returns (out, number of cases / clips)."""
    h5_path, out = Path(h5_path), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt}: choose one of {'|'.join(FORMATS)}")
    if not h5_path.is_file():
        raise ExportError(f"--fake={h5_path}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"--out={out} exists and is not empty; pass --force to replace it")
    try:
        f = h5py.File(h5_path, "r")
    except OSError as e:
        raise ExportError(f"--fake={h5_path}: not a readable HDF5 file ({e})") from None
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with f:
            if "video" not in f or f["video"].ndim != 4:
                raise ExportError(f"--fake={h5_path}: no 'video' (N, F, H, W) dataset (docs/ARCHITECTURE.md §Data)")
            if fmt in ("nnunet", "camus") and "mask" not in f:
                raise ExportError(f"--fake={h5_path} holds no masks, which a {fmt} dataset needs: sample with the "
                                  f"mask condition (--conditions=...,mask, or --anatomy=model)")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            n = {"nnunet": lambda: _nnunet(f, tmp, spacing, name),
                 "camus": lambda: _camus(f, tmp, spacing, view),
                 "mp4": lambda: _mp4(f, tmp, fps)}[fmt]()
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, n
