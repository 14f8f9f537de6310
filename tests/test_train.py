"""tools/train.py end to end on a tiny phantom (CPU): every stage, exact resume, 2-process DDP,
stage-2 freezing, refusals and bad input. Models are the tiny preset shrunk further (32x32)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from heartbeat import checkpoint as ckpt
from tools.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image_size=32", "--vae_channels=8,16,32", "--vae_norm_groups=8", "--unet_channels=32,32,32",
        "--norm_groups=8", "--context_dim=32", "--text_width=32", "--text_layers=1", "--text_tokens=16",
        "--prior_tokens=4", "--prior_dim=32", "--cond_channels=8,8,16", "--frames=4", "--num_workers=0", "--log_every=1",
        "--sample_every=0", "--warmup_steps=2", "--lr=1e-3"]


def run(*args, expect=0):
    rc = train_main(list(args))
    assert rc == expect, f"tools/train.py {' '.join(args)} returned {rc}"
    return rc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep.phantom import build
    root = tmp_path_factory.mktemp("phantom")
    build(root / "echo", clips=6, frames=4, size=32, seed=0, progress=False)
    build(root / "cmr", clips=4, frames=4, size=32, seed=0, cmr=True, progress=False)
    return root


@pytest.fixture(scope="module")
def chain(data, tmp_path_factory):
    """vae -> pretrain -> finetune -> cmr, a few steps each, in one runs folder."""
    out = tmp_path_factory.mktemp("runs")
    common = TINY + [f"--out={out}", "--batch_size=4", "--ckpt_every=3"]
    run("--stage=vae", *common, f"--data={data / 'echo'}", "--max_steps=3")
    vae = out / "000-vae-tiny"
    run("--stage=pretrain", *common, f"--data={data / 'echo'}", "--max_steps=6", f"--vae={vae}")
    run("--stage=finetune", *TINY, f"--out={out}", "--batch_size=2", "--ckpt_every=3",
        f"--data={data / 'echo'}", "--max_steps=3", "--sample_every=2")   # a preview at step 2
    run("--stage=cmr", *TINY, f"--out={out}", "--batch_size=2", "--ckpt_every=3",
        f"--data={data / 'cmr'}", "--max_steps=3")
    return out


def test_every_stage_trains_and_writes_its_files(chain):
    names = sorted(p.name for p in chain.iterdir())
    assert names == ["000-vae-tiny", "001-pretrain-tiny", "002-finetune-tiny", "003-cmr-tiny"]
    for name in names:
        run_dir = chain / name
        assert (run_dir / "config.json").exists() and (run_dir / "samples.png").stat().st_size > 100
        w = ckpt.read_weights(ckpt.find_weights(run_dir))
        assert w.stage == name.split("-")[1] and w.preset == "tiny" and w.ema
        assert all(torch.isfinite(v).all() for v in w.model.values())
    fin = ckpt.read_weights(ckpt.find_weights(chain / "002-finetune-tiny")).config
    assert fin.model.temporal and "flow" in fin.model.conditions
    cmr = ckpt.read_weights(ckpt.find_weights(chain / "003-cmr-tiny")).config
    assert cmr.model.conditions == ("mask",)


def test_sample_py_after_training_with_its_defaults(chain, data, tmp_path):
    """The README's first-video command: tools/sample.py on a fresh finetune run, default --out. The
    run's own previews live in RUN/previews, so RUN/samples is free for sample.py (it was not: the
    training previews took it, and the command refused to start)."""
    from tools.sample import main as sample_main
    run_dir = chain / "002-finetune-tiny"
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == ["step-0000002.png"]
    gif = tmp_path / "first_video.gif"
    assert sample_main([f"--ckpt={run_dir}", f"--data={data / 'echo'}", "--num=1", "--steps=2",
                        f"--gif={gif}"]) == 0
    assert (run_dir / "samples" / "samples.h5").exists() and gif.stat().st_size > 100


def test_load_for_sampling(chain):
    from heartbeat.models import load_for_sampling
    cfg, parts, ema = load_for_sampling(chain / "001-pretrain-tiny")
    assert cfg.train.stage == "pretrain" and parts["unet"] is not None and parts["vae"] is not None
    unet = dict(parts["unet"].named_parameters(prefix="unet"))
    names = [k for k in ema if k.startswith("unet.")]
    assert names and all(torch.equal(unet[k], ema[k]) for k in names)      # the EMA weights are loaded


def test_finetune_freezes_spatial_weights_bit_identical(chain):
    from heartbeat.unet import UNet
    init = ckpt.read_weights(ckpt.find_weights(chain / "001-pretrain-tiny")).ema_model_state()
    after = ckpt.read_weights(ckpt.find_weights(chain / "002-finetune-tiny"))
    trained = [k for k in after.model if UNet.is_temporal_name(k) or k.startswith("conditioner.local.flow.")]
    frozen = [k for k in after.model if k not in trained]
    assert trained and frozen
    assert set(after.ema) == set(trained)
    same = [k for k in frozen if torch.equal(after.model[k], init[k])]
    assert same == frozen, f"changed frozen tensors: {sorted(set(frozen) - set(same))[:5]}"
    assert any(not torch.equal(after.model[k], torch.zeros_like(after.model[k])) for k in trained
               if k.endswith("to_out.0.weight") or k.endswith("proj_out.weight"))


def _resume_last_half(full, half, stage, step):
    """Copy run `full` to `half` without its step-`step` checkpoint, resume it there; both checkpoints."""
    shutil.copytree(full, half)
    name = f"ckpt-{step:07d}.safetensors"
    for f in (name, f"state-{step:07d}.pt"):
        (half / f).unlink()
    run(f"--stage={stage}", f"--resume={half}")
    return ckpt.read_weights(full / name), ckpt.read_weights(half / name)


def test_resume_is_exact(data, tmp_path):
    args = TINY + [f"--data={data / 'echo'}", f"--out={tmp_path}", "--batch_size=4", "--max_steps=10",
                   "--ckpt_every=5", "--keep_ckpts=0", "--stage=vae"]
    run(*args)
    full, half = tmp_path / "000-vae-tiny", tmp_path / "half"
    a, b = _resume_last_half(full, half, "vae", 10)
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.ema:
        assert torch.equal(a.ema[k], b.ema[k]), k
    sa, sb = ckpt.load_state(full / "state-0000010.pt"), ckpt.load_state(half / "state-0000010.pt")
    assert sa["data"] == sb["data"]


def test_resume_is_exact_for_the_diffusion_model(chain, data, tmp_path):
    """pretrain: 3 steps saved, resumed to 6 == the chain's uninterrupted 6 steps."""
    a, b = _resume_last_half(chain / "001-pretrain-tiny", tmp_path / "half", "pretrain", 6)
    bad = [k for k in a.model if not torch.equal(a.model[k], b.model[k])]
    bad += [k for k in a.ema if not torch.equal(a.ema[k], b.ema[k])]
    assert not bad, bad[:5]


def test_a_resumed_stage2_run_reads_the_cache_of_its_own_vae(chain, data, tmp_path):
    """Resuming starts from the run's own weights before the encoder cache is keyed: a stage-2 resume
    reuses the cache its VAE wrote, not a new one keyed on a randomly initialised VAE."""
    shutil.copytree(data / "echo", tmp_path / "echo")
    shutil.copytree(chain / "002-finetune-tiny", tmp_path / "fin")
    before = sorted(p.name for p in (tmp_path / "echo").glob("train.cache-*.h5"))
    run("--stage=finetune", f"--resume={tmp_path / 'fin'}", f"--data={tmp_path / 'echo'}", "--max_steps=4")
    assert sorted(p.name for p in (tmp_path / "echo").glob("train.cache-*.h5")) == before and len(before) == 1
    assert ckpt.read_weights(ckpt.find_weights(tmp_path / "fin")).meta["step"] == "4"


def test_loss_falls_when_overfitting(data, tmp_path):
    import json
    run("--stage=vae", *TINY, f"--data={data / 'echo'}", f"--out={tmp_path}", "--batch_size=4",
        "--max_steps=30", "--ckpt_every=30", "--lr=3e-3", "--warmup_steps=3")
    losses = [v for _, v in json.loads((tmp_path / "000-vae-tiny" / "loss.json").read_text())]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:3]) / 3, losses


def test_refuses_wrong_stage_and_preset(chain, capsys):
    run("--stage=finetune", f"--resume={chain / '001-pretrain-tiny'}", expect=2)
    err = capsys.readouterr().err
    assert "'pretrain' checkpoint" in err and "'finetune'" in err
    run("--stage=finetune", "--preset=small", f"--init={chain / '001-pretrain-tiny'}", expect=2)
    err = capsys.readouterr().err
    assert "preset 'tiny'" in err and "preset 'small'" in err
    run("--stage=cmr", *TINY, f"--init={chain / '001-pretrain-tiny'}", f"--out={chain}", expect=2)
    assert "'pretrain' checkpoint" in capsys.readouterr().err


def test_bad_input_is_one_clear_message(data, chain, tmp_path, capsys):
    base = TINY + ["--stage=vae", "--max_steps=1", f"--out={tmp_path / 'runs'}"]
    empty = tmp_path / "empty"
    empty.mkdir()
    run(*base, f"--data={empty}", expect=2)
    assert "train.h5 not found" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(data / "echo", broken)
    with h5py.File(broken / "train.h5", "a") as f:
        del f["mask"]
    run("--stage=pretrain", *TINY, "--max_steps=1", f"--data={broken}", f"--vae={chain / '000-vae-tiny'}",
        f"--out={tmp_path / 'runs'}", expect=2)
    assert "'mask' is missing" in capsys.readouterr().err
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    raw = (data / "echo" / "train.h5").read_bytes()
    (trunc / "train.h5").write_bytes(raw[: len(raw) // 3])
    run(*base, f"--data={trunc}", expect=2)
    assert "error:" in capsys.readouterr().err
    run(*base, f"--data={data / 'echo'}", "--batch_size=6", "--grad_accum=4", expect=2)
    assert "not divisible" in capsys.readouterr().err
    # an --out that holds a run: refused, nothing touched; --force trains into it
    old = chain / "000-vae-tiny"
    before = {p.name: p.stat().st_mtime_ns for p in old.iterdir()}
    run(*TINY, "--stage=vae", "--max_steps=1", f"--data={data / 'echo'}", f"--out={old}", expect=2)
    assert "--resume" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in old.iterdir()} == before
    run(*TINY, "--stage=pretrain", "--bogus=1", expect=2)
    assert "unknown option --bogus" in capsys.readouterr().err
    assert not list((tmp_path / "runs").glob("*/ckpt-*")) if (tmp_path / "runs").exists() else True


def test_non_finite_steps_are_skipped_then_stop(data, tmp_path, capsys):
    run("--stage=vae", *TINY, f"--data={data / 'echo'}", f"--out={tmp_path}", "--batch_size=4",
        "--max_steps=20", "--lr=1e30", "--warmup_steps=0", "--grad_clip=0", "--max_bad_steps=2", expect=2)
    err = capsys.readouterr()
    assert "2 consecutive steps had a non-finite" in err.err


def _torchrun2(args):
    """tools/train.py under torchrun with 2 gloo processes (one thread each); must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tools" / "train.py"), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _worst(a, b):
    """Largest |difference| over the model tensors of two checkpoints."""
    return max((a.model[k] - b.model[k]).abs().max().item() for k in a.model)


def _ddp_args(data, out, extra=()):
    return TINY + ["--stage=pretrain", f"--data={data / 'echo'}", f"--out={out}", "--batch_size=4",
                   "--max_steps=3", "--ckpt_every=3", *extra]


def test_ddp_two_processes_match_one(chain, data, tmp_path):
    """2 gloo processes x 2 samples == 1 process x 4 samples, every stage-1 condition on: per-sample
    noise and dropout, and the image prior's adapter normalises with the global batch's statistics."""
    vae = f"--vae={chain / '000-vae-tiny'}"
    fresh = tmp_path / "data"          # without the encoder cache: rank 0 writes it while rank 1 waits
    shutil.copytree(data / "echo", fresh / "echo", ignore=shutil.ignore_patterns("*.cache-*"))
    r = _torchrun2(_ddp_args(fresh, tmp_path / "ddp", [vae]))
    assert "writing the encoder cache" in r.stdout and len(list((fresh / "echo").glob("train.cache-*.h5"))) == 1
    run(*_ddp_args(fresh, tmp_path / "one", [vae]))
    a = ckpt.read_weights(ckpt.find_weights(tmp_path / "ddp" / "000-pretrain-tiny"))
    b = ckpt.read_weights(ckpt.find_weights(tmp_path / "one" / "000-pretrain-tiny"))
    assert a.meta["step"] == "3"
    worst = _worst(a, b)
    assert worst < 1e-4, worst
    out_conv = "unet.out.2.weight"                 # zero-initialised: it moved, so the test compares updates
    assert a.model[out_conv].abs().max() > 1e-4
    bn = "conditioner.adapter.norm.running_mean"   # the adapter trained, on both sides alike
    assert a.model[bn].abs().max() > 1e-3 and (a.model[bn] - b.model[bn]).abs().max() < 1e-5


def test_ddp_stage2_one_clip_per_rank_matches_one_process(chain, data, tmp_path):
    """Stage 2 at one clip per rank, where condition dropout often drops everything a rank holds: DDP runs
    without find_unused_parameters, and 2 processes x 1 clip == 1 process x 2 clips."""
    args = TINY + ["--stage=finetune", f"--init={chain / '001-pretrain-tiny'}", f"--data={data / 'echo'}",
                   "--batch_size=2", "--max_steps=3", "--ckpt_every=3", "--drop_all_prob=0.5"]
    _torchrun2(args + [f"--out={tmp_path / 'ddp'}"])
    run(*args, f"--out={tmp_path / 'one'}")
    a = ckpt.read_weights(ckpt.find_weights(tmp_path / "ddp" / "000-finetune-tiny"))
    b = ckpt.read_weights(ckpt.find_weights(tmp_path / "one" / "000-finetune-tiny"))
    worst = _worst(a, b)
    assert worst < 1e-4, worst
    moved = [k for k in a.ema if k.endswith("attn_temporal.to_out.0.weight")]
    assert moved and all(a.model[k].abs().max() > 1e-5 for k in moved)      # zero-initialised: it trained


@pytest.mark.parametrize("name,conditions", [("001-pretrain-tiny", None), ("001-pretrain-tiny", "text,sketch,mask,mv"),
                                             ("002-finetune-tiny", None), ("003-cmr-tiny", None)])
def test_every_trainable_weight_is_in_every_steps_graph(chain, name, conditions):
    """DDP runs without find_unused_parameters, so a trainable weight missing from one step's graph
    (a condition dropped for the whole batch, the image branch of a model without `image`) would fail
    that step. Here every condition is dropped for every sample, or none is; dropping must also give
    the UNet exactly what skipping the condition gives."""
    import dataclasses
    from heartbeat.data import SeededItems, collate, make_dataset
    from heartbeat.models import build_model
    cfg = ckpt.read_weights(ckpt.find_weights(chain / name)).config
    if conditions:
        cfg.model.conditions = tuple(conditions.split(","))
    for drop_all in (1.0, 0.0):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, drop_all_prob=drop_all, drop_prob=0.0))
        torch.manual_seed(0)
        model = build_model(c).train()
        items = SeededItems(make_dataset(c, "train"))
        batch = collate([items[(i, i)] for i in range(2)])
        loss, _ = model.loss(batch)
        loss.backward()
        trainable = model.trainable_parameters()
        missing = [n for n, p in trainable if p.grad is None]
        assert not missing, missing
        names = {n.split(".")[2] for n, _ in trainable if n.startswith("conditioner.local.")}
        assert names == set(c.model.conditions) & {"sketch", "mask", "mv", "flow"} - (
            {"sketch", "mask", "mv"} if c.train.stage == "finetune" else set())
        assert any(n.startswith("conditioner.adapter.") for n, _ in trainable) == (
            "image" in c.model.conditions and c.train.stage == "pretrain")
    # all dropped: the conditioner's zeros give the UNet what skipping the conditions gives
    z = torch.randn(2, *(([c.model.frames] if c.model.temporal else []) + [4, 8, 8]))
    t = torch.tensor([10, 500])
    cond = model.condition_batch(batch)
    none = {k: torch.zeros(2, dtype=torch.bool) for k in ("text", "image", "sketch", "mask", "mv", "flow")}
    with torch.no_grad():
        dropped = model.conditioner(cond, none, batch_size=2)
        assert dropped["local"] is not None or not set(c.model.conditions) - {"text", "image"}
        skipped = model.conditioner.eval()(cond, none, batch_size=2)
        assert skipped["image"] is None and skipped["local"] is None
        torch.testing.assert_close(model.unet(z, t, **dropped), model.unet(z, t, **skipped), rtol=0, atol=1e-6)


class _Rank:
    """One rank's side of Dist for a single process: rank 0 records what it broadcasts, another rank
    replays rank 0's values, so two sequential calls act as two ranks with a file system in between."""
    enabled = True

    def __init__(self, rank, sent=None):
        self.rank, self.main, self.calls = rank, rank == 0, []
        self.sent = [] if sent is None else list(sent)

    def broadcast(self, obj):
        self.calls.append("broadcast")
        if self.main:
            self.sent.append(obj)
            return obj
        return self.sent.pop(0)

    def barrier(self):
        self.calls.append("barrier")


def test_ranks_make_the_same_collectives_whatever_they_find_on_disk(chain, data, tmp_path):
    """Rank 1 may look only after rank 0 has built the phantom or written the encoder cache; it must
    still join the same collectives, or its next one pairs with the wrong partner (a CI failure once:
    make_run_dir received rank 0's cache flag as the run name)."""
    import dataclasses
    from heartbeat.data import ensure_cache, prepare_data
    echo = tmp_path / "echo"
    shutil.copytree(data / "echo", echo, ignore=shutil.ignore_patterns("*.cache-*"))
    model = _pretrained(chain / "001-pretrain-tiny")
    cfg = ckpt.read_weights(ckpt.find_weights(chain / "001-pretrain-tiny")).config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=str(echo)))
    r0 = _Rank(0)
    key = ensure_cache(model, cfg, r0, log=lambda *a: None)
    assert key and len(list(echo.glob("train.cache-*.h5"))) == 1        # rank 0 wrote it
    r1 = _Rank(1, r0.sent)
    assert ensure_cache(model, cfg, r1, log=lambda *a: None) == key    # rank 1 finds it already there
    assert r1.calls == r0.calls and not r1.sent

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=str(tmp_path / "ph")))
    phantoms = {str(tmp_path / "ph"): {"clips": 2, "cmr": False}}
    r0 = _Rank(0)
    prepare_data(cfg, r0, phantoms, log=lambda *a: None)
    assert (tmp_path / "ph" / "train.h5").exists()
    r1 = _Rank(1, r0.sent)
    prepare_data(cfg, r1, phantoms, log=lambda *a: None)
    assert r1.calls == r0.calls and not r1.sent


# ------------------------------------------------------------------------------ encoder cache

def _pretrained(run_dir):
    from heartbeat.models import build_model
    w = ckpt.read_weights(ckpt.find_weights(run_dir))
    model = build_model(w.config)
    model.load_model_state(w.ema_model_state())
    return model.eval()


def test_encoder_cache_holds_what_the_frozen_encoders_give(chain, data):
    from heartbeat.data import FrameDataset, cache_key, cache_path
    path = data / "echo" / "train.h5"
    caches = sorted(path.parent.glob("train.cache-*.h5"))
    assert len(caches) == 1, caches      # written by pretrain, reused by finetune (same frozen VAE + prior)
    assert len(list((data / "cmr").glob("train.cache-*.h5"))) == 1
    model = _pretrained(chain / "001-pretrain-tiny")
    key = cache_key(model)
    assert caches[0] == cache_path(path, key)
    plain = FrameDataset(path, size=32, conditions=("image",))
    cached = FrameDataset(path, size=32, conditions=("image",), cache=key)
    with torch.no_grad():
        for i in (0, 5, len(plain) - 1):
            torch.manual_seed(i)
            a = plain[i]
            torch.manual_seed(i)                      # the same prior frame is drawn with the cache
            b = cached[i]
            assert "prior" not in b and b["latent"].shape == (4, 8, 8)
            torch.testing.assert_close(b["latent"], model.encode(a["image"][None])[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(b["prior_tokens"], model.image_prior(a["prior"][None])[0],
                                       atol=1e-5, rtol=1e-4)
            assert not torch.equal(b["prior_tokens"], model.image_prior(a["image"][None])[0])


def test_cached_training_matches_uncached(chain, data, tmp_path):
    args = TINY + ["--stage=pretrain", f"--data={data / 'echo'}", "--batch_size=4", "--max_steps=3",
                   "--ckpt_every=3", f"--vae={chain / '000-vae-tiny'}"]
    run(*args, f"--out={tmp_path / 'cached'}")
    run(*args, f"--out={tmp_path / 'plain'}", "--cache=false")
    a = ckpt.read_weights(ckpt.find_weights(tmp_path / "cached" / "000-pretrain-tiny"))
    b = ckpt.read_weights(ckpt.find_weights(tmp_path / "plain" / "000-pretrain-tiny"))
    worst = _worst(a, b)
    assert worst < 1e-4, worst
    assert a.model["unet.out.2.weight"].abs().max() > 1e-4         # it trained


def test_stale_cache_is_rebuilt_and_a_missing_one_refused(chain, data, tmp_path, capsys):
    from heartbeat.data import DataError, FrameDataset, cache_status
    d = tmp_path / "echo"
    shutil.copytree(data / "echo", d)                  # copy2: same bytes and times, so the cache is valid
    (old,) = d.glob("train.cache-*.h5")
    key = old.name.split("cache-")[1][:-3]
    st = (d / "train.h5").stat()
    with h5py.File(d / "train.h5", "r") as f:
        n = f["video"].shape[0]
    assert cache_status(d / "train.h5", key, n, 4) == ""
    os.utime(d / "train.h5", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))     # the split file "changed"
    assert cache_status(d / "train.h5", key, n, 4).startswith("stale")
    with pytest.raises(DataError, match="--cache=false"):
        FrameDataset(d / "train.h5", conditions=("image",), cache=key)
    run(*TINY, "--stage=pretrain", f"--data={d}", f"--out={tmp_path / 'runs'}", "--batch_size=4", "--max_steps=1",
        f"--vae={chain / '000-vae-tiny'}")
    assert "writing the encoder cache" in capsys.readouterr().out
    assert cache_status(d / "train.h5", key, n, 4) == ""
    with pytest.raises(DataError, match="absent"):
        FrameDataset(d / "train.h5", conditions=("image",), cache="0" * 16)


def test_force_replaces_the_old_run_checkpoints(data, tmp_path, capsys):
    args = TINY + ["--stage=vae", f"--data={data / 'echo'}", "--batch_size=4", "--keep_ckpts=0"]
    run(*args, f"--out={tmp_path}", "--max_steps=4", "--ckpt_every=2")
    run_dir = tmp_path / "000-vae-tiny"
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 4]
    run(*args, f"--out={run_dir}", "--max_steps=1", "--ckpt_every=1", "--force")
    assert "deleting 2 checkpoint(s)" in capsys.readouterr().out
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]       # a resume finds this run, not the old one


def test_seg_stage_writes_a_segmenter_that_segments(data, tmp_path):
    """The seg stage's segmenter, trained briefly on the phantom's train split, finds the LV cavity,
    myocardium and LA on test frames it never saw far better than the same network untrained."""
    from heartbeat.metrics import dice
    from heartbeat.segmenter import SegUNet, load_segmenter, segment
    run(*TINY, "--stage=seg", f"--data={data / 'echo'}", f"--out={tmp_path}", "--batch_size=16", "--max_steps=150")
    model = load_segmenter(tmp_path / "000-seg-tiny" / "segmenter.safetensors")
    with h5py.File(data / "echo" / "test.h5", "r") as f:
        frames, masks = f["video"][()].reshape(-1, 32, 32), f["mask"][()].reshape(-1, 32, 32)
    labels = segment(model, frames)
    assert labels.shape == masks.shape
    trained = dice(labels, masks)
    torch.manual_seed(0)
    untrained = dice(segment(SegUNet(4, (16, 32, 64), 32).eval(), frames), masks)
    for k, floor in ((1, 0.7), (2, 0.4), (3, 0.5)):           # LV cavity, myocardium (thin at 32 px), LA
        assert trained[k] > floor and trained[k] > untrained[k] + 0.3, (trained, untrained)


def test_an_rgb_vae_like_sd15s_trains_on_grey_frames(data, tmp_path):
    """SD1.5's VAE takes 3 channels; the frames are grey: they are repeated on the way in."""
    shutil.copytree(data / "echo", tmp_path / "echo")          # its cache must not land in the shared data
    common = TINY + [f"--data={tmp_path / 'echo'}", f"--out={tmp_path}", "--batch_size=4", "--in_channels=3"]
    run("--stage=vae", *common, "--max_steps=2")
    run("--stage=pretrain", *common, "--max_steps=2", f"--vae={tmp_path / '000-vae-tiny'}", "--cache=false")
    run("--stage=pretrain", *common, "--max_steps=2", f"--vae={tmp_path / '000-vae-tiny'}")
    a = ckpt.read_weights(ckpt.find_weights(tmp_path / "001-pretrain-tiny"))
    b = ckpt.read_weights(ckpt.find_weights(tmp_path / "002-pretrain-tiny"))
    assert max((a.model[k] - b.model[k]).abs().max().item() for k in a.model) < 1e-4


def _write_tokenizer(folder):
    """A tiny CLIP-format BPE vocabulary (bytes, their word-final forms, start/end) with no merges."""
    import json
    from heartbeat.text import bytes_to_unicode
    syms = list(bytes_to_unicode().values())
    syms = syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(syms)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def test_pretrain_from_an_sd15_single_file(data, tmp_path, capsys):
    """--init=<SD1.5 single file>: its UNet, VAE and CLIP text model are loaded, the tokenizer is found in
    tokenizer/ beside it, stage 2 inherits the text encoder's files, and sampling rebuilds it."""
    from safetensors.torch import save_file
    from heartbeat.config import get_config
    from heartbeat.weights import build_text_encoder
    from heartbeat.unet import UNet
    from heartbeat.vae import AutoencoderKL
    opts = TINY + ["--text_encoder=clip", "--in_channels=3", "--text_trainable=false"]
    m = get_config("tiny", opts).model
    _write_tokenizer(tmp_path / "sd" / "tokenizer")
    torch.manual_seed(3)
    unet, vae = UNet(m), AutoencoderKL(m)
    text = build_text_encoder(m, str(tmp_path / "sd" / "tokenizer"))      # random CLIP with that vocabulary
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items() if not UNet.is_new_parameter(k)}
    sd["model.diffusion_model.input_blocks.0.0.weight"] = unet.state_dict()["input_blocks.0.0.weight"][:, :4]
    sd |= {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    sd |= {"cond_stage_model.transformer." + k: v for k, v in text.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd" / "sd15.safetensors"))
    shutil.copytree(data / "echo", tmp_path / "echo")
    common = opts + [f"--data={tmp_path / 'echo'}", f"--out={tmp_path / 'runs'}", "--batch_size=4", "--max_steps=2"]
    run("--stage=pretrain", *common, f"--init={tmp_path / 'sd' / 'sd15.safetensors'}", "--lr=0")
    out = capsys.readouterr().out
    assert "VAE: from" in out and "text encoder: CLIP from --init" in out
    w = ckpt.read_weights(ckpt.find_weights(tmp_path / "runs" / "000-pretrain-tiny"))
    for k, v in sd.items():          # lr 0: every loaded tensor is still the file's
        name = k.replace("model.diffusion_model.", "unet.").replace("first_stage_model.", "vae.").replace(
            "cond_stage_model.transformer.", "conditioner.text_encoder.")
        got = w.model[name][:, :4] if name == "unet.input_blocks.0.0.weight" else w.model[name]
        assert torch.equal(got, v), name
    assert w.config.model.text_weights == str(tmp_path / "sd" / "sd15.safetensors")
    run("--stage=finetune", *TINY, f"--data={tmp_path / 'echo'}", f"--out={tmp_path / 'runs'}", "--batch_size=2",
        "--max_steps=1")
    from heartbeat.models import load_for_sampling
    cfg, parts, _ = load_for_sampling(tmp_path / "runs" / "001-finetune-tiny")
    assert cfg.model.text_weights == str(tmp_path / "sd" / "sd15.safetensors")
    assert parts["text_encoder"].tokenize(["apical four chamber"]).shape == (1, 16)
    # without the tokenizer files: one clear message before any training
    (tmp_path / "sd" / "tokenizer").rename(tmp_path / "sd" / "elsewhere")
    run("--stage=pretrain", *common, f"--init={tmp_path / 'sd' / 'sd15.safetensors'}", expect=2)
    assert "no tokenizer: pass --text_weights" in capsys.readouterr().err


def test_pretrain_and_finetune_with_a_medsam_prior(chain, data, tmp_path):
    """--prior=medsam --prior_weights=FILE: the SAM ViT encoder is the frozen image prior, its tokens are
    cached like the VAE's, and stage 2 finds the file again through the recorded config."""
    from heartbeat.image_prior import SAMImageEncoder
    from heartbeat.data import FrameDataset, cache_key
    from heartbeat.models import build_model
    torch.manual_seed(0)
    sam = SAMImageEncoder(img_size=64, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                          out_chans=16, window_size=3, global_attn_indexes=(1,))
    torch.save({"image_encoder." + k: v for k, v in sam.state_dict().items()}, tmp_path / "medsam_tiny.pth")
    shutil.copytree(data / "echo", tmp_path / "echo", ignore=shutil.ignore_patterns("*.cache-*"))
    common = TINY + [f"--data={tmp_path / 'echo'}", f"--out={tmp_path / 'runs'}", "--prior=medsam", "--prior_dim=16",
                     f"--prior_weights={tmp_path / 'medsam_tiny.pth'}"]
    run("--stage=pretrain", *common, "--batch_size=4", "--max_steps=2", f"--vae={chain / '000-vae-tiny'}")
    w = ckpt.read_weights(ckpt.find_weights(tmp_path / "runs" / "000-pretrain-tiny"))
    model = build_model(w.config)
    model.load_model_state(w.ema_model_state())
    ds = FrameDataset(tmp_path / "echo" / "train.h5", size=32, conditions=("image",), cache=cache_key(model.eval()))
    plain = FrameDataset(tmp_path / "echo" / "train.h5", size=32, conditions=("image",))
    torch.manual_seed(1)
    a = ds[3]
    torch.manual_seed(1)
    b = plain[3]
    with torch.no_grad():
        torch.testing.assert_close(a["prior_tokens"], model.image_prior(b["prior"][None])[0], atol=1e-5, rtol=1e-4)
    run("--stage=finetune", *TINY, "--prior_dim=16", f"--data={tmp_path / 'echo'}", f"--out={tmp_path / 'runs'}",
        "--batch_size=2", "--max_steps=1")      # (TINY's own --prior_dim=32 would override the checkpoint's)
    fin = ckpt.read_weights(ckpt.find_weights(tmp_path / "runs" / "001-finetune-tiny")).config
    assert fin.model.prior == "medsam" and fin.model.prior_weights == str(tmp_path / "medsam_tiny.pth")
