"""tools/utility.py: every arm trains the same segmenter and is tested on the real test split;
patients never mix; bad input. A few steps only: this tests the plumbing, not the numbers."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest

from heartbeat import utility as U
from tools import utility as tool

FR, SIZE = 4, 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """real/{train,test}.h5 (phantom seed 0) and a "synthetic" file: phantom seed 1's clips with
    their patients renamed (they stand in for generated clips with masks)."""
    from data_prep.phantom import build
    d = tmp_path_factory.mktemp("util")
    build(d / "real", clips=24, frames=FR, size=SIZE, progress=False)
    build(d / "s", clips=6, frames=FR, size=SIZE, seed=1, progress=False)
    fake = d / "fake.h5"
    shutil.copy(d / "s" / "train.h5", fake)
    with h5py.File(fake, "r+") as f:
        n = len(f["patient"])
        del f["patient"]
        f["patient"] = np.array([f"synth{i}" for i in range(n)], dtype=h5py.string_dtype())
    return d, fake


def test_arms_seeds_and_report(data, tmp_path, capsys):
    d, fake = data
    rc = tool.main([f"--real={d / 'real'}", f"--fake={fake}", "--real_fraction=1.0,0.5", "--steps=2", "--seeds=2",
                    f"--size={SIZE}", "--batch=4", f"--out={tmp_path}"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "utility.json").read_text())
    assert list(rep["arms"]) == ["real", "synthetic", "real+synthetic", "real 0.5", "real 0.5+synthetic"]
    a = rep["arms"]
    with h5py.File(d / "real" / "train.h5", "r") as f:
        n_real = int(f["mask_valid"][()].sum())
    with h5py.File(fake, "r") as f:
        n_fake = int(f["mask_valid"][()].sum())
    assert a["real"]["frames"] == n_real and a["synthetic"]["frames"] == n_fake
    assert a["real+synthetic"]["frames"] == n_real + n_fake
    assert a["real 0.5+synthetic"]["frames"] == a["real 0.5"]["per_seed"][0]["frames"] + n_fake
    assert 0 < a["real 0.5"]["frames"] < n_real
    for arm in a.values():
        assert len(arm["per_seed"]) == 2
        for k in ("lv", "myo", "la"):
            vals = [s[k] for s in arm["per_seed"]]
            assert arm[k]["mean"] == pytest.approx(np.mean(vals)) and arm[k]["std"] == pytest.approx(np.std(vals))
            assert all(0 <= v <= 1 for v in vals)
    assert a["real"]["per_seed"][0] != a["real"]["per_seed"][1]        # seeds differ
    md = (tmp_path / "utility.md").read_text()
    assert "| real 0.5+synthetic |" in md and "±" in md and "synthetic_over_real" in md
    rc = tool.main([f"--real={d / 'real'}", f"--fake={fake}", "--steps=1", "--seeds=1", f"--out={tmp_path}"])
    assert rc == 2 and "--force" in capsys.readouterr().err


def test_patients_never_mix_and_bad_input(data, tmp_path, capsys):
    d, fake = data
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(d / "real" / "train.h5", bad / "train.h5")
    shutil.copy(d / "real" / "train.h5", bad / "test.h5")            # the same patients in both
    leak = tmp_path / "leak.h5"                                       # samples driven by test patients
    shutil.copy(d / "real" / "test.h5", leak)
    nomask = tmp_path / "nomask.h5"
    with h5py.File(nomask, "w") as f:
        f["video"] = np.zeros((1, FR, SIZE, SIZE), np.uint8)
    notest = tmp_path / "notest"
    notest.mkdir()
    shutil.copy(d / "real" / "train.h5", notest / "train.h5")
    for real, fk, extra, msg in ((bad, fake, [], "share patients"), (d / "real", leak, [], "test patients"),
                                 (d / "real", nomask, [], "no masks"), (notest, fake, [], "no test.h5"),
                                 (d / "real", fake, ["--real_fraction=0"], "--real_fraction=0")):
        rc = tool.main([f"--real={real}", f"--fake={fk}", "--steps=1", "--seeds=1", f"--out={tmp_path / 'o'}"] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
