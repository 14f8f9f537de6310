"""Paired comparison of two evaluations of the same clips: is B within X % of A, and how sure is that?

    python tools/compare.py --a=EVAL_DIR[,EVAL_DIR...] --b=EVAL_DIR[,EVAL_DIR...] [--within=5]
        [--metrics=dice_lv,dice_myo,dice_la,mv_px] [--resamples=10000] [--seed=0] [--out=FILE.md [--force]]

--a and --b name metrics.json files written by tools/eval.py (or their folders); several, comma-
separated, are concatenated in order. Sample i of A is paired with sample i of B, so both must come
from the same clips, conditions and seeds (tools/sample.py with the same --data, --split, --num and
--seed; only the checkpoint, sampler or steps differ); a pair whose source clip or conditions differ
is an error. Typical use: A the 50-step guided teacher, B a few-step student (heartbeat/distill.py).

For each metric, over the pairs where both have a finite value:
  A, B      the means;
  worse     how much worse B is than A, relative to A, in percent: (A - B) / A for the metrics where
            higher is better (SSIM, Dice), (B - A) / A for the others (distances, errors);
            negative = B is better;
  95 % CI   a paired percentile bootstrap interval for `worse`: --resamples draws of the n pairs with
            replacement, the same indices into A and B (Efron & Tibshirani 1993, ch. 13);
  within    "yes" when the whole interval is at most --within, "no" when all of it is above,
            "undecided" when it straddles --within (more clips would decide).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HIGHER_IS_BETTER = ("ssim", "dice_lv", "dice_myo", "dice_la")
KEYS = ("sample", "source", "conditions")     # per_sample fields that are not metrics


class CompareError(Exception):
    """Inputs that cannot be compared (missing, not tools/eval.py output, or unpaired)."""


def load(spec: str) -> list[dict]:
    """The per-sample rows of one or more (comma-separated) eval outputs, concatenated in order."""
    rows = []
    for part in [p for p in spec.split(",") if p]:
        path = Path(part)
        path = path / "metrics.json" if path.is_dir() else path
        if not path.is_file():
            raise CompareError(f"{part}: no metrics.json there; run tools/eval.py --out={part} first")
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CompareError(f"{path} is not JSON ({e}); rerun tools/eval.py") from None
        if "per_sample" not in report:
            raise CompareError(f"{path} has no per_sample metrics (written by an older tools/eval.py, or "
                               f"not by tools/eval.py); rerun tools/eval.py on its samples")
        rows += report["per_sample"]
    if not rows:
        raise CompareError(f"{spec}: no evaluated samples")
    return rows


def pair(a: list[dict], b: list[dict]):
    """Check that A and B pair sample by sample: same count, source clips and conditions."""
    if len(a) != len(b):
        raise CompareError(f"A has {len(a)} samples and B {len(b)}; sample both with the same --data, --split, "
                           f"--num and --seed")
    for i, (x, y) in enumerate(zip(a, b)):
        for k in ("source", "conditions"):
            if x.get(k) != y.get(k):
                raise CompareError(f"sample {i}: A's {k} is {x.get(k)!r}, B's is {y.get(k)!r}; the two were not "
                                   f"sampled from the same clips and conditions (same --data, --split, --num, "
                                   f"--seed, --conditions)")


def worse_percent(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How much worse mean b is than mean a, in percent of a, along the last axis."""
    ma, mb = a.mean(-1), b.mean(-1)
    gap = ma - mb if name in HIGHER_IS_BETTER else mb - ma
    return 100.0 * gap / np.abs(ma)


def compare(a: list[dict], b: list[dict], metrics=None, within: float = 5.0, resamples: int = 10000,
            seed: int = 0) -> list[dict]:
    """One row per metric: n, mean A, mean B, worse (%), its 95 % paired bootstrap CI, and the verdict."""
    pair(a, b)
    in_a = list(dict.fromkeys(k for r in a for k in r if k not in KEYS))   # eval's order
    names = metrics or [m for m in in_a if any(m in r for r in b)]
    unknown = [m for m in names if m in KEYS or not any(m in r for r in a + b)]
    if unknown:
        present = sorted({k for r in a + b for k in r} - set(KEYS))
        raise CompareError(f"--metrics: {unknown} not in the evaluations; they have {present}")
    rng = np.random.default_rng(seed)
    rows = []
    for m in names:
        va = np.array([r.get(m, np.nan) for r in a], dtype=np.float64)
        vb = np.array([r.get(m, np.nan) for r in b], dtype=np.float64)
        ok = np.isfinite(va) & np.isfinite(vb)
        va, vb = va[ok], vb[ok]
        n = len(va)
        if n == 0 or va.mean() == 0:
            rows.append(dict(metric=m, n=n, a=None, b=None, worse=None, lo=None, hi=None, within="n/a"))
            continue
        idx = rng.integers(0, n, size=(resamples, n))
        boot = worse_percent(m, va[idx], vb[idx])
        lo, hi = np.percentile(boot, [2.5, 97.5])
        verdict = "yes" if hi <= within else "no" if lo > within else "undecided"
        rows.append(dict(metric=m, n=n, a=float(va.mean()), b=float(vb.mean()),
                         worse=float(worse_percent(m, va, vb)), lo=float(lo), hi=float(hi), within=verdict))
    return rows


def markdown(rows: list[dict], within: float) -> str:
    lines = [f"| metric | n | A | B | B worse by (%) | 95 % CI (%) | within {within:g} % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["a"] is None:
            lines.append(f"| {r['metric']} | {r['n']} | | | | | n/a |")
            continue
        lines.append(f"| {r['metric']} | {r['n']} | {r['a']:.4g} | {r['b']:.4g} | {r['worse']:+.1f} | "
                     f"[{r['lo']:+.1f}, {r['hi']:+.1f}] | {r['within']} |")
    return "\n".join(lines) + "\n"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="the reference: metrics.json or its folder (comma-separated: several)")
    p.add_argument("--b", required=True, help="the one compared with it, paired sample by sample")
    p.add_argument("--within", type=float, default=5.0, help="the tolerance, percent worse than A")
    p.add_argument("--metrics", default="", help="comma-separated (default: every metric both have)")
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the table to this file")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    a = p.parse_args(argv)
    if a.resamples < 100:
        raise CompareError(f"--resamples={a.resamples}: use at least 100 (10000 gives stable 95 % bounds)")
    if a.out and Path(a.out).exists() and not a.force:
        raise CompareError(f"--out={a.out} already exists; pass --force to replace it or name another file")
    a.metrics = [m.strip() for m in a.metrics.split(",") if m.strip()]
    return a


def main(argv=None) -> int:
    try:
        args = parse(argv)
        rows = compare(load(args.a), load(args.b), args.metrics, args.within, args.resamples, args.seed)
    except CompareError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    md = markdown(rows, args.within)
    print(md, end="")
    if args.out:
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
