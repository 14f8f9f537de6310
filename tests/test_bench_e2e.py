"""tools/bench_e2e.py's quick path: both UNets run on the same weights, give the same output, and the
report has a time and a ratio for forward and forward+backward. The timings themselves are not tested."""
import pytest

pytest.importorskip("diffusers")

from tools.bench_e2e import main  # noqa: E402


def test_quick_path_runs_and_outputs_agree(tmp_path, capsys):
    res = main(["--quick", "--repeats=1", "--latent=8", f"--json={tmp_path / 'r.json'}"])
    assert res["max_abs_out"] > 1e-2  # random weights everywhere: a real output to compare
    assert res["max_abs_diff"] <= 1e-4 * res["max_abs_out"], res["max_abs_diff"]
    for kind in ("fwd", "fwd+bwd"):
        r = res["rows"][kind]
        assert r["ours_s"] > 0 and r["diffusers_s"] > 0 and r["ratio"] > 0
    out = capsys.readouterr().out
    assert "fwd+bwd" in out and "ratio" in out
    with pytest.raises(SystemExit):  # an existing --json is not overwritten without --force
        main(["--quick", f"--json={tmp_path / 'r.json'}"])
