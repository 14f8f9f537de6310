"""UNet: shapes, SD1.5 parameter count and names, zero-init invariants, inflate, checkpointing,
backends, bad input, and equivalence with diffusers' UNet2DConditionModel (a reference someone else wrote)."""
import math

import pytest
import torch

from heartbeat.config import get_config
from heartbeat.unet import UNet
from heartbeat.weights import diffusers_unet_to_ldm, pad_conv_in

SD15_UNET_PARAMS = 859_520_964  # SD1.5 UNet with 4 input channels


def small_cfg(**kw):
    cfg = get_config("tiny").model
    base = dict(unet_channels=(32, 64), unet_layers=1, attn_levels=(True, True), heads=4, norm_groups=8,
                context_dim=32, text_tokens=8, max_frames=8, attn_backend="math")
    base.update(kw)
    for k, v in base.items():
        setattr(cfg, k, v)
    return cfg


def wake(model, skip=()):
    """Give every all-zero parameter (the zero-inits) random values, except names containing `skip`."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in skip) or p.abs().max() > 0:
                continue
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in) * (0.5 if p.ndim > 1 else 0.1))
    return model


def inputs(cfg, B=2, h=8, frames=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if frames is None else (B, frames)
    z = torch.randn(*lead, cfg.latent_channels, h, h, generator=g)
    t = torch.tensor([10, 700][:B] + [5] * max(0, B - 2))
    text = torch.randn(B, cfg.text_tokens, cfg.context_dim, generator=g)
    image = torch.randn(B, cfg.text_tokens, cfg.context_dim, generator=g)
    local = torch.randn(*lead, cfg.local_channels, h, h, generator=g)
    return z, t, text, image, local


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_preset_shapes(preset):
    cfg = get_config(preset).model
    torch.manual_seed(0)
    unet = UNet(cfg)
    n = cfg.latent_size // 2 if preset == "small" else cfg.latent_size
    z, t, text, image, local = inputs(cfg, B=1, h=n)
    with torch.no_grad():
        assert unet(z, t, text=text, image=image, local=local).shape == z.shape
        unet.inflate()
        zv, t, text, image, localv = inputs(cfg, B=1, h=n, frames=2)
        assert unet(zv, t, text=text, image=image, local=localv).shape == zv.shape


def test_sd15_parameter_count_on_meta():
    cfg = get_config("sd15").model
    with torch.device("meta"):
        unet = UNet(cfg)
    named = dict(unet.named_parameters())
    total = sum(p.numel() for p in named.values())
    new = sum(p.numel() for n, p in named.items() if unet.is_new_parameter(n))
    extra_conv_in = cfg.unet_channels[0] * cfg.local_channels * 9  # conv_in's local-condition channels
    assert total - new - extra_conv_in == SD15_UNET_PARAMS
    br = unet.parameter_breakdown()
    assert br["sd"] == SD15_UNET_PARAMS and br["image_branch"] == new and br["local_conv_in"] == extra_conv_in
    # image branch: per transformer block to_q_img (C x C) + to_k_img, to_v_img (C x 768)
    blocks = [(m.dim) for m in unet.transformer_blocks()]
    assert len(blocks) == 16
    assert new == sum(c * c + 2 * c * 768 for c in blocks)
    # SD's names (a few spot checks of the CompVis layout)
    for key in ["time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.3.weight",
                "input_blocks.1.1.proj_in.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_out.weight",
                "middle_block.2.out_layers.3.bias", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.norm3.weight",
                "out.0.weight", "out.2.weight"]:
        assert key in named, key
    assert named["input_blocks.0.0.weight"].shape == (320, 4 + cfg.local_channels, 3, 3)
    assert named["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)  # SD1.5: conv 1x1
    with torch.device("meta"):
        unet.inflate()
    tp = sum(p.numel() for p in unet.temporal_parameters())
    # per block: q, k, v, out (C x C) + out bias + LayerNorm (2C) + positions (max_frames x C)
    assert tp == sum(4 * c * c + 3 * c + cfg.max_frames * c for c in blocks)
    assert unet.parameter_breakdown()["temporal"] == tp


def test_image_branch_and_local_channels_start_at_zero():
    cfg = small_cfg()
    torch.manual_seed(0)
    unet = wake(UNet(cfg), skip=("to_v_img", "input_blocks.0.0.weight"))
    z, t, text, image, local = inputs(cfg)
    with torch.no_grad():
        ref = unet(z, t, text=text)
        assert ref.abs().max() > 1e-3  # woken: the test can fail
        assert torch.equal(unet(z, t, text=text, image=image), ref)
        assert torch.equal(unet(z, t, text=text, local=local), ref)
        assert torch.equal(unet(z, t, text=text, image=torch.zeros_like(image)), ref)  # zero tokens = absent
    w = unet.input_blocks[0][0].weight
    assert w[:, cfg.latent_channels:].abs().max() == 0 and w[:, :cfg.latent_channels].abs().max() > 0
    wake(unet)  # now the image branch and the local channels act
    with torch.no_grad():
        w[:, cfg.latent_channels:].normal_(0, 0.1)
    with torch.no_grad():
        assert (unet(z, t, text=text, image=image) - ref).abs().max() > 1e-4
        assert (unet(z, t, text=text, local=local) - ref).abs().max() > 1e-4


def test_inflate_reproduces_per_frame_then_mixes_frames():
    cfg = small_cfg()
    torch.manual_seed(0)
    unet = wake(UNet(cfg))
    B, Fr = 2, 3
    z, t, text, image, local = inputs(cfg, B=B, frames=Fr)
    with torch.no_grad():
        per_frame = torch.stack([unet(z[:, f], t, text=text, image=image, local=local[:, f]) for f in range(Fr)], 1)
        assert unet.inflate() is unet and cfg.temporal
        video = unet(z, t, text=text, image=image, local=local)
    assert (video - per_frame).abs().max() < 1e-5
    names = [n for n, _ in unet.named_parameters() if UNet.is_temporal_name(n)]
    assert names and all(("attn_temporal" in n or "norm_temporal" in n) for n in names)
    assert sum(p.numel() for p in unet.temporal_parameters()) + sum(
        p.numel() for p in unet.spatial_parameters()) == sum(p.numel() for p in unet.parameters())
    wake(unet)  # temporal output projections act: frames now see each other
    with torch.no_grad():
        video2 = unet(z, t, text=text, image=image, local=local)
        z2 = z.clone()
        z2[:, 0] += 1.0
        changed = unet(z2, t, text=text, image=image, local=local)
    assert (video2 - per_frame).abs().max() > 1e-4
    assert (changed[:, 1:] - video2[:, 1:]).abs().max() > 1e-5  # frame 0 affects frames 1, 2


def test_gradient_checkpointing_same_gradients():
    cfg = small_cfg()
    torch.manual_seed(0)
    unet = wake(UNet(cfg)).inflate()
    wake(unet)
    z, t, text, image, local = inputs(cfg, frames=2)

    def grads(ck):
        cfg.grad_checkpointing = ck
        unet.zero_grad()
        unet(z, t, text=text, image=image, local=local).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    a, b = grads(False), grads(True)
    cfg.grad_checkpointing = False
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-7), n
    assert any(g.abs().max() > 0 for n, g in a.items() if "attn_temporal" in n)


def test_backends_math_and_sdpa_agree():
    cfg = small_cfg()
    torch.manual_seed(0)
    unet = wake(UNet(cfg)).inflate()
    wake(unet)
    z, t, text, image, local = inputs(cfg, frames=2)
    outs = {}
    for be in ("math", "sdpa"):
        for m in unet.modules():
            if hasattr(m, "backend"):
                m.backend = be
        with torch.no_grad():
            outs[be] = unet(z, t, text=text, image=image, local=local)
    assert (outs["math"] - outs["sdpa"]).abs().max() < 1e-4


def test_share_q_option():
    """--share_image_q: no to_q_img, and the image branch uses the text branch's queries, so the model
    equals the unshared one whose every to_q_img is a copy of to_q (and differs from it otherwise)."""
    cfg = small_cfg()
    torch.manual_seed(0)
    unshared = wake(UNet(cfg))
    cfg_s = small_cfg(share_image_q=True)
    shared = UNet(cfg_s)
    assert not any("to_q_img" in n for n, _ in shared.named_parameters())
    state = {k: v for k, v in unshared.state_dict().items() if "to_q_img" not in k}
    shared.load_state_dict(state)                               # strict: the same names otherwise
    z, t, text, image, local = inputs(cfg)
    with torch.no_grad():
        out = shared(z, t, text=text, image=image, local=local)
        differs = unshared(z, t, text=text, image=image, local=local)
        for name, p in unshared.named_parameters():
            if name.endswith("to_q_img.weight"):
                p.copy_(unshared.get_parameter(name.replace("to_q_img", "to_q")))
        same = unshared(z, t, text=text, image=image, local=local)
    assert out.shape == z.shape
    torch.testing.assert_close(out, same, rtol=0, atol=1e-6)
    assert (out - differs).abs().max() > 1e-3                   # to_q_img mattered: the test can fail


def test_bad_input_raises_clear_errors():
    cfg = small_cfg()
    unet = UNet(cfg)
    z, t, text, image, local = inputs(cfg)
    with pytest.raises(ValueError, match="text must have shape"):
        unet(z, t, text=text[..., :-1])
    with pytest.raises(ValueError, match="image must have shape"):
        unet(z, t, image=image[:1])
    with pytest.raises(ValueError, match="local must have shape"):
        unet(z, t, local=local[:, :2])
    with pytest.raises(ValueError, match="latent_channels"):
        unet(z[:, :3], t)
    with pytest.raises(ValueError, match="t must have shape"):
        unet(z, t[:1].repeat(3))
    with pytest.raises(ValueError, match="inflate"):
        unet(z[:, None], t)
    with pytest.raises(ValueError, match="divisible"):
        unet(z[..., :7, :7], t)


def _diffusers_pair(seed=0):
    diffusers = pytest.importorskip("diffusers")
    cfg = small_cfg(unet_channels=(32, 64, 64), unet_layers=2, attn_levels=(True, True, False),
                    local_channels=0, attn_backend="sdpa")
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=cfg.unet_layers,
        block_out_channels=cfg.unet_channels, norm_num_groups=cfg.norm_groups,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.heads,  # SD1.5 config: 8 = heads
        flip_sin_to_cos=True, freq_shift=0, act_fn="silu", norm_eps=1e-5).eval()
    wake(ref)
    return cfg, ref


def test_matches_diffusers_unet():
    cfg, ref = _diffusers_pair()
    ours = UNet(cfg).eval()
    missing, unexpected = ours.load_state_dict(diffusers_unet_to_ldm(ref.state_dict()), strict=False)
    assert not unexpected
    assert missing and all(UNet.is_new_parameter(k) for k in missing), missing
    z, t, text, _, _ = inputs(cfg, h=16)
    with torch.no_grad():
        a = ref(z, t, encoder_hidden_states=text).sample
        b = ours(z, t, text=text)
    assert a.abs().max() > 1e-2
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


def test_diffusers_sd15_layout_maps_onto_ours_on_meta():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        ours = UNet(get_config("sd15").model)
    assert sum(p.numel() for p in ref.parameters()) == SD15_UNET_PARAMS  # diffusers' defaults are SD1.5's
    mapped, own = diffusers_unet_to_ldm(ref.state_dict()), ours.state_dict()
    assert set(mapped) <= set(own)
    assert all(UNet.is_new_parameter(k) for k in set(own) - set(mapped))
    assert [k for k in mapped if mapped[k].shape != own[k].shape] == ["input_blocks.0.0.weight"]  # + local channels
    padded = pad_conv_in(mapped, ours.cfg)
    assert padded["input_blocks.0.0.weight"].shape == own["input_blocks.0.0.weight"].shape
