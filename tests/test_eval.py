"""tools/eval.py end to end on tiny synthetic HDF5 files (§4 schema), and its bad-input messages."""
import json

import h5py
import numpy as np
import pytest
import torch

from data_prep.conditions import extract
from tools import eval as ev

F, S = 16, 64


def synth_clip(rng):
    """A sector with speckle, an LV ellipse that shrinks over the clip above an LA ellipse."""
    yy, xx = np.mgrid[:S, :S]
    sector = np.hypot(xx - S / 2, yy + 8) < S + 4
    speckle = rng.uniform(0.6, 1.4, (S, S))
    video, mask = np.zeros((2, F, S, S), np.uint8)
    cx, a0, la_y = S / 2 + rng.uniform(-4, 4), rng.uniform(11, 14), 44 + rng.uniform(-2, 2)
    for f in range(F):
        a = a0 * (1 - 0.3 * f / (F - 1))
        lv = ((xx - cx) / (0.55 * a)) ** 2 + ((yy - (la_y - a)) / a) ** 2
        la = ((xx - cx) / 9) ** 2 + ((yy - (la_y + 5)) / 7) ** 2 < 1
        m = np.where(lv < 1, 1, np.where(lv < 1.8, 2, 0))
        m[la & (m != 1)] = 3                      # the LA meets the LV at the annulus
        m[~sector] = 0
        mask[f] = m
        img = np.choose(m, [90, 25, 210, 30]) * np.roll(speckle, f // 4, 0)
        video[f] = np.where(sector, np.clip(img, 1, 255), 0).astype(np.uint8)
    return video, mask


def write_real(path, n, seed):
    rng = np.random.default_rng(seed)
    clips = [synth_clip(rng) for _ in range(n)]
    with h5py.File(path, "w") as h:
        h["video"] = np.stack([c[0] for c in clips])
        h["mask"] = np.stack([c[1] for c in clips])
        h["mask_valid"] = np.ones((n, F), bool)
        ex = [extract(v, m) for v, m in clips]
        h["mv_points"] = np.stack([e["mv_points"] for e in ex])
        h["flow"] = np.stack([e["flow"] for e in ex]).astype(np.float16)
        h["view"] = np.array(["2CH"] * n, dtype=h5py.string_dtype())
    return clips


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    write_real(d / "train.h5", 8, 0)
    real = write_real(d / "test.h5", 4, 1)
    rng = np.random.default_rng(2)
    fake = d / "samples.h5"
    with h5py.File(fake, "w") as h:      # 4 exact copies (T+I+M), 4 noise clips (T), same sources
        vids = [c[0] for c in real] + [rng.integers(0, 256, (F, S, S)).astype(np.uint8) for _ in real]
        h["video"] = np.stack(vids)
        metas = [{"source_index": i % 4, "conditions": "text,image,mask" if i < 4 else "text"}
                 for i in range(8)]
        h["meta"] = np.array([json.dumps(m) for m in metas], dtype=h5py.string_dtype())
    return d, fake


def run(argv, capsys):
    rc = ev.main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_eval_rows_and_reference(data, capsys, tmp_path):
    d, fake = data
    rc, cap = run(["--real", d, "--fake", fake, "--metrics", "ssim,control", "--seg_steps", "80",
                   "--seg_size", "32", "--out", tmp_path], capsys)
    assert rc == 0, cap.err
    rep = json.loads((tmp_path / "metrics.json").read_text())
    rows = {r["label"]: r for r in rep["rows"]}
    assert set(rows) == {"T", "T+I+M", "real"}
    copy, noise, ref = rows["T+I+M"], rows["T"], rows["real"]
    assert copy["n"] == 4 and noise["n"] == 4 and ref["n"] == 4
    assert copy["ssim"] == pytest.approx(1.0) and noise["ssim"] < 0.2
    for k in ("dice_lv", "dice_myo", "dice_la", "mv_px", "ef_err"):   # copies = the real clips
        assert copy[k] == pytest.approx(ref[k]), k
    assert copy["dice_lv"] > 0.7, copy                 # the segmenter learned the LV
    assert copy["flow_epe_px"] < 0.05                  # same extractor, float16 storage only
    assert noise["flow_epe_px"] > copy["flow_epe_px"] + 0.2
    assert noise["dice_lv"] < copy["dice_lv"]
    assert any("fid skipped" in n for n in rep["notes"]) is False   # fid not requested
    assert rep["timing"]["frames_per_s"] > 0
    per = rep["per_sample"]                            # what tools/compare.py pairs
    assert [p["sample"] for p in per] == list(range(8)) and [p["source"] for p in per] == [0, 1, 2, 3] * 2
    assert [p["conditions"] for p in per] == ["text,image,mask"] * 4 + ["text"] * 4
    assert np.mean([p["dice_myo"] for p in per[:4]]) == pytest.approx(copy["dice_myo"])
    assert np.mean([p["warp_err"] for p in per[4:]]) == pytest.approx(noise["warp_err"])
    md = (tmp_path / "metrics.md").read_text()
    assert "| T+I+M |" in md and "ssim + control: 128 frames" in md and "| T+I+M |" in cap.out
    out2 = tmp_path / "again"                          # reusing the saved segmenter: same numbers
    rc, cap = run(["--real", d, "--fake", fake, "--metrics", "control", "--out", out2,
                   "--segmenter", tmp_path / "segmenter.safetensors"], capsys)
    assert rc == 0, cap.err
    rows2 = {r["label"]: r for r in json.loads((out2 / "metrics.json").read_text())["rows"]}
    assert rows2["T+I+M"]["dice_lv"] == copy["dice_lv"] and rows2["T"]["mv_px"] == noise["mv_px"]


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_eval_fid_fvd_with_torchscript_files(data, capsys, tmp_path):
    from tests.test_metrics import FakeI3DTS, FakeInceptionTS
    d, fake = data
    torch.jit.script(FakeInceptionTS(dims=64)).save(str(tmp_path / "inc.pt"))  # 64-d: a fast FD
    torch.jit.script(FakeI3DTS()).save(str(tmp_path / "i3d.pt"))
    rc, cap = run(["--real", d / "test.h5", "--fake", fake, "--metrics", "fid,fvd",
                   "--inception", tmp_path / "inc.pt", "--i3d", tmp_path / "i3d.pt",
                   "--out", tmp_path], capsys)
    assert rc == 0, cap.err
    rows = {r["label"]: r for r in json.loads((tmp_path / "metrics.json").read_text())["rows"]}
    assert rows["T+I+M"]["fid"] < 1e-6 and rows["T+I+M"]["fvd"] < 1e-6   # copies of the real split
    assert rows["T"]["fid"] > 1 and rows["T"]["fvd"] > 1e-3


def test_eval_skips_missing_weights(data, capsys, tmp_path):
    d, fake = data
    rc, cap = run(["--real", d, "--fake", fake, "--metrics", "fid,fvd,ssim", "--group",
                   "conditions,view", "--i3d", tmp_path / "nope.pt", "--out", tmp_path], capsys)
    assert rc == 0, cap.err
    rows = json.loads((tmp_path / "metrics.json").read_text())["rows"]
    assert {r["view"] for r in rows} == {"2CH"}         # the source clips' view
    assert "| T+I+M | 2CH | 4 | 1 |" in cap.out
    assert "fid skipped: no --inception" in cap.out
    assert f"I3D weights file {tmp_path / 'nope.pt'} is missing" in cap.out


def test_eval_bad_input(data, capsys, tmp_path):
    d, fake = data
    rc, cap = run(["--real", d, "--fake", tmp_path / "none.h5"], capsys)
    assert rc == 2 and "none.h5 not found" in cap.err and "Traceback" not in cap.err
    rc, cap = run(["--real", tmp_path, "--fake", fake], capsys)
    assert rc == 2 and "test.h5 not found" in cap.err
    rc, cap = run(["--real", d, "--fake", fake, "--metrics", "fid,psnr"], capsys)
    assert rc == 2 and "psnr" in cap.err
    with h5py.File(tmp_path / "empty.h5", "w") as h:
        h["mask"] = np.zeros((1, 1, 4, 4), np.uint8)
    rc, cap = run(["--real", d, "--fake", tmp_path / "empty.h5"], capsys)
    assert rc == 2 and "no 'video' dataset" in cap.err
    with h5py.File(tmp_path / "badsrc.h5", "w") as h:
        h["video"] = np.zeros((2, F, S, S), np.uint8)
        h["source_index"] = np.array([0, 9])
    rc, cap = run(["--real", d, "--fake", tmp_path / "badsrc.h5", "--metrics", "ssim"], capsys)
    assert rc == 2 and "source_index" in cap.err
    with h5py.File(tmp_path / "badcond.h5", "w") as h:
        h["video"] = np.zeros((1, F, S, S), np.uint8)
        h["conditions"] = np.array(["text,colour"], dtype=h5py.string_dtype())
    rc, cap = run(["--real", d, "--fake", tmp_path / "badcond.h5", "--metrics", "ssim"], capsys)
    assert rc == 2 and "colour" in cap.err


def test_eval_stage1_frames_smaller_size_and_no_source(data, capsys, tmp_path):
    """Stage-1 samples (F = 1, the source's first frame) at 32 px from 64 px real clips; one sample
    with conditions from files (source_index -1) and its mask stored in the fake file."""
    import cv2
    d, _ = data
    with h5py.File(d / "test.h5", "r") as h:
        v0, m0 = h["video"][:, :1], h["mask"][:, :1]
    small = lambda a, interp: np.stack([[cv2.resize(f, (32, 32), interpolation=interp) for f in c] for c in a])
    fake = tmp_path / "s1.h5"
    with h5py.File(fake, "w") as h:
        h["video"] = small(v0, cv2.INTER_AREA)
        h["mask"] = small(m0, cv2.INTER_NEAREST)
        h["source_index"] = np.array([0, 1, 2, -1])
        h["conditions"] = np.array(["mask"] * 4, dtype=h5py.string_dtype())
    rc, cap = run(["--real", d, "--fake", fake, "--metrics", "ssim,control,fvd", "--seg_steps", "5",
                   "--seg_size", "32", "--i3d", tmp_path / "x.pt", "--out", tmp_path], capsys)
    assert rc == 0, cap.err
    rep = json.loads((tmp_path / "metrics.json").read_text())
    row = {r["label"]: r for r in rep["rows"]}["M"]
    assert row["n"] == 4 and row["ssim"] == pytest.approx(1.0)   # 3 paired samples, all identical
    assert "dice_lv" in row and "flow_epe_px" not in row and "ef_err" not in row   # one frame
    assert {r["label"]: r for r in rep["rows"]}["real"]["n"] == 3
