"""The memory-format policy (heartbeat/nn.py MEMORY_FORMAT, docs/ARCHITECTURE.md §Tensors): in a forward
of the UNet and of the VAE every conv meets an input and a weight in the one layout, so no conv
re-lays its weights per call (an aten::copy_ inside aten::_convolution, as when SpatialTransformer
handed proj_out a channels-last view and the layout spread through the residual adds). The other
policy (channels-last) holds the same invariant and gives the same outputs."""
import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from heartbeat.config import get_config
import heartbeat.nn
from heartbeat.unet import UNet
from heartbeat.vae import AutoencoderKL

def conv_layouts(model, fn):
    """Run fn() (no grad) under the profiler. Returns (names of convs whose input or weight is not in
    MEMORY_FORMAT, number of copies of a conv's weight made inside that convolution, convs run).
    A weight copy is an aten::copy_ / aten::clone under aten::convolution whose tensor has the weight's
    shape (the slow CPU path's bias broadcast copies have the output's shape and do not count)."""
    off, seen = [], []

    def check(name):
        def hook(mod, args):
            seen.append(name)
            x = args[0]
            if not (x.is_contiguous(memory_format=fmt) and mod.weight.is_contiguous(memory_format=fmt)):
                off.append(f"{name} input strides {x.stride()} shape {tuple(x.shape)}")
        return hook

    fmt = heartbeat.nn.MEMORY_FORMAT
    handles = [m.register_forward_pre_hook(check(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
    finally:
        for h in handles:
            h.remove()
    copies = 0
    for e in prof.events():
        if e.name in ("aten::copy_", "aten::clone"):
            p = e.cpu_parent
            while p is not None and p.name != "aten::convolution":
                p = p.cpu_parent
            copies += p is not None and e.input_shapes[0] == p.input_shapes[1]  # (input, weight, bias, ...)
    return off, copies, len(seen)


def _tiny_unet():
    cfg = get_config("tiny").model
    for k, v in dict(unet_channels=(32, 64), unet_layers=1, attn_levels=(True, True), heads=4, norm_groups=8,
                     context_dim=32, text_tokens=8, attn_backend="sdpa").items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():  # wake the zero-inits (proj_out, out.2): a real output to compare
        for p in unet.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return cfg, unet


@pytest.fixture(params=["nchw", "channels_last"])
def policy(request, monkeypatch):
    """Each test under the policy (nchw) and under the alternative the constant may be set to."""
    if request.param == "channels_last":
        monkeypatch.setattr(heartbeat.nn, "MEMORY_FORMAT", torch.channels_last)
    return request.param


def test_unet_forward_makes_no_weight_copies(policy):
    cfg, unet = _tiny_unet()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, cfg.latent_channels, 8, 8, generator=g)
    text = torch.randn(2, cfg.text_tokens, cfg.context_dim, generator=g)
    off, copies, n = conv_layouts(unet, lambda: unet(z, torch.tensor([10, 700]), text=text))
    assert n > 10  # the hooks saw the convs: the test can fail
    assert not off, f"convs off the memory format {heartbeat.nn.MEMORY_FORMAT}: " + "; ".join(off[:5])
    assert copies == 0, f"{copies} weight copies inside convolutions (re-laid per call)"
    unet.inflate()  # video: frames become batch; the same layout
    zv = torch.randn(1, 3, cfg.latent_channels, 8, 8, generator=g)
    off, copies, _ = conv_layouts(unet, lambda: unet(zv, torch.tensor([10]), text=text[:1]))
    assert not off and copies == 0, off[:5]


def test_policies_give_the_same_output(monkeypatch):
    cfg, unet = _tiny_unet()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, cfg.latent_channels, 8, 8, generator=g)
    text = torch.randn(2, cfg.text_tokens, cfg.context_dim, generator=g)
    with torch.no_grad():
        a = unet(z, torch.tensor([10, 700]), text=text)
        monkeypatch.setattr(heartbeat.nn, "MEMORY_FORMAT", torch.channels_last)
        heartbeat.nn.layout_weights(unet)
        assert unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
        b = unet(z, torch.tensor([10, 700]), text=text)
    assert a.abs().max() > 1e-2 and b.is_contiguous()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_vae_forward_makes_no_weight_copies(policy):
    cfg = get_config("tiny").model
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    off, copies, n = conv_layouts(vae, lambda: vae(x, sample=False))
    assert n > 10
    assert not off, f"convs off the memory format {heartbeat.nn.MEMORY_FORMAT}: " + "; ".join(off[:5])
    assert copies == 0, f"{copies} weight copies inside convolutions (re-laid per call)"


def test_temporal_layer_makes_no_copies(monkeypatch):
    """norm_temporal and attn_temporal run on the (B, F, h*w, C) tokens as the spatial layers leave
    them (docs/ARCHITECTURE.md §Tensors): from norm_temporal's input to attn_temporal's output no
    aten::copy_ / clone runs outside the attention op itself, and the attention gets views of the
    projections. (Before, norm_temporal got a (B, h*w, F, C) transpose, which LayerNorm copied.)"""
    import heartbeat.attention as A
    from torch.autograd.profiler import record_function
    from heartbeat.unet import BasicTransformerBlock

    got = []

    real = A.temporal_attention

    def op(q, k, v, scale=None, backend="auto"):   # the dispatcher: its internals do not count
        got.append(q)
        with record_function("attention_op"):
            return real(q, k, v, scale, backend)
    monkeypatch.setattr(A, "temporal_attention", op)
    torch.manual_seed(0)
    blk = BasicTransformerBlock(16, 2, 8, backend="sdpa")   # SDPA returns (B, F, H, D) dense: o views back
    blk.add_temporal(8)
    region = []
    blk.norm_temporal.register_forward_pre_hook(lambda m, a: region.append(record_function("temporal").__enter__()))
    blk.attn_temporal.register_forward_hook(lambda m, a, o: region.pop().__exit__(None, None, None))
    B, F, L = 2, 4, 6
    x = torch.randn(B * F, L, 16)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        blk(x, frames=F)
    copies, inside = [], 0
    for e in prof.events():
        chain, p = [], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        if "temporal" in chain and "attention_op" not in chain and e.name != "attention_op":
            inside += 1
            if e.name in ("aten::copy_", "aten::clone", "aten::contiguous") and chain[0] != "aten::addmm":
                # (addmm starts its output as a copy of the bias: a Linear's own write, not a layout copy)
                copies.append(" < ".join([e.name] + chain))
    assert inside >= 5    # the region saw the layer's ops (norm, projections, add): the test can fail
    assert not copies, "copies around the temporal layer: " + "; ".join(copies[:3])
    q = got[0]
    assert q.shape == (B, F, L * 2, 8) and q._base is not None   # a view of the projection, not a copy
