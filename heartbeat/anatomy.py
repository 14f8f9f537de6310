"""Anatomy at a chosen ejection fraction, without real masks (docs/ARCHITECTURE.md §Sampling).

The parametric heart model is the phantom's (data_prep/phantom.py): a per-patient geometry drawn
by `sample_anatomy`, a contraction field whose strength rises ED -> ES on a half cosine, exact
label maps by inverting the motion. Here the peak strength is solved so that the clip's
**area-based EF** (100 (A_ED - A_ES) / A_ED of the LV-cavity pixel counts, the quantity
`tools/eval.py` reads from a segmentation, heartbeat/metrics.py:area_ef) is the one requested.
That is a 2-D surrogate, not the biplane volume EF of a clinical report; the volume EF by the
area-length method is recorded beside it (`ef_area_length`).

    clip = model_clip("4CH", ef=0.35, frames=16, size=256, rng=np.random.default_rng(0))
    clip["mask"] (F, S, S) uint8, clip["mv"] (F, S, S) uint8, clip["mv_points"] (F, 2, 2),
    clip["text"], clip["meta"] (ef_requested, ef_area, ef_area_length, strength, anatomy)
    src = AnatomySource(cfg, used, frames, video, efs="0.2:0.7", view="4CH")  # for tools/sample.py

Sample k's anatomy and EF come from its own generator (seed + k), as its noise does.
"""
from __future__ import annotations

import numpy as np

from data_prep import phantom
from data_prep.conditions import mv_image

VIEWS = ("2CH", "4CH")
CONDITIONS = ("text", "mask", "mv")        # what the model gives a sampler
S_MAX = 0.6                                 # strongest contraction tried (the phantom's own stay below 0.45)
MAX_AREA_EF = {"2CH": 0.65, "4CH": 0.42}    # what every drawn geometry reaches by S_MAX, with redraws
SOLVE_TOL = 0.01                            # a solved strength further off than this: redraw the geometry
REDRAWS = 20                                # geometries tried per clip before giving up


class AnatomyError(ValueError):
    """A bad request (EF, view): the message names the option and the fix."""


def parse_ef(text: str) -> tuple[float, float]:
    """'0.35' -> (0.35, 0.35); '0.2:0.7' -> (0.2, 0.7), a uniform range. Values in (0, 1)."""
    parts = str(text).split(":")
    try:
        lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) in (1, 2) else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None:
        raise AnatomyError(f"--ef={text}: give one fraction (0.35) or a range (0.2:0.7)")
    if not (0 < lo < 1 and 0 < hi < 1) or lo > hi:
        raise AnatomyError(f"--ef={text}: ejection fractions are fractions in (0, 1), low:high "
                           f"(write 0.35, not 35)")
    return lo, hi


def check_view(view: str, ef_range=None) -> str:
    """The view code; with ef_range, also that the model reaches its top in this view."""
    v = str(view).upper()
    if v not in VIEWS:
        raise AnatomyError(f"--view={view}: the heart model makes {' or '.join(VIEWS)}")
    if ef_range is not None and ef_range[1] > MAX_AREA_EF[v]:
        raise AnatomyError(f"--ef: the heart model's {v} LV reaches an area EF of {MAX_AREA_EF[v]} at most "
                           f"(asked {ef_range[1]}); area EF is below volume EF (docs/ARCHITECTURE.md §Sampling)")
    return v


def area_ef_of(mask_ed: np.ndarray, mask_es: np.ndarray) -> float:
    """Area-based EF (fraction) of two label maps: 1 - A_ES / A_ED, A = LV-cavity (label 1) pixels."""
    a0, a1 = float((mask_ed == 1).sum()), float((mask_es == 1).sum())
    return 1 - a1 / a0 if a0 > 0 else float("nan")


def solve_area_strength(an: dict, view: str, ef: float, size: int, iters: int = 16) -> float:
    """The peak contraction strength whose ES mask, at `size` px, has area EF `ef` (bisection; the
    area shrinks monotonically with the strength), so the clip's masks hit the request at the
    size they are used at."""
    geo = phantom.view_geometry(an, view)
    cart, _, _, inside, _, _ = phantom._grids(size)
    _, ed = phantom.frame_labels(cart, inside, geo, 0.0)
    lo, hi = 0.0, S_MAX
    if area_ef_of(ed, phantom.frame_labels(cart, inside, geo, hi)[1]) < ef:
        raise AnatomyError(f"--ef: area EF {ef:.3f} is beyond what this {view} geometry contracts to")
    for _ in range(iters):
        mid = (lo + hi) / 2
        if area_ef_of(ed, phantom.frame_labels(cart, inside, geo, mid)[1]) < ef:
            lo = mid
        else:
            hi = mid
    s = (lo + hi) / 2
    # near the top the area is not monotone in the strength for some geometries: check the result
    if abs(area_ef_of(ed, phantom.frame_labels(cart, inside, geo, s)[1]) - ef) > SOLVE_TOL:
        raise AnatomyError(f"--ef: area EF {ef:.3f} is not reached cleanly by this {view} geometry")
    return s


def model_clip(view: str, ef: float, frames: int, size: int, rng: np.random.Generator) -> dict:
    """One clip's conditions from the heart model: a random patient geometry (the phantom's
    distribution) contracting ED -> ES to area EF `ef`."""
    view = check_view(view, (ef, ef))
    for attempt in range(REDRAWS):        # a geometry that cannot contract that far is drawn again
        an = phantom.sample_anatomy(rng)
        try:
            s = solve_area_strength(an, view, ef, size)
        except AnatomyError:
            if attempt == REDRAWS - 1:
                raise
            continue
        mask, pts = phantom.echo_masks(an, view, frames, size, s)
        # the clip inverts the motion frame by frame from the previous frame; near the model's limit
        # that can land elsewhere than the solve's direct inversion: check the clip itself
        if abs(area_ef_of(mask[0], mask[-1]) - ef) <= SOLVE_TOL:
            break
        if attempt == REDRAWS - 1:
            raise AnatomyError(f"--ef: area EF {ef:.3f} is not reached cleanly by the {view} model; ask for less")
    mv = np.stack([mv_image(p, size) for p in pts])
    meta = dict(ef_requested=round(float(ef), 4), ef_area=round(area_ef_of(mask[0], mask[-1]), 4),
                ef_area_length=round(phantom.area_length_ef(mask[0], mask[-1], pts[0], pts[-1]) / 100, 4),
                strength=round(s, 4), view=view, ED=0, ES=frames - 1, source="heart-model",
                anatomy={k: round(float(v), 4) for k, v in an.items() if k != "ef"})
    return dict(mask=mask, mv=mv, mv_points=pts, text=phantom.ECHO_TEXT[view], view=view, meta=meta)


def requested_ef(meta: dict):
    """The EF (fraction) a samples.h5 clip was asked for, from its meta JSON; None when none."""
    src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    v = meta.get("ef_requested", src.get("ef_requested"))
    return None if v is None else float(v)


class AnatomySource:
    """tools/sample.py's source for --anatomy=model: sample k = a new model patient with EF drawn
    uniformly from `efs` (or fixed), its masks, MV skeleton and view prompt (source_index -1)."""

    def __init__(self, cfg, used, frames: int | None, video: bool, efs: str, view: str):
        from .sampling import SampleError
        try:
            self.ef_range = parse_ef(efs)
            self.view = check_view(view, self.ef_range)
        except AnatomyError as e:
            raise SampleError(str(e)) from None
        if cfg.model.mask_classes < 4:
            raise SampleError(f"--anatomy=model draws echo labels 0..3; this checkpoint knows "
                              f"{cfg.model.mask_classes} mask classes")
        if "mask" not in used:
            raise SampleError("--anatomy=model conditions on masks, but this run does not use the mask condition "
                              f"(uses: {', '.join(used) or 'none'}); pick a checkpoint trained with masks")
        self.used, self.video, self.size = tuple(used), video, cfg.model.image_size
        self.frames = frames or cfg.model.frames        # a whole ED -> ES cycle, also for stage 1's frames
        if self.frames < 2:
            raise SampleError("--anatomy=model needs at least 2 frames (ED and ES) per sample")

    def __len__(self):
        return 1

    def job(self, k: int, seed: int) -> dict:
        from .sampling import make_job
        rng = np.random.default_rng([seed, 7919])
        lo, hi = self.ef_range
        ef = float(rng.uniform(lo, hi)) if hi > lo else lo
        c = model_clip(self.view, ef, max(self.frames, 2), self.size, rng)
        Fr = self.frames
        kw = {}
        if "text" in self.used:
            kw["text"] = c["text"]
        if "mask" in self.used:
            kw["mask"] = c["mask"][:Fr]
        if "mv" in self.used:
            kw["mv"], kw["mv_points"] = c["mv"][:Fr], c["mv_points"][:Fr]
        return make_job(k, seed, -1, Fr, view=self.view, patient=f"model{k:05d}",
                        source_meta=c["meta"], video=self.video, **kw)


def ef_request_error(seg: np.ndarray, cond_mask, meta_json) -> dict:
    """{'ef_req_err': |area EF of the segmentation - requested EF|, in EF points} for a clip that
    records a requested EF (tools/eval.py); ED / ES are the conditioning masks' largest / smallest
    LV cavity, as for ef_err. Empty when the clip has no request, no mask or a single frame."""
    import json
    from .metrics import area_ef, ed_es_frames
    try:
        meta = json.loads(meta_json) if isinstance(meta_json, (str, bytes)) else dict(meta_json or {})
    except (ValueError, TypeError):
        return {}
    ef = requested_ef(meta)
    if ef is None or cond_mask is None or len(seg) < 2:
        return {}
    ed, es = ed_es_frames((np.asarray(cond_mask) == 1).reshape(len(seg), -1).sum(1))
    got = area_ef((seg == 1).reshape(len(seg), -1).sum(1), ed, es)
    return {"ef_req_err": abs(got - 100 * ef)} if np.isfinite(got) else {}
