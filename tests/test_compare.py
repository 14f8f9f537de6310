"""tools/compare.py: paired bootstrap comparison of two tools/eval.py outputs, and its bad input."""
import json

import numpy as np
import pytest

from tools import compare as C


def rows(values: dict, sources=None, conditions="text,mask"):
    n = len(next(iter(values.values())))
    sources = list(range(n)) if sources is None else sources
    return [{"sample": i, "source": sources[i], "conditions": conditions,
             **{k: float(v[i]) for k, v in values.items()}} for i in range(n)]


def write(folder, per_sample):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"rows": [], "per_sample": per_sample}))
    return folder


def by_metric(result):
    return {r["metric"]: r for r in result}


def test_identical_evaluations_are_within():
    rng = np.random.default_rng(0)
    a = rows({"dice_lv": rng.uniform(0.8, 1.0, 30), "mv_px": rng.uniform(0.5, 3.0, 30)})
    r = by_metric(C.compare(a, a, resamples=500))
    for m in ("dice_lv", "mv_px"):
        assert r[m]["worse"] == 0 and r[m]["lo"] == 0 and r[m]["hi"] == 0 and r[m]["within"] == "yes"
    assert list(r) == ["dice_lv", "mv_px"]            # the eval's column order


def test_direction_and_verdicts():
    """Dice is worse when lower, distances when higher; 20 % worse is 'no', better is 'yes', and a
    noisy 5 % gap on few clips is 'undecided'."""
    rng = np.random.default_rng(1)
    n = 40
    dice = rng.uniform(0.7, 0.9, n)
    mv = rng.uniform(1.0, 2.0, n)
    a = rows({"dice_myo": dice, "mv_px": mv})
    b = rows({"dice_myo": dice * 0.8, "mv_px": mv * 0.9})
    r = by_metric(C.compare(a, b, resamples=2000))
    assert r["dice_myo"]["worse"] == pytest.approx(20.0) and r["dice_myo"]["within"] == "no"
    assert r["mv_px"]["worse"] == pytest.approx(-10.0) and r["mv_px"]["within"] == "yes"
    noisy = rows({"dice_myo": dice * 0.95 + rng.normal(0, 0.15, n), "mv_px": mv * 1.05 + rng.normal(0, 1.0, n)})
    r = by_metric(C.compare(a, noisy, resamples=2000))
    for m in ("dice_myo", "mv_px"):
        assert r[m]["lo"] < 5 < r[m]["hi"] and r[m]["within"] == "undecided", r[m]
        assert r[m]["lo"] <= r[m]["worse"] <= r[m]["hi"]


def test_the_bootstrap_is_paired():
    """B = A - 0.01 on every clip, A spread widely: paired, the gap is nearly exact (the interval is
    narrow); an unpaired bootstrap of the same numbers would give an interval tens of percent wide."""
    rng = np.random.default_rng(2)
    a_vals = rng.uniform(0.3, 1.0, 20)
    r = C.compare(rows({"dice_la": a_vals}), rows({"dice_la": a_vals - 0.01}), resamples=4000)[0]
    assert r["hi"] - r["lo"] < 0.5, r
    i, j = rng.integers(0, 20, (2, 4000, 20))
    unpaired = C.worse_percent("dice_la", a_vals[i], (a_vals - 0.01)[j])
    assert np.percentile(unpaired, 97.5) - np.percentile(unpaired, 2.5) > 10


def test_more_clips_narrow_the_interval():
    rng = np.random.default_rng(3)
    widths = []
    for n in (16, 256):
        a = rng.uniform(1.0, 2.0, n)
        b = a * 1.05 + rng.normal(0, 0.3, n)
        r = C.compare(rows({"mv_px": a}), rows({"mv_px": b}), resamples=4000)[0]
        widths.append(r["hi"] - r["lo"])
    assert widths[1] < widths[0] / 2.5, widths          # about 1 / sqrt(16) as wide


def test_cli_concatenates_and_skips_missing_values(tmp_path, capsys):
    rng = np.random.default_rng(4)
    d = rng.uniform(0.8, 0.9, 10)
    mv = rng.uniform(1, 2, 10)
    mv_b = mv.copy()
    mv_b[3] = np.nan                                       # no annulus found in one B clip
    a1 = write(tmp_path / "a1", rows({"dice_lv": d[:5], "mv_px": mv[:5]}))
    a2 = write(tmp_path / "a2", rows({"dice_lv": d[5:], "mv_px": mv[5:]}, sources=list(range(5, 10))))
    b = write(tmp_path / "b", rows({"dice_lv": d, "mv_px": mv_b}))
    out = tmp_path / "table.md"
    assert C.main([f"--a={a1},{a2}", f"--b={b}", f"--out={out}", "--resamples=200"]) == 0
    text = capsys.readouterr().out
    assert "| dice_lv | 10 |" in text and "| mv_px | 9 |" in text and out.read_text() == text
    assert C.main([f"--a={a1},{a2}", f"--b={b}", f"--out={out}"]) == 2         # no --force
    assert "already exists" in capsys.readouterr().err


def test_bad_input(tmp_path, capsys):
    a = write(tmp_path / "a", rows({"dice_lv": [0.9, 0.8]}))
    other = write(tmp_path / "other", rows({"dice_lv": [0.9, 0.8]}, sources=[1, 0]))
    short = write(tmp_path / "short", rows({"dice_lv": [0.9]}))
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"rows": []}))
    (tmp_path / "bad.json").write_text("{not json")
    cases = [(f"--b={other}", "sample 0: A's source is 0, B's is 1"),
             (f"--b={short}", "A has 2 samples and B 1"),
             (f"--b={old}", "no per_sample metrics"),
             (f"--b={tmp_path / 'bad.json'}", "is not JSON"),
             (f"--b={tmp_path / 'nowhere'}", "no metrics.json there"),
             (f"--b={a} --metrics=dice_rv", "not in the evaluations")]
    for arg, msg in cases:
        assert C.main([f"--a={a}", *arg.split()]) == 2, arg
        assert msg in capsys.readouterr().err, arg
