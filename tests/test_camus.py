"""data_prep/camus.py on fake trees in both CAMUS layouts, written with SimpleITK.

`write_fake_camus` is also used by tools/bench_data.py to time a CAMUS-sized conversion.
Fake frames are asymmetric (a bright block at the top-left) so a flip is detected, and each
source frame t carries the grey level 10 + 5 t in its lower half, so the output order is decoded.
"""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import camus

VIEWS = ("2CH", "4CH")


def fake_frame(t, H, W):
    img = np.full((H, W), 40, np.uint8)
    img[H // 2:] = 10 + 5 * t                 # frame code
    img[: H // 4, : W // 3] = 250             # asymmetric marker: top-left
    return img


def fake_mask(t, H, W):
    """LV cavity (1) above LA (3), touching; myocardium (2) beside; LV height grows with t."""
    m = np.zeros((H, W), np.uint8)
    top = H // 8
    mid = top + H // 4 + t % 7
    m[top:mid, W // 4: W // 2] = 1
    m[top:mid, W // 2: W // 2 + 3] = 2
    m[mid: mid + H // 5, W // 4: W // 2] = 3
    return m


def _write(arr, path, spacing):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path), useCompression=str(path).endswith(".gz"))


def write_fake_camus(root, release="2019", patients=4, frames=10, height=60, width=44, seed=0, noise=0):
    """Write a fake CAMUS tree under root; returns {patient: {view: (ED, ES, T)}} (1-based ED/ES).
    noise > 0 adds uniform speckle-like noise of that amplitude to the frames (for benchmarks:
    realistic compression and edge/flow work; the frame codes are then no longer exact)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    base = root / ("database_nifti" if release == "2023" else "training")
    truth = {}
    names = [f"patient{i + 1:04d}" for i in range(patients)]
    for k, pat in enumerate(names):
        d = base / pat
        d.mkdir(parents=True)
        truth[pat] = {}
        for v in VIEWS:
            T = int(frames + rng.integers(0, 3))
            if release == "2023":
                ed, es = 1, T
            else:
                ed, es = (2, T - 1) if k % 3 else (T - 1, 2)        # one patient with ES before ED
            seq = np.stack([fake_frame(t, height, width) for t in range(T)])
            if noise:
                seq = np.clip(seq + rng.integers(0, noise, seq.shape), 0, 255).astype(np.uint8)
            gt = np.stack([fake_mask(t, height, width) for t in range(T)])
            sp2 = (0.31, 0.154)
            if release == "2023":
                _write(seq, d / f"{pat}_{v}_half_sequence.nii.gz", sp2 + (1.0,))
                _write(gt, d / f"{pat}_{v}_half_sequence_gt.nii.gz", sp2 + (1.0,))
                cfg = f"ED: {ed}\nES: {es}\nNbFrame: {T}\nSex: F\nAge: {50 + k}\nImageQuality: Good\nEF: {40 + k}\nFrameRate: 50\n"
            else:
                _write(seq, d / f"{pat}_{v}_sequence.mhd", sp2 + (1.0,))
                for phase, i in (("ED", ed), ("ES", es)):
                    _write(seq[i - 1], d / f"{pat}_{v}_{phase}.mhd", sp2)
                    _write(gt[i - 1], d / f"{pat}_{v}_{phase}_gt.mhd", sp2)
                cfg = f"ED: {ed}\nES: {es}\nNbFrame: {T}\nSex: M\nAge: {60 + k}\nImageQuality: Medium\nLVedv: 100.0\nLVesv: 50.0\nLVef: {45.5 + k}\n"
            (d / f"Info_{v}.cfg").write_text(cfg)
            truth[pat][v] = (ed, es, T)
    if release == "2023":
        sd = root / "database_split"
        sd.mkdir()
        (sd / "subgroup_training.txt").write_text("\n".join(names[:-2]) + "\n")
        (sd / "subgroup_validation.txt").write_text(names[-2] + "\n")
        (sd / "subgroup_testing.txt").write_text(names[-1] + "\n")
    return truth


def _load(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


def _decode_frames(video):
    """Source frame index of each output frame from its grey code (lower half)."""
    S = video.shape[-1]
    return [(int(round(float(np.median(v[S // 2 + 2:, -3:])))) - 10) // 5 for v in video]


@pytest.mark.parametrize("release", ["2019", "2023"])
def test_convert_layout(tmp_path, release):
    truth = write_fake_camus(tmp_path / "src", release, patients=4, frames=9)
    assert camus.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"),
                       "--frames", "6", "--size", "32"]) == 0
    splits = ("train", "val", "test") if release == "2023" else ("train", "test")
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.h5")) == sorted(splits)
    seen = {}
    for split in splits:
        d, attrs = _load(tmp_path / "out" / f"{split}.h5")
        assert attrs["source"] == f"camus{release}" and attrs["frames"] == 6 and attrs["size"] == 32
        assert d["video"].shape[1:] == (6, 32, 32) and d["flow"].shape[1:] == (6, 2, 32, 32)
        for i, pat in enumerate(x.decode() for x in d["patient"]):
            seen.setdefault(pat, set()).add(split)
            view = d["view"][i].decode()
            ed, es, T = truth[pat][view]
            meta = json.loads(d["meta"][i])
            want = np.round(np.linspace(ed - 1, es - 1, 6)).astype(int).tolist()
            got = _decode_frames(d["video"][i])
            assert got[0] == ed - 1 and got[-1] == es - 1                            # ED first, ES last
            assert meta["frame_indices"] == want and got == want
            v = d["video"][i]
            assert v[0, 1, 1] == 250 and v[0, 1, -2] == 40         # marker top-left: no flip
            assert d["text"][i].decode() == f"An ECHO with {view[0]}-chamber view."
            m, valid = d["mask"][i], d["mask_valid"][i]
            if release == "2023":
                assert valid.all()
            else:
                assert valid.tolist() == [True, False, False, False, False, True]
                assert not m[1:-1].any() and np.isnan(d["mv_points"][i, 1:-1]).all()
            for f in np.nonzero(valid)[0]:
                assert set(np.unique(m[f])) == {0, 1, 2, 3}
                lv_rows = np.nonzero((m[f] == 1).any(1))[0]
                assert lv_rows.min() < 16 and np.isfinite(d["mv_points"][i, f]).all()
            assert meta["ED"] == ed and meta["ES"] == es and meta["NbFrame"] == T
            assert meta["EF"] == (40 + int(pat[-1]) - 1 if release == "2023" else 45.5 + int(pat[-1]) - 1)
            assert meta["spacing"] == pytest.approx([0.31, 0.154])
            assert meta["spacing_resized"] == pytest.approx([0.31 * 44 / 32, 0.154 * 60 / 32])
            assert meta["Sex"] in ("F", "M") and "ImageQuality" in meta
    assert all(len(s) == 1 for s in seen.values()) and len(seen) == 4     # split by patient
    if release == "2023":
        assert seen["patient0003"] == {"val"} and seen["patient0004"] == {"test"}


def test_random_split_and_workers(tmp_path):
    write_fake_camus(tmp_path / "src", "2023", patients=5, frames=6)
    a = camus.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o1"), "--size", "32",
                    "--frames", "4", "--split", "random", "--seed", "3"])
    b = camus.main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o2"), "--size", "32",
                    "--frames", "4", "--split", "random", "--seed", "3", "--workers", "2"])
    assert a == b == 0
    assert sorted(p.stem for p in (tmp_path / "o1").glob("*.h5")) == ["test", "train"]
    d1, _ = _load(tmp_path / "o1" / "train.h5")
    d2, _ = _load(tmp_path / "o2" / "train.h5")
    assert len(d1["patient"]) == 8 and np.array_equal(d1["video"], d2["video"])
    assert np.array_equal(d1["patient"], d2["patient"])


def _bad_tree(tmp_path, what):
    src = tmp_path / "src"
    write_fake_camus(src, "2023" if what == "frames" else "2019", patients=3, frames=6)
    base = src / ("database_nifti" if what == "frames" else "training")
    d = base / "patient0002"
    if what == "info":
        (d / "Info_4CH.cfg").unlink()
    elif what == "frames":
        p = d / "patient0002_2CH_half_sequence_gt.nii.gz"
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        _write(gt[:-1], p, (1.0, 1.0, 1.0))
    elif what == "unreadable":
        (d / "patient0002_2CH_sequence.raw").write_bytes(b"\0" * 10)
    return src


@pytest.mark.parametrize("what,expect", [
    ("info", r"patient0002: .*Info_4CH\.cfg is missing"),
    ("frames", r"patient0002: patient0002_2CH_half_sequence_gt\.nii\.gz has \d+ frames .* but patient0002_2CH_half_sequence\.nii\.gz has \d+ frames"),
    ("unreadable", r"patient0002: .*patient0002_2CH_sequence\.mhd cannot be read"),
])
def test_bad_input_one_clear_line_and_skip_bad(tmp_path, capsys, what, expect):
    src = _bad_tree(tmp_path, what)
    out = tmp_path / "out"
    assert camus.main(["--src", str(src), "--out", str(out), "--size", "32", "--frames", "4"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(expect, lines[0]), lines[0]
    assert not list(out.glob("*.h5")) and not list(out.glob(".*tmp*"))     # nothing half-written
    assert camus.main(["--src", str(src), "--out", str(out), "--size", "32", "--frames", "4", "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 case(s)" in err and re.search(expect, err)
    n = sum(len(_load(p)[0]["patient"]) for p in out.glob("*.h5"))
    assert n == 5                                                        # 6 clips, one skipped


def test_empty_folder_and_no_overwrite(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert camus.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no CAMUS layout found" in capsys.readouterr().err
    (tmp_path / "empty" / "training").mkdir()
    assert camus.main(["--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    assert "no patient folder" in capsys.readouterr().err
    write_fake_camus(tmp_path / "src", "2019", patients=2, frames=5)
    args = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--size", "32", "--frames", "4"]
    assert camus.main(args) == 0
    capsys.readouterr()
    before = (tmp_path / "o" / "train.h5").stat().st_mtime_ns
    assert camus.main(args) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "o" / "train.h5").stat().st_mtime_ns == before
    assert camus.main(args + ["--force"]) == 0
