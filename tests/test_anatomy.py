"""heartbeat/anatomy.py: the heart model's masks at a requested EF; tools/sample.py --anatomy=model
and the EF-request error tools/eval.py reports (stand-in networks, so this tests the plumbing)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from heartbeat import anatomy as A
from test_sample import FRAMES, SIZE, run_tool, save_ckpt, stub_load_model
from tools import eval as ev
from tools import sample as tool

TOL = 0.02    # area EF (fraction) of the model's own 64-px masks vs the request


@pytest.mark.parametrize("view", ["2CH", "4CH"])
def test_model_masks_reach_requested_area_ef(view):
    for k, ef in enumerate((0.15, 0.4, A.MAX_AREA_EF[view])):
        c = A.model_clip(view, ef, frames=6, size=64, rng=np.random.default_rng(k))
        m = c["mask"]
        got = A.area_ef_of(m[0], m[-1])
        assert abs(got - ef) < TOL, (view, ef, got)
        areas = (m == 1).reshape(len(m), -1).sum(1)
        assert np.all(np.diff(areas) <= 0)                   # ED -> ES: the cavity only shrinks
        assert set(np.unique(m)) == {0, 1, 2, 3}
        assert np.isfinite(c["mv_points"]).all() and (c["mv"] > 0).any()
        assert c["meta"]["ef_requested"] == ef and c["view"] == view


def test_model_limit_4ch_clip_not_only_the_solve():
    """At the 4CH limit the frame-by-frame clip once missed the solved EF by 8 points (rng [k, 42])."""
    for k in range(10):
        m = A.model_clip("4CH", 0.42, frames=16, size=64, rng=np.random.default_rng([k, 42]))["mask"]
        assert abs(A.area_ef_of(m[0], m[-1]) - 0.42) <= A.SOLVE_TOL, k


@pytest.mark.parametrize("text", ["0", "1", "35", "-0.2", "0.7:0.2", "abc", "0.1:0.2:0.3"])
def test_bad_ef(text):
    with pytest.raises(A.AnatomyError, match="--ef"):
        A.parse_ef(text)


def test_parse_ef_and_unreachable():
    assert A.parse_ef("0.35") == (0.35, 0.35) and A.parse_ef("0.2:0.7") == (0.2, 0.7)
    with pytest.raises(A.AnatomyError, match="beyond"):
        A.solve_area_strength(A.phantom.sample_anatomy(np.random.default_rng(0)), "4CH", 0.6, 32)
    with pytest.raises(A.AnatomyError, match="4CH LV reaches"):
        A.model_clip("4CH", 0.5, 4, 32, np.random.default_rng(0))


def test_sample_anatomy_model_then_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tool, "load_model", stub_load_model)
    ckpt = save_ckpt(tmp_path / "s2.safetensors", "finetune", "text,image,sketch,mask,mv,flow")
    out = tmp_path / "o"
    rc, err = run_tool(["--ckpt", ckpt, "--anatomy=model", "--ef=0.2:0.6", "--view=2CH", "--num=3", f"--frames={FRAMES}",
                        "--steps=2", "--out", out, "--previews=0"], capsys)
    assert rc == 0, err
    with h5py.File(out / "samples.h5", "r") as f:
        metas = [json.loads(s) for s in f["meta"].asstr()[()]]
        masks, conds = f["mask"][()], f["conditions"].asstr()[()]
        assert list(f["view"].asstr()[()]) == ["2CH"] * 3 and (f["source_index"][()] == -1).all()
    efs = [A.requested_ef(m) for m in metas]
    assert len(set(efs)) == 3 and all(0.2 <= e <= 0.6 for e in efs)
    assert set(conds) == {"text,mask,mv"} and masks.shape == (3, FRAMES, SIZE, SIZE)
    for m, e in zip(masks, efs):
        assert abs(A.area_ef_of(m[0], m[-1]) - e) < 0.05         # 32 px masks: coarser
    # the same seeds give the same anatomy
    rc, _ = run_tool(["--ckpt", ckpt, "--anatomy=model", "--ef=0.2:0.6", "--view=2CH", "--num=3", f"--frames={FRAMES}",
                      "--steps=2", "--out", out, "--previews=0", "--force"], capsys)
    with h5py.File(out / "samples.h5", "r") as f:
        assert rc == 0 and np.array_equal(f["mask"][()], masks)
    # eval: the segmentation's area EF against the request (a perfect segmenter scores |ef_area - ef|)
    from data_prep.phantom import build
    build(tmp_path / "real", clips=4, frames=FRAMES, size=SIZE, progress=False)
    monkeypatch.setattr("heartbeat.segmenter.train_segmenter", lambda *a, **k: "stub")
    monkeypatch.setattr("heartbeat.segmenter.save_segmenter", lambda *a, **k: None)
    with h5py.File(out / "samples.h5", "r") as f:
        truth = iter(f["mask"][()])
    monkeypatch.setattr("heartbeat.segmenter.segment", lambda model, frames: next(truth))
    assert ev.main(["--real", str(tmp_path / "real"), "--fake", str(out / "samples.h5"),
                    "--metrics=control", "--out", str(tmp_path / "ev")]) == 0
    row = json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"][0]
    want = np.mean([abs(A.area_ef_of(m[0], m[-1]) - e) * 100 for m, e in zip(masks, efs)])
    assert row["ef_req_err"] == pytest.approx(want, abs=1e-6) and row["dice_lv"] == 1.0


def test_sample_anatomy_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tool, "load_model", stub_load_model)
    ckpt = save_ckpt(tmp_path / "s2.safetensors", "finetune", "text,image,sketch,mask,mv,flow")
    base = ["--ckpt", ckpt, "--anatomy=model", "--out", tmp_path / "o"]
    for extra, msg in ((["--ef=1.5"], "--ef=1.5"), ([], "needs --ef"), (["--ef=0.3", "--view=PLAX"], "--view"),
                       (["--ef=0.3", "--data", tmp_path], "drop --data")):
        rc, err = run_tool(base + extra, capsys)
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    rc, err = run_tool(base + ["--ef=0.3", "--conditions=text"], capsys)
    assert rc == 2 and "mask condition" in err, err
    rc, err = run_tool(base + ["--ef=0.3", "--frames=1"], capsys)
    assert rc == 2 and "at least 2 frames" in err, err
    assert not (tmp_path / "o").exists()
