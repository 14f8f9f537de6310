"""heartbeat/data.py: batch keys and values (docs/ARCHITECTURE.md), resizing, lazy handles, errors."""
import pickle

import h5py
import numpy as np
import pytest
import torch

from data_prep.h5io import ECHO_LABELS, ClipWriter
from heartbeat.data import ClipDataset, DataError, FrameDataset, find_split

N, F, S = 3, 4, 16


def _clip(i):
    rng = np.random.default_rng(i)
    video = rng.integers(0, 256, (F, S, S), dtype=np.uint8)
    mask = np.zeros((F, S, S), np.uint8)
    mask[:, 2:8, 2:14], mask[:, 8:14, 2:14] = 1, 3
    sketch = np.zeros((F, S, S), np.uint8)
    sketch[:, 5, :] = 255                    # one thin edge row
    flow = np.zeros((F, 2, S, S), np.float32)
    flow[:-1, 0], flow[:-1, 1] = 1.5 + i, -2.0
    return dict(video=video, mask=mask, mask_valid=np.array([True, False, False, True]), sketch=sketch,
                mv=sketch[:, ::-1].copy(), mv_points=np.zeros((F, 2, 2), np.float32), flow=flow,
                text=f"An ECHO with {2 + 2 * (i % 2)}-chamber view.", view="2CH", patient=f"p{i}",
                meta={"i": i})


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with ClipWriter(d / "train.h5", frames=F, size=S, labels=ECHO_LABELS, source="test") as w:
        for i in range(N):
            w.add(_clip(i))
    return d / "train.h5"


def test_frame_dataset_contract(h5):
    ds = FrameDataset(h5)
    assert len(ds) == N * F
    b = ds[F + 2]                            # clip 1, frame 2
    assert set(b) == {"image", "prior", "sketch", "mask", "mv", "mask_valid", "text", "clip", "frame"}
    c = _clip(1)
    assert b["clip"] == 1 and b["frame"] == 2 and b["text"] == c["text"]
    assert b["image"].shape == (1, S, S) and b["image"].dtype == torch.float32
    torch.testing.assert_close(b["image"][0], torch.from_numpy(c["video"][2]).float() / 127.5 - 1)
    assert b["mask"].dtype == torch.int64 and torch.equal(b["mask"], torch.from_numpy(c["mask"][2]).long())
    assert torch.equal(b["sketch"][0], torch.from_numpy(c["sketch"][2] > 0).float())
    assert torch.equal(b["mv"][0], torch.from_numpy(c["mv"][2] > 0).float())
    assert b["mask_valid"].shape == () and not b["mask_valid"].item()
    # the prior is another frame of the same clip
    frames = [torch.from_numpy(v).float() / 127.5 - 1 for v in c["video"]]
    for _ in range(10):
        p = ds[F + 2]["prior"][0]
        hits = [k for k, v in enumerate(frames) if torch.equal(v, p)]
        assert len(hits) == 1 and hits[0] != 2


def test_clip_dataset_contract(h5):
    ds = ClipDataset(h5)
    assert len(ds) == N
    b = ds[2]
    assert set(b) == {"video", "prior", "sketch", "mask", "mv", "flow", "mask_valid", "text", "clip"}
    c = _clip(2)
    assert b["video"].shape == (F, 1, S, S) and b["sketch"].shape == (F, 1, S, S)
    assert b["mask"].shape == (F, S, S) and b["mv"].shape == (F, 1, S, S) and b["prior"].shape == (1, S, S)
    assert b["flow"].shape == (F, 2, S, S)
    torch.testing.assert_close(b["flow"], torch.from_numpy(c["flow"]))
    assert b["mask_valid"].tolist() == [True, False, False, True]
    assert float(b["video"].min()) >= -1 and float(b["video"].max()) <= 1
    assert any(torch.equal(b["prior"], b["video"][k]) for k in range(F))


def test_conditions_and_flow_flags(h5):
    b = ClipDataset(h5, conditions=())[0]
    assert set(b) == {"video", "mask_valid", "text", "clip"}
    b = FrameDataset(h5, conditions=("mask",))[0]
    assert set(b) == {"image", "mask", "mask_valid", "text", "clip", "frame"}
    b = FrameDataset(h5, conditions=("text", "image", "sketch", "mask", "mv"))[0]   # ModelConfig names
    assert set(b) == {"image", "prior", "sketch", "mask", "mv", "mask_valid", "text", "clip", "frame"}
    with pytest.raises(ValueError, match="unknown"):
        FrameDataset(h5, conditions=("depth",))


def test_resize_on_load(h5):
    b = ClipDataset(h5, size=8)[1]
    assert b["video"].shape == (F, 1, 8, 8) and b["mask"].shape == (F, 8, 8)
    v = torch.from_numpy(_clip(1)["video"]).float() / 127.5 - 1
    torch.testing.assert_close(b["video"][:, 0], v.reshape(F, 8, 2, 8, 2).mean((2, 4)))   # area
    assert set(b["mask"].unique().tolist()) <= {0, 1, 3}
    assert b["sketch"][0, 0, 2].all() and b["sketch"].sum() == F * 8    # thin edge survives max-pool
    torch.testing.assert_close(b["flow"][0, 0], torch.full((8, 8), 2.5 / 2))  # vectors scale too
    up = FrameDataset(h5, size=32)[0]
    assert up["image"].shape == (1, 32, 32) and up["mask"].shape == (32, 32)


def test_lazy_handle_and_workers(h5):
    ds = FrameDataset(h5)
    assert ds._h5 is None
    ds[0]
    assert ds._h5 is not None
    clone = pickle.loads(pickle.dumps(ds))   # picklable after open; reopens in the new process
    assert clone._h5 is None and torch.equal(clone[3]["image"], ds[3]["image"])
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(dl)
    assert sum(len(b["clip"]) for b in batches) == N * F
    assert batches[0]["image"].shape == (4, 1, S, S) and len(batches[0]["text"]) == 4


def test_errors_name_file_dataset_and_fix(h5, tmp_path):
    with pytest.raises(DataError, match="not found"):
        FrameDataset(tmp_path / "none.h5")
    bad = tmp_path / "noflow.h5"
    with h5py.File(h5, "r") as src, h5py.File(bad, "w") as dst:
        for k in src:
            if k != "flow":
                src.copy(k, dst)
        dst.attrs.update(src.attrs)
    FrameDataset(bad)                        # stage 1 does not need flow
    with pytest.raises(DataError, match=r"noflow\.h5: dataset 'flow' is missing; drop 'flow' from the conditions"):
        ClipDataset(bad)
    ClipDataset(bad, conditions=("text", "image", "sketch", "mask", "mv"))
    with h5py.File(bad, "a") as f:
        f.attrs["schema"] = 99
    with pytest.raises(DataError, match=r"noflow\.h5: schema 99"):
        FrameDataset(bad)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(DataError, match="junk.h5: not a readable HDF5 file"):
        FrameDataset(junk)


def test_find_split(h5, tmp_path):
    assert find_split(h5.parent, "train") == h5
    with pytest.raises(DataError, match=r"val\.h5 not found; splits in .*: train"):
        find_split(h5.parent, "val")
    with pytest.raises(DataError, match="does not exist"):
        find_split(tmp_path / "nope", "train")
