"""The built-in dataset: simulated apical 2/4-chamber echo clips (and short-axis CMR-like volumes).

    python -m data_prep.phantom --out data/phantom [--clips 200] [--frames 16] [--size 256]
        [--views 2CH,4CH] [--seed 0] [--cmr] [--workers 0] [--force]
    python -m data_prep.phantom --preview docs/phantom.png     # ED/ES of a 2CH and a 4CH clip

writes OUT/train.h5 and OUT/test.h5 (about 10 % of patients) in the docs/ARCHITECTURE.md §Data
schema.

Echo model. Anatomy lives in "material" coordinates (normalised image units, the heart at ED).
A smooth displacement field d_t(X) contracts the ventricles towards their apex (radial shortening
and base descent, strength chosen per clip to give a target ejection fraction); the atria are
stretched by the moving annulus. A pixel p of frame t shows the material point X with
X + d_t(X) = p (solved by fixed-point iteration), so masks are exact label look-ups and the true
motion from frame t to t+1 at p is d_{t+1}(X) - d_t(X) (dataset `flow_true`). The image is formed
on a polar (depth, angle) grid: reflectivity x complex Gaussian scatterers fixed in the tissue,
blurred by a point-spread function narrow in depth and wide in angle (so lateral speckle grows
with depth), depth attenuation, near-field haze, envelope, log compression, then scan-converted
to the sector (black outside). Valve leaflets hinge at the annulus and close during the first
frames. sketch / mv / flow come from data_prep.conditions, as for real data; `mv_points` and
`mask` come from the simulation. meta holds EF (area-length, % from the simulated masks), the
target EF, ED/ES frame indices and the anatomy parameters.

CMR model (--cmr): short-axis bSSFP-like slices (bright blood, dark myocardium ring, RV crescent,
grey body, bright fat, dark lungs, Rician noise, bias field), slices as frames from base (frame
0) to apex (last frame, the rings shrink); one ED and one ES volume per patient; labels 1 LV,
2 MYO, 3 RV; no flow_true (slices are not time).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np

from . import conditions
from .h5io import CMR_LABELS, ECHO_LABELS, ClipWriter, DataPrepError, check_output, encode

APEX = np.array([0.5, 0.03])     # sector apex (x, y), normalised image units
HALF_ANGLE = math.radians(36.0)
DEPTH = 0.93


# ------------------------------------------------------------------------------- anatomy

def sample_anatomy(rng: np.random.Generator) -> dict:
    """Per-patient heart geometry (normalised units) and cycle parameters."""
    tilt = math.radians(rng.uniform(-10, 10))
    cav_len = rng.uniform(0.46, 0.56)                 # apex-to-annulus length of the LV cavity
    ry = cav_len / 1.75
    return dict(
        tilt=tilt, ry=ry, rx=rng.uniform(0.12, 0.15), h=0.75 * ry,
        apex_depth=rng.uniform(0.10, 0.16), wall=rng.uniform(0.035, 0.05),
        la_rx=rng.uniform(0.12, 0.16), la_ry=rng.uniform(0.12, 0.16),
        rv_rx=rng.uniform(0.085, 0.105), ef=rng.uniform(0.30, 0.70),
        atten=rng.uniform(0.8, 1.8), gain_db=rng.uniform(-3, 3), haze=rng.uniform(0.2, 0.6),
        open0=rng.uniform(0.25, 0.5))


def view_geometry(an: dict, view: str) -> dict:
    """Ventricle frames for one view: list of (centre, e_a, e_b, rx, ry, h) with e_b pointing from
    apex to base; the first is the LV. 4CH adds the RV on the image left."""
    c, s = math.cos(an["tilt"]), math.sin(an["tilt"])
    e_b, e_a = np.array([-s, c]), np.array([c, s])
    lv_x = 0.5 + (0.075 if view == "4CH" else 0.0)
    apex = np.array([lv_x, APEX[1] + an["apex_depth"]])
    rx, ry, h = an["rx"] * (0.85 if view == "4CH" else 1.0), an["ry"], an["h"]
    lv = dict(c=apex + ry * e_b, e_a=e_a, e_b=e_b, rx=rx, ry=ry, h=h)
    vents = [lv]
    if view == "4CH":
        rrx, rry = an["rv_rx"], 0.85 * ry
        off = rx + an["wall"] + 0.008 + rrx                # septum between the cavities
        rh = 0.7 * rry
        c_rv = lv["c"] - off * e_a + (h - 0.02 - rh) * e_b   # tricuspid slightly apical
        vents.append(dict(c=c_rv, e_a=e_a, e_b=e_b, rx=rrx, ry=rry, h=rh))
    return dict(vents=vents, wall=an["wall"], la_rx=an["la_rx"], la_ry=an["la_ry"])


def _local(X, v):
    """X (..., 2) -> coordinates (a, b) in a ventricle's frame."""
    d = X - v["c"]
    return d @ v["e_a"], d @ v["e_b"]


def annulus_half_width(v) -> float:
    return v["rx"] * math.sqrt(1 - (v["h"] / v["ry"]) ** 2)


def solve_strength(ef: float, kx=1.0, ky=0.35) -> float:
    """Contraction strength s with 1 - (1 - kx s)^2 (1 - ky s) = ef (area-length volume model)."""
    lo, hi = 0.0, 0.9
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - (1 - kx * mid) ** 2 * (1 - ky * mid) < ef else (lo, mid)
    return (lo + hi) / 2


def displacement(X, geo, s, kx=1.0, ky=0.35):
    """d(X) (..., 2): every ventricle pulls its tissue towards its long axis and its apex, with
    weight 1 inside the cavity decaying outside (so the wall thickens and the far field rests)."""
    dx = np.zeros(X.shape[:-1], X.dtype)
    dy = np.zeros(X.shape[:-1], X.dtype)
    x, y = X[..., 0], X[..., 1]
    for v in geo["vents"]:
        (ax, ay), (bx, by) = v["e_a"], v["e_b"]
        ux, uy = x - v["c"][0], y - v["c"][1]
        a, b = ux * ax + uy * ay, ux * bx + uy * by
        rho = np.sqrt((a * (1 / v["rx"])) ** 2 + (b * (1 / v["ry"])) ** 2)
        w = np.exp(-(np.maximum(rho - 1, 0) * (1 / 0.45)) ** 2) * s
        pa, pb = w * (kx * a), w * (ky * (b + v["ry"]))
        dx -= pa * ax + pb * bx
        dy -= pa * ay + pb * by
    return np.stack([dx, dy], -1)


def invert(P, geo, s, X0=None, iters=10):
    """Material points X with X + d(X) = P (fixed-point iteration; X0 = a warm start)."""
    X = P.copy() if X0 is None else X0
    for _ in range(iters):
        X = P - displacement(X, geo, s)
    return X


def labels_and_reflectivity(X, geo, leaflet_open: float):
    """Labels (0 bg, 1 LV cavity, 2 myocardium, 3 LA) and echo reflectivity at material points.
    Painted in layers: pericardium, walls, atrial walls, blood pools, leaflets."""
    wall = geo["wall"]
    lab = np.zeros(X.shape[:-1], np.uint8)
    refl = np.full(X.shape[:-1], 0.045, np.float32)
    regions = []
    for k, v in enumerate(geo["vents"]):
        thick = wall if k == 0 else 0.6 * wall
        a, b = _local(X, v)
        base = b <= v["h"]
        cav = ((a / v["rx"]) ** 2 + (b / v["ry"]) ** 2 < 1) & base
        outer = ((a / (v["rx"] + thick)) ** 2 + (b / (v["ry"] + 0.8 * thick)) ** 2 < 1) & base
        peri = ((a / (v["rx"] + thick + 0.03)) ** 2 + (b / (v["ry"] + thick + 0.03)) ** 2 < 1) & (b <= v["h"] + 0.02)
        # atrium below the annulus, at least as wide as the annulus on its line
        arx = max(geo["la_rx"] * (1.0 if k == 0 else 0.85), annulus_half_width(v) / 0.8 + 0.005)
        ary = geo["la_ry"] * (1.0 if k == 0 else 0.9)
        ea = (a / arx) ** 2 + ((b - v["h"] - 0.6 * ary) / ary) ** 2
        regions.append((cav, outer, peri, (ea < 1) & ~base, (ea < 1.3) & ~base))
    for cav, outer, peri, atrium, awall in regions:
        refl[peri] = 1.0                                              # bright pericardium
    for cav, outer, peri, atrium, awall in regions:
        refl[awall] = 0.30                                            # atrial walls
    for k, (cav, outer, peri, atrium, awall) in enumerate(regions):
        refl[outer] = 0.45 if k == 0 else 0.35                        # myocardium
    lab[regions[0][1]] = 2
    for k, (cav, outer, peri, atrium, awall) in enumerate(regions):
        refl[cav | atrium] = 0.005                                    # blood
        if k == 0:
            lab[cav], lab[atrium] = 1, 3
    for v in geo["vents"]:
        _leaflets(X, v, leaflet_open, refl)
    return lab, refl


def _leaflets(X, v, openness, refl):
    """Two bright leaflets hinged at the annulus ends; closed: meeting below the annulus centre;
    open: swung towards the apex by `openness` (0..1)."""
    w, h = annulus_half_width(v), v["h"]
    a, b = _local(X, v)
    for side in (-1.0, 1.0):
        hinge = np.array([side * w, h])
        closed = np.array([0.0, h + 0.15 * w]) - hinge
        ang = side * openness * 1.2                                   # swing into the LV
        ca, sa = math.cos(ang), math.sin(ang)
        tip = hinge + 1.02 * np.array([ca * closed[0] - sa * closed[1], sa * closed[0] + ca * closed[1]])
        seg = tip - hinge
        t = np.clip(((a - hinge[0]) * seg[0] + (b - hinge[1]) * seg[1]) / (seg @ seg), 0, 1)
        dist = np.hypot(a - hinge[0] - t * seg[0], b - hinge[1] - t * seg[1])
        refl[dist < 0.007] = 0.8


# ------------------------------------------------------------------------------- echo render

def _grids(S):
    """Cartesian pixel centres (S, S, 2) and the polar sample points (Nr, Nt, 2), normalised."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    cart = np.stack([(xx + 0.5) / S, (yy + 0.5) / S], -1)
    r = np.linspace(0, DEPTH, S)
    th = np.linspace(-HALF_ANGLE, HALF_ANGLE, S)
    polar = APEX + np.stack([np.sin(th)[None, :] * r[:, None], np.cos(th)[None, :] * r[:, None]], -1)
    dx, dy = cart[..., 0] - APEX[0], cart[..., 1] - APEX[1]
    rr, tt = np.hypot(dx, dy), np.arctan2(dx, dy)
    inside = (rr <= DEPTH) & (np.abs(tt) <= HALF_ANGLE)
    map_r = (rr / DEPTH * (S - 1)).astype(np.float32)
    map_t = ((tt + HALF_ANGLE) / (2 * HALF_ANGLE) * (S - 1)).astype(np.float32)
    return cart.astype(np.float32), polar.astype(np.float32), r, inside, map_t, map_r


def render_echo_clip(an: dict, view: str, F: int, S: int, rng: np.random.Generator) -> dict:
    """One apical clip ED -> ES: video, mask (F, S, S) uint8, mv_points (F, 2, 2), flow_true
    (F, 2, S, S) in pixels, and meta."""
    geo = view_geometry(an, view)
    s_max = solve_strength(an["ef"])
    cart, polar, r, inside, map_t, map_r = _grids(S)
    G = 2 * S                                           # scatterer grid over [-0.1, 1.1]^2
    noise = (rng.standard_normal((G, G, 2)) / math.sqrt(2)).astype(np.float32)
    psf_r, psf_t = max(0.5, 1.2 * S / 256), max(0.7, 3.5 * S / 256)
    att = np.exp(-an["atten"] * r)[:, None].astype(np.float32)
    haze = (an["haze"] * np.exp(-r / 0.06))[:, None].astype(np.float32)
    strengths = cycle_strengths(s_max, F)
    video = np.zeros((F, S, S), np.uint8)
    mask = np.zeros((F, S, S), np.uint8)
    flow_true = np.zeros((F, 2, S, S), np.float32)
    ref = None
    X_prev = Xp = None
    for f in range(F):
        s = strengths[f]
        openness = an["open0"] * max(0.0, 1 - f / max(1, 0.2 * F))
        Xp = invert(polar, geo, s, Xp, 10 if f == 0 else 5)
        _, refl = labels_and_reflectivity(Xp, geo, openness)
        g = ((Xp + 0.1) / 1.2 * G - 0.5).astype(np.float32)
        sc = cv2.remap(noise, g[..., 0], g[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        amp = np.sqrt(refl)[..., None] * sc
        amp = cv2.GaussianBlur(amp, (0, 0), sigmaX=psf_t, sigmaY=psf_r)
        env = np.hypot(amp[..., 0], amp[..., 1]) * att
        hz = haze * np.abs(cv2.GaussianBlur(noise[:S, :S, 0], (0, 0), 2.0 * S / 256 + 0.5))
        env = env + hz
        db = 20 * np.log10(env + 1e-6)
        if ref is None:
            ref = np.percentile(db, 99.5) + an["gain_db"]
        gray = np.clip((db - ref + 42) / 42, 0, 1) ** 1.4
        img = cv2.remap(gray.astype(np.float32), map_t, map_r, cv2.INTER_LINEAR)
        video[f] = np.where(inside, np.round(img * 255), 0).astype(np.uint8)
        Xc, mask[f] = frame_labels(cart, inside, geo, s, X_prev)
        if f > 0:   # motion f-1 -> f at the pixels of frame f-1: d_f(X) - d_{f-1}(X), X from f-1
            flow_true[f - 1] = ((displacement(X_prev, geo, s) - displacement(X_prev, geo, strengths[f - 1]))
                                * S).transpose(2, 0, 1)
        X_prev = Xc
    flow_true *= inside
    pts = np.stack([_annulus_points(geo, s, S) for s in strengths])
    ef = area_length_ef(mask[0], mask[-1], pts[0], pts[-1])
    meta = dict(ED=0, ES=F - 1, EF=ef, EF_target=round(100 * an["ef"], 2), strength=round(s_max, 4),
                view=view, frames=list(range(F)), source="phantom",
                anatomy={k: round(float(v), 4) for k, v in an.items()})
    return dict(video=video, mask=mask, mv_points=pts, flow_true=flow_true, meta=meta)


def cycle_strengths(s_max: float, F: int) -> np.ndarray:
    """Contraction strength of each of F frames, ED (0) -> ES (s_max) on a half cosine."""
    t = np.arange(F) / max(F - 1, 1)
    return s_max * (1 - np.cos(np.pi * t)) / 2


def frame_labels(cart, inside, geo, s, X_prev=None):
    """(material points, label map (S, S) uint8) of the frame at strength s; X_prev (the previous
    frame's material points) is a warm start."""
    Xc = invert(cart, geo, s, X_prev, 10 if X_prev is None else 5)
    lab, _ = labels_and_reflectivity(Xc, geo, 0.0)
    return Xc, np.where(inside, lab, 0).astype(np.uint8)


def echo_masks(an: dict, view: str, F: int, S: int, s_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The label maps (F, S, S) uint8 and annulus points (F, 2, 2) of a clip ED -> ES at peak
    strength s_max, without rendering the image (what render_echo_clip draws its masks from)."""
    geo = view_geometry(an, view)
    cart, _, _, inside, _, _ = _grids(S)
    strengths = cycle_strengths(s_max, F)
    mask = np.zeros((F, S, S), np.uint8)
    X = None
    for f, s in enumerate(strengths):
        X, mask[f] = frame_labels(cart, inside, geo, s, X)
    return mask, np.stack([_annulus_points(geo, s, S) for s in strengths])


def _annulus_points(geo, s, S):
    """The mitral annulus ends at strength s, in pixels (pixel centres at integers), sorted by x."""
    v = geo["vents"][0]
    w = annulus_half_width(v)
    X = np.stack([v["c"] + side * w * v["e_a"] + v["h"] * v["e_b"] for side in (-1, 1)])
    P = X + displacement(X, geo, s)
    P = P * S - 0.5
    return P[np.argsort(P[:, 0])].astype(np.float32)


def area_length_ef(m_ed, m_es, p_ed, p_es) -> float:
    """EF (%) by the single-plane area-length method V = 8 A^2 / (3 pi L) on LV-cavity masks."""
    def vol(m, p):
        ys, xs = np.nonzero(m == 1)
        if len(xs) == 0:
            return float("nan")
        mid = p.mean(0)
        L = np.hypot(xs - mid[0], ys - mid[1]).max()
        return 8 * len(xs) ** 2 / (3 * math.pi * max(L, 1.0))
    v0, v1 = vol(m_ed, p_ed), vol(m_es, p_es)
    return round(100 * (v0 - v1) / v0, 2)


# ------------------------------------------------------------------------------- CMR render

def render_cmr_volume(rng_patient: np.random.Generator, phase: str, F: int, S: int,
                      rng: np.random.Generator) -> dict:
    """Short-axis stack, base (frame 0) -> apex: video, mask (F, S, S), meta."""
    p = dict(cx=rng_patient.uniform(0.45, 0.58), cy=rng_patient.uniform(0.42, 0.55),
             r_lv=rng_patient.uniform(0.10, 0.14), wall=rng_patient.uniform(0.035, 0.05),
             rv=rng_patient.uniform(0.13, 0.18), body=rng_patient.uniform(0.40, 0.46),
             ef=rng_patient.uniform(0.35, 0.7), rot=rng_patient.uniform(-0.3, 0.3))
    es = phase == "ES"
    yy, xx = np.mgrid[0:S, 0:S]
    x, y = (xx + 0.5) / S, (yy + 0.5) / S
    bias = 1 + 0.25 * (np.cos(2.1 * x + p["rot"]) * np.sin(1.7 * y + 0.5))
    tex = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 2.0 * S / 256 + 0.5)
    video = np.zeros((F, S, S), np.uint8)
    mask = np.zeros((F, S, S), np.uint8)
    for f in range(F):
        z = f / max(F - 1, 1)                             # 0 base .. 1 apex
        shrink = math.sqrt(max(1 - z ** 2 * 0.85, 0.05))
        r_ed = p["r_lv"] * shrink
        r_cav = r_ed * (math.sqrt(1 - p["ef"]) if es else 1.0)
        wall = p["wall"] * (0.8 + 0.2 * shrink)
        r_epi = math.sqrt(r_cav ** 2 + (r_ed + wall) ** 2 - r_ed ** 2)   # myocardial area conserved
        rad = np.hypot(x - p["cx"], y - p["cy"])
        lv, myo = rad < r_cav, (rad >= r_cav) & (rad < r_epi)
        # RV: a crescent on the septal side (image left), vanishing towards the apex
        rvx = p["cx"] - r_epi * 0.9 * math.cos(p["rot"])
        rvy = p["cy"] + r_epi * 0.9 * math.sin(p["rot"])
        rv_r = p["rv"] * shrink * (0.85 if es else 1.0) * max(0.0, 1 - z * 1.1)
        rv = (np.hypot((x - rvx) / 1.0, (y - rvy) / 1.5) < rv_r) & (rad >= r_epi + 0.01)
        lab = np.zeros((S, S), np.uint8)
        lab[lv], lab[myo], lab[rv] = 1, 2, 3
        body = ((x - 0.5) / p["body"]) ** 2 + ((y - 0.5) / (0.8 * p["body"])) ** 2
        img = np.where(body < 1, 0.35, 0.02)
        img = np.where((body > 0.85) & (body < 1), 0.85, img)                      # fat
        lungs = (np.hypot((x - 0.22) / 0.7, y - 0.47) < 0.11) | (np.hypot((x - 0.79) / 0.7, y - 0.47) < 0.10)
        img = np.where(lungs & (lab == 0), 0.06, img)
        img = np.where(lv | rv, 0.9, img)
        img = np.where(myo, 0.22, img)
        img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.8 * S / 256 + 0.3)
        img = img * bias * (1 + 0.06 * tex)
        sigma = 0.04
        n1, n2 = rng.standard_normal((2, S, S))
        img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)                 # Rician
        video[f] = np.clip(img / 1.1 * 255, 0, 255).astype(np.uint8)
        mask[f] = lab
    meta = dict(phase=phase, slices=F, order="base->apex", source="phantom-cmr",
                EF_target=round(100 * p["ef"], 2))
    return dict(video=video, mask=mask, meta=meta)


# ------------------------------------------------------------------------------- dataset

ECHO_TEXT = {"2CH": "An ECHO with 2-chamber view.", "4CH": "An ECHO with 4-chamber view."}
CMR_TEXT = {"ED": "A cardiac MRI short-axis volume at end-diastole.",
            "ES": "A cardiac MRI short-axis volume at end-systole."}


def make_clip(job) -> dict:
    """job = (kind, patient index, view or phase, frames, size, seed) -> one clip dict for the writer."""
    kind, pid, code, F, S, seed = job
    rng_patient = np.random.default_rng([seed, pid])
    rng = np.random.default_rng([seed, pid, 1 + ["2CH", "4CH", "ED", "ES"].index(code)])
    cv2.setNumThreads(1)
    if kind == "echo":
        clip = render_echo_clip(sample_anatomy(rng_patient), code, F, S, rng)
        pts = clip["mv_points"]
        derived = conditions.extract(clip["video"], clip["mask"])
        derived["mv"] = np.stack([conditions.mv_image(p, S) for p in pts])  # from the exact points
        derived.pop("mv_points")
        text = ECHO_TEXT[code]
    else:
        clip = render_cmr_volume(rng_patient, code, F, S, rng)
        derived = conditions.extract(clip["video"], clip["mask"])
        text = CMR_TEXT[code]
    clip.update(derived, mask_valid=np.ones(F, bool), text=text, view=code if kind == "echo" else "SA",
                patient=f"phantom{pid:04d}")
    clip["meta"]["patient"] = clip["patient"]
    return clip


def _make_encoded(job) -> dict:
    return encode(make_clip(job))


def split_patients(n_patients: int, seed: int, test_frac=0.1):
    """Seeded patient-level split -> (train ids, test ids); at least one test patient when n >= 2."""
    order = np.random.default_rng([seed, 12345]).permutation(n_patients)
    n_test = max(1 if n_patients >= 2 else 0, round(test_frac * n_patients))
    return sorted(order[n_test:].tolist()), sorted(order[:n_test].tolist())


def build(out, clips=200, frames=16, size=256, views=("2CH", "4CH"), seed=0, cmr=False,
          workers=1, force=False, progress=True) -> dict:
    """Write OUT/train.h5 and OUT/test.h5; returns {split: path}."""
    out = Path(out)
    for split in ("train", "test"):
        check_output(out / f"{split}.h5", force)
    codes = ("ED", "ES") if cmr else tuple(views)
    bad = [v for v in codes if v not in ECHO_TEXT and v not in CMR_TEXT]
    if bad:
        raise DataPrepError(f"--views: unknown view(s) {', '.join(bad)}; choose from 2CH, 4CH")
    n_pat = max(1, math.ceil(clips / len(codes)))
    train_ids, test_ids = split_patients(n_pat, seed)
    kind = "cmr" if cmr else "echo"
    jobs = [(kind, p, c, frames, size, seed) for p in range(n_pat) for c in codes][:clips]
    by_split = {"train": [j for j in jobs if j[1] in set(train_ids)],
                "test": [j for j in jobs if j[1] in set(test_ids)]}
    labels = CMR_LABELS if cmr else ECHO_LABELS
    paths = {}
    pool = Pool(workers) if workers > 1 else None
    try:
        for split, js in by_split.items():
            with ClipWriter(out / f"{split}.h5", frames=frames, size=size, labels=labels,
                            source="phantom-cmr" if cmr else "phantom", force=force,
                            flow_true=not cmr) as w:
                it = pool.imap(_make_encoded, js, chunksize=4) if pool else map(make_clip, js)
                for i, clip in enumerate(it):
                    w.add(clip)
                    if progress and (i + 1) % 50 == 0:
                        print(f"  {split}: {i + 1}/{len(js)} clips", file=sys.stderr)
            paths[split] = w.path
    finally:
        if pool:
            pool.close()
            pool.join()
    return paths


COLORS = np.array([[0, 0, 0], [60, 60, 255], [60, 220, 60], [255, 120, 40]], np.uint8)  # BGR per label


def preview(path, size=256, seed=0, patient=0) -> None:
    """Write a PNG montage: rows 2CH and 4CH; columns ED, ED + mask/MV overlay, ES, ES + overlay."""
    rows = []
    for view in ("2CH", "4CH"):
        c = make_clip(("echo", patient, view, 16, size, seed))
        tiles = []
        for f, name in ((0, "ED"), (15, "ES")):
            g = cv2.cvtColor(c["video"][f], cv2.COLOR_GRAY2BGR)
            m = c["mask"][f]
            ov = g.copy()
            ov[m > 0] = (0.55 * g[m > 0] + 0.45 * COLORS[m[m > 0]]).astype(np.uint8)
            ov[c["mv"][f] > 0] = (0, 255, 255)
            for img, label in ((g, f"{view} {name}"), (ov, f"{view} {name} mask + MV")):
                img = img.copy()
                cv2.putText(img, label, (6, size - 8), cv2.FONT_HERSHEY_SIMPLEX, size / 640, (255, 255, 255), 1, cv2.LINE_AA)
                tiles.append(img)
        rows.append(np.concatenate(tiles, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(rows, 0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="output folder for train.h5 and test.h5")
    ap.add_argument("--preview", metavar="PNG", help="only write a montage of one 2CH and one 4CH clip")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--views", default="2CH,4CH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cmr", action="store_true", help="short-axis CMR-like volumes instead of echo")
    ap.add_argument("--workers", type=int, default=0, help="processes (0 = all cores, at most 8)")
    ap.add_argument("--force", action="store_true", help="overwrite existing output files")
    a = ap.parse_args(argv)
    if a.preview:
        preview(a.preview, a.size, a.seed)
        print(f"wrote {a.preview}")
        return 0
    if not a.out:
        ap.error("--out is required (or --preview PNG)")
    try:
        if a.clips < 1 or a.frames < 2 or a.size < 32:
            raise DataPrepError("need --clips >= 1, --frames >= 2 and --size >= 32")
        workers = a.workers or min(8, os.cpu_count() or 1)
        paths = build(a.out, a.clips, a.frames, a.size, [v.strip().upper() for v in a.views.split(",")],
                      a.seed, a.cmr, workers, a.force)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, p in paths.items():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
