"""AutoencoderKL: SD1.5 parameter count and names, equality with diffusers' AutoencoderKL, the loss."""
import dataclasses

import pytest
import torch

from heartbeat.config import ModelConfig, get_config
from heartbeat.vae import AutoencoderKL, laplacian_pyramid, ssim, vae_loss
from heartbeat.weights import diffusers_vae_to_ldm, load_into

TINY = dict(vae_channels=(8, 16, 16), vae_layers=2, in_channels=3, latent_channels=4, vae_norm_groups=4,
            attn_backend="math")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_sd15_parameter_count_and_names():
    with torch.device("meta"):
        vae = AutoencoderKL(get_config("sd15").model)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    sd = vae.state_dict()
    for k, shape in [("encoder.down.0.downsample.conv.weight", (128, 128, 3, 3)),
                     ("encoder.down.1.block.0.nin_shortcut.weight", (256, 128, 1, 1)),
                     ("encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
                     ("encoder.conv_out.weight", (8, 512, 3, 3)),
                     ("quant_conv.weight", (8, 8, 1, 1)), ("post_quant_conv.weight", (4, 4, 1, 1)),
                     ("decoder.up.3.block.2.conv2.weight", (512, 512, 3, 3)),
                     ("decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
                     ("decoder.up.1.upsample.conv.weight", (256, 256, 3, 3)),
                     ("decoder.conv_out.weight", (3, 128, 3, 3))]:
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    with torch.device("meta"):
        post = vae.encode(torch.zeros(1, 3, 256, 256))
        assert post.mean.shape == (1, 4, 32, 32) and vae.decode(post.mean).shape == (1, 3, 256, 256)


def _diffusers_tiny():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                                  layers_per_block=2, latent_channels=4, norm_num_groups=4).eval()
    with torch.no_grad():  # make every parameter non-trivial (norm affines start at 1/0)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.mark.parametrize("names", ["new", "old"])
def test_matches_diffusers(names):
    ref = _diffusers_tiny()
    sd = ref.state_dict()
    if names == "old":  # diffusers < 0.14 attention names
        ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        sd2 = {}
        for k, v in sd.items():
            for a, b in ren.items():
                k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
            sd2[k] = v
        sd = sd2
        assert any(".query." in k for k in sd)
    ours = AutoencoderKL(ModelConfig(**TINY)).eval()
    load_into(ours, diffusers_vae_to_ldm(sd), "diffusers")
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rp, op = ref.encode(x).latent_dist, ours.encode(x)
        assert op.mean.shape == (2, 4, 8, 6)
        assert _rel(op.mean, rp.mean) < 1e-4 and _rel(op.logvar, rp.logvar) < 1e-4
        assert _rel(op.kl(), rp.kl()) < 1e-4
        z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(2))
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-4


def test_posterior_sampling_is_seeded_and_clamped():
    vae = AutoencoderKL(ModelConfig(**TINY))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    post = vae.encode(x)
    a, b = post.sample(torch.Generator().manual_seed(3)), post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, post.sample(torch.Generator().manual_seed(4)))
    from heartbeat.vae import DiagonalGaussian
    p = DiagonalGaussian(torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], 1))
    assert p.logvar.max() == 20.0
    assert torch.allclose(DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl(), torch.zeros(1))


def test_ssim_and_pyramid():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert abs(ssim(x, x).item() - 1) < 1e-5
    assert ssim(x, x + 0.5 * torch.randn_like(x)) < 0.7
    # a blurred copy: small L1 relative to its band-pass error (the term that keeps speckle)
    blur = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    bands = laplacian_pyramid(x, 4)
    assert len(bands) == 4 and bands[-1].shape[-1] == 4
    lap_err = (laplacian_pyramid(blur, 4)[0] - bands[0]).abs().mean()
    assert lap_err > 0.5 * (blur - x).abs().mean()


def test_loss_trains():
    torch.manual_seed(0)
    cfg = ModelConfig(**dict(TINY, in_channels=1))
    vae = AutoencoderKL(cfg)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    r = torch.tensor([0.3, 0.5, 0.7, 0.4])[:, None, None]
    x = torch.where(xx ** 2 + yy ** 2 < r ** 2, 0.8, -0.6)[:, None] + 0.1 * torch.randn(4, 1, 16, 16)  # disks + speckle
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss, logs = vae_loss(vae, x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else logs["loss"].item()
    assert set(logs) >= {"loss", "l1", "lap", "ssim", "kl"} and all(torch.isfinite(v) for v in logs.values())
    assert logs["loss"].item() < 0.6 * first


def test_bad_input_messages():
    vae = AutoencoderKL(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="3 channels"):
        vae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of the VAE factor 4"):
        vae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match="latent_channels"):
        vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="vae_norm_groups"):
        AutoencoderKL(ModelConfig(**dict(TINY, vae_channels=(6, 16))))
    cfg = dataclasses.replace(get_config("tiny").model)
    assert AutoencoderKL(cfg).encode(torch.zeros(1, 1, 64, 64)).mean.shape == (1, 4, 16, 16)
