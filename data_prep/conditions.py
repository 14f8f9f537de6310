"""Local conditions extracted from a clip, the same for the phantom and real data (docs/ARCHITECTURE.md §Data).

All functions are deterministic, offline, and take uint8 frames:
    sketch(frame (H, W) uint8)            -> (H, W) uint8 {0, 255}   Canny edges of a smoothed frame
    mv_points(mask (H, W) uint8)          -> (2, 2) float32           annulus ends (x, y), NaN if none
    mv_image(points (2, 2), size)         -> (H, W) uint8 {0, 255}   the annulus drawn as a line
    flow(video (F, H, W) uint8)           -> (F, 2, H, W) float32     DIS flow f -> f+1 in pixels
                                                                        (preset FAST)
    extract(video, mask)                  -> dict of the datasets above for one clip

Mask labels: 1 LV cavity, 3 LA (CAMUS). The annulus is the LV-cavity / LA interface: the midpoints
between 4-neighbour pixel pairs (one LV, one LA); its two ends are the extreme midpoints along the
interface's principal axis, ordered by x (then y).
"""
from __future__ import annotations

import cv2
import numpy as np

LV, LA = 1, 3


def sketch(frame: np.ndarray) -> np.ndarray:
    """Canny edges of a median- and Gaussian-smoothed frame, thresholds from the median of the
    non-black pixels (black = outside the sector). (H, W) uint8 -> (H, W) uint8 {0, 255}."""
    size = frame.shape[0]
    k = max(3, (size // 64) | 1)                      # 3 at <=191 px, 5 at 256, 9 at 512
    smooth = cv2.medianBlur(frame, k)
    smooth = cv2.GaussianBlur(smooth, (0, 0), sigmaX=max(0.7, size / 110))
    inside = smooth[smooth > 8]
    med = float(np.median(inside)) if inside.size else 0.0
    lo, hi = max(10.0, 0.66 * med), max(30.0, 1.33 * med)
    edges = cv2.Canny(smooth, lo, hi, L2gradient=True)
    return np.where(edges > 0, 255, 0).astype(np.uint8)


def mv_points(mask: np.ndarray) -> np.ndarray:
    """(H, W) label map -> (2, 2) float32 [[x0, y0], [x1, y1]], the two ends of the LV/LA interface
    in pixel coordinates (pixel centres at integers), NaN when the labels do not touch."""
    lv, la = mask == LV, mask == LA
    pts = []
    ys, xs = np.nonzero((lv[:-1] & la[1:]) | (la[:-1] & lv[1:]))   # vertical neighbours
    pts.append(np.stack([xs, ys + 0.5], 1))
    ys, xs = np.nonzero((lv[:, :-1] & la[:, 1:]) | (la[:, :-1] & lv[:, 1:]))  # horizontal
    pts.append(np.stack([xs + 0.5, ys], 1))
    p = np.concatenate(pts).astype(np.float64)
    if len(p) == 0:
        return np.full((2, 2), np.nan, np.float32)
    if len(p) == 1:
        return np.repeat(p, 2, 0).astype(np.float32)
    c = p - p.mean(0)
    axis = np.linalg.svd(c, full_matrices=False)[2][0]
    proj = c @ axis
    ends = p[[int(np.argmin(proj)), int(np.argmax(proj))]]
    order = np.lexsort((ends[:, 1], ends[:, 0]))
    return ends[order].astype(np.float32)


def mv_thickness(size: int) -> int:
    return max(1, round(size / 96))                    # 1 px at 64, 3 px at 256


def mv_image(points: np.ndarray, size: int) -> np.ndarray:
    """(2, 2) annulus points -> (size, size) uint8 line, {0, 255}; empty when points are NaN."""
    img = np.zeros((size, size), np.uint8)
    if not np.all(np.isfinite(points)):
        return img
    (x0, y0), (x1, y1) = np.round(points).astype(int)
    cv2.line(img, (int(x0), int(y0)), (int(x1), int(y1)), 255, mv_thickness(size), cv2.LINE_8)
    return img


def flow(video: np.ndarray) -> np.ndarray:
    """(F, H, W) uint8 -> (F, 2, H, W) float32: dense DIS flow from frame f to f+1, (dx, dy) in
    pixels, so frame_f(p) ~ frame_{f+1}(p + flow_f(p)); the last frame's flow is zero."""
    F, H, W = video.shape
    out = np.zeros((F, 2, H, W), np.float32)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)   # 4x faster than MEDIUM,
    # about as accurate on echo speckle (phantom: 0.23 vs 0.19 px mean error in the myocardium)
    if min(H, W) < 96:                                 # small frames: smaller patches
        dis.setPatchSize(6)
        dis.setPatchStride(3)
    for f in range(F - 1):
        out[f] = dis.calc(video[f], video[f + 1], None).transpose(2, 0, 1)
    return out


def extract(video: np.ndarray, mask: np.ndarray, with_flow: bool = True) -> dict:
    """One clip's derived datasets: sketch, mv, mv_points, flow (docs/ARCHITECTURE.md §Data shapes).
    video, mask: (F, H, W) uint8. Masks without an LV/LA interface give NaN points, empty mv."""
    F, H, W = video.shape
    pts = np.stack([mv_points(m) for m in mask])
    out = dict(sketch=np.stack([sketch(v) for v in video]),
               mv_points=pts,
               mv=np.stack([mv_image(p, H) for p in pts]))
    out["flow"] = flow(video) if with_flow else np.zeros((F, 2, H, W), np.float32)
    return out
