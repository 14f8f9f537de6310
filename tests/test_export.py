"""tools/export.py: nnU-Net v2 raw layout, the CAMUS 2023 layout read back identically by
data_prep.camus, MP4 clips; refusal to overwrite and bad input."""
from __future__ import annotations

import json

import cv2
import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from tools import export as tool

FR, SIZE = 4, 32


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A phantom split standing in for samples.h5 (same schema), plus a copy without masks."""
    from data_prep.phantom import build
    d = tmp_path_factory.mktemp("exp")
    build(d, clips=6, frames=FR, size=SIZE, progress=False)
    with h5py.File(d / "train.h5", "r") as f, h5py.File(d / "nomask.h5", "w") as g:
        g["video"] = f["video"][()]
    return d / "train.h5", d / "nomask.h5"


def run(argv, capsys):
    rc = tool.main([str(a) for a in argv])
    return rc, capsys.readouterr()


def test_nnunet_layout(fake, tmp_path, capsys):
    h5, _ = fake
    rc, _ = run(["--fake", h5, "--format=nnunet", "--out", tmp_path / "nn", "--spacing=0.3"], capsys)
    assert rc == 0
    ds = json.loads((tmp_path / "nn" / "dataset.json").read_text())
    with h5py.File(h5, "r") as f:
        n, video, mask = f["video"].shape[0], f["video"][()], f["mask"][()]
    assert ds["numTraining"] == n * FR and ds["file_ending"] == ".nii.gz"
    assert ds["channel_names"] == {"0": "US"} and ds["labels"]["background"] == 0 and ds["labels"]["LA"] == 3
    img = sitk.ReadImage(str(tmp_path / "nn" / "imagesTr" / "HeartBeatSynthetic_00001_02_0000.nii.gz"))
    lab = sitk.ReadImage(str(tmp_path / "nn" / "labelsTr" / "HeartBeatSynthetic_00001_02.nii.gz"))
    assert img.GetSpacing()[:2] == pytest.approx((0.3, 0.3))
    assert np.array_equal(sitk.GetArrayFromImage(img)[0], video[1, 2])
    assert np.array_equal(sitk.GetArrayFromImage(lab)[0], mask[1, 2])
    assert len(list((tmp_path / "nn" / "labelsTr").iterdir())) == n * FR


def test_camus_round_trip(fake, tmp_path, capsys):
    from data_prep.camus import build
    h5, _ = fake
    assert run(["--fake", h5, "--format=camus", "--out", tmp_path / "camus"], capsys)[0] == 0
    paths, skipped = build(tmp_path / "camus", tmp_path / "back", frames=FR, size=SIZE)
    assert not skipped and list(paths) == ["train"]
    with h5py.File(h5, "r") as a, h5py.File(paths["train"], "r") as b:
        for name in ("video", "mask", "mask_valid", "sketch"):   # sketch: derived from the same frames
            assert np.array_equal(a[name][()], b[name][()]), name
        assert list(a["view"].asstr()[()]) == list(b["view"].asstr()[()])
        # (the phantom draws its MV from the simulated annulus, CAMUS derives it from the mask)


def test_mp4(fake, tmp_path, capsys):
    h5, _ = fake
    assert run(["--fake", h5, "--format=mp4", "--out", tmp_path / "v"], capsys)[0] == 0
    files = sorted((tmp_path / "v").iterdir())
    with h5py.File(h5, "r") as f:
        assert len(files) == len(f["video"])
    cap = cv2.VideoCapture(str(files[0]))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FR and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) > SIZE
    cap.release()


def test_refuses_existing_and_bad_input(fake, tmp_path, capsys):
    h5, nomask = fake
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, c = run(["--fake", h5, "--format=mp4", "--out", out], capsys)
    assert rc == 2 and "--force" in c.err and (out / "keep.txt").exists()
    assert run(["--fake", h5, "--format=mp4", "--out", out, "--force"], capsys)[0] == 0
    assert not (out / "keep.txt").exists() and any(out.iterdir())
    for argv, msg in (([nomask, "--format=nnunet"], "no masks"), ([nomask, "--format=camus"], "no masks"),
                      ([h5, "--format=png"], "--format=png"), ([tmp_path / "none.h5", "--format=mp4"], "no such file")):
        rc, c = run(["--fake", argv[0], argv[1], "--out", tmp_path / "n"], capsys)
        assert rc == 2 and msg in c.err and c.err.count("\n") == 1, c.err
        assert not (tmp_path / "n").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
