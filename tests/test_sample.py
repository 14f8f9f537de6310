"""tools/sample.py and heartbeat/sampling.py: CLI validation, rank/batch invariance, the samples.h5
schema, previews, file conditions. CPU only; tiny stand-in networks keep it fast, and the
end-to-end tests at the bottom use the real checkpoint loader and models when they exist."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from heartbeat.config import get_config
from heartbeat import sampling as S
from tools import sample as tool

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 32, 4


# ---------------------------------------------------------------------- stand-in networks
# Tiny modules that honour the contracts of docs/ARCHITECTURE.md §Conditions (Conditioner(batch, keep) -> UNet
# kwargs; dropped = absent = zeros; 4-D frames or 5-D clips), so sampling logic is tested alone.

class StubConditioner(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.classes, self.lc = m.mask_classes, m.local_channels
        self.f = m.vae_factor
        self.text = nn.Embedding(256, m.context_dim)
        self.image = nn.Linear(1, m.context_dim)
        self.enc = nn.ModuleDict({"mask": nn.Conv2d(m.mask_classes, m.local_channels, 1),
                                  "sketch": nn.Conv2d(1, m.local_channels, 1),
                                  "mv": nn.Conv2d(1, m.local_channels, 1),
                                  "flow": nn.Conv2d(2, m.local_channels, 1)})

    def forward(self, batch, keep, batch_size=None):
        rows = batch_size
        for v in batch.values():
            rows = len(v) if isinstance(v, list) else v.shape[0]
        out = {"text": None, "image": None, "local": None}
        dev = self.text.weight.device
        if "text" in batch:
            ids = [torch.tensor(list(s.encode())[:16] or [0], device=dev) for s in batch["text"]]
            e = torch.stack([self.text(i).mean(0) for i in ids])[:, None]
            out["text"] = e * keep["text"].view(-1, 1, 1).float()
        if "prior" in batch:
            e = self.image(batch["prior"].mean((1, 2, 3))[:, None])[:, None]
            out["image"] = e * keep["image"].view(-1, 1, 1).float()
        loc = 0
        for name in ("mask", "sketch", "mv", "flow"):
            if name not in batch:
                continue
            x = batch[name]
            if name == "mask":
                x = F.one_hot(x.long(), self.classes).movedim(-1, -3).float()
            lead = x.shape[:-3]
            y = self.enc[name](F.avg_pool2d(x.reshape(-1, *x.shape[-3:]), self.f))
            y = y.reshape(*lead, *y.shape[-3:])
            k = keep[name].float().view(-1, *([1] * (y.dim() - 1)))
            loc = loc + y * k
        if torch.is_tensor(loc):
            out["local"] = loc
        return out


class StubUNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m = cfg.model
        self.conv = nn.Conv2d(m.latent_channels + m.local_channels, m.latent_channels, 3, padding=1)
        self.ctx = nn.Linear(m.context_dim, m.latent_channels)
        self.lc = m.local_channels

    def forward(self, z, t, text=None, image=None, local=None):
        video = z.dim() == 5
        B = z.shape[0]
        x = z.reshape(-1, *z.shape[-3:])
        loc = torch.zeros(x.shape[0], self.lc, *x.shape[-2:]) if local is None else local.reshape(-1, self.lc, *x.shape[-2:])
        y = self.conv(torch.cat([x, loc], 1)) + 0.01 * (t.float().view(-1, 1, 1, 1) / 1000).repeat_interleave(
            x.shape[0] // B, 0)
        c = 0
        for e in (text, image):
            if e is not None:
                c = c + self.ctx(e.mean(1))
        if torch.is_tensor(c):
            y = y + c.repeat_interleave(x.shape[0] // B, 0)[:, :, None, None]
        y = y.reshape(z.shape)
        if video:
            y = y + 0.1 * y.mean(1, keepdim=True)          # frames interact, as temporal attention does
        return 0.5 * torch.tanh(y)


class StubVAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.f = cfg.model.vae_factor
        self.conv = nn.Conv2d(cfg.model.latent_channels, cfg.model.in_channels, 1)

    def decode(self, z):
        return torch.tanh(self.conv(F.interpolate(z, scale_factor=self.f, mode="nearest")))


def stub_parts(cfg):
    torch.manual_seed(0)
    return {"unet": StubUNet(cfg), "conditioner": StubConditioner(cfg), "vae": StubVAE(cfg)}


def stub_load_model(path, cfg, use_ema, device):
    return {k: v.to(device).eval() for k, v in stub_parts(cfg).items()}


def tiny_cfg(stage="pretrain", conditions="text,image,sketch,mask,mv"):
    return get_config("tiny", [f"--stage={stage}", f"--image_size={SIZE}", f"--conditions={conditions}",
                               "--timesteps=100"])


def save_ckpt(path, stage="pretrain", conditions="text,image,sketch,mask,mv"):
    from heartbeat.checkpoint import save_weights
    cfg = tiny_cfg(stage, conditions)
    save_weights(path, {"w": torch.zeros(1)}, {}, cfg, step=1)
    return path


# -------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from data_prep.phantom import build
    d = tmp_path_factory.mktemp("phantom")
    build(d, clips=8, frames=FRAMES, size=SIZE, progress=False)
    return d


@pytest.fixture(scope="module")
def cmr_data(tmp_path_factory):
    from data_prep.phantom import build
    d = tmp_path_factory.mktemp("cmr")
    build(d, clips=4, frames=FRAMES, size=SIZE, cmr=True, progress=False)
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"pretrain": save_ckpt(d / "s1.safetensors"),
            "finetune": save_ckpt(d / "s2.safetensors", "finetune", "text,image,sketch,mask,mv,flow"),
            "cmr": save_ckpt(d / "cmr.safetensors", "cmr", "mask")}


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(tool, "load_model", stub_load_model)


def run_tool(argv, capsys=None):
    rc = tool.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return rc, err


# ------------------------------------------------------------------------- bad input: exit 2

def test_bad_inputs_one_clear_message(phantom, ckpts, tmp_path, capsys, stub):
    base = ["--ckpt", ckpts["pretrain"], "--data", phantom, "--steps=2", "--num=1"]
    cases = [
        (["--conditions=text,bogus"], "unknown condition(s) bogus"),
        (["--conditions=flow"], "not trained with flow"),
        (["--guidance=mask=2,colour=1"], "unknown condition(s) colour"),
        (["--guidance=sketch=2", "--conditions=text,mask"], "guidance names sketch"),
        (["--split=nope"], "splits in"),
        (["--steps=0"], "--steps=0"),
    ]
    for extra, msg in cases:
        rc, err = run_tool(base + extra + ["--out", tmp_path / "o"], capsys)
        assert rc == 2, extra
        assert err.startswith("error: ") and msg in err, (extra, err)
        assert "Traceback" not in err
        assert not (tmp_path / "o").exists()
    # not a HeartBeat checkpoint: a plain safetensors file, then garbage
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    for ck in (plain, garbage, tmp_path / "missing"):
        rc, err = run_tool(["--ckpt", ck, "--data", phantom, "--out", tmp_path / "o"], capsys)
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    # a VAE-stage checkpoint cannot sample
    from heartbeat.checkpoint import save_weights
    vae = tmp_path / "vae.safetensors"
    save_weights(vae, {"w": torch.zeros(1)}, {}, tiny_cfg("vae"), 1)
    rc, err = run_tool(["--ckpt", vae, "--data", phantom, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "'vae' checkpoint cannot sample" in err


def test_bad_masks(ckpts, tmp_path, capsys, stub):
    base = ["--ckpt", ckpts["pretrain"], "--steps=2", "--out", tmp_path / "o"]
    wrong_labels = tmp_path / "m255.npy"
    np.save(wrong_labels, np.full((2, SIZE, SIZE), 255, np.uint8))
    rc, err = run_tool(base + ["--mask", wrong_labels], capsys)
    assert rc == 2 and "outside 0..3" in err and "0/255" in err
    nonsquare = tmp_path / "rect.npy"
    np.save(nonsquare, np.zeros((2, SIZE, SIZE + 8), np.uint8))
    rc, err = run_tool(base + ["--mask", nonsquare], capsys)
    assert rc == 2 and "square" in err
    rc, err = run_tool(base + ["--mask", tmp_path / "nothing_here"], capsys)
    assert rc == 2 and "no such file" in err
    rc, err = run_tool(base + ["--conditions=sketch"], capsys)
    assert rc == 2 and "--sketch" in err
    cmr_prompt = ["--ckpt", ckpts["cmr"], "--prompt=hello", "--out", tmp_path / "o"]
    rc, err = run_tool(cmr_prompt, capsys)
    assert rc == 2 and "trained with mask only" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force_and_keeps_old_file(phantom, ckpts, tmp_path, capsys, stub):
    out = tmp_path / "o"
    out.mkdir()
    (out / "samples.h5").write_text("old")
    args = ["--ckpt", ckpts["pretrain"], "--data", phantom, "--steps=2", "--num=2", "--out", out, "--previews=0"]
    rc, err = run_tool(args, capsys)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert (out / "samples.h5").read_text() == "old"
    assert run_tool(args + ["--force"])[0] == 0
    with h5py.File(out / "samples.h5") as f:
        assert f["video"].shape == (2, 1, SIZE, SIZE)
    assert not list(out.glob(".*"))                      # no temporary / part files left


# -------------------------------------------------------------------- seeds, batches, ranks

def _read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def test_batch_size_does_not_change_results(phantom, ckpts, tmp_path, stub):
    outs = []
    for b in (1, 3):
        o = tmp_path / f"b{b}"
        assert run_tool(["--ckpt", ckpts["pretrain"], "--data", phantom, "--split=train", "--num=5",
                         "--steps=3", "--frames=2", f"--batch={b}", "--sampler=ddpm", "--save_latents",
                         "--out", o, "--previews=0"])[0] == 0
        outs.append(_read(o / "samples.h5")[0])
    a, b = outs
    np.testing.assert_allclose(a["latent_sample"], b["latent_sample"], atol=1e-6, rtol=0)
    assert np.abs(a["video"].astype(int) - b["video"].astype(int)).max() <= 1
    assert (a["source_index"] == b["source_index"]).all()
    with h5py.File(phantom / "train.h5") as f:              # stage 1: each frame its own sketch
        for k in range(5):
            np.testing.assert_array_equal(a["sketch"][k], f["sketch"][k % f["video"].shape[0], :2])


def _dist_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from tools import sample as t
    if os.environ.get("HB_TEST_STUB", "1") == "1":
        t.load_model = stub_load_model
    rc = t.main(argv)
    if rc != 0:
        raise SystemExit(rc)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(argv, world, stub=True):
    os.environ["HB_TEST_STUB"] = "1" if stub else "0"
    mp.spawn(_dist_worker, args=(world, _free_port(), [str(a) for a in argv]), nprocs=world, join=True)


def test_two_ranks_equal_one_rank(phantom, ckpts, tmp_path, stub):
    common = ["--ckpt", ckpts["pretrain"], "--data", phantom, "--split=train", "--num=5", "--steps=3",
              "--batch=2", "--sampler=ddim", "--eta=1.0", "--save_latents", "--previews=1",
              "--guidance=mask=2,text=1"]
    assert run_tool(common + ["--out", tmp_path / "w1"])[0] == 0          # one process, in this one
    run_ranks(common + ["--out", tmp_path / "w2"], 2)
    (a, aa), (b, ba) = _read(tmp_path / "w1/samples.h5"), _read(tmp_path / "w2/samples.h5")
    np.testing.assert_allclose(a["latent_sample"], b["latent_sample"], atol=1e-6, rtol=0)
    assert np.abs(a["video"].astype(int) - b["video"].astype(int)).max() <= 1
    for k in ("source_index", "mask", "text", "meta", "conditions"):
        assert (a[k] == b[k]).all(), k
    assert ba["world_size"] == 2 and aa["world_size"] == 1
    assert [json.loads(m)["seed"] for m in b["meta"]] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "w2").glob(".part*"))


# ------------------------------------------------------------------------------ the schema

def test_samples_h5_schema_stage1(phantom, ckpts, tmp_path, stub):
    out = tmp_path / "o"
    rc = run_tool(["--ckpt", ckpts["pretrain"], "--data", phantom, "--split=train", "--num=7", "--steps=2",
                   "--frames=3", "--seed=10", "--conditions=text,mask,mv", "--out", out])[0]
    assert rc == 0
    d, attrs = _read(out / "samples.h5")
    n_clips = h5py.File(phantom / "train.h5")["video"].shape[0]
    assert d["video"].shape == (7, 3, SIZE, SIZE) and d["video"].dtype == np.uint8
    assert d["mask"].shape == (7, 3, SIZE, SIZE) and d["mv"].shape == (7, 3, SIZE, SIZE)
    assert d["mv_points"].shape == (7, 3, 2, 2) and d["mask_valid"].shape == (7, 3)
    assert "sketch" not in d and "flow" not in d            # only the conditioning maps given
    assert list(d["source_index"]) == [k % n_clips for k in range(7)]
    assert {c.decode() for c in d["conditions"]} == {"text,mask,mv"}
    with h5py.File(phantom / "train.h5") as f:              # the conditioning masks are the clip's
        for k in range(7):
            np.testing.assert_array_equal(d["mask"][k], f["mask"][k % n_clips, :3])
            assert d["text"][k] == f["text"][k % n_clips]
            assert d["view"][k] == f["view"][k % n_clips]
    meta = json.loads(d["meta"][3])
    assert meta["seed"] == 13 and meta["sampler"] == "ddim" and meta["steps"] == 2
    assert meta["conditions"] == "text,mask,mv" and meta["checkpoint"].endswith("s1.safetensors")
    for key in ("checkpoint", "sampler", "steps", "guidance", "seed", "schema", "labels", "frames", "size"):
        assert key in attrs, key
    assert attrs["seed"] == 10 and attrs["guidance"] == "3.0" and attrs["schema"] == 1
    # the synthetic set reads back through the training datasets
    from heartbeat.data import ClipDataset, FrameDataset
    fd = FrameDataset(out / "samples.h5", conditions=("mask", "mv"))
    assert len(fd) == 21 and fd[4]["mask"].shape == (SIZE, SIZE)
    assert ClipDataset(out / "samples.h5", conditions=("mask",))[0]["video"].shape == (3, 1, SIZE, SIZE)
    # previews: GIFs with the panels side by side, and a grid
    import imageio.v3 as iio
    gifs = sorted(out.glob("sample_*.gif"))
    assert len(gifs) == 4
    g = iio.imread(gifs[0], index=None)
    assert g.shape[0] == 3 and g.shape[2] == 3 * SIZE + 2 * 2      # frame | mask overlay | MV
    assert (out / "grid.png").exists() and (out / "sample_args.json").exists()


def test_stage2_clips_with_flow(phantom, ckpts, tmp_path, stub):
    out = tmp_path / "o"
    assert run_tool(["--ckpt", ckpts["finetune"], "--data", phantom, "--num=3", "--steps=2",
                     "--sampler=dpmpp2m", "--out", out, "--previews=1"])[0] == 0
    d, attrs = _read(out / "samples.h5")
    assert d["video"].shape == (3, FRAMES, SIZE, SIZE)
    assert d["flow"].shape == (3, FRAMES, 2, SIZE, SIZE) and d["flow"].dtype == np.float16
    # stage 2: the first frame's sketch, broadcast over time
    assert all((d["sketch"][k] == d["sketch"][k][:1]).all() for k in range(3))
    assert d["conditions"][0].decode() == "text,image,sketch,mask,mv,flow"
    assert attrs["stage"] == "finetune"


def test_cmr_volumes(cmr_data, ckpts, tmp_path, stub):
    out = tmp_path / "o"
    assert run_tool(["--ckpt", ckpts["cmr"], "--data", cmr_data, "--num=2", "--steps=2", "--out", out])[0] == 0
    d, attrs = _read(out / "samples.h5")
    assert d["video"].shape == (2, FRAMES, SIZE, SIZE)
    assert set(d) >= {"mask", "mask_valid"} and "mv" not in d and "sketch" not in d
    assert json.loads(attrs["labels"])["3"] == "RV"


# -------------------------------------------------------------------- conditions from files

def test_conditions_from_files(phantom, ckpts, tmp_path, stub):
    import imageio.v3 as iio
    with h5py.File(phantom / "test.h5") as f:
        masks, frame, sk = f["mask"][0], f["video"][0, 0], f["sketch"][0, 0]
    big = np.stack([np.kron(m, np.ones((2, 2), np.uint8)) for m in masks])       # 64 px: resized (nearest)
    mdir = tmp_path / "masks"
    mdir.mkdir()
    for i, m in enumerate(big):
        iio.imwrite(mdir / f"{i:02d}.png", m)
    iio.imwrite(tmp_path / "prior.png", frame)
    iio.imwrite(tmp_path / "sketch.png", sk)
    out = tmp_path / "o"
    rc = run_tool(["--ckpt", ckpts["finetune"], "--mask", mdir, "--prior", tmp_path / "prior.png",
                   "--sketch", tmp_path / "sketch.png", "--prompt=An ECHO with 2-chamber view.",
                   "--num=2", "--steps=2", "--out", out])[0]
    assert rc == 0
    d, _ = _read(out / "samples.h5")
    assert d["video"].shape == (2, FRAMES, SIZE, SIZE)
    np.testing.assert_array_equal(d["mask"][0], masks)
    assert list(d["source_index"]) == [-1, -1]
    assert d["conditions"][0].decode() == "text,image,sketch,mask,mv"      # mv derived from the mask
    from data_prep.conditions import mv_image, mv_points
    np.testing.assert_array_equal(d["mv"][0, 1], mv_image(mv_points(masks[1]), SIZE))
    assert d["text"][0].decode() == "An ECHO with 2-chamber view."
    assert d["mask_valid"].all()
    # the two samples share conditions and differ only by seed
    assert not (d["video"][0] == d["video"][1]).all()


def test_file_mask_overrides_dataset_and_subset_drops_rest(phantom, ckpts, tmp_path, stub):
    m = np.zeros((FRAMES, SIZE, SIZE), np.uint8)
    m[:, 8:20, 8:20] = 1
    m[:, 20:28, 8:20] = 3
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "o"
    assert run_tool(["--ckpt", ckpts["pretrain"], "--data", phantom, "--mask", tmp_path / "m.npy",
                     "--conditions=text,mask", "--num=2", "--steps=2", "--out", out])[0] == 0
    d, _ = _read(out / "samples.h5")
    assert (d["mask"][:, 0] == m[0]).all() and list(d["source_index"]) == [-1, -1]


def test_dropped_conditions_match_absent(tmp_path):
    """Leaving a condition out of --conditions is the Conditioner's drop, not another input: the
    same sample with guidance 1 over {text} equals a batch that never held the other conditions."""
    cfg = tiny_cfg()
    parts = stub_parts(cfg)
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[0, 4:20, 4:20] = 1
    full = S.make_job(0, 5, -1, 1, text="a", mask=mask, video=False)
    bare = S.make_job(0, 5, -1, 1, text="a", video=False)
    spec = S.GuidanceSpec.parse("1.0")
    z_a, _ = S.generate(parts, cfg, [full], steps=2, sampler="ddim", eta=0, guidance=spec, used=("text",))
    z_b, _ = S.generate(parts, cfg, [bare], steps=2, sampler="ddim", eta=0, guidance=spec, used=("text",))
    z_c, _ = S.generate(parts, cfg, [full], steps=2, sampler="ddim", eta=0, guidance=spec, used=("text", "mask"))
    np.testing.assert_allclose(z_a, z_b, atol=1e-6)
    assert not torch.allclose(z_a, z_c)


def test_merge_parts_order(tmp_path):
    paths = []
    for r in range(3):
        p = tmp_path / f"p{r}.h5"
        with S.PartWriter(p, 1, 8, ()) as w:
            for k in range(r, 7, 3):
                job = S.make_job(k, k, k, 1, video=False)
                w.add(job, np.full((1, 8, 8), k, np.uint8), {"k": k}, "")
        paths.append(p)
    S.merge_parts(paths, tmp_path / "all.h5", {"seed": 0})
    with h5py.File(tmp_path / "all.h5") as f:
        assert list(f["video"][:, 0, 0, 0]) == list(range(7))
        assert list(f["source_index"][()]) == list(range(7))


# ------------------------------------------------------- end to end: the real models and loader

SHRINK = ["--image_size=32", "--vae_channels=16,32", "--vae_norm_groups=8", "--unet_channels=32,32",
          "--attn_levels=False,True", "--norm_groups=8", "--heads=2", "--context_dim=32", "--text_width=32",
          "--text_layers=1", "--text_heads=2", "--text_tokens=16", "--prior_tokens=4", "--prior_dim=32",
          "--cond_channels=8,16", "--unet_layers=1", "--timesteps=100"]


def real_ckpt(path, stage, extra=(), ema_noise=0.0):
    """A checkpoint of the real LatentDiffusion model (random weights), saved by heartbeat.checkpoint."""
    from heartbeat.checkpoint import save_weights
    from heartbeat.models import build_model
    cfg = get_config("tiny", SHRINK + [f"--stage={stage}", *extra])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():   # random weights everywhere (zero-init layers would make every input alike)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {n: p.detach() + ema_noise * torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    save_weights(path, model.state_dict(), ema, cfg, step=3)
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    return {"pretrain": real_ckpt(d / "ckpt-0000003.safetensors", "pretrain", ema_noise=0.05),
            "finetune": real_ckpt(d / "s2.safetensors", "finetune",
                                  ["--temporal", "--conditions=text,image,sketch,mask,mv,flow"]),
            "dir": d}


def test_real_two_ranks_equal_one_rank_stage2(phantom, real, tmp_path):
    """Same seeds, same clips on 1 or 2 ranks: bit-identical when every sample's batch is the same
    (--batch=1); with other batch mixes, equal up to float32 rounding of the batched kernels."""
    common = ["--ckpt", real["finetune"], "--data", phantom, "--split=train", "--num=3", "--steps=2",
              "--frames=3", "--save_latents", "--previews=0", "--guidance=2.0", "--sampler=ddpm"]
    torch.set_num_threads(1)                                   # as the spawned ranks
    assert run_tool(common + ["--batch=1", "--out", tmp_path / "w1"])[0] == 0
    run_ranks(common + ["--batch=1", "--out", tmp_path / "w2"], 2, stub=False)
    run_ranks(common + ["--batch=2", "--out", tmp_path / "w2b"], 2, stub=False)
    (a, _), (b, _), (c, _) = (_read(tmp_path / n / "samples.h5") for n in ("w1", "w2", "w2b"))
    assert a["video"].shape == (3, 3, SIZE, SIZE)
    np.testing.assert_array_equal(a["latent_sample"], b["latent_sample"])
    np.testing.assert_array_equal(a["video"], b["video"])
    np.testing.assert_allclose(a["latent_sample"], c["latent_sample"], atol=1e-5, rtol=1e-5)
    assert np.abs(a["video"].astype(int) - c["video"].astype(int)).max() <= 1
    assert a["video"].std() > 0 and not (a["video"][0] == a["video"][1]).all()


def test_real_cli_plain_python_stage1_and_ema(phantom, real, tmp_path):
    """`python tools/sample.py` on a run folder (newest ckpt), EMA weights by default."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    outs = {}
    for name, extra in (("ema", []), ("raw", ["--no_ema"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, str(ROOT / "tools/sample.py"), f"--ckpt={real['dir']}",
                            f"--data={phantom}", "--num=2", "--steps=2", "--frames=2", f"--out={out}",
                            "--save_latents", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        outs[name] = _read(out / "samples.h5")
    (d, attrs), (raw, _) = outs["ema"], outs["raw"]
    assert d["video"].shape == (2, 2, SIZE, SIZE) and attrs["stage"] == "pretrain"
    assert attrs["checkpoint"].endswith("ckpt-0000003.safetensors") and attrs["ema"]
    assert not np.allclose(d["latent_sample"], raw["latent_sample"])       # --no_ema loads other weights
    # a user mistake through the real CLI: one line, exit 2, no traceback
    r = subprocess.run([sys.executable, str(ROOT / "tools/sample.py"), f"--ckpt={real['dir']}",
                        f"--data={phantom}", "--conditions=flow", f"--out={tmp_path / 'x'}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "not trained with flow" in r.stderr


def test_real_loader_rejects_weights_that_do_not_fit(phantom, ckpts, tmp_path, capsys):
    """A file with HeartBeat metadata whose tensors do not build the model: one error line."""
    rc, err = run_tool(["--ckpt", ckpts["pretrain"], "--data", phantom, "--num=1", "--steps=2",
                        "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.startswith("error: --ckpt=") and "does not fit" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_real_unconditional_and_compositional(phantom, real, tmp_path):
    out = tmp_path / "u"
    assert run_tool(["--ckpt", real["pretrain"], "--num=2", "--steps=2", "--out", out, "--previews=0"])[0] == 0
    d, attrs = _read(out / "samples.h5")
    assert d["video"].shape == (2, 1, SIZE, SIZE) and attrs["conditions"] == ""
    assert not d["mask_valid"].any() and list(d["source_index"]) == [-1, -1]
    # dropped (keep = False) is absent: a split's clips with every condition dropped (--conditions=none),
    # or given but unguided (--guidance=0), give the same samples as no conditions at all
    base = ["--ckpt", real["pretrain"], "--num=2", "--steps=2", "--previews=0", "--save_latents"]
    assert run_tool(base + ["--out", tmp_path / "u0"])[0] == 0
    assert run_tool(base + ["--data", phantom, "--conditions=none", "--out", tmp_path / "u1"])[0] == 0
    assert run_tool(base + ["--data", phantom, "--conditions=text,image,mask", "--guidance=0",
                            "--out", tmp_path / "u2"])[0] == 0
    assert run_tool(base + ["--data", phantom, "--conditions=text,image,mask", "--out", tmp_path / "u3"])[0] == 0
    u0, u1, u2, u3 = (_read(tmp_path / n / "samples.h5")[0]["latent_sample"] for n in ("u0", "u1", "u2", "u3"))
    np.testing.assert_array_equal(u0, u1)
    np.testing.assert_allclose(u0, u2, atol=1e-6)
    assert not np.allclose(u0, u3, atol=1e-3)                 # the conditions do act
    m = np.zeros((2, SIZE, SIZE), np.uint8)
    m[:, 6:20, 10:22] = 1
    m[:, 20:26, 10:22] = 3
    np.save(tmp_path / "m.npy", m)
    out = tmp_path / "c"
    assert run_tool(["--ckpt", real["pretrain"], "--mask", tmp_path / "m.npy", "--prompt=An ECHO",
                     "--guidance=mask+mv=2,text=1.5", "--steps=2", "--out", out, "--previews=1"])[0] == 0
    d, _ = _read(out / "samples.h5")
    assert d["video"].shape == (1, 2, SIZE, SIZE) and d["conditions"][0].decode() == "text,mask,mv"
