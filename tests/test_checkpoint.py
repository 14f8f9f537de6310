"""heartbeat/checkpoint.py: weights + metadata, aliases, pruning, EMA, RNG, refusals; and the atomic
writes of heartbeat/utils.py that every checkpoint goes through."""
import random

import numpy as np
import pytest
import torch

from heartbeat import checkpoint as ckpt
from heartbeat.config import get_config
from heartbeat.utils import atomic_write, atomic_write_text


def _cfg(stage="pretrain", preset="tiny"):
    return get_config(preset, [f"--stage={stage}"])


def test_weights_roundtrip_with_metadata_and_shared_tensors(tmp_path):
    shared = torch.randn(3, 4)
    model = {"a.weight": shared, "b.weight": shared, "c": torch.arange(5.0)}   # b is a (shared)
    ema = {"c": torch.ones(5)}
    p = tmp_path / "ckpt-0000007.safetensors"
    ckpt.save_weights(p, model, ema, _cfg("finetune"), step=7)
    w = ckpt.read_weights(p)
    assert w.stage == "finetune" and w.preset == "tiny" and w.meta["step"] == "7"
    assert w.config.train.stage == "finetune" and w.config.model == _cfg().model
    assert set(w.model) == set(model) and torch.equal(w.model["b.weight"], shared)
    assert torch.equal(w.ema_model_state()["c"], torch.ones(5))
    assert not [q for q in tmp_path.iterdir() if ".tmp" in q.name]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "old")

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]


def test_prune_and_find_resume(tmp_path):
    cfg = _cfg()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"w": torch.zeros(1) + step}, {}, cfg, {"step": step}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert not ckpt.state_path(tmp_path, 2).exists()
    ckpt.state_path(tmp_path, 4).unlink()            # a kill between weights and state of step 4
    w, s = ckpt.find_resume(tmp_path)
    assert w.name == "ckpt-0000003.safetensors" and ckpt.load_state(s)["step"] == 3
    assert ckpt.find_weights(tmp_path).name == "ckpt-0000004.safetensors"


def test_refuses_wrong_stage_or_preset_naming_both(tmp_path):
    p = tmp_path / "ckpt-0000001.safetensors"
    ckpt.save_weights(p, {"w": torch.zeros(1)}, {}, _cfg("pretrain", "small"), 1)
    meta = ckpt.read_meta(p)
    with pytest.raises(ckpt.CheckpointError, match="'pretrain'.*'finetune'"):
        ckpt.check_compatible(meta, "finetune", "small", what="--resume")
    with pytest.raises(ckpt.CheckpointError, match="preset 'small'.*preset 'tiny'"):
        ckpt.check_compatible(meta, "pretrain", "tiny", what="--init")
    ckpt.check_compatible(meta, ("pretrain", "finetune"), "small", what="--init")


def test_corrupt_and_missing_files_are_checkpoint_errors(tmp_path):
    p = tmp_path / "ckpt-0000001.safetensors"
    ckpt.save_weights(p, {"w": torch.zeros(100)}, {}, _cfg(), 1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        ckpt.read_weights(p)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_meta(tmp_path / "nope.safetensors")
    (tmp_path / "state-0000001.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_state(tmp_path / "state-0000001.pt")
    with pytest.raises(ckpt.CheckpointError):
        ckpt.find_resume(tmp_path / "missing-run")


def test_ema_halflife_and_rampup():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = ckpt.EMA([("p", p)], halflife_steps=10, rampup=None)
    assert ema.beta(1) == pytest.approx(0.5 ** 0.1)
    with torch.no_grad():
        p.fill_(1.0)
    for step in range(1, 11):
        ema.update([("p", p)], step)
    assert torch.allclose(ema.shadow["p"], torch.full((2,), 0.5))     # one half-life: half way
    ramp = ckpt.EMA([("p", p)], halflife_steps=1000, rampup=0.05)
    assert ramp.beta(20) == pytest.approx(0.5)                           # halflife = 20 * 0.05 = 1 step
    assert ramp.beta(10 ** 6) == pytest.approx(0.5 ** (1 / 1000))


def test_rng_capture_restore_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(3)
    state = ckpt.capture_rng({"g": g})
    torch.save(state, tmp_path / "s.pt")
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    ckpt.restore_rng(torch.load(tmp_path / "s.pt", weights_only=True), {"g": g})
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])
