"""data_prep/conditions.py: flow on known shifts and on the phantom's true motion, MV points, sketch."""
import cv2
import numpy as np
import pytest

from data_prep import conditions, phantom


def _texture(S=96, seed=0):
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.standard_normal((S, S)).astype(np.float32), (0, 0), 2.0)
    return np.clip(128 + 40 * t / t.std(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shift", [(2.3, -1.7), (-0.6, 0.4), (4.0, 3.0)])
def test_flow_recovers_a_known_shift(shift):
    a = _texture()
    M = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])    # b(p) = a(p - shift)
    b = cv2.warpAffine(a, M, a.shape[::-1], flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    fl = conditions.flow(np.stack([a, b, b]))
    assert fl.shape == (3, 2, 96, 96) and fl.dtype == np.float32
    inner = fl[0][:, 12:-12, 12:-12]
    err = np.hypot(inner[0] - shift[0], inner[1] - shift[1])
    assert err.mean() < 0.5, err.mean()
    assert np.abs(fl[1]).max() < 0.5          # identical frames: no motion
    assert not fl[2].any()                    # the last frame's flow is zero


def test_flow_matches_phantom_true_motion():
    c = phantom.make_clip(("echo", 3, "2CH", 4, 256, 0))
    true, est = c["flow_true"][:-1], c["flow"][:-1]
    myo = c["mask"][:-1] == 2
    epe = np.hypot(est[:, 0] - true[:, 0], est[:, 1] - true[:, 1])[myo]
    mag = np.hypot(true[:, 0], true[:, 1])[myo]
    assert mag.mean() > 1.0                   # the heart does move, by pixels per frame
    assert epe.mean() < 0.4 * mag.mean(), (epe.mean(), mag.mean())


def test_mv_points_are_the_exact_interface_ends():
    m = np.zeros((40, 50), np.uint8)
    m[5:20, 10:41] = 1                        # LV cavity above ...
    m[20:35, 10:41] = 3                       # ... LA below: interface between rows 19 and 20
    m[5:20, 5:10] = 2
    p = conditions.mv_points(m)
    np.testing.assert_array_equal(p, np.float32([[10, 19.5], [40, 19.5]]))
    # a vertical interface: LV left of LA
    m2 = np.zeros((30, 30), np.uint8)
    m2[4:25, 3:12], m2[4:25, 12:20] = 1, 3
    np.testing.assert_array_equal(conditions.mv_points(m2), np.float32([[11.5, 4], [11.5, 24]]))


def test_mv_points_absent_gives_nan_and_empty_image():
    m = np.zeros((32, 32), np.uint8)
    m[2:10, 2:10], m[20:30, 20:30] = 1, 3     # LV and LA do not touch
    p = conditions.mv_points(m)
    assert p.shape == (2, 2) and np.isnan(p).all()
    assert not conditions.mv_image(p, 32).any()


def test_mv_image_draws_the_segment():
    img = conditions.mv_image(np.float32([[10, 30], [50, 30]]), 64)
    assert set(np.unique(img)) == {0, 255}
    ys, xs = np.nonzero(img)
    assert xs.min() == 10 and xs.max() == 50 and set(ys) == {30}   # 1 px wide at 64
    thick = conditions.mv_image(np.float32([[40, 120], [200, 120]]), 256)
    assert 2 <= len(set(np.nonzero(thick)[0])) <= 5                    # a few px wide at 256


def test_sketch_finds_a_disc_boundary_and_nothing_in_a_flat_image():
    S = 128
    yy, xx = np.mgrid[0:S, 0:S]
    r = np.hypot(xx - 64, yy - 64)
    img = np.where(r < 30, 200, 60).astype(np.uint8)
    sk = conditions.sketch(img)
    assert sk.dtype == np.uint8 and set(np.unique(sk)) <= {0, 255}
    on = r[sk > 0]
    assert len(on) > 150 and np.abs(on - 30).max() < 3
    assert not conditions.sketch(np.full((S, S), 90, np.uint8)).any()


def test_extract_shapes():
    video = np.stack([_texture(64, s) for s in range(3)])
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[:, 10:30, 10:50], mask[:, 30:50, 10:50] = 1, 3
    out = conditions.extract(video, mask)
    assert out["sketch"].shape == (3, 64, 64) and out["mv"].shape == (3, 64, 64)
    assert out["mv_points"].shape == (3, 2, 2) and out["flow"].shape == (3, 2, 64, 64)
    np.testing.assert_array_equal(out["mv_points"][1], np.float32([[10, 29.5], [49, 29.5]]))
