"""Distillation (heartbeat/distill.py, stage distill): a tiny teacher's student trains, resumes exactly,
is an ordinary checkpoint that tools/sample.py samples with --sampler=lcm at 1, 2 and 4 steps for
every condition subset, refuses what it was not trained for; and on a toy whose teacher is exact,
the one-step student beats the one-step teacher. CPU, the tiny preset shrunk to 32x32."""
from __future__ import annotations

import itertools
import shutil

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

from heartbeat import checkpoint as ckpt
from heartbeat.diffusion import Schedule, sample
from heartbeat.distill import draw_guidance, guided_teacher, lcd_loss, teacher_sets
from tests.test_sample import real_ckpt
from tools import sample as sample_tool
from tools.train import main as train_main

RUN = ["--num_workers=0", "--log_every=1", "--sample_every=0", "--batch_size=2", "--warmup_steps=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from data_prep.phantom import build
    root = tmp_path_factory.mktemp("distill")
    build(root / "echo", clips=4, frames=4, size=32, seed=0, progress=False)
    (root / "t1").mkdir()
    (root / "t2").mkdir()
    real_ckpt(root / "t1" / "ckpt-0000003.safetensors", "pretrain")
    real_ckpt(root / "t2" / "ckpt-0000003.safetensors", "finetune",
              ["--temporal", "--conditions=text,image,sketch,mask,mv,flow"])
    out = root / "runs"
    assert train_main(["--stage=distill", f"--init={root / 't1'}", f"--data={root / 'echo'}", f"--out={out}",
                       "--max_steps=4", "--ckpt_every=2", "--keep_ckpts=0", *RUN]) == 0
    return root, out / "000-distill-tiny"


def _tool(argv, capsys=None):
    rc = sample_tool.main([str(a) for a in argv])
    return rc, (capsys.readouterr().err if capsys is not None else "")


def test_student_is_an_ordinary_checkpoint_and_resumes_exactly(setup, tmp_path):
    root, run = setup
    w = ckpt.read_weights(ckpt.find_weights(run))
    assert w.stage == "distill" and w.config.model.teacher_stage == "pretrain"
    assert w.config.model.guidance_inputs == 1 + 5 and not any(k.startswith("teacher.") for k in w.model)
    teacher = ckpt.read_weights(ckpt.find_weights(root / "t1")).ema_model_state()
    moved = [k for k in w.model if k.startswith("unet.") and k in teacher and not torch.equal(w.model[k], teacher[k])]
    assert moved and any(k.startswith("unet.guidance_embed.") for k in w.ema)
    # resume from step 2 to 4 == the uninterrupted run
    half = tmp_path / "half"
    shutil.copytree(run, half)
    for f in ("ckpt-0000004.safetensors", "state-0000004.pt"):
        (half / f).unlink()
    assert train_main(["--stage=distill", f"--resume={half}"]) == 0
    a, b = ckpt.read_weights(run / "ckpt-0000004.safetensors"), ckpt.read_weights(half / "ckpt-0000004.safetensors")
    bad = [k for k in a.model if not torch.equal(a.model[k], b.model[k])]
    bad += [k for k in a.ema if not torch.equal(a.ema[k], b.ema[k])]
    assert not bad, bad[:5]


def test_sample_lcm_1_2_4_steps_and_every_condition_subset(setup, tmp_path):
    root, run = setup
    common = ["--ckpt", run, "--data", root / "echo", "--num=2", "--frames=2", "--sampler=lcm", "--previews=0",
              "--save_latents"]
    lat = {}
    for steps in (1, 2, 4):
        assert _tool(common + [f"--steps={steps}", "--out", tmp_path / f"s{steps}"])[0] == 0
        with h5py.File(tmp_path / f"s{steps}" / "samples.h5") as f:
            lat[steps] = f["latent_sample"][:]
            assert f["video"].shape == (2, 2, 32, 32) and f.attrs["sampler"] == "lcm"
    assert np.isfinite(lat[4]).all() and not np.allclose(lat[1], lat[4])
    # every subset of the five conditions, and per-condition scales, through the one loader and path
    from heartbeat.guidance import GuidanceSpec
    from heartbeat.models import load_for_sampling
    from heartbeat.sampling import DatasetSource, generate
    cfg, parts, _ = load_for_sampling(run)
    conds = cfg.model.conditions
    outs = {}
    for r in range(len(conds) + 1):
        for used in itertools.combinations(conds, r):
            src = DatasetSource(cfg, root / "echo" / "test.h5", used, 1, False)
            z, _ = generate(parts, cfg, [src.job(0, 7)], steps=1, sampler="lcm", eta=0.0,
                            guidance=GuidanceSpec.parse("2.0"), used=used)
            assert torch.isfinite(z).all()
            outs[used] = z
    assert len(outs) == 32 and not torch.allclose(outs[()], outs[conds])
    src = DatasetSource(cfg, root / "echo" / "test.h5", ("text", "mask"), 1, False)
    z, _ = generate(parts, cfg, [src.job(0, 7)], steps=2, sampler="lcm", eta=0.0,
                    guidance=GuidanceSpec.parse("mask=3,text=1"), used=("text", "mask"))
    assert torch.isfinite(z).all()


def test_stage2_student_samples_clips_with_flow(setup, tmp_path):
    root, _ = setup
    out = tmp_path / "runs"
    assert train_main(["--stage=distill", f"--init={root / 't2'}", f"--data={root / 'echo'}", f"--out={out}",
                       "--max_steps=1", *RUN]) == 0
    run = out / "000-distill-tiny"
    assert ckpt.read_weights(ckpt.find_weights(run)).config.model.guidance_inputs == 1 + 6
    for steps, conds in ((1, "flow"), (2, "text,mask,flow")):
        assert _tool(["--ckpt", run, "--data", root / "echo", "--num=1", "--sampler=lcm", f"--steps={steps}",
                      f"--conditions={conds}", "--previews=0", "--out", tmp_path / f"v{steps}",
                      "--gif", tmp_path / f"v{steps}.gif"])[0] == 0
        with h5py.File(tmp_path / f"v{steps}" / "samples.h5") as f:
            assert f["video"].shape == (1, 4, 32, 32) and "flow" in f
    from PIL import Image
    gif = Image.open(tmp_path / "v2.gif")                   # the clip beside its mask: two panels, 4 frames
    assert gif.n_frames == 4 and gif.size[1] >= 256 and gif.size[0] > 2 * gif.size[1]


def test_bad_input_is_one_clear_message(setup, tmp_path, capsys):
    root, run = setup
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    for init, says in ((junk, "not a"), (plain, "not a HeartBeat checkpoint"), (run, "'distill' checkpoint")):
        assert train_main(["--stage=distill", f"--init={init}", f"--out={tmp_path / 'o'}"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert train_main(["--stage=distill", f"--out={tmp_path / 'o'}"]) == 2
    assert "needs --init" in capsys.readouterr().err
    assert train_main(["--stage=distill", f"--init={root / 't1'}", "--lcd_loss=l1", f"--out={tmp_path / 'o'}"]) == 2
    assert "--lcd_loss=l1: choose one of l2, huber" in capsys.readouterr().err
    base = ["--ckpt", run, "--data", root / "echo", "--num=1", "--out", tmp_path / "x"]
    for extra, says in ((["--sampler=lcm", "--steps=5"], "distilled for 1..4 steps"),
                        (["--sampler=lcm", "--steps=2", "--guidance=9"], "outside 0..8"),
                        (["--sampler=lcm", "--steps=2", "--guidance=mask+mv=2"], "group mask+mv"),
                        (["--steps=2"], "sample it with --sampler=lcm")):
        rc, err = _tool(base + extra, capsys)
        assert rc == 2 and says in err and "Traceback" not in err, err
    rc, err = _tool(["--ckpt", root / "t1", "--num=1", "--sampler=lcm", "--steps=2", "--out", tmp_path / "y"], capsys)
    assert rc == 2 and "distil it" in err


# ------------------------------------------- the toy: an exact teacher, a small student, one step

MODES = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
STD = 0.3


def _exact_eps(x, t, sched, cls=None):
    """The exact eps of x0 ~ a mixture of N(mode_k, STD^2 I) (one mode when cls is given) at x_t."""
    a = sched.sqrt_alphas_cumprod[t].float()[:, None]
    s = sched.sqrt_one_minus_alphas_cumprod[t].float()[:, None]
    var = a ** 2 * STD ** 2 + s ** 2
    d = x[:, None, :] - a[:, None] * MODES[None]                        # (B, K, 2)
    logits = -(d ** 2).sum(-1) / (2 * var)
    if cls is not None:
        logits = torch.where(torch.arange(2)[None] == cls[:, None], logits, torch.full_like(logits, -1e9))
    r = logits.softmax(1)[..., None]
    return s * (r * d).sum(1) / var                                    # eps = -s * score


class ToyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 8 + 2 + 1, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2))

    def forward(self, x, t, g, cls):
        f = torch.arange(1, 5).float()[None] * t.float()[:, None] / 1000
        emb = torch.cat([f.sin(), f.cos()], 1)
        c = torch.nn.functional.one_hot(cls.clamp(min=0), 2).float() * (cls >= 0).float()[:, None]
        return self.net(torch.cat([x, emb, g[:, :1] / 4, c], 1))


def _energy_distance(a, b):
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_one_step_student_beats_the_one_step_teacher_on_a_toy(loss):
    """A 2-D two-mode mixture whose teacher eps is exact (guided: class-conditional vs unconditional):
    after 300 LCD steps (SD1.5 schedule, skipping interval 100) the student's 1-step samples at guidance 1 (conditional) lie closer, in energy
    distance, to the true class-conditional data than the teacher's 1-step DDIM samples (which
    collapse to the mean). Uses the library's lcd_loss, guided_teacher, consistency and lcm sampler."""
    torch.manual_seed(0)
    sched = Schedule.sd15()
    student = ToyStudent()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    conds = ("mask",)
    for step in range(300):
        B = 128
        gens = [torch.Generator().manual_seed(step * B + i) for i in range(B)]
        cls = torch.randint(0, 2, (B,))
        z0 = MODES[cls] + STD * torch.randn(B, 2)
        keep = {"mask": torch.rand(B) > 0.2}
        g = draw_guidance(keep, conds, 4.0, gens)
        kept = torch.where(keep["mask"], cls, torch.full_like(cls, -1))

        def teacher_fn(z, t):
            u = _exact_eps(z, t, sched)
            c = torch.where(keep["mask"][:, None], _exact_eps(z, t, sched, cls), u)
            return torch.stack([u, c, c])                       # sets: none, all kept, mask alone

        value, _ = lcd_loss(lambda z, t: student(z, t, g, kept), teacher_fn, z0, sched, g, gens, skip=100, loss=loss)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert len(teacher_sets(conds)) == 3
    n = 512
    cls = torch.arange(n) % 2
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    real = MODES[cls] + STD * torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    g = torch.tensor([[1.0, 0.0]]).expand(n, 2)
    with torch.no_grad():
        stu = sample(lambda z, t: student(z, t, g, cls), x_T, steps=1, sampler="lcm", schedule=sched, lcm_skip=100,
                     generator=torch.Generator().manual_seed(3))
        tea = sample(lambda z, t: guided_teacher(torch.stack([_exact_eps(z, t, sched),
                                                              _exact_eps(z, t, sched, cls),
                                                              _exact_eps(z, t, sched, cls)]),
                                                 g), x_T, steps=1, sampler="ddim", schedule=sched)
    d_student, d_teacher = _energy_distance(stu, real), _energy_distance(tea, real)
    assert d_student < 0.5 * d_teacher, (d_student, d_teacher)


def test_stage2_decoupled_from_an_image_student(setup, tmp_path):
    """--spatial=RUN (AnimateLCM): the video student keeps the image student's spatial weights
    exactly; only the temporal layers and the guidance embedding learn."""
    from heartbeat.unet import UNet
    root, run1 = setup
    out = tmp_path / "runs"
    assert train_main(["--stage=distill", f"--init={root / 't2'}", f"--spatial={run1}", f"--data={root / 'echo'}",
                       f"--out={out}", "--max_steps=1", *RUN]) == 0
    w2 = ckpt.read_weights(ckpt.find_weights(out / "000-distill-tiny"))
    w1 = ckpt.read_weights(ckpt.find_weights(run1)).ema_model_state()
    assert set(w2.ema) == {k for k in w2.model if k.startswith("unet.") and
                           (UNet.is_temporal_name(k) or UNet.is_guidance_name(k))}
    spatial = [k for k in w2.model if k.startswith("unet.") and not UNet.is_temporal_name(k)
               and not UNet.is_guidance_name(k)]
    assert spatial and all(torch.equal(w2.model[k], w1[k]) for k in spatial)
    g1, g2 = w1["unet.guidance_embed.0.weight"], w2.model["unet.guidance_embed.0.weight"]
    assert g2.shape[1] == g1.shape[1] + 32 and not torch.equal(g2[:, :g1.shape[1]], torch.zeros_like(g1))


def test_teacher_skips_the_sets_no_scale_weighs(setup, tmp_path, monkeypatch):
    """The teacher runs only the (set, example) pairs equation (1) weighs (heartbeat.distill.needed_sets):
    on stage-2 clips the losses equal those of the full 2 + n set call, and fewer rows ran."""
    import json

    import heartbeat.models as M
    from heartbeat.distill import needed_sets
    root, _ = setup
    args = ["--stage=distill", f"--init={root / 't2'}", f"--data={root / 'echo'}", "--max_steps=3", *RUN]
    ran = []
    monkeypatch.setattr(M, "needed_sets", lambda g: ran.append(needed_sets(g)) or ran[-1])
    assert train_main(args + [f"--out={tmp_path / 'a'}"]) == 0
    assert sum(int(n.sum()) for n in ran) < sum(n.numel() for n in ran)      # rows were skipped
    monkeypatch.setattr(M, "needed_sets", lambda g: torch.ones(g.shape[1] + 1, g.shape[0], dtype=torch.bool))
    assert train_main(args + [f"--out={tmp_path / 'b'}"]) == 0
    la, lb = (json.loads((tmp_path / x / "000-distill-tiny" / "loss.json").read_text()) for x in "ab")
    assert len(la) == 3 and [s for s, _ in la] == [s for s, _ in lb]
    assert all(abs(a - b) <= 1e-5 * max(abs(b), 1e-3) for (_, a), (_, b) in zip(la, lb)), (la, lb)


def test_joint_phase_starts_from_a_whole_student(setup, tmp_path, capsys):
    """--student=RUN: a second distillation starts from all of RUN's UNet weights (here a --spatial
    video student) and trains every UNet weight, spatial ones included; the teacher stays --init's.
    A student of another teacher stage, --student beside --spatial or outside distill: one message."""
    from heartbeat.unet import UNet
    root, run1 = setup
    common = [f"--data={root / 'echo'}", "--max_steps=1", *RUN]
    assert train_main(["--stage=distill", f"--init={root / 't2'}", f"--spatial={run1}", f"--out={tmp_path / 'a'}",
                       *common]) == 0
    run2 = tmp_path / "a" / "000-distill-tiny"
    assert train_main(["--stage=distill", f"--init={root / 't2'}", f"--student={run2}", f"--out={tmp_path / 'b'}",
                       "--lr=1e-12", *common]) == 0
    w2 = ckpt.read_weights(ckpt.find_weights(run2)).ema_model_state()
    w3 = ckpt.read_weights(ckpt.find_weights(tmp_path / "b" / "000-distill-tiny"))
    unet = [k for k in w3.model if k.startswith("unet.")]
    assert set(w3.ema) == set(unet)                          # every UNet weight learned, spatial ones too
    assert any(not UNet.is_temporal_name(k) and not UNet.is_guidance_name(k) for k in w3.ema)
    # one step at lr 1e-12 from run2's weights: still run2's weights (not the teacher's, which differ)
    assert all(torch.allclose(w3.model[k], w2[k], atol=1e-8) for k in unet)
    teacher = ckpt.read_weights(ckpt.find_weights(root / "t2")).ema_model_state()
    assert any(not torch.equal(w2[k], teacher[k]) for k in unet if k in teacher)
    for extra, says in (([f"--init={root / 't2'}", f"--student={run1}"], "a student of a 'pretrain' checkpoint"),
                        ([f"--init={root / 't2'}", f"--student={run2}", f"--spatial={run1}"], "choose one"),
                        ([f"--init={root / 't1'}", f"--student={root / 't1'}"], "'pretrain' checkpoint, but this "
                                                                                  "needs a 'distill'")):
        assert train_main(["--stage=distill", *extra, f"--out={tmp_path / 'c'}", *common]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert train_main(["--stage=finetune", f"--init={root / 't1'}", f"--student={run2}",
                       f"--out={tmp_path / 'c'}", *common]) == 2
    assert "only applies to a distillation (bash train.sh distill), not to --stage=finetune" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())   # no run folder left behind
