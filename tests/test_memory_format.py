"""The memory-format policy (heartbeat/nn.py MEMORY_FORMAT, docs/ARCHITECTURE.md §Tensors): in a forward
of the UNet and of the VAE every conv meets an input and a weight in the one layout, so no conv
re-lays its weights per call (an aten::copy_ inside aten::_convolution, as when SpatialTransformer
handed proj_out a channels-last view and the layout spread through the residual adds)."""
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

from heartbeat.config import get_config
from heartbeat.nn import MEMORY_FORMAT
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
            if not (x.is_contiguous(memory_format=MEMORY_FORMAT)
                    and mod.weight.is_contiguous(memory_format=MEMORY_FORMAT)):
                off.append(f"{name} input strides {x.stride()} shape {tuple(x.shape)}")
        return hook

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
    return cfg, UNet(cfg).eval()


def test_unet_forward_makes_no_weight_copies():
    cfg, unet = _tiny_unet()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, cfg.latent_channels, 8, 8, generator=g)
    text = torch.randn(2, cfg.text_tokens, cfg.context_dim, generator=g)
    off, copies, n = conv_layouts(unet, lambda: unet(z, torch.tensor([10, 700]), text=text))
    assert n > 10  # the hooks saw the convs: the test can fail
    assert not off, f"convs off the memory format {MEMORY_FORMAT}: " + "; ".join(off[:5])
    assert copies == 0, f"{copies} weight copies inside convolutions (re-laid per call)"
    unet.inflate()  # video: frames become batch; the same layout
    zv = torch.randn(1, 3, cfg.latent_channels, 8, 8, generator=g)
    off, copies, _ = conv_layouts(unet, lambda: unet(zv, torch.tensor([10]), text=text[:1]))
    assert not off and copies == 0, off[:5]


def test_vae_forward_makes_no_weight_copies():
    cfg = get_config("tiny").model
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    x = torch.randn(1, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    off, copies, n = conv_layouts(vae, lambda: vae(x, sample=False))
    assert n > 10
    assert not off, f"convs off the memory format {MEMORY_FORMAT}: " + "; ".join(off[:5])
    assert copies == 0, f"{copies} weight copies inside convolutions (re-laid per call)"
