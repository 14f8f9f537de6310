"""heartbeat/privacy.py: planted copies of training clips are flagged, unseen patients mostly not;
tools/sample.py --filter_copies drops and records them; tools/eval.py --metrics=privacy."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from heartbeat import privacy as P
from heartbeat.segmenter import SegUNet, save_segmenter
from test_sample import SIZE, run_tool, save_ckpt, stub_load_model
from tools import eval as ev
from tools import sample as tool

FR = 4


def _rename_patients(path, prefix):
    with h5py.File(path, "r+") as f:
        n = len(f["patient"])
        del f["patient"]
        f["patient"] = np.array([f"{prefix}{i:04d}" for i in range(n)], dtype=h5py.string_dtype())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """real/train.h5 (phantom seed 0), real/test.h5 (22 unseen patients' clips, phantom seed 1),
    other.h5 (8 more unseen clips, seed 2), a seeded untrained segmenter (its encoder is the
    feature space; a trained one separates better, this keeps the test fast)."""
    from data_prep.phantom import build
    d = tmp_path_factory.mktemp("priv")
    build(d / "real", clips=36, frames=FR, size=SIZE, progress=False)
    build(d / "held", clips=24, frames=FR, size=SIZE, seed=1, progress=False)
    build(d / "other", clips=8, frames=FR, size=SIZE, seed=2, progress=False)
    shutil.copy(d / "held" / "train.h5", d / "real" / "test.h5")
    _rename_patients(d / "real" / "test.h5", "held")
    torch.manual_seed(0)
    seg = SegUNet(size=SIZE).eval()
    save_segmenter(seg, d / "seg.safetensors")
    with h5py.File(d / "real" / "train.h5", "r") as f:
        train = f["video"][()]
    with h5py.File(d / "other" / "train.h5", "r") as f:
        other = f["video"][()]
    noisy = np.clip(train[5] + np.random.default_rng(0).normal(0, 8, train[5].shape), 0, 255).astype(np.uint8)
    fake = np.concatenate([train[2:3], noisy[None], other])         # 0: exact copy, 1: noised copy
    return d, seg, fake


def test_planted_copies_flagged_unseen_mostly_not(world):
    d, seg, fake = world
    rep = P.copy_report(fake, d / "real" / "train.h5", d / "real" / "test.h5", seg)
    assert rep["flagged"][0] and rep["flagged"][1], (rep["distance"][:2], rep["threshold"])
    assert rep["distance"][0] < 1e-6 and rep["nearest"][0] == 2 and rep["nearest"][1] == 5
    assert rep["flagged"][2:].sum() <= 2, (rep["distance"][2:], rep["threshold"])
    assert 0 < rep["threshold"] <= np.sort(rep["test_distances"])[1]


def test_overlapping_patients_refused(world, tmp_path):
    d, seg, fake = world
    shutil.copy(d / "real" / "train.h5", tmp_path / "t.h5")
    with pytest.raises(P.PrivacyError, match="share patients"):
        P.copy_report(fake, d / "real" / "train.h5", tmp_path / "t.h5", seg)


def _samples_file(path, video):
    with h5py.File(path, "w") as f:
        f["video"] = video
        f["meta"] = np.array([json.dumps({"seed": 10 + i, "source_index": -1, "conditions": "text"})
                              for i in range(len(video))], dtype=h5py.string_dtype())
        f.attrs["count"] = len(video)


def test_filter_file_drops_and_records(world, tmp_path):
    d, seg, fake = world
    _samples_file(tmp_path / "samples.h5", fake)
    rep = P.filter_file(tmp_path / "samples.h5", d / "real", seg, record=tmp_path / "copies.json")
    kept = np.flatnonzero(~rep["flagged"])
    with h5py.File(tmp_path / "samples.h5", "r") as f:
        assert np.array_equal(f["video"][()], fake[kept]) and f.attrs["count"] == len(kept)
        info = json.loads(f.attrs["copy_filter"])
        assert np.all(f["copy_distance"][()] >= info["threshold"])
    assert info == json.loads((tmp_path / "copies.json").read_text())
    assert [x["seed"] for x in info["dropped"]][:2] == [10, 11] and info["kept"] == len(kept)


def test_sample_filter_copies_cli(world, tmp_path, monkeypatch, capsys):
    d, seg, fake = world
    monkeypatch.setattr(tool, "load_model", stub_load_model)
    ckpt = save_ckpt(tmp_path / "s2.safetensors", "finetune", "text,image,sketch,mask,mv,flow")
    base = ["--ckpt", ckpt, "--data", d / "real", "--num=2", "--steps=1", f"--frames={FR}", "--previews=0",
            "--filter_copies"]
    rc, err = run_tool(base + ["--out", tmp_path / "x"], capsys)
    assert rc == 2 and "--segmenter" in err and not (tmp_path / "x").exists()
    rc, err = run_tool(base + ["--out", tmp_path / "x", "--segmenter", d / "seg.safetensors",
                               "--copy_ref", tmp_path], capsys)
    assert rc == 2 and "train.h5" in err and err.count("\n") == 1 and not (tmp_path / "x").exists()
    rc, err = run_tool(base + ["--out", tmp_path / "o", "--segmenter", d / "seg.safetensors"], capsys)
    assert rc == 0, err
    info = json.loads((tmp_path / "o" / "copies.json").read_text())
    with h5py.File(tmp_path / "o" / "samples.h5", "r") as f:
        assert json.loads(f.attrs["copy_filter"]) == info and len(f["video"]) == info["kept"]
    assert info["before"] == 2 and info["kept"] + len(info["dropped"]) == 2


def test_eval_privacy(world, tmp_path, capsys):
    d, seg, fake = world
    _samples_file(tmp_path / "samples.h5", fake)
    rc = ev.main(["--real", str(d / "real"), "--fake", str(tmp_path / "samples.h5"), "--metrics=privacy",
                  "--segmenter", str(d / "seg.safetensors"), "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "metrics.json").read_text())
    direct = P.copy_report(fake, d / "real" / "train.h5", d / "real" / "test.h5", seg)
    assert rep["rows"][0]["copy_rate"] == pytest.approx(direct["rate"]) and direct["rate"] >= 2 / len(fake)
    assert any("copies:" in n for n in rep["notes"])
