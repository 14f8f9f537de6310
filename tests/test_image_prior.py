"""Image priors: SAM ViT-B encoder vs segment_anything's ImageEncoderViT, preprocessing, the VAE prior."""
import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch

from heartbeat.config import get_config
from heartbeat.image_prior import SAMImageEncoder, preprocess
from heartbeat.weights import build_image_prior
from heartbeat.vae import AutoencoderKL
from heartbeat.weights import load_into

SMALL = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, out_chans=16, window_size=3,
             global_attn_indexes=(1, 3))


def sam_image_encoder_class():
    """segment_anything's ImageEncoderViT, imported without the package __init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("segment_anything")
    if spec is None:
        pytest.skip("segment_anything is not installed")
    root = os.path.dirname(spec.origin)
    saved = {k: sys.modules.get(k) for k in ("segment_anything", "segment_anything.modeling")}
    try:
        for name, path in (("segment_anything", root), ("segment_anything.modeling", os.path.join(root, "modeling"))):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        mod = importlib.import_module("segment_anything.modeling.image_encoder")
        return mod.ImageEncoderViT
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _ref_small():
    Ref = sam_image_encoder_class()
    torch.manual_seed(0)
    ref = Ref(img_size=SMALL["img_size"], patch_size=SMALL["patch_size"], embed_dim=SMALL["embed_dim"],
              depth=SMALL["depth"], num_heads=SMALL["num_heads"], out_chans=SMALL["out_chans"], qkv_bias=True,
              use_rel_pos=True, window_size=SMALL["window_size"], global_attn_indexes=SMALL["global_attn_indexes"]).eval()
    with torch.no_grad():  # rel-pos tables and pos_embed start at zero: make them matter
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def test_sam_encoder_matches_segment_anything():
    ref = _ref_small()
    ours = load_into(SAMImageEncoder(**SMALL).eval(), ref.state_dict(), "SAM")
    # 64 / 8 = 8 patches per side: windows of 3 need padding (8 -> 9), exercising the pad/crop path
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (2, 16, 8, 8)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_vit_b_parameter_count_and_names():
    Ref = sam_image_encoder_class()
    with torch.device("meta"):
        ours, ref = SAMImageEncoder(), Ref(depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, num_heads=12,
                                           patch_size=16, qkv_bias=True, use_rel_pos=True,
                                           global_attn_indexes=[2, 5, 8, 11], window_size=14, out_chans=256)
    a, b = ours.state_dict(), ref.state_dict()
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    assert sum(p.numel() for p in ours.parameters()) == 89_670_912
    assert tuple(a["blocks.2.attn.rel_pos_h"].shape) == (127, 64) and tuple(a["blocks.0.attn.rel_pos_h"].shape) == (27, 64)
    with torch.device("meta"):  # shapes of a full-size forward, without computing it
        assert ours(torch.zeros(1, 3, 1024, 1024)).shape == (1, 256, 64, 64)


def test_preprocess():
    x = torch.rand(2, 1, 40, 40) * 1.2 - 0.7
    y = preprocess(x, 64)
    assert y.shape == (2, 3, 64, 64)
    assert torch.allclose(y.amin(dim=(1, 2, 3)), torch.zeros(2)) and torch.allclose(y.amax(dim=(1, 2, 3)), torch.ones(2))
    s = preprocess(torch.ones(1, 3, 64, 64), 64, mode="sam")
    assert torch.allclose(s[0, :, 0, 0], (255 - torch.tensor([123.675, 116.28, 103.53])) / torch.tensor([58.395, 57.12, 57.375]))
    with pytest.raises(ValueError, match="1 or 3"):
        preprocess(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("dim", [128, 4])
def test_vae_prior(dim):
    cfg = get_config("tiny", [f"--prior_dim={dim}"]).model
    vae = AutoencoderKL(cfg)
    prior = build_image_prior(cfg, vae=vae)
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    t = prior(x)
    assert t.shape == (3, cfg.prior_tokens, dim) and not t.requires_grad
    assert all(not p.requires_grad for p in prior.parameters())
    prior.train()
    assert not prior.training
    if dim == 4:  # the latent variant is the scaled posterior mean, pooled to a 4x4 grid
        m = cfg.latent_scale * vae.encode(x).mean
        want = torch.nn.functional.adaptive_avg_pool2d(m, 4).flatten(2).transpose(1, 2)
        assert torch.allclose(t, want, atol=1e-5)
    assert not torch.allclose(t[0], t[1])


def test_prior_bad_config():
    cfg = get_config("tiny", ["--prior_dim=7"]).model
    with pytest.raises(ValueError, match="prior_dim=128"):
        build_image_prior(cfg, vae=AutoencoderKL(cfg))
    cfg = get_config("tiny", ["--prior_dim=128", "--prior_tokens=10"]).model
    with pytest.raises(ValueError, match="square"):
        build_image_prior(cfg, vae=AutoencoderKL(cfg))
    cfg = get_config("tiny", ["--prior=medsam"]).model
    with pytest.raises(ValueError, match="checkpoint"):
        build_image_prior(cfg)


def test_medsam_prior_from_checkpoint(tmp_path):
    ref = _ref_small()
    path = tmp_path / "medsam_small.pth"
    torch.save({"image_encoder." + k: v for k, v in ref.state_dict().items()} | {"pixel_mean": torch.zeros(3, 1, 1)}, path)
    cfg = get_config("tiny", ["--prior=medsam", "--prior_dim=256"]).model
    with pytest.raises(ValueError, match="prior_dim=16"):  # the small encoder has 16 output channels
        build_image_prior(cfg, path=str(path))
    cfg.prior_dim = 16
    prior = build_image_prior(cfg, path=str(path))
    x = torch.rand(2, 1, 48, 48) * 2 - 1
    t = prior(x)
    assert t.shape == (2, cfg.prior_tokens, 16) and not t.requires_grad
    with torch.no_grad():
        f = ref(preprocess(x, 64))
    assert torch.allclose(t, torch.nn.functional.adaptive_avg_pool2d(f, 4).flatten(2).transpose(1, 2), atol=1e-4)


def test_vae_prior_grey_into_rgb_vae():
    """An SD-style VAE takes 3 channels: grey frames are repeated, so grey and its RGB copy agree."""
    cfg = get_config("tiny", ["--in_channels=3", "--prior_dim=128"]).model
    prior = build_image_prior(cfg, vae=AutoencoderKL(cfg))
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    assert torch.allclose(prior(x), prior(x.expand(-1, 3, -1, -1)))
