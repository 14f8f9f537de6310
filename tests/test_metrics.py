"""Tests of heartbeat/metrics.py, fid.py, fvd.py and segmenter.py against known answers."""
import h5py
import numpy as np
import pytest
import scipy.linalg
import torch

from heartbeat import metrics as M
from heartbeat.fid import FIDInceptionV3, inception_features, load_inception
from heartbeat.fvd import i3d_features, load_i3d, preprocess_clips
from heartbeat.segmenter import load_segmenter, save_segmenter, segment, train_segmenter


def random_rotation(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# ------------------------------------------------------------------------- Frechet distance

def test_frechet_diagonal_closed_form_and_rotation():
    rng = np.random.default_rng(0)
    d = 16
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q = random_rotation(d, rng)        # commuting covariances in a rotated basis: same distance
    fd = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert fd == pytest.approx(expected, rel=1e-9)


def test_frechet_general_vs_scipy_sqrtm_and_singular():
    rng = np.random.default_rng(1)
    d = 12
    x, y = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # rank-deficient covariances (N < D, as with few samples): finite, >= 0, zero for itself
    f = rng.standard_normal((5, 40))
    mu, s = M.feature_stats(f)
    assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-8
    g = f + 1.0                                    # a pure shift: FD = |shift|^2 = 40
    assert M.frechet_distance_feats(f, g) == pytest.approx(40.0, rel=1e-8)
    with pytest.raises(ValueError, match="shapes"):
        M.frechet_distance(mu, s, mu[:3], s)


# ----------------------------------------------------------------------------------- SSIM

def ssim_loops(x, y, L=255.0, win=11, sigma=1.5):
    """Independent reference: explicit windows, weighted moments, Wang et al. eq. 13."""
    g = np.exp(-((np.arange(win) - win // 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cab = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_constant_images_by_hand():
    a, b = 100.0, 140.0
    x, y = np.full((16, 16), a), np.full((16, 16), b)
    c1 = (0.01 * 255) ** 2
    assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    assert M.ssim(x, x) == pytest.approx(1.0)


def test_ssim_matches_loops_and_skimage():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (2, 20, 23)).astype(np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    s = M.ssim(x, y, data_range=255.0)
    assert s.shape == (2,)
    for k in range(2):
        assert s[k] == pytest.approx(ssim_loops(x[k].astype(float), y[k].astype(float)), rel=1e-10)
    skm = pytest.importorskip("skimage.metrics")   # test-only reference (requirements.txt)
    for k in range(2):
        ref = skm.structural_similarity(x[k], y[k], gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=255)
        assert s[k] == pytest.approx(ref, abs=1e-7)
    with pytest.raises(ValueError, match="smaller than"):
        M.ssim(x[:, :5, :5], y[:, :5, :5])


# ------------------------------------------------------------------------- controllability

def test_dice_identical_and_shifted():
    m = np.zeros((32, 32), np.uint8)
    m[4:14, 4:14] = 1          # 10 x 10 square
    m[20:30, 20:30] = 3
    d = M.dice(m, m)
    assert d[1] == 1.0 and d[3] == 1.0 and np.isnan(d[2])
    s = np.roll(m, 3, axis=1)  # shift by 3: overlap 10 x 7 -> Dice 0.7
    d = M.dice(s, m)
    assert d[1] == pytest.approx(0.7) and d[3] == pytest.approx(0.7)


def test_mv_distance_order_free_and_nan():
    p = np.array([[10.0, 20.0], [30.0, 20.0]])
    q = np.array([[33.0, 24.0], [10.0, 20.0]])   # swapped order, second point 5 px away
    assert M.mv_distance(p, q) == pytest.approx(2.5)
    assert np.isnan(M.mv_distance(p, np.full((2, 2), np.nan)))


def test_annulus_points_rule():
    m = np.zeros((40, 40), np.uint8)
    m[5:20, 10:21] = 1          # LV above
    m[20:30, 10:21] = 3         # LA below: interface between rows 19 and 20, x 10..20
    p = M.annulus_points(m[None])[0]
    np.testing.assert_allclose(p, [[10, 19.5], [20, 19.5]])
    assert np.isnan(M.annulus_points(np.zeros((8, 8), np.uint8))).all()


def test_flow_epe_known_shift():
    rng = np.random.default_rng(3)
    base = cv2_blur(rng.integers(0, 256, (96, 96)).astype(np.uint8))
    video = np.stack([np.roll(base, 2 * k, axis=1) for k in range(3)])   # 2 px/frame to the right
    est = M.estimate_flow(video)
    region = np.zeros((96, 96), bool)
    region[16:-16, 16:-16] = True
    true = np.zeros_like(est)
    true[:2, 0] = 2.0
    assert M.flow_epe(est[:2], true[:2], region) < 0.3
    assert M.flow_epe(np.zeros_like(est[:2]), true[:2], region) == pytest.approx(2.0)
    assert M.flow_epe(np.ones((1, 2, 4, 4)), np.zeros((1, 2, 4, 4))) == pytest.approx(np.sqrt(2))


def cv2_blur(img):
    import cv2
    return cv2.GaussianBlur(img, (0, 0), 2.0)


def test_area_ef():
    areas = [100, 90, 70, 60, 65]
    ed, es = M.ed_es_frames(areas)
    assert (ed, es) == (0, 3)
    assert M.area_ef(areas, ed, es) == pytest.approx(40.0)
    assert np.isnan(M.area_ef([0, 0], 0, 1))


# -------------------------------------------------------------------------------- FID / FVD

def test_inception_architecture_keys_shapes_and_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    sd = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    # names and shapes of the pytorch-fid file (torchvision's Inception3 naming, 1008 classes)
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6b.branch7x7dbl_5.conv.weight"] == (192, 128, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in sd)
    # torchvision's inception_v3 (aux, 1000 classes) has 27,161,264 parameters; less the aux head
    # (3,326,696) and plus 8 more classes (8 x 2049): 23,850,960
    assert sum(p.numel() for p in net.parameters()) == 23_850_960
    # a state-dict file round trip, without num_batches_tracked (tolerated either way)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save({k: v for k, v in net.state_dict().items() if "num_batches" not in k}, path)
    loaded = load_inception(path)
    assert loaded.kind == "state_dict"
    frames = np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.uint8)
    f1, f2 = inception_features(net, frames), inception_features(loaded, frames)
    assert f1.shape == (2, 2048) and np.isfinite(f1).all()
    np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-8)
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a pytorch-fid"):
        load_inception(bad)
    with pytest.raises(FileNotFoundError, match="--inception"):
        load_inception(tmp_path / "missing.pth")


def numpy_inception_weights(net):
    """Seeded weights that do not depend on torch's RNG: He-normal convs / fc, BN near identity."""
    rng = np.random.default_rng(0)
    sd = {}
    for k, v in net.state_dict().items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            a = v
        elif k.endswith("conv.weight") or k == "fc.weight":
            a = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif k.endswith("running_var"):
            a = rng.uniform(0.5, 1.5, shape)
        elif k.endswith("bn.weight"):
            a = rng.uniform(0.8, 1.2, shape)
        else:
            a = rng.normal(0, 0.1, shape)
        sd[k] = torch.as_tensor(a, dtype=v.dtype)
    return sd


def test_inception_forward_matches_torchvision_fingerprint():
    """pool3 of these weights on this input, computed once (2026-11-24) by torchvision 0.28's
    Inception3(num_classes=1008, aux_logits=False) with the FID pool branches (padding-excluding
    average pools in Mixed_5b-7b, max pool in Mixed_7c), fed the pytorch-fid preprocessing. It
    agreed with ours to 0.0; torchvision is not a dependency, so the numbers are kept here."""
    net = FIDInceptionV3().eval()
    net.load_state_dict(numpy_inception_weights(net))
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 40, 48)).astype(np.uint8)
    f = inception_features(net, x)
    np.testing.assert_allclose(f[:, :4], [[0.9611504, 11.0519562, 12.0676413, 8.1521091],
                                          [1.0009381, 11.2812662, 12.0650702, 8.1322527]], rtol=1e-4)
    np.testing.assert_allclose(f.mean(1), [2.5367131, 2.550918], rtol=1e-4)
    np.testing.assert_allclose(f.std(1), [3.3993638, 3.4157105], rtol=1e-4)


class FakeInceptionTS(torch.nn.Module):
    """The StyleGAN2-ADA TorchScript calling convention: net(uint8 images, return_features=True)."""

    def __init__(self, dims: int = 2048):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        v = x.float().mean(dim=(2, 3))                     # (N, 3)
        return v.repeat(1, self.dims // 3 + 1)[:, :self.dims] if return_features else v


class FakeI3DTS(torch.nn.Module):
    """StyleGAN-V's i3d_torchscript.pt convention: net(x, rescale=, resize=, return_features=)."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        assert not rescale and not resize and return_features
        v = x.mean(dim=(1, 3, 4))                          # (N, 16)
        return v.repeat(1, 25)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_feature_files(tmp_path):
    torch.jit.script(FakeInceptionTS()).save(str(tmp_path / "inception-2015-12-05.pt"))
    net = load_inception(tmp_path / "inception-2015-12-05.pt")
    assert net.kind == "torchscript"
    frames = np.full((3, 32, 32), 200, np.uint8)
    np.testing.assert_allclose(inception_features(net, frames), 200.0)
    torch.jit.script(FakeI3DTS()).save(str(tmp_path / "i3d_torchscript.pt"))
    i3d = load_i3d(tmp_path / "i3d_torchscript.pt")
    clips = np.zeros((2, 16, 48, 64), np.uint8)
    clips[:, 8:] = 255
    f = i3d_features(i3d, clips)
    assert f.shape == (2, 400)
    np.testing.assert_allclose(f[0, :16], [-1.0] * 8 + [1.0] * 8, atol=1e-6)
    with pytest.raises(ValueError, match="TorchScript"):
        bad = tmp_path / "x.pt"
        bad.write_bytes(b"not a model")
        load_i3d(bad)


def test_fvd_preprocess_protocol():
    clips = torch.zeros(1, 20, 40, 80, dtype=torch.uint8)
    clips[..., 40:] = 255                                 # right half white
    x = preprocess_clips(clips)
    assert x.shape == (1, 3, 16, 224, 224)
    assert x.min() == -1 and x.max() == 1
    # shorter side 40 -> 224, width 448, centre crop keeps columns 112..335: white from 112 on
    assert x[0, 0, 0, 0, 100] == -1 and x[0, 0, 0, 0, 130] == 1
    with pytest.raises(ValueError, match="at least 16"):
        preprocess_clips(torch.zeros(1, 8, 32, 32, dtype=torch.uint8))


# ------------------------------------------------------------------------------- segmenter

def make_seg_h5(path, n=6, frames=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    video = np.zeros((n, frames, size, size), np.uint8)
    mask = np.zeros_like(video)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for f in range(frames):
            cx, cy, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 7)
            d = np.hypot(xx - cx, yy - cy)
            m = np.where(d < r, 1, np.where(d < r + 3, 2, 0)).astype(np.uint8)
            mask[i, f] = m
            v = np.choose(m, [90, 20, 220]) + rng.normal(0, 10, m.shape)
            video[i, f] = np.clip(v, 0, 255).astype(np.uint8)
    with h5py.File(path, "w") as h:
        h["video"], h["mask"] = video, mask
        h["mask_valid"] = np.ones((n, frames), bool)
    return video, mask


def test_segmenter_learns_deterministic_and_roundtrip(tmp_path):
    path = tmp_path / "seg.h5"
    video, mask = make_seg_h5(path)
    a = train_segmenter(path, steps=60, size=32, seed=0, channels=(8, 16))
    b = train_segmenter(path, steps=60, size=32, seed=0, channels=(8, 16))
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    pred = segment(a, video.reshape(-1, 32, 32))
    d = M.dice(pred, mask.reshape(-1, 32, 32), labels=(1, 2))
    assert d[1] > 0.8 and d[2] > 0.6, d
    save_segmenter(a, tmp_path / "seg.safetensors")
    c = load_segmenter(tmp_path / "seg.safetensors")
    np.testing.assert_array_equal(segment(c, video[0]), segment(a, video[0]))
    up = segment(a, np.repeat(np.repeat(video[0], 2, 1), 2, 2))   # other sizes come back resized
    assert up.shape == (4, 64, 64)
    with pytest.raises(FileNotFoundError, match="not found"):
        train_segmenter(tmp_path / "none.h5", steps=1)


def test_warp_error_is_low_for_coherent_motion_and_high_for_flicker():
    """A blob moving 1 px a frame: warped by its true flow (and by its own estimated flow) the next
    frame lands on this one; independent noise frames (flicker) cannot be explained by any flow."""
    from heartbeat.metrics import warp_error
    yy, xx = np.mgrid[0:32, 0:32]
    frames = np.stack([255 * np.exp(-((xx - 10 - f) ** 2 + (yy - 16) ** 2) / 30.0) for f in range(5)])
    clip = frames.round().astype(np.uint8)
    true = np.zeros((5, 2, 32, 32), np.float32)
    true[:, 0] = 1.0
    still = np.zeros_like(true)
    assert warp_error(clip, true) < 1.0 < warp_error(clip, still)
    assert warp_error(clip) < 3.0                                   # its own (DIS) flow
    noise = np.random.default_rng(0).integers(0, 256, (5, 32, 32)).astype(np.uint8)
    assert warp_error(noise) > 40
    region = np.zeros((32, 32), bool)
    region[:, 28:] = True                                            # right of the blob: nothing moves
    assert warp_error(clip, still, region) < 0.5
