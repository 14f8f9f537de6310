"""data_prep/mnms.py on a fake M&Ms tree (4D NIfTI written with SimpleITK) and CSV."""
import json
import re

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep import mnms

T, Z, H, W = 6, 5, 40, 36
HEADER = "External code,VendorName,Vendor,Centre,ED,ES,Pathology\n"


def _volume(code_i):
    """(t, z, y, x): grey level 20 * z + t in the lower half (decodes slice and time); bright
    top-left marker; masks whose LV width depends on t, RV left of it, MYO between."""
    img = np.zeros((T, Z, H, W), np.int16)
    gt = np.zeros((T, Z, H, W), np.uint8)
    for t in range(T):
        for z in range(Z):
            img[t, z, H // 2:] = 20 * z + t
            img[t, z, :5, :6] = 200
            gt[t, z, 8:20, 18:22 + t] = 1
            gt[t, z, 8:20, 16:18] = 2
            gt[t, z, 8:20, 8:16] = 3
    return img, gt


def _write(arr, path):
    img = sitk.GetImageFromArray(arr, isVector=False)
    img.SetSpacing((1.25, 1.3, 9.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def write_fake_mnms(root, codes=("A0S9V9", "B1K2L3", "C4D5E6", "D7E8F9"), official=False):
    rows = []
    for i, code in enumerate(codes):
        group = ("Training/Labeled" if i < len(codes) - 1 else "Testing") if official else "Training/Labeled"
        d = root / "src" / group / code
        d.mkdir(parents=True)
        img, gt = _volume(i)
        _write(img, d / f"{code}_sa.nii.gz")
        _write(gt, d / f"{code}_sa_gt.nii.gz")
        rows.append(f"{code},Siemens,A,{1 + i % 2},{i % 2},{3 + i % 2},NOR\n")
    (root / "info.csv").write_text(HEADER + "".join(rows))
    return root / "src", root / "info.csv"


def test_convert(tmp_path):
    src, csv = write_fake_mnms(tmp_path)
    assert mnms.main(["--src", str(src), "--csv", str(csv), "--out", str(tmp_path / "o"),
                      "--frames", "9", "--size", "24"]) == 0
    n = 0
    for split in ("train", "test"):
        with h5py.File(tmp_path / "o" / f"{split}.h5", "r") as f:
            assert f.attrs["source"] == "mnms" and json.loads(f.attrs["labels"])["3"] == "RV"
            for i in range(len(f["video"])):
                n += 1
                meta = json.loads(f["meta"][i])
                k = ["A0S9V9", "B1K2L3", "C4D5E6", "D7E8F9"].index(meta["patient"])
                t = (k % 2) if meta["phase"] == "ED" else 3 + k % 2
                assert meta["time_index"] == t and meta["Vendor"] == "A" and meta["Centre"] == str(1 + k % 2)
                phase_word = "end-diastole" if meta["phase"] == "ED" else "end-systole"
                assert f["text"][i].decode() == f"A cardiac MRI short-axis volume at {phase_word}."
                assert f["view"][i].decode() == "SA"
                v, m = f["video"][i].astype(float), f["mask"][i]
                want_z = np.round(np.linspace(0, Z - 1, 9)).astype(int)
                assert meta["slice_indices"] == want_z.tolist()
                code = v[:, -2, -2]                    # lower-right: 20 z + t, scaled per volume
                order = np.argsort(code, kind="stable")
                assert (np.diff(code) >= 0).all() and order[0] == 0 and code[-1] > code[0]
                assert (v[:, 0, 0] > v[:, -2, -2]).all()          # marker top-left: no flip
                assert set(np.unique(m)) == {0, 1, 2, 3}
                lv_w = (m[0] == 1).any(0).sum()
                assert abs(lv_w - (4 + t) * 24 / W) <= 1.01     # the mask is from time index t
                assert meta["spacing"] == pytest.approx([1.25, 1.3])
                assert f["mask_valid"][i].all() and np.isnan(f["mv_points"][i]).all()
    assert n == 8


def test_official_split(tmp_path):
    src, csv = write_fake_mnms(tmp_path, official=True)
    assert mnms.main(["--src", str(src), "--csv", str(csv), "--out", str(tmp_path / "o"),
                      "--frames", "4", "--size", "24"]) == 0
    with h5py.File(tmp_path / "o" / "test.h5", "r") as f:
        assert {p.decode() for p in f["patient"][:]} == {"D7E8F9"} and len(f["patient"]) == 2


def test_bad_csv_and_missing_subject(tmp_path, capsys):
    src, csv = write_fake_mnms(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("External code,VendorName,Vendor,ED\nA0S9V9,Siemens,A,0\n")
    out = ["--out", str(tmp_path / "o"), "--frames", "4", "--size", "24"]
    assert mnms.main(["--src", str(src), "--csv", str(bad)] + out) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: --csv {bad}: missing column(s) Centre, ES; found External code, VendorName, Vendor, ED"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")                 # D7E8F9 loses its row
    assert mnms.main(["--src", str(src), "--csv", str(csv)] + out) == 1
    assert re.search(r"^error: D7E8F9: .*D7E8F9_sa\.nii\.gz has no row in", capsys.readouterr().err)
    assert mnms.main(["--src", str(src), "--csv", str(csv), "--skip-bad"] + out) == 0
    assert "skipped 1 case(s)" in capsys.readouterr().err
    assert mnms.main(["--src", str(src), "--csv", str(csv), "--skip-bad"] + out) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
