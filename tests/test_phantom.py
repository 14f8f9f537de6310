"""data_prep/phantom.py: schema, split, exact ground truth (masks, MV points, true motion), CLI."""
import json

import cv2
import h5py
import numpy as np
import pytest

from data_prep import conditions, phantom
from data_prep.h5io import SCHEMA


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    assert phantom.main(["--out", str(out), "--clips", "8", "--frames", "8", "--size", "64",
                         "--workers", "1"]) == 0
    return out


def test_schema_and_split(echo):
    files = {s: h5py.File(echo / f"{s}.h5", "r") for s in ("train", "test")}
    n = {s: f["video"].shape[0] for s, f in files.items()}
    assert n["train"] + n["test"] == 8 and n["test"] >= 1
    pats = {s: set(x.decode() for x in f["patient"][:]) for s, f in files.items()}
    assert not pats["train"] & pats["test"]
    f = files["train"]
    assert f.attrs["schema"] == SCHEMA and f.attrs["frames"] == 8 and f.attrs["size"] == 64
    assert f.attrs["source"] == "phantom" and f.attrs["count"] == n["train"]
    assert json.loads(f.attrs["labels"]) == {"0": "background", "1": "LV cavity", "2": "myocardium", "3": "LA"}
    N = n["train"]
    for name, dtype, shape in [("video", np.uint8, (N, 8, 64, 64)), ("mask", np.uint8, (N, 8, 64, 64)),
                               ("sketch", np.uint8, (N, 8, 64, 64)), ("mv", np.uint8, (N, 8, 64, 64)),
                               ("mask_valid", bool, (N, 8)), ("mv_points", np.float32, (N, 8, 2, 2)),
                               ("flow", np.float16, (N, 8, 2, 64, 64)), ("flow_true", np.float16, (N, 8, 2, 64, 64))]:
        assert f[name].dtype == dtype and f[name].shape == shape, name
    assert f["video"].chunks == (1, 1, 64, 64) and f["flow"].chunks == (1, 1, 2, 64, 64)
    for name in ("text", "view", "patient", "meta"):
        assert f[name].shape == (N,)
    views = [v.decode() for v in f["view"][:]]
    texts = [t.decode() for t in f["text"][:]]
    assert set(views) == {"2CH", "4CH"}
    assert all(t == f"An ECHO with {v[0]}-chamber view." for v, t in zip(views, texts))
    assert f["mask_valid"][:].all()
    assert set(np.unique(f["sketch"][:])) <= {0, 255} and set(np.unique(f["mv"][:])) <= {0, 255}


def test_echo_looks_like_echo(echo):
    with h5py.File(echo / "train.h5", "r") as f:
        v, m = f["video"][:].astype(float), f["mask"][:]
    S = v.shape[-1]
    _, _, _, inside, _, _ = phantom._grids(S)
    assert v[..., ~inside].max() == 0                       # black outside the sector
    assert v[..., inside].mean() > 20
    assert v[m == 1].mean() < 0.5 * v[m == 2].mean()        # dark cavity, bright myocardium
    assert v[m == 3].mean() < 0.5 * v[m == 2].mean()
    assert set(np.unique(m)) == {0, 1, 2, 3}
    assert not m[..., ~inside].any()


def test_cycle_and_ground_truth(echo):
    with h5py.File(echo / "train.h5", "r") as f:
        m, pts, ft = f["mask"][:], f["mv_points"][:], f["flow_true"][:].astype(np.float32)
        metas = [json.loads(x) for x in f["meta"][:]]
    area = (m == 1).sum((2, 3))
    assert (area[:, -1] < 0.85 * area[:, 0]).all()          # ES cavity smaller than ED
    for meta in metas:
        assert meta["ED"] == 0 and meta["ES"] == 7 and 20 < meta["EF"] < 80
        assert abs(meta["EF"] - meta["EF_target"]) < 10
    # simulated annulus points sit on the ends of the mask's LV/LA interface
    ext = np.stack([[conditions.mv_points(x) for x in clip] for clip in m])
    assert np.abs(ext - pts).max() < 1.5
    assert not ft[:, -1].any()


@pytest.mark.parametrize("view", ["2CH", "4CH"])
def test_true_motion_carries_the_labels(view):
    """mask_{f+1}(p + flow_true_f(p)) == mask_f(p), far better than assuming no motion."""
    c = phantom.make_clip(("echo", 2, view, 3, 128, 0))
    m, ft = c["mask"], c["flow_true"].astype(np.float32)
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    for f in range(2):
        w = cv2.remap(m[f + 1], xx + ft[f, 0], yy + ft[f, 1], cv2.INTER_NEAREST)
        moved, still = (w != m[f]).sum(), (m[f + 1] != m[f]).sum()
        assert still > 300 and moved < 0.25 * still, (moved, still)
    assert not ft[-1].any()


def test_deterministic_and_anatomy_varies(echo, tmp_path):
    phantom.build(tmp_path, clips=8, frames=8, size=64, seed=0, workers=2, progress=False)
    with h5py.File(echo / "train.h5", "r") as a, h5py.File(tmp_path / "train.h5", "r") as b:
        np.testing.assert_array_equal(a["video"][:], b["video"][:])   # workers do not change bytes
        np.testing.assert_array_equal(a["flow"][:], b["flow"][:])
        anat = [json.loads(x)["anatomy"]["rx"] for x in a["meta"][:]]
    assert len(set(anat)) > 1


def test_no_overwrite_without_force(echo, capsys):
    before = (echo / "train.h5").stat().st_mtime_ns
    assert phantom.main(["--out", str(echo), "--clips", "2", "--size", "64"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "train.h5" in err
    assert (echo / "train.h5").stat().st_mtime_ns == before
    assert phantom.main(["--out", str(echo), "--views", "3CH", "--force"]) == 1
    assert "3CH" in capsys.readouterr().err
    assert not list(echo.glob(".*tmp*"))


def test_cmr_volumes(tmp_path):
    phantom.build(tmp_path, clips=4, frames=6, size=48, cmr=True, workers=1, progress=False)
    with h5py.File(tmp_path / "train.h5", "r") as f:
        assert f.attrs["source"] == "phantom-cmr" and "flow_true" not in f
        assert json.loads(f.attrs["labels"])["3"] == "RV"
        m, v = f["mask"][:], f["video"][:].astype(float)
        texts = [t.decode() for t in f["text"][:]]
        phases = [json.loads(x)["phase"] for x in f["meta"][:]]
        assert np.isnan(f["mv_points"][:]).all()          # LV and RV never touch: no annulus
    assert set(np.unique(m)) == {0, 1, 2, 3}
    lv = (m == 1).sum((2, 3))
    assert (np.diff(lv, axis=1) <= 0).all() and (lv[:, -1] < lv[:, 0]).all()   # base -> apex shrinks
    assert v[m == 1].mean() > 2 * v[m == 2].mean()         # bright blood, dark myocardium
    for t, ph in zip(texts, phases):
        assert ("end-diastole" if ph == "ED" else "end-systole") in t
    ed, es = phases.index("ED"), phases.index("ES")
    assert lv[es].sum() < lv[ed].sum()
