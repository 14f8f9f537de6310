"""Evaluate generated clips against a real split: FID, FVD, SSIM and controllability
(docs/ARCHITECTURE.md §Evaluation).

    python tools/eval.py --real=data/phantom --fake=runs/003-sample/samples.h5 [--split=test]
        [--metrics=fid,fvd,ssim,control] [--inception=FILE] [--i3d=FILE] [--segmenter=FILE]
        [--seg_steps=300] [--seg_data=H5] [--group=conditions|conditions,view] [--out=DIR]
        [--device=cuda|cpu] [--threads=N]

--real is a folder of <split>.h5 files or one .h5 file; --fake is a samples.h5 in the §4 schema.
Each generated clip i is paired with the real clip that drove it, `source_index`, and belongs to a
condition subset, `conditions` ("text,image,mask"); both are read from a per-sample dataset of that
name, else from the clip's `meta` JSON, else from a root attribute (conditions only); without
source_index, clip i is paired with real clip i (a warning says so). One row per condition subset
(the paper's ablation table), plus a reference row that runs the control metrics on the real
source clips themselves (the segmenter's and flow estimator's own floor).

Metrics (docs/METRICS.md gives the exact protocols):
  fid      InceptionV3 pool3 features of every generated frame vs every real frame of the split
           (at most --fid_max_frames, a seeded choice); needs --inception.
  fvd      I3D logits of 16-frame clips, generated vs real clips of the split; needs --i3d.
  ssim     per frame, generated vs its real source frame (Gaussian 11 / 1.5, data range 255).
  control  a segmenter (--segmenter FILE, else trained here on --seg_data, by default the real
           folder's train.h5 or the real file) segments the generated frames:
           dice_lv / dice_myo / dice_la against the conditioning masks (per clip, then averaged),
           mv_px: annulus points of the segmentation vs the conditioning mv_points,
           flow_epe_px: DIS flow of the generated clip vs the conditioning flow inside the sector,
           warp_err: frame f+1 warped onto frame f by the clip's own DIS flow, mean |difference|
           in grey levels inside the sector (temporal consistency; clips of 2+ frames),
           ef_err: |area-EF of the segmentation - area-EF of the conditioning masks| (percent),
           ef_req_err: |area-EF of the segmentation - the requested EF| (sample.py --anatomy=model).
  privacy  copy_rate: the fraction of generated clips nearer a real training clip (the segmenter's
           encoder features) than the --copy_quantile-th percentile of the real test clips' own
           nearest-training distances; always DIR/train.h5 and DIR/test.h5 of the real folder,
           whatever --split pairs the clips with (samples made from the train split: --split=train).
Writes OUT/metrics.json (the rows, and `per_sample`: each generated clip's SSIM and control metrics
with its source clip and conditions, for paired comparisons with tools/compare.py) and OUT/metrics.md
(OUT defaults to the fake file's folder), and OUT/segmenter.safetensors when it trained one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402

from heartbeat import metrics as M  # noqa: E402
from heartbeat.config import CONDITIONS as CONDITION_ORDER  # noqa: E402

METRICS = ("fid", "fvd", "ssim", "control", "privacy")
SHORT = {"text": "T", "image": "I", "sketch": "S", "mask": "M", "mv": "V", "flow": "F"}
STRUCTURES = {1: "lv", 2: "myo", 3: "la"}
COLUMNS = ("n", "fid", "fvd", "ssim", "dice_lv", "dice_myo", "dice_la", "mv_px", "flow_epe_px",
           "warp_err", "ef_err", "ef_req_err", "copy_rate")


class EvalError(Exception):
    """A user mistake: the message names the file or option and the fix."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------- inputs


def resolve_real(real: str, split: str) -> Path:
    p = Path(real)
    if p.is_dir():
        p = p / f"{split}.h5"
    if not p.is_file():
        raise EvalError(f"real data {p} not found: pass --real=DIR (holding {split}.h5) or --real=FILE.h5")
    return p


def open_h5(path: Path, need=("video",)) -> h5py.File:
    if not path.is_file():
        raise EvalError(f"{path} not found")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EvalError(f"{path} is not a readable HDF5 file ({e})") from None
    for k in need:
        if k not in f:
            raise EvalError(f"{path} has no '{k}' dataset (docs/ARCHITECTURE.md §Data schema)")
    if f["video"].ndim != 4 or f["video"].dtype != np.uint8:
        raise EvalError(f"{path}: 'video' must be uint8 (N, F, H, W), got {f['video'].dtype} "
                        f"{f['video'].shape}")
    return f


def canonical_conditions(text: str) -> str:
    names = [s.strip() for s in str(text).replace("+", ",").split(",") if s.strip()]
    bad = [n for n in names if n not in CONDITION_ORDER]
    if bad:
        raise EvalError(f"unknown condition name(s) {bad} in the fake file; valid: {CONDITION_ORDER}")
    return ",".join(c for c in CONDITION_ORDER if c in names) or "none"


def condition_label(cond: str) -> str:
    """'text,image,mask' -> 'T+I+M' (the paper's table style)."""
    return "+".join(SHORT[c] for c in cond.split(",") if c in SHORT) or "uncond"


def read_pairing(f: h5py.File, n_real: int, path: Path):
    """-> source_index (N,) int, conditions list[str], views list[str]."""
    N = f["video"].shape[0]
    metas = [{}] * N
    if "meta" in f:
        metas = []
        for s in f["meta"].asstr()[()]:
            try:
                metas.append(json.loads(s) if s else {})
            except json.JSONDecodeError:
                metas.append({})
    if "source_index" in f:
        src = np.asarray(f["source_index"][()], np.int64)
    elif all("source_index" in m for m in metas):
        src = np.array([int(m["source_index"]) for m in metas], np.int64)
    else:
        log(f"warning: {path} gives no source_index; pairing generated clip i with real clip i")
        src = np.arange(N)
    if len(src) != N or src.min(initial=0) < -1 or src.max(initial=0) >= n_real:
        raise EvalError(f"{path}: source_index must give one real clip index in [0, {n_real}) (or -1: "
                        f"none) per sample; got range [{src.min()}, {src.max()}] for {N} samples — "
                        "is --split right?")
    if "conditions" in f:
        conds = list(f["conditions"].asstr()[()])
    elif all("conditions" in m for m in metas):
        conds = [m["conditions"] if isinstance(m["conditions"], str) else ",".join(m["conditions"])
                 for m in metas]
    else:
        conds = [str(f.attrs.get("conditions", "unknown"))] * N
    conds = [canonical_conditions(c) if c != "unknown" else c for c in conds]
    views = list(f["view"].asstr()[()]) if "view" in f else [""] * N
    return src, conds, views


def resize_frames(a: np.ndarray, size: tuple, nearest: bool) -> np.ndarray:
    """(F, H, W) -> (F, h, w)."""
    if a.shape[-2:] == size:
        return a
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return np.stack([cv2.resize(x, size[::-1], interpolation=interp) for x in a])


class Conditions:
    """The conditions that drove fake clip i: from the fake file when it stores them, else from
    the first F frames of the real source clip (tools/sample.py generates a source clip's first F
    frames), resized to the generated size with flow and points scaled; None when neither has it
    (e.g. source_index -1: conditions given as files and not stored)."""

    def __init__(self, fake: h5py.File, real: h5py.File, src: np.ndarray, stored: bool = True):
        self.fake, self.real, self.src, self.stored = fake, real, src, stored
        self.frames = fake["video"].shape[1]
        self.size = fake["video"].shape[2:]

    def source_video(self, i: int):
        """The real source clip's frames (F, h, w), resized to the generated size; None if none."""
        if self.src[i] < 0:
            return None
        return resize_frames(self.real["video"][self.src[i]][:self.frames], self.size, nearest=False)

    def get(self, name: str, i: int):
        if self.stored and name in self.fake:
            return self.fake[name][i]
        if name not in self.real or self.src[i] < 0:
            return None
        a = self.real[name][self.src[i]][:self.frames]       # every per-clip array is per frame
        (h, w), (H, W) = self.size, self.real["video"].shape[2:]
        if (h, w) == (H, W) or name == "mask_valid":
            return a
        if name == "mask":
            return resize_frames(a, (h, w), nearest=True)
        if name == "mv_points":
            return a * np.array([w / W, h / H], np.float32)
        if name == "flow":
            a = a.astype(np.float32)
            out = np.stack([resize_frames(a[:, c], (h, w), False) for c in range(2)], 1)
            return out * np.array([w / W, h / H], np.float32)[None, :, None, None]
        return a


# ---------------------------------------------------------------------------- metrics


def control_metrics(frames: np.ndarray, seg: np.ndarray, cond: Conditions, i: int,
                    sector: np.ndarray) -> dict:
    """Controllability of one clip: frames (F, H, W) uint8, seg (F, H, W) its segmentation."""
    out = {}
    mask = cond.get("mask", i)
    valid = cond.get("mask_valid", i)
    valid = np.ones(len(frames), bool) if valid is None else np.asarray(valid, bool)
    if mask is not None and valid.any():
        d = M.dice(seg[valid], mask[valid], labels=tuple(STRUCTURES))
        out.update({f"dice_{name}": d[k] for k, name in STRUCTURES.items()})
        if valid.all() and len(frames) > 1:
            areas_c = (mask == 1).reshape(len(mask), -1).sum(1)
            ed, es = M.ed_es_frames(areas_c)
            if ed != es:
                areas_g = (seg == 1).reshape(len(seg), -1).sum(1)
                out["ef_err"] = abs(M.area_ef(areas_g, ed, es) - M.area_ef(areas_c, ed, es))
    pts = cond.get("mv_points", i)
    if pts is not None:
        d = M.mv_distance(M.annulus_points(seg), pts)
        if np.isfinite(d).any():
            out["mv_px"] = float(np.nanmean(d))
    flow = cond.get("flow", i)
    est = M.estimate_flow(frames) if len(frames) > 1 else None
    if flow is not None and est is not None:
        out["flow_epe_px"] = M.flow_epe(est[:-1], np.asarray(flow[:-1], np.float32), sector)
    if est is not None:                          # temporal consistency: the clip under its own flow
        out["warp_err"] = M.warp_error(frames, est, sector)
    return out


def mean_of(rows: list[dict]) -> dict:
    acc = defaultdict(list)
    for r in rows:
        for k, v in r.items():
            if v is not None and np.isfinite(v):
                acc[k].append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def feature_sets(args, fake, real, groups):
    """FID / FVD per group, or a skip message. Returns {group: {fid, fvd}}, notes."""
    out, notes = defaultdict(dict), []
    rng = np.random.default_rng(args.seed)
    size = fake["video"].shape[2:]        # real frames are first brought to the generated size
    if "fid" in args.metrics:
        if not args.inception:
            notes.append("fid skipped: no --inception=FILE (pt_inception-2015-12-05-6726825d.pth "
                         "or inception-2015-12-05.pt)")
        elif not Path(args.inception).is_file():
            notes.append(f"fid skipped: Inception weights file {args.inception} is missing")
        else:
            from heartbeat.fid import inception_features, load_inception
            net = load_inception(args.inception).to(args.device)
            feats = lambda a: inception_features(net, a, device=args.device)  # noqa: E731
            Nr, Fr = real["video"].shape[:2]
            keep = max(1, args.fid_max_frames // Fr)
            clips = np.sort(rng.choice(Nr, min(Nr, keep), replace=False))
            rf = np.concatenate([feats(resize_frames(real["video"][j], size, False)) for j in clips])
            rs = M.feature_stats(rf)
            for g, idx in groups.items():
                ff = np.concatenate([feats(fake["video"][idx[k:k + 8]].reshape(-1, *size))
                                     for k in range(0, len(idx), 8)])
                if len(ff) < 2:
                    continue
                out[g]["fid"] = M.frechet_distance(*M.feature_stats(ff), *rs)
            notes.append(f"fid: {len(rf)} real frames ({net.kind} weights {Path(args.inception).name})")
    if "fvd" in args.metrics:
        from heartbeat.fvd import FVD_FRAMES, i3d_features, load_i3d
        if not args.i3d:
            notes.append("fvd skipped: no --i3d=FILE (i3d_torchscript.pt)")
        elif not Path(args.i3d).is_file():
            notes.append(f"fvd skipped: I3D weights file {args.i3d} is missing")
        elif min(fake["video"].shape[1], real["video"].shape[1]) < FVD_FRAMES:
            notes.append(f"fvd skipped: clips have fewer than {FVD_FRAMES} frames")
        else:
            net = load_i3d(args.i3d).to(args.device)
            feats = lambda a: i3d_features(net, a, device=args.device)  # noqa: E731
            rf = np.concatenate([feats(resize_frames(real["video"][j], size, False)[None])
                                 for j in range(real["video"].shape[0])])
            rs = M.feature_stats(rf)
            for g, idx in groups.items():
                ff = np.concatenate([feats(fake["video"][idx[k:k + 8]]) for k in range(0, len(idx), 8)])
                if len(ff) < 2:
                    continue
                out[g]["fvd"] = M.frechet_distance(*M.feature_stats(ff), *rs)
            notes.append(f"fvd: {len(rf)} real clips, 16 frames, 224x224, I3D logits (400-d), "
                         "not divided by 16")
    return out, notes


def get_segmenter(args, real_path: Path):
    from heartbeat.segmenter import load_segmenter, save_segmenter, train_segmenter
    if args.segmenter:
        return load_segmenter(args.segmenter), f"segmenter {args.segmenter}"
    data = Path(args.seg_data) if args.seg_data else None
    if data is None:
        train = real_path.parent / "train.h5"
        data = train if train.is_file() else real_path
    size = args.seg_size
    log(f"training a segmenter on {data} ({args.seg_steps} steps at {size}x{size}); "
        "pass --segmenter=FILE to reuse one")
    model = train_segmenter(data, steps=args.seg_steps, size=size, seed=args.seed, log=log)
    saved = Path(args.out) / "segmenter.safetensors"
    save_segmenter(model, saved)
    return model, (f"segmenter trained here on {data}, {args.seg_steps} steps, {size}px, seed "
                   f"{args.seed}; saved to {saved} (reuse: --segmenter={saved})")


def evaluate(args) -> dict:
    real_path = resolve_real(args.real, args.split)
    fake_path = Path(args.fake)
    with open_h5(fake_path) as fake, open_h5(real_path) as real:
        return _evaluate(args, fake, real, fake_path, real_path)


def _evaluate(args, fake, real, fake_path, real_path) -> dict:
    src, conds, views = read_pairing(fake, real["video"].shape[0], fake_path)
    if "view" not in fake and "view" in real:          # the source clip's view
        rv = list(real["view"].asstr()[()])
        views = [rv[j] if j >= 0 else "" for j in src]
    keys = [(c, v) if "view" in args.group else (c, "") for c, v in zip(conds, views)]
    groups = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    groups = dict(sorted(groups.items(), key=lambda kv: (len(kv[0][0].split(",")), kv[0])))
    N, Fr, H, W = fake["video"].shape
    log(f"{N} generated clips of {Fr} frames {H}x{W} in {len(groups)} group(s); real: {real_path} "
        f"({real['video'].shape[0]} clips {real['video'].shape[2]}x{real['video'].shape[3]})")
    cond = Conditions(fake, real, src)
    results = {g: {"n": len(idx)} for g, idx in groups.items()}
    notes, timing = [], {}

    seg_model = None
    if "control" in args.metrics or "privacy" in args.metrics:
        seg_model, how = get_segmenter(args, real_path)
        notes.append(how)
    if "privacy" in args.metrics:                       # heartbeat/privacy.py
        from heartbeat.privacy import PrivacyError, copy_report, summary
        try:
            rep = copy_report(fake["video"], real_path.parent / "train.h5", real_path.parent / "test.h5", seg_model,
                              args.copy_quantile)
        except PrivacyError as e:
            raise EvalError(str(e)) from None
        for g, idx in groups.items():
            results[g]["copy_rate"] = float(rep["flagged"][idx].mean())
        notes.append(summary(rep))
    if "control" not in args.metrics:
        seg_model = None
    else:
        from heartbeat.segmenter import segment
        from heartbeat.anatomy import ef_request_error
    per_clip = {}
    t0, c0, n_frames = time.perf_counter(), time.process_time(), 0
    if "ssim" in args.metrics or "control" in args.metrics:
        for i in range(N):
            frames = fake["video"][i]
            ref = cond.source_video(i)           # the real source frames, None without a source
            r = {}
            if "ssim" in args.metrics and ref is not None:
                r["ssim"] = float(M.ssim(frames, ref, data_range=255.0).mean())
            if seg_model is not None:
                sector = (ref if ref is not None else frames).max(0) > 0
                seg = segment(seg_model, frames)
                r.update(control_metrics(frames, seg, cond, i, sector))
                if "meta" in fake:        # clips made at a requested EF (heartbeat/anatomy.py)
                    r.update(ef_request_error(seg, cond.get("mask", i), fake["meta"][i]))
            per_clip[i] = r
            n_frames += Fr
        dt, dc = time.perf_counter() - t0, max(time.process_time() - c0, 1e-9)
        timing = {"ssim_control_frames": n_frames, "seconds": dt, "frames_per_s": n_frames / dt,
                  "cpu_seconds": dc, "frames_per_cpu_s": n_frames / dc}
    for g, idx in groups.items():
        results[g].update(mean_of([per_clip[i] for i in idx if i in per_clip]))
    feats, fnotes = feature_sets(args, fake, real, groups)
    for g in groups:
        results[g].update(feats.get(g, {}))
    notes += fnotes

    reference = None
    if seg_model is not None:     # the floor: the same control metrics on the real source clips
        used = np.unique(src[src >= 0])
        rows = []
        for j in used:
            i = int(np.flatnonzero(src == j)[0])          # a fake clip it drove: same frames, size
            frames = cond.source_video(i)
            real_cond = Conditions(fake, real, src, stored=False)     # the real clip's own
            rows.append(control_metrics(frames, segment(seg_model, frames), real_cond, i,
                                        frames.max(0) > 0))
        if rows:
            reference = {"n": len(used), **mean_of(rows)}
    rows = []
    for (c, v), r in results.items():
        rows.append({"conditions": c, "label": condition_label(c) if c != "unknown" else "?",
                     "view": v, **r})
    if reference is not None:
        rows.append({"conditions": "reference: real source clips", "label": "real", "view": "",
                     **reference})
    notes.append("columns and protocols: docs/METRICS.md")
    per_sample = [{"sample": i, "source": int(src[i]), "conditions": conds[i], **per_clip[i]}
                  for i in sorted(per_clip)]         # for paired comparisons (tools/compare.py)
    return {"real": str(real_path), "fake": str(fake_path), "metrics": list(args.metrics),
            "rows": rows, "notes": notes, "timing": timing, "per_sample": per_sample}


# ------------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in report["rows"])]
    show_view = any(r["view"] for r in report["rows"])
    head = ["conditions"] + (["view"] if show_view else []) + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["label"]] + ([r["view"]] if show_view else [])
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (str(v) if c == "n" else f"{v:.4g}"))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if report["notes"]:
        text += "\n" + "\n".join(f"- {n}" for n in report["notes"]) + "\n"
    t = report.get("timing")
    if t:
        what = " + ".join(m for m in ("ssim", "control") if m in report["metrics"])
        text += (f"\n{what}: {t['ssim_control_frames']} frames in {t['seconds']:.2f} s "
                 f"({t['frames_per_s']:.1f} frames/s; {t['frames_per_cpu_s']:.1f} frames per "
                 "CPU-second)\n")
    return text


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", required=True, help="folder of <split>.h5 files, or one .h5 file")
    p.add_argument("--fake", required=True, help="samples.h5 written by tools/sample.py")
    p.add_argument("--split", default="test")
    p.add_argument("--metrics", default="fid,fvd,ssim,control")
    p.add_argument("--inception", default="", help="pt_inception-2015-12-05-*.pth or inception-2015-12-05.pt")
    p.add_argument("--i3d", default="", help="i3d_torchscript.pt")
    p.add_argument("--segmenter", default="", help="a saved segmenter (.safetensors)")
    p.add_argument("--seg_data", default="", help="HDF5 split to train the segmenter on")
    p.add_argument("--seg_steps", type=int, default=300)
    p.add_argument("--seg_size", type=int, default=64)
    p.add_argument("--fid_max_frames", type=int, default=10000)
    p.add_argument("--copy_quantile", type=float, default=1.0,
                   help="privacy: copy threshold = this percentile of real test-to-train distances")
    p.add_argument("--group", default="conditions", help="conditions | conditions,view")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="", help="for the FID / FVD networks (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is much faster on a busy machine")
    p.add_argument("--out", default="", help="folder for metrics.json / metrics.md (default: the fake file's)")
    a = p.parse_args(argv)
    a.metrics = tuple(m.strip() for m in a.metrics.split(",") if m.strip())
    import torch
    if not a.device:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if a.group not in ("conditions", "conditions,view"):
        raise EvalError(f"--group={a.group}: choose conditions or conditions,view")
    bad = [m for m in a.metrics if m not in METRICS]
    if bad:
        raise EvalError(f"--metrics: unknown {bad}; choose from {','.join(METRICS)}")
    return a


def main(argv=None) -> int:
    try:
        args = parse(argv)
        out = Path(args.out) if args.out else Path(args.fake).resolve().parent
        args.out = str(out)
        out.mkdir(parents=True, exist_ok=True)
        report = evaluate(args)
        md = markdown(report)
        tmp = out / f".metrics.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(report, indent=2, default=float))
        tmp.replace(out / "metrics.json")
        (out / "metrics.md").write_text(md)
        print(md, end="")
        log(f"wrote {out / 'metrics.json'} and {out / 'metrics.md'}")
        return 0
    except (EvalError, FileNotFoundError, KeyError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"eval: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
