"""tools/gpu_check.sh --dry-run: the one-call GPU check has the structure the GPU window needs (every
section writes its JSON and status, the summary is written and printed under 10 KB), checked on the
CPU so that a broken script fails here and not in a scarce GPU window."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--dry-run"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("env", "tests", "kernels", "e2e", "clip"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data.get("dry_run") or name == "env", f"{name}: {data}"
    for name in ("env", "kernels", "e2e", "clip"):
        status = json.loads((out / f"{name}.status.json").read_text())
        assert status["rc"] == 0 and not status["timed_out"], f"{name}: {status}"
    assert json.loads((out / "env.json").read_text())["torch"]
    summary = (out / "summary.txt").read_text()
    assert 0 < len(summary.encode()) < 10_000
    assert summary.strip().splitlines()[-1] in r.stdout   # printed, last
    for name in ("kernels", "e2e", "clip"):
        assert f"[{name}] status: rc=0" in summary


def test_clip_rows_on_the_cpu():
    """The clip section's body (not only its dry run) on a tiny UNet on the CPU: each row times a
    sampling run and records its figures; a CUDA-graph row records its error instead of failing."""
    import dataclasses

    import torch
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_check
    from heartbeat.config import get_config
    from heartbeat.unet import UNet
    cfg = get_config("tiny").model
    torch.manual_seed(0)
    teacher = UNet(cfg)
    teacher.inflate()
    student = UNet(dataclasses.replace(cfg, guidance_inputs=len(cfg.conditions) + 1))
    student.inflate()
    saved = []
    runs = [("student", "lcm", 2, False), ("teacher", "ddim", 3, False), ("student", "lcm", 2, True)]
    rows = gpu_check.clip_rows(teacher.eval(), student.eval(), cfg, backends=("sdpa",), runs=runs, frames=2,
                               latent=8, device="cpu", save=lambda r: saved.append(len(r)))
    assert saved == [1, 2, 3]
    assert [r["unet_evals"] for r in rows] == [2, 6, 2]
    for r in rows[:2]:
        assert "error" not in r and r["finite"] and r["seconds"] > 0, r
    assert "CUDA" in rows[2]["error"] and "seconds" not in rows[2]
