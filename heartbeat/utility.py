"""Does synthetic data train a better segmenter? (docs/METRICS.md §Utility)

Every arm trains the project's segmenter (heartbeat/segmenter.py `fit_segmenter`: same SegUNet,
steps, batch, augmentation, learning rate) on its own frames and is tested on the real test split:

    real                 (a) the real training split
    synthetic            (b) the synthetic files alone
    real+synthetic       (c) both
    real r               the real training patients' fraction r alone (r < 1, seeded by patient)
    real r+synthetic     (d) that fraction plus the synthetic files

Dice per structure (LV, MYO, LA; per test clip over its annotated frames, then the mean over
clips), mean +- std over seeds. A seed sets the segmenter's initialisation and batch order and the
choice of the real fraction's patients (the same patients for `real r` and `real r+synthetic`).

Patients never mix: the real splits must share none, and no synthetic clip may carry a test
patient's id (tools/sample.py records the patient whose clip drove a sample: sample from the
train split, or with --anatomy=model).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

STRUCTURES = {1: "lv", 2: "myo", 3: "la"}


class UtilityError(ValueError):
    """Bad input: the message names the file or option and the fix."""


def _patients(path: Path) -> list[str]:
    with h5py.File(path, "r") as f:
        if "patient" not in f:
            raise UtilityError(f"{path} has no 'patient' dataset: splits by patient cannot be checked "
                               "(rewrite it with data_prep)")
        return list(f["patient"].asstr()[()])


def check_inputs(real_dir, fakes) -> dict:
    """Paths and the patient checks; -> dict(train, test, fakes, train_patients)."""
    real_dir = Path(real_dir)
    train, test = real_dir / "train.h5", real_dir / "test.h5"
    for p, what in ((train, "training"), (test, "test")):
        if not p.is_file():
            raise UtilityError(f"--real={real_dir} has no {p.name}: the utility test needs the real {what} split "
                               f"(data_prep writes train.h5 and test.h5)")
    if not fakes:
        raise UtilityError("--fake: give at least one samples.h5")
    tr, te = _patients(train), _patients(test)
    both = sorted(set(tr) & set(te))
    if both:
        raise UtilityError(f"{train} and {test} share patients {both[:5]}: split the real data by patient")
    for fp in fakes:
        fp = Path(fp)
        if not fp.is_file():
            raise UtilityError(f"--fake={fp}: no such file")
        with h5py.File(fp, "r") as f:
            if "video" not in f or "mask" not in f:
                raise UtilityError(f"--fake={fp} holds no masks: a segmenter cannot learn from it; sample with the "
                                   f"mask condition (--conditions=...,mask, or --anatomy=model)")
            pats = set(f["patient"].asstr()[()]) if "patient" in f else set()
        leak = sorted(pats & set(te))
        if leak:
            raise UtilityError(f"--fake={fp} has clips made from test patients {leak[:5]}: training on them would "
                               f"test on seen anatomy; sample from the train split (--split=train) or --anatomy=model")
    assert not set(tr) & set(te)
    return dict(train=train, test=test, fakes=[Path(p) for p in fakes], train_patients=tr)


def arms(fractions) -> list[tuple[str, float, bool]]:
    """(name, real fraction, with synthetic) for every arm, in report order."""
    out = [("real", 1.0, False), ("synthetic", 0.0, True), ("real+synthetic", 1.0, True)]
    for r in fractions:
        if r < 1:
            out += [(f"real {r:g}", r, False), (f"real {r:g}+synthetic", r, True)]
    return out


def _fraction_clips(patients: list[str], r: float, seed: int) -> np.ndarray:
    uniq = sorted(set(patients))
    k = max(1, round(r * len(uniq)))
    chosen = set(np.random.default_rng([seed, 4242]).choice(uniq, k, replace=False).tolist())
    return np.array([i for i, p in enumerate(patients) if p in chosen], int)


def dice_on_test(model, test_path) -> dict:
    """Mean over real test clips of the per-clip Dice (over the clip's annotated frames)."""
    from .metrics import dice
    from .segmenter import segment
    rows = []
    with h5py.File(test_path, "r") as f:
        N, Fr = f["video"].shape[:2]
        valid = f["mask_valid"][()] if "mask_valid" in f else np.ones((N, Fr), bool)
        for i in range(N):
            if not valid[i].any():
                continue
            seg = segment(model, f["video"][i][valid[i]])
            rows.append(dice(seg, f["mask"][i][valid[i]], labels=tuple(STRUCTURES)))
    return {name: float(np.nanmean([r[k] for r in rows])) for k, name in STRUCTURES.items()}


def run(real_dir, fakes, fractions=(1.0, 0.1), steps: int = 300, seeds: int = 3, size: int = 64,
        batch_size: int = 16, log=print) -> dict:
    """Train and test every arm for every seed; -> the report (JSON-serialisable)."""
    from .segmenter import fit_segmenter, load_frames
    for r in fractions:
        if not 0 < r <= 1:
            raise UtilityError(f"--real_fraction={r}: fractions in (0, 1]")
    if steps < 1 or seeds < 1:
        raise UtilityError("--steps and --seeds must be >= 1")
    io = check_inputs(real_dir, fakes)
    results = {}
    for name, r, synth in arms(fractions):
        per_seed = []
        for seed in range(seeds):
            parts = []
            if r > 0:
                clips = None if r >= 1 else _fraction_clips(io["train_patients"], r, seed)
                parts.append(load_frames(io["train"], size, seed=seed, clips=clips))
            if synth:
                parts += [load_frames(fp, size, seed=seed) for fp in io["fakes"]]
            frames = np.concatenate([p[0] for p in parts])
            masks = np.concatenate([p[1] for p in parts])
            model = fit_segmenter(frames, masks, steps=steps, size=size, seed=seed, batch_size=batch_size)
            d = dice_on_test(model, io["test"])
            d["frames"] = int(len(frames))
            per_seed.append(d)
            log(f"{name:>22s} seed {seed}: " + " ".join(f"{k} {d[k]:.4f}" for k in STRUCTURES.values())
                + f" ({len(frames)} training frames)")
        results[name] = {
            **{k: {"mean": float(np.mean([d[k] for d in per_seed])), "std": float(np.std([d[k] for d in per_seed]))}
               for k in STRUCTURES.values()},
            "mean_dice": {"mean": float(np.mean([np.mean([d[k] for k in STRUCTURES.values()]) for d in per_seed])),
                          "std": float(np.std([np.mean([d[k] for k in STRUCTURES.values()]) for d in per_seed]))},
            "frames": per_seed[0]["frames"], "real_fraction": r, "synthetic": synth, "per_seed": per_seed}
    return dict(real=str(real_dir), fake=[str(p) for p in io["fakes"]], steps=steps, seeds=seeds, size=size,
                batch_size=batch_size, fractions=list(fractions), arms=results, goals=goals(results))


def goals(res: dict) -> dict:
    """The issue's two goals: synthetic-only >= 90 % of real-only mean Dice; real r + synthetic beats real r."""
    out = {}
    if "real" in res and "synthetic" in res:
        ratio = res["synthetic"]["mean_dice"]["mean"] / max(res["real"]["mean_dice"]["mean"], 1e-9)
        out["synthetic_over_real"] = {"ratio": ratio, "met": ratio >= 0.9}
    for name in res:
        if name.endswith("+synthetic") and name.startswith("real ") and name[:-len("+synthetic")] in res:
            alone = res[name[:-len("+synthetic")]]["mean_dice"]["mean"]
            out[f"{name} vs alone"] = {"gain": res[name]["mean_dice"]["mean"] - alone,
                                       "met": res[name]["mean_dice"]["mean"] > alone}
    return out


def markdown(rep: dict) -> str:
    lines = [f"Segmenter utility: {rep['steps']} steps, batch {rep['batch_size']}, {rep['size']} px, "
             f"{rep['seeds']} seed(s); tested on {rep['real']}/test.h5; synthetic: {', '.join(rep['fake'])}", "",
             "| arm | training frames | Dice LV | Dice MYO | Dice LA | mean |", "|---|---|---|---|---|---|"]
    for name, r in rep["arms"].items():
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in ("lv", "myo", "la", "mean_dice")]
        lines.append(f"| {name} | {r['frames']} | " + " | ".join(cells) + " |")
    lines.append("")
    for k, g in rep["goals"].items():
        val = f"ratio {g['ratio']:.3f}" if "ratio" in g else f"gain {g['gain']:+.3f}"
        lines.append(f"- {k}: {val} ({'met' if g['met'] else 'not met'})")
    return "\n".join(lines) + "\n"


def write(rep: dict, out: Path) -> None:
    from .utils import atomic_write
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "utility.json", lambda t: Path(t).write_text(json.dumps(rep, indent=2)))
    atomic_write(out / "utility.md", lambda t: Path(t).write_text(markdown(rep)))
