"""Faster teacher sampling (heartbeat/sampling.py, heartbeat/graphs.py): the batched guided call equals
one call per condition set, the conditioner runs once per batch, --compile and CUDA graphs wire
through. CPU; the CUDA-graph test skips without a GPU."""
from __future__ import annotations

import pytest
import torch

from heartbeat import graphs
from heartbeat.config import get_config
from heartbeat.diffusion import Schedule, sample
from heartbeat.guidance import GuidanceSpec, combine
from heartbeat.models import build_model
from heartbeat.sampling import sample_latents

SHRINK = ["--image_size=32", "--vae_channels=16,32", "--vae_norm_groups=8", "--unet_channels=32,32",
          "--attn_levels=False,True", "--norm_groups=8", "--heads=2", "--context_dim=32", "--text_width=32",
          "--text_layers=1", "--text_heads=2", "--text_tokens=16", "--prior_tokens=4", "--prior_dim=32",
          "--cond_channels=8,16", "--unet_layers=1", "--timesteps=100"]


@pytest.fixture(scope="module")
def model():
    cfg = get_config("tiny", SHRINK + ["--stage=pretrain"])
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():     # random weights everywhere (zero-init layers would make every input alike)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, m.eval()


def _cond(cfg, B=2):
    g = torch.Generator().manual_seed(1)
    S = cfg.model.image_size
    return {"text": ["An ECHO with 2-chamber view.", "An ECHO with 4-chamber view."][:B],
            "prior": torch.rand(B, 1, S, S, generator=g) * 2 - 1,
            "mask": torch.randint(0, 4, (B, S, S), generator=g),
            "sketch": (torch.rand(B, 1, S, S, generator=g) > 0.8).float()}


def _sequential(cfg, m, cond, seeds, spec, used, steps):
    """The old path: one conditioner + UNet call per condition set per step, then the guidance sum."""
    C, h = cfg.model.latent_channels, cfg.model.latent_size
    x_T = torch.stack([torch.randn((1, C, h, h), generator=torch.Generator().manual_seed(s)) for s in seeds])[:, 0]
    sets = spec.cond_sets(used)

    def model_fn(z, t):
        preds = []
        for s in sets:
            keep = {n: torch.full((z.shape[0],), n in s) for n in ("text", "image", "sketch", "mask", "mv", "flow")}
            preds.append(m.unet(z, t, **m.conditioner(cond, keep, batch_size=z.shape[0])))
        return combine(torch.stack(preds), spec)

    return sample(model_fn, x_T, steps=steps, sampler="ddim", schedule=Schedule.from_config(cfg.model),
                  prediction=cfg.model.prediction)


@pytest.mark.parametrize("text", ["3.0", "mask=2,text=1,image=0.5"])
def test_batched_guidance_equals_one_call_per_set(model, text):
    cfg, m = model
    cond, used, spec = _cond(cfg), ("text", "image", "sketch", "mask"), GuidanceSpec.parse(text)
    parts = {"unet": m.unet, "conditioner": m.conditioner}
    fast = sample_latents(parts, cfg, cond, [3, 4], 1, False, steps=4, guidance=spec, used=used)
    slow = _sequential(cfg, m, cond, [3, 4], spec, used, steps=4)
    torch.testing.assert_close(fast[:, 0], slow, atol=2e-5, rtol=1e-5)
    assert fast.abs().max() > 0.1


def test_contexts_are_encoded_once_per_batch_not_per_step(model, monkeypatch):
    cfg, m = model
    calls = {"conditioner": 0, "text": 0, "prior": 0, "unet": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(m.conditioner, "forward", counting("conditioner", m.conditioner.forward))
    monkeypatch.setattr(m.conditioner.text_encoder, "forward", counting("text", m.conditioner.text_encoder.forward))
    monkeypatch.setattr(m.conditioner.image_prior, "forward", counting("prior", m.conditioner.image_prior.forward))
    monkeypatch.setattr(m.unet, "forward", counting("unet", m.unet.forward))
    parts = {"unet": m.unet, "conditioner": m.conditioner}
    sample_latents(parts, cfg, _cond(cfg), [0, 1], 1, False, steps=6, guidance=GuidanceSpec.parse("mask=2,text=1,image=1"),
                   used=("text", "image", "mask"))
    assert calls == {"conditioner": 1, "text": 1, "prior": 1, "unet": 6}   # one batched UNet call per step


def test_compile_flag_wires_through_once_per_model(model, monkeypatch):
    """--compile: the UNet goes through torch.compile once per model (here a stand-in that records the
    call: compiling on a loaded 2-core CPU takes minutes), and the results do not change."""
    cfg, m = model
    made = []
    monkeypatch.setattr(graphs.torch, "compile", lambda mod: made.append(mod) or mod)
    monkeypatch.setattr(graphs, "_COMPILED", graphs.weakref.WeakKeyDictionary())
    parts = {"unet": m.unet, "conditioner": m.conditioner}
    kw = dict(steps=2, guidance=GuidanceSpec.parse("2.0"), used=("text", "mask"))
    a = sample_latents(parts, cfg, _cond(cfg), [0, 1], 1, False, compile=True, **kw)
    b = sample_latents(parts, cfg, _cond(cfg), [0, 1], 1, False, compile=True, **kw)
    c = sample_latents(parts, cfg, _cond(cfg), [0, 1], 1, False, **kw)
    assert made == [m.unet]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert get_config("tiny", ["--compile"]).train.compile


def test_cuda_graph_refuses_the_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        graphs.GraphedCall(lambda x: x * 2, torch.zeros(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_sampling_equals_eager(model):
    cfg, m = model
    m = m.to("cuda")
    parts = {"unet": m.unet, "conditioner": m.conditioner}
    cond = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in _cond(cfg).items()}
    kw = dict(steps=4, guidance=GuidanceSpec.parse("mask=2,text=1"), used=("text", "mask"), device="cuda")
    eager = sample_latents(parts, cfg, cond, [0, 1], 1, False, **kw)
    graphed = sample_latents(parts, cfg, cond, [0, 1], 1, False, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, atol=2e-2, rtol=2e-2)       # bf16 autocast in both
    m.to("cpu")
