"""Metrics for generated echo clips: Frechet distance, SSIM, and controllability
(docs/ARCHITECTURE.md §Evaluation).

The feature networks live beside this file: heartbeat/fid.py (InceptionV3 pool3, FID) and
heartbeat/fvd.py (I3D logits, FVD); heartbeat/segmenter.py segments generated frames. The exact
protocols and how to compare with published numbers are in docs/METRICS.md.

    mu, sigma = feature_stats(feats)                       # feats (N, D) -> (D,), (D, D) float64
    fd = frechet_distance(mu1, s1, mu2, s2)                # float
    s = ssim(x, y, data_range=255.)                        # x, y (..., H, W) -> (...) per image
    d = dice(pred, target, labels=(1, 2, 3))               # label maps -> {label: dice or nan}
    e = mv_distance(p, q)                                  # (..., 2, 2) annulus points -> (...) px
    epe = flow_epe(flow_pred, flow_true, region)           # (F, 2, H, W) -> float px
    w = warp_error(video, flow=None, region=None)          # (F, H, W) clip under its own flow -> grey levels
    ef = area_ef(lv_areas, ed, es)                         # percent

Everything is numpy / torch on CPU, deterministic, float64 where precision matters.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------- Frechet distance


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,), covariance (D, D), float64, unbiased (N - 1), as FID does."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_stats needs (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_eigvals(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off removed: those below the numerical-rank tolerance
    (D * eps * max|w|, as numpy's matrix_rank uses) are zero, not +-1e-16 (whose square roots,
    ~1e-8 each, would add up in a rank-deficient 2048-d covariance)."""
    tol = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigh."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(_psd_eigvals(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), Dowson & Landau 1982:

        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)

    tr((S1 S2)^1/2) equals tr((S1^1/2 S2 S1^1/2)^1/2) (similar matrices), and the latter is a
    symmetric PSD matrix, so both square roots are taken by symmetric eigendecomposition in float64:
    no complex round-off, no eps offset, exact for singular (rank-deficient) covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    r1 = _sym_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = np.sqrt(_psd_eigvals(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_feats(f1, f2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N1, D), (N2, D)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ----------------------------------------------------------------------------------- SSIM


def gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) float64 Gaussian summing to 1; its outer product with itself is the SSIM window
    of Wang et al. 2004 (11 x 11, sigma 1.5), so the window is applied as two 1-D passes."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x, y, data_range: float = 255.0, win: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Mean SSIM per image (Wang et al. 2004, eq. 13), Gaussian-weighted local statistics with
    population (biased) variances, averaged over the 'valid' positions only (no padding; the same
    as skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=L), which crops the padded border before averaging).

    x, y: (..., H, W) arrays or tensors (any real dtype), H, W >= win. Returns (...) float64.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"ssim: need two arrays of the same shape (..., H, W), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    lead, (H, W) = x.shape[:-2], x.shape[-2:]
    if H < win or W < win:
        raise ValueError(f"ssim: images {H}x{W} are smaller than the {win}x{win} window")
    x, y = x.reshape(-1, 1, H, W), y.reshape(-1, 1, H, W)
    g = gaussian_1d(win, sigma)
    maps = torch.cat([x, y, x * x, y * y, x * y], 1)   # (B, 5, H, W): five local moments at once
    maps = F.conv2d(maps, g.view(1, 1, 1, win).expand(5, 1, 1, win), groups=5)   # valid rows
    maps = F.conv2d(maps, g.view(1, 1, win, 1).expand(5, 1, win, 1), groups=5)   # valid columns
    mx, my, exx, eyy, exy = maps.unbind(1)
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean((1, 2)).reshape(lead).numpy()


# ------------------------------------------------------------------------- controllability


def dice(pred, target, labels=(1, 2, 3)) -> dict:
    """Dice of each label between two label maps of the same shape (any number of dims, e.g. a
    whole clip (F, H, W): pooled over all its pixels). NaN where the label is absent from both."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"dice: shapes differ: {pred.shape} vs {target.shape}")
    out = {}
    for k in labels:
        p, t = pred == k, target == k
        denom = p.sum() + t.sum()
        out[int(k)] = float(2 * (p & t).sum() / denom) if denom else float("nan")
    return out


def mv_distance(p, q) -> np.ndarray:
    """Mean distance in pixels between two annulus point pairs, order-free: (..., 2, 2) [(x, y) x 2]
    -> (...), the smaller of the two matchings; NaN where either pair is undefined (NaN)."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    d_same = (np.linalg.norm(p[..., 0, :] - q[..., 0, :], axis=-1)
              + np.linalg.norm(p[..., 1, :] - q[..., 1, :], axis=-1)) / 2
    d_swap = (np.linalg.norm(p[..., 0, :] - q[..., 1, :], axis=-1)
              + np.linalg.norm(p[..., 1, :] - q[..., 0, :], axis=-1)) / 2
    return np.fmin(d_same, d_swap) * np.where(np.isnan(d_same + d_swap), np.nan, 1.0)


def flow_epe(pred, target, region=None) -> float:
    """Mean end-point error in pixels between two flows (..., 2, H, W) (dx, dy), over the pixels
    where `region` (..., H, W) or (H, W) is True (all pixels when None)."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    if pred.shape != target.shape or pred.shape[-3] != 2:
        raise ValueError(f"flow_epe: need two flows (..., 2, H, W) of one shape, got {pred.shape} "
                         f"and {target.shape}")
    err = np.linalg.norm(pred - target, axis=-3)
    if region is None:
        return float(err.mean())
    region = np.broadcast_to(np.asarray(region, bool), err.shape)
    return float(err[region].mean()) if region.any() else float("nan")


def warp_error(video, flow=None, region=None) -> float:
    """Temporal consistency of a clip (F, H, W): frame f+1 warped back onto frame f by the flow
    f -> f+1 (bilinear, I_{f+1}(x + flow_f(x))), mean absolute difference to frame f in grey levels
    (0..255), over frames 0..F-2 and the pixels whose flow target lies inside the frame (and inside
    `region`, (H, W) or (F, H, W)). flow (F, 2, H, W) in pixels, default the clip's own flow
    (estimate_flow). A clip whose frames move coherently scores near the flow's own error; flicker
    that no motion explains raises it."""
    v = np.asarray(video, np.float32)
    if v.ndim != 3 or len(v) < 2:
        raise ValueError(f"warp_error: need a clip (F >= 2, H, W), got shape {v.shape}")
    flow = estimate_flow(video) if flow is None else np.asarray(flow, np.float32)
    Fn, H, W = v.shape
    fl = torch.from_numpy(np.ascontiguousarray(flow[:-1], np.float32))          # (F-1, 2, H, W)
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    gx, gy = xs + fl[:, 0], ys + fl[:, 1]                                         # where x lands in f+1
    grid = torch.stack([2 * gx / (W - 1) - 1, 2 * gy / (H - 1) - 1], -1)
    nxt = torch.from_numpy(v[1:, None])
    warped = F.grid_sample(nxt, grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]
    inside = (gx >= 0) & (gx <= W - 1) & (gy >= 0) & (gy <= H - 1)
    if region is not None:
        inside &= torch.from_numpy(np.broadcast_to(np.asarray(region, bool), (Fn, H, W))[:-1].copy())
    err = (warped - torch.from_numpy(v[:-1])).abs()
    return float(err[inside].mean()) if bool(inside.any()) else float("nan")


def estimate_flow(video) -> np.ndarray:
    """(F, H, W) uint8 -> (F, 2, H, W) float32 flow f -> f+1, by the same extractor (DIS) that made
    the conditioning flow (data_prep/conditions.py), so EPE compares like with like."""
    from data_prep.conditions import flow  # the project's one flow rule
    return flow(np.ascontiguousarray(np.asarray(video, np.uint8)))


def annulus_points(mask) -> np.ndarray:
    """(..., H, W) label map(s) -> (..., 2, 2) annulus points, by the rule of
    data_prep/conditions.py (ends of the LV-cavity / LA interface; NaN when they do not touch)."""
    from data_prep.conditions import mv_points
    mask = np.asarray(mask)
    flat = mask.reshape(-1, *mask.shape[-2:])
    return np.stack([mv_points(m) for m in flat]).reshape(*mask.shape[:-2], 2, 2)


def area_ef(lv_areas, ed: int, es: int) -> float:
    """Area-based ejection-fraction proxy in percent: 100 (A_ED - A_ES) / A_ED, with A the LV-cavity
    pixel count of frames ed and es (a 2D surrogate of the volume EF; NaN when A_ED = 0)."""
    a = np.asarray(lv_areas, np.float64)
    return float(100 * (a[ed] - a[es]) / a[ed]) if a[ed] > 0 else float("nan")


def ed_es_frames(lv_areas) -> tuple[int, int]:
    """(F,) LV-cavity areas -> (ED, ES) frame indices: the largest and the smallest cavity."""
    a = np.asarray(lv_areas)
    return int(np.argmax(a)), int(np.argmin(a))
