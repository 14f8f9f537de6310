"""Conditioner: shapes, zero-init, dropped == absent, per-sample dropout == separate runs,
sample_keep rates, prior tokens vs prior images, stage-2 sketch broadcast, bad input."""
import pytest
import torch
import torch.nn as nn

from heartbeat.conditions import Conditioner, GlobalAdapter, LocalEncoder
from heartbeat.config import get_config
from heartbeat.unet import UNet

from test_unet import small_cfg, wake

S = 32  # pixel size in these tests (tiny VAE factor 4 -> latent 8)


class FakeText(nn.Module):
    """The text-encoder interface: tokenize(list[str]) -> (B, Lt) ids; forward(ids) -> (B, Lt, width)."""

    def __init__(self, tokens, width):
        super().__init__()
        self.tokens = tokens
        self.emb = nn.Embedding(258, width)
        self.pos = nn.Parameter(torch.randn(tokens, width))

    def tokenize(self, texts):
        ids = torch.zeros(len(texts), self.tokens, dtype=torch.long)
        for i, s in enumerate(texts):
            b = [256] + list(s.encode())[: self.tokens - 2] + [257]
            ids[i, : len(b)] = torch.tensor(b)
        return ids

    def forward(self, ids):
        return self.emb(ids) + self.pos


class FakePrior(nn.Module):
    """The image-prior interface: (B, C, H, W) in [-1, 1] -> (B, prior_tokens, prior_dim)."""

    def __init__(self, cfg):
        super().__init__()
        side = int(cfg.prior_tokens ** 0.5)
        self.conv = nn.Conv2d(cfg.in_channels, cfg.prior_dim, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(side)

    def forward(self, x):
        return self.pool(self.conv(x)).flatten(2).transpose(1, 2)  # (B, tokens, dim)


def make(conditions=("text", "image", "sketch", "mask", "mv"), seed=0, **kw):
    cfg = small_cfg(image_size=S, conditions=tuple(conditions), **kw)
    torch.manual_seed(seed)
    cond = Conditioner(cfg, FakeText(cfg.text_tokens, cfg.context_dim), FakePrior(cfg))
    wake(cond)  # give any all-zero parameter random values so the tests can fail
    return cfg, cond.eval()


def batch(cfg, B=3, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if frames is None else (B, frames)
    return dict(
        text=[f"An ECHO with {2 + (i % 2) * 2}-chamber view." for i in range(B)],
        prior=torch.rand(B, cfg.in_channels, S, S, generator=g) * 2 - 1,
        sketch=(torch.rand(*lead, 1, S, S, generator=g) > 0.8).float(),
        mask=torch.randint(0, cfg.mask_classes, (*lead, S, S), generator=g),
        mv=(torch.rand(*lead, 1, S, S, generator=g) > 0.9).float(),
        flow=torch.randn(*lead, 2, S, S, generator=g) * 3)


def same(a, b):
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a, b)


def test_shapes_image_and_video():
    cfg, cond = make(conditions=("text", "image", "sketch", "mask", "mv", "flow"))
    h = cfg.latent_size
    with torch.no_grad():
        out = cond(batch(cfg))
        assert out["text"].shape == (3, cfg.text_tokens, cfg.context_dim)
        assert out["image"].shape == (3, cfg.text_tokens, cfg.context_dim)
        assert out["local"].shape == (3, cfg.local_channels, h, h)
        vid = cond(batch(cfg, frames=4))
        assert vid["local"].shape == (3, 4, cfg.local_channels, h, h)


def test_presets_build_and_encode_to_latent_size():
    for preset in ("tiny", "small", "sd15"):
        cfg = get_config(preset).model
        enc = LocalEncoder(cfg.mask_classes, cfg)
        x = torch.zeros(1, cfg.mask_classes, cfg.image_size, cfg.image_size)
        assert enc(x).shape == (1, cfg.local_channels, cfg.latent_size, cfg.latent_size)
        ad = GlobalAdapter(cfg).eval()
        assert ad(torch.randn(2, cfg.prior_tokens, cfg.prior_dim)).shape == (2, cfg.text_tokens, cfg.context_dim)


def test_fresh_model_ignores_local_conditions_but_they_train():
    """A fresh UNet ignores local conditions exactly (its extra conv_in channels are zero), yet the
    local path gets gradients: two zero-initialised layers in series (encoder output conv and conv_in)
    would both stay exactly zero forever, and sketch/mask/MV would never be learned."""
    cfg = small_cfg(image_size=S)
    torch.manual_seed(0)
    cond = Conditioner(cfg, FakeText(cfg.text_tokens, cfg.context_dim), FakePrior(cfg))
    unet = UNet(cfg)
    b = {k: v for k, v in batch(cfg).items() if k in ("sketch", "mask", "mv")}
    z = torch.randn(3, 4, cfg.latent_size, cfg.latent_size)
    t = torch.tensor([10, 500, 900])
    ctx = cond(b)
    assert ctx["local"].abs().max() > 0  # the encoders produce features...
    with torch.no_grad():  # ...which a fresh UNet ignores exactly
        assert torch.equal(unet(z, t, local=ctx["local"]), unet(z, t))
    conv_in = unet.input_blocks[0][0]
    with torch.no_grad():  # SD's output conv starts at zero too; training's first step moves it
        unet.out[2].weight.normal_(0, 0.02)
    unet(z, t, local=ctx["local"]).square().mean().backward()
    assert conv_in.weight.grad[:, 4:].abs().max() > 0, "conv_in's local channels get no gradient"
    with torch.no_grad():  # one step on conv_in, then every encoder must get a gradient too
        conv_in.weight[:, 4:] -= 0.1 * conv_in.weight.grad[:, 4:].sign()
    cond.zero_grad()
    unet(z, t, **cond(b)).square().mean().backward()
    for name in ("sketch", "mask", "mv"):
        last = [m for m in cond.local[name].modules() if isinstance(m, nn.Conv2d)][-1]
        assert last.weight.grad is not None and last.weight.grad.abs().max() > 0, f"{name} encoder gets no gradient"


def test_dropped_equals_absent():
    cfg, cond = make()
    b = batch(cfg)
    B = 3
    with torch.no_grad():
        for name in ("text", "image", "sketch", "mask", "mv"):
            keep = {n: torch.ones(B, dtype=torch.bool) for n in cfg.conditions}
            keep[name] = torch.zeros(B, dtype=torch.bool)
            dropped = cond(b, keep)
            key = "prior" if name == "image" else name
            absent = cond({k: v for k, v in b.items() if k != key})
            for k in ("text", "image", "local"):
                assert same(dropped[k], absent[k]), (name, k)
        # a name missing from keep = dropped for all; everything dropped = nothing given
        none = cond(b, {})
        empty = cond({}, batch_size=B)
        for k in ("text", "image", "local"):
            assert same(none[k], empty[k]), k
        assert none["image"] is None and none["local"] is None
        assert same(none["text"], cond.text_encoder(cond.text_encoder.tokenize([""] * B)))
        # conditions outside cfg.conditions are never used
        full = cond(b)
        no_flow = cond({k: v for k, v in b.items() if k != "flow"})
        assert same(full["local"], no_flow["local"])


def test_per_sample_dropout_equals_separate_runs():
    cfg, cond = make()
    unet = wake(UNet(cfg)).eval()
    with torch.no_grad():  # let the image branch and the local channels act
        unet.input_blocks[0][0].weight[:, cfg.latent_channels:].normal_(0, 0.2)
    B = 4
    b = batch(cfg, B=B)
    keep = {"text": torch.tensor([1, 0, 1, 0]), "image": torch.tensor([0, 1, 1, 0]),
            "sketch": torch.tensor([1, 1, 0, 0]), "mask": torch.tensor([0, 1, 0, 1]),
            "mv": torch.tensor([1, 0, 0, 0])}
    keep = {k: v.bool() for k, v in keep.items()}
    z = torch.randn(B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    t = torch.tensor([1, 200, 500, 999])
    with torch.no_grad():
        together = unet(z, t, **cond(b, keep))
        for i in range(B):
            sub = {k: ([v[i]] if k == "text" else v[i:i + 1]) for k, v in b.items()
                   if k == "flow" or bool(keep.get("image" if k == "prior" else k, torch.zeros(B))[i])}
            alone = unet(z[i:i + 1], t[i:i + 1], **cond(sub, batch_size=1))
            assert (alone - together[i:i + 1]).abs().max() < 1e-5, i
    assert (together[0] - together[3]).abs().max() > 1e-3


@pytest.mark.parametrize("frames", [None, 4])
@pytest.mark.parametrize("training", [False, True])
def test_for_sets_equals_the_repeated_batch(frames, training):
    """Conditioner.for_sets (each encoder once on the B examples) gives what forward gives on the
    batch repeated over the condition sets, row k*B + b = example b under set k, for frames and clips
    (the stage-2 sketch is per clip), with per-example dropout, in eval and in training mode (where
    the encoders run for dropped examples too)."""
    from heartbeat.distill import teacher_sets
    from heartbeat.guidance import repeat_sets
    names = ("text", "image", "sketch", "mask", "mv") + (() if frames is None else ("flow",))
    cfg, cond = make(conditions=names)
    cond.train(training)
    B = 4
    b = batch(cfg, B=B, frames=frames)
    keep = {"text": [1, 0, 1, 1], "image": [0, 1, 1, 0], "sketch": [1, 1, 0, 0], "mask": [0, 1, 0, 1],
            "mv": [1, 0, 0, 0], "flow": [1, 1, 0, 1]}
    keep = {n: torch.tensor(v).bool() for n, v in keep.items() if n in names}
    for sets in (teacher_sets(names), [frozenset(), frozenset({"mask", "text"})], [frozenset()]):
        K = len(sets)
        rows = {n: torch.tensor([n in s for s in sets]).repeat_interleave(B) & keep[n].repeat(K) for n in keep}
        with torch.no_grad():
            want = cond({k: repeat_sets(v, K) for k, v in b.items()}, rows, batch_size=K * B)
            got = cond.for_sets(b, keep, sets)
        for k in ("text", "image", "local"):
            assert (want[k] is None) == (got[k] is None), (sets, k)
            if want[k] is not None:
                assert got[k].shape == want[k].shape, (sets, k)
                assert (got[k] - want[k]).abs().max() <= 1e-5 * (1 + want[k].abs().max()), (sets, k)
        if len(sets) > 2:                     # the teacher's sets: the local features are not all zero
            assert want["local"].abs().max() > 0 and want["text"].std(0).max() > 0


def test_sample_keep_rates_and_conditions():
    cfg, cond = make(drop_prob=0.3, drop_all_prob=0.2)
    B = 20000
    keep = cond.sample_keep(B, torch.Generator().manual_seed(1))
    again = cond.sample_keep(B, torch.Generator().manual_seed(1))
    assert all(torch.equal(keep[k], again[k]) for k in keep)
    for n in cfg.conditions:
        assert keep[n].dtype == torch.bool and keep[n].shape == (B,)
        assert abs(keep[n].float().mean().item() - 0.7 * 0.8) < 0.02, n
    assert not keep["flow"].any()  # not in cfg.conditions
    none = ~torch.stack([keep[n] for n in cfg.conditions]).any(0)
    assert abs(none.float().mean().item() - (0.2 + 0.8 * 0.3 ** 5)) < 0.02
    a, b = keep["text"].float(), keep["mask"].float()  # independent given drop-all
    assert abs((a * b).mean().item() - 0.8 * 0.7 * 0.7) < 0.02


def test_prior_tokens_cache_equals_prior_image():
    cfg, cond = make()
    b = batch(cfg)
    with torch.no_grad():
        tokens = cond.image_prior(b["prior"])
        cached = dict(b, prior_tokens=tokens)
        del cached["prior"]
        assert torch.allclose(cond(b)["image"], cond(cached)["image"], atol=1e-6)
    assert not any(p.requires_grad for p in cond.image_prior.parameters())


def test_video_sketch_is_first_frame_broadcast_and_masks_per_frame():
    cfg, cond = make(conditions=("sketch", "mask"))
    b = batch(cfg, B=2, frames=3)
    with torch.no_grad():
        only_sketch = cond({"sketch": b["sketch"]})["local"]
        b2 = dict(sketch=b["sketch"].clone())
        b2["sketch"][:, 1:] = 1 - b2["sketch"][:, 1:]
        assert torch.equal(cond(b2)["local"], only_sketch)  # frames 1.. ignored
        assert torch.equal(only_sketch[:, 0], only_sketch[:, 2])
        first = cond({"sketch": b["sketch"][:, 0]})["local"]  # 4-D sketch
        assert torch.equal(first, only_sketch[:, 0])
        masks = cond({"mask": b["mask"]})["local"]
        assert (masks[:, 0] - masks[:, 1]).abs().max() > 0  # per-frame masks differ
        assert torch.allclose(masks[:, 1], cond({"mask": b["mask"][:, 1]})["local"], atol=1e-6)


def test_trainable_parameters_by_stage():
    from heartbeat.stages import get_stage
    cfg, cond = make()
    flow = {id(p) for p in cond.local["flow"].parameters()}
    assert {id(p) for p in cond.parameters_of(get_stage("finetune").trains_encoders)} == flow
    pre = {id(p) for p in cond.parameters_of(get_stage("pretrain").trains_encoders)}
    assert not (pre & flow) and {id(p) for p in cond.adapter.parameters()} <= pre
    assert not any(id(p) in pre for p in cond.image_prior.parameters())


def test_bad_input_raises_clear_errors():
    cfg, cond = make(conditions=("text", "image", "sketch", "mask", "mv", "flow"))
    b = batch(cfg)
    with pytest.raises(ValueError, match="sketch must have shape"):
        cond(dict(b, sketch=b["sketch"][..., :16]))
    with pytest.raises(ValueError, match="mask labels"):
        cond(dict(b, mask=b["mask"] + cfg.mask_classes))
    with pytest.raises(ValueError, match="flow must have shape"):
        cond(dict(b, flow=b["flow"][:, :1]))
    with pytest.raises(ValueError, match="prior_tokens must have shape"):
        cond(dict(b, prior=None, prior_tokens=torch.randn(3, cfg.prior_tokens + 1, cfg.prior_dim)))
    with pytest.raises(ValueError, match=r"keep\['mask'\]"):
        cond(b, {"mask": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="frames"):
        cond(dict(b, mask=batch(cfg, frames=2)["mask"], mv=batch(cfg, frames=3)["mv"]))
    with pytest.raises(ValueError, match="cond_channels"):
        LocalEncoder(1, small_cfg(cond_channels=(8, 8, 8, 8)))


def _global_bn_rank(rank, world, init, x, dy, out):
    import torch.distributed as dist
    from heartbeat.conditions import GlobalBatchNorm1d
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = GlobalBatchNorm1d(x.shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    y = bn.train()(part)
    (y * dy.chunk(world)[rank]).sum().backward()
    for p in bn.parameters():
        dist.all_reduce(p.grad)                      # what DDP does (sum; the global loss is the sum here)
    torch.save({"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                "rm": bn.running_mean, "rv": bn.running_var}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batchnorm_is_the_whole_batchs_batchnorm(tmp_path):
    """2 gloo processes with half a batch each == one nn.BatchNorm1d on the whole batch: outputs, input
    and parameter gradients, running statistics (so DDP / FSDP train the adapter as one process does)."""
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, generator=g) * 3 + 1
    dy = torch.randn(6, 5, 7, generator=g)
    mp.spawn(_global_bn_rank, args=(2, f"file://{tmp_path}/store", x, dy, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm1d(5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    xr = x.clone().requires_grad_(True)
    y = ref.train()(xr)
    (y * dy).sum().backward()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([o["y"] for o in got]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([o["dx"] for o in got]), xr.grad, atol=1e-5, rtol=1e-5)
    for o in got:
        torch.testing.assert_close(o["dw"], ref.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(o["db"], ref.bias.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(o["rm"], ref.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(o["rv"], ref.running_var, atol=1e-5, rtol=1e-5)
    # a plain per-process BatchNorm would not match: the halves' statistics differ
    half = torch.nn.BatchNorm1d(5)
    half.load_state_dict({**ref.state_dict(), "running_mean": torch.zeros(5), "running_var": torch.ones(5),
                          "num_batches_tracked": torch.tensor(0)})
    assert (half.train()(x[:3]) - y[:3]).abs().max() > 1e-2
