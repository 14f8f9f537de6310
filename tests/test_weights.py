"""Checkpoint loaders: every format, written to temporary files from tiny reference models with random
weights (diffusers UNet/VAE, transformers CLIP, segment_anything SAM); loaded models reproduce the references."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from heartbeat.config import get_config
from heartbeat.weights import (WeightsError, diffusers_vae_to_ldm, load_image_encoder, load_text_encoder, load_unet,
                               load_vae, read_state_dict)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _perturb(m):
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def refs():
    torch.manual_seed(0)
    unet = _perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8))
    vae = _perturb(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, scaling_factor=0.3))
    text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
        pad_token_id=1)))
    return dict(unet=unet, vae=vae, text=text)


def _text_sd(ref):
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}


def _unet_ldm(ref):
    from heartbeat.weights import diffusers_unet_to_ldm
    return diffusers_unet_to_ldm(ref.state_dict())


def _check_unet(ours, ref):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([3, 801])
    with torch.no_grad():
        assert _rel(ours(x, t, text=ctx), ref(x, t, encoder_hidden_states=ctx).sample) < 1e-4


def _check_vae(ours, ref):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel(ours.encode(x).mean, ref.encode(x).latent_dist.mean) < 1e-4
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        assert _rel(ours.decode(z), ref.decode(z).sample) < 1e-4


def _check_text(ours, ref):
    ids = torch.randint(0, 600, (2, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _rel(ours(ids), ref(input_ids=ids).last_hidden_state) < 1e-4


# ------------------------------------------------------------------------------ diffusers folder

def test_diffusers_folder(refs, tmp_path):
    refs["unet"].save_pretrained(tmp_path / "unet")
    refs["vae"].save_pretrained(tmp_path / "vae")
    refs["text"].save_pretrained(tmp_path / "text_encoder")
    unet = load_unet(str(tmp_path))
    assert unet.cfg.unet_channels == (32, 64) and unet.cfg.heads == 4 and unet.cfg.attn_levels == (True, False)
    _check_unet(unet, refs["unet"])
    vae = load_vae(str(tmp_path))
    assert vae.latent_scale == pytest.approx(0.3)
    _check_vae(vae, refs["vae"])
    _check_vae(load_vae(str(tmp_path / "vae")), refs["vae"])  # the component folder itself
    _check_text(load_text_encoder(str(tmp_path)), refs["text"])


def test_diffusers_vae_old_attention_names_bin(refs, tmp_path):
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in refs["vae"].state_dict().items():
        for a, b in ren.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        sd[k] = v
    refs["vae"].save_config(tmp_path / "vae")  # config.json: norm groups, scaling factor
    torch.save(sd, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    _check_vae(load_vae(str(tmp_path)), refs["vae"])


# ------------------------------------------------------------------------ SD1.5 single file

def _single_file_sd(refs):
    sd = {"model.diffusion_model." + k: v for k, v in _unet_ldm(refs["unet"]).items()}
    sd |= {"first_stage_model." + k: v for k, v in diffusers_vae_to_ldm(refs["vae"].state_dict()).items()}
    sd |= {"cond_stage_model.transformer." + k: v for k, v in _text_sd(refs["text"]).items()}
    sd["model_ema.decay"] = torch.tensor(0.9999)  # other entries of real SD files are ignored
    return sd


@pytest.mark.parametrize("ext", ["safetensors", "ckpt"])
def test_sd_single_file(refs, tmp_path, ext):
    sd = _single_file_sd(refs)
    path = str(tmp_path / f"sd15.{ext}")
    if ext == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"state_dict": sd, "global_step": 1}, path)
    cfg = get_config("tiny", ["--unet_channels=32,64", "--attn_levels=true,false", "--heads=4", "--norm_groups=8",
                              "--context_dim=32", "--text_width=32", "--local_channels=3"]).model
    unet = load_unet(path, cfg)
    w = unet.state_dict()["input_blocks.0.0.weight"]
    assert w.shape[1] == 7 and torch.equal(w[:, :4], refs["unet"].conv_in.weight) and not w[:, 4:].any()
    _check_unet(unet, refs["unet"])
    # the new image branch starts silent: an image context changes nothing yet
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert torch.allclose(unet(x, torch.tensor([5]), text=ctx, image=torch.randn(1, 3, 32)),
                              unet(x, torch.tensor([5]), text=ctx), atol=1e-6)
    with pytest.raises(WeightsError, match="vae_norm_groups"):  # a state dict alone cannot tell GroupNorm groups
        load_vae(path)
    vae_cfg = get_config("tiny", ["--vae_channels=8,16", "--vae_layers=1", "--vae_norm_groups=4", "--in_channels=3",
                                  "--image_size=16"]).model
    _check_vae(load_vae(path, vae_cfg), refs["vae"])
    _check_text(load_text_encoder(path, heads=4), refs["text"])  # no config.json: heads cannot be read


# ------------------------------------------------------------------------------ CLIP formats

def _hf_to_openai(sd):
    p = "text_model."
    out = {"token_embedding.weight": sd[p + "embeddings.token_embedding.weight"],
           "positional_embedding": sd[p + "embeddings.position_embedding.weight"],
           "ln_final.weight": sd[p + "final_layer_norm.weight"], "ln_final.bias": sd[p + "final_layer_norm.bias"],
           "text_projection": torch.zeros(32, 16), "logit_scale": torch.tensor(4.6),
           "visual.conv1.weight": torch.zeros(8, 3, 4, 4)}
    for i in range(2):
        a, b = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[b + "attn.in_proj_" + kind] = torch.cat([sd[a + f"self_attn.{n}_proj.{kind}"] for n in "qkv"])
            for x, y in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{b}{y}.{kind}"] = sd[f"{a}{x}.{kind}"]
    return out


def test_openai_clip_and_tokenizer(refs, tmp_path):
    sd = _hf_to_openai(_text_sd(refs["text"]))
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    te = load_text_encoder(str(tmp_path / "ViT-tiny.pt"), heads=4)
    _check_text(te, refs["text"])
    with pytest.raises(RuntimeError, match="vocab.json"):
        te.tokenize(["no tokenizer files"])
    # a tokenizer folder beside the weights is found
    from heartbeat.text import bytes_to_unicode
    syms = list(bytes_to_unicode().values())
    syms = syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(tmp_path / "tokenizer")
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(syms)}))
    (tmp_path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    te = load_text_encoder(str(tmp_path / "ViT-tiny.pt"))
    ids = te.tokenize(["An echo"])
    assert ids[0, :4].tolist() == [512, syms.index("a"), syms.index("n</w>"), syms.index("e")] and ids[0, -1] == 513
    # build_text_encoder with a weights path loads them (and checks them against the config)
    from heartbeat.weights import build_text_encoder
    opts = ["--text_encoder=clip", "--text_width=32", "--context_dim=32", "--text_heads=4"]
    te = build_text_encoder(get_config("tiny", opts + ["--text_layers=2"]).model, str(tmp_path / "ViT-tiny.pt"))
    _check_text(te, refs["text"])
    assert te.tokenize(["x"]).shape == (1, 77)
    with pytest.raises(ValueError, match="text_layers=3"):
        build_text_encoder(get_config("tiny", opts + ["--text_layers=3"]).model, str(tmp_path / "ViT-tiny.pt"))


def test_hf_full_clip_model_keys(refs, tmp_path):
    sd = _text_sd(refs["text"]) | {"vision_model.embeddings.class_embedding": torch.zeros(8),
                                   "text_projection.weight": torch.zeros(16, 32), "logit_scale": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    _check_text(load_text_encoder(str(tmp_path / "model.safetensors"), heads=4), refs["text"])


# ------------------------------------------------------------------------------------- SAM

def test_sam_checkpoints(tmp_path):
    from test_image_prior import SMALL, _ref_small
    ref = _ref_small()
    full = {"image_encoder." + k: v for k, v in ref.state_dict().items()}
    full |= {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.zeros(2, 128),
             "mask_decoder.iou_token.weight": torch.zeros(1, 256), "pixel_mean": torch.zeros(3, 1, 1)}
    torch.save(full, tmp_path / "medsam_vit_tiny.pth")
    torch.save(ref.state_dict(), tmp_path / "bare.pth")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(x)
    for name in ("medsam_vit_tiny.pth", "bare.pth"):
        enc = load_image_encoder(str(tmp_path / name))
        assert enc.img_size == SMALL["img_size"] and len(enc.blocks) == SMALL["depth"]
        assert [i for i, b in enumerate(enc.blocks) if not b.window] == list(SMALL["global_attn_indexes"])
        with torch.no_grad():
            assert _rel(enc(x), want) < 1e-4


# ------------------------------------------------------------------------------- round trips

def test_round_trips(tmp_path):
    from heartbeat.weights import build_text_encoder
    from heartbeat.unet import UNet
    from heartbeat.vae import AutoencoderKL
    cfg = get_config("tiny").model
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg).eval()
    save_file(vae.state_dict(), str(tmp_path / "vae.safetensors"))
    v2 = load_vae(str(tmp_path / "vae.safetensors"), cfg)
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), v2.state_dict().values()))
    v3 = load_vae(str(tmp_path / "vae.safetensors"))  # architecture read from the shapes
    assert v3.encoder.conv_in.in_channels == 1 and len(v3.encoder.down) == len(cfg.vae_channels)

    unet = UNet(get_config("tiny").model).inflate().eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"unet." + k: v for k, v in unet.state_dict().items()}, tmp_path / "unet.pt")
    u2 = load_unet(str(tmp_path / "unet.pt"), get_config("tiny").model)
    assert u2.cfg.temporal and all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), u2.state_dict().values()))

    # without config.json the head count follows CLIP's convention, head dim 64
    te = build_text_encoder(get_config("sd15", ["--text_layers=1", "--text_width=128", "--context_dim=128",
                                                "--text_heads=2"]).model).eval()
    save_file(te.state_dict(), str(tmp_path / "te.safetensors"))
    te2 = load_text_encoder(str(tmp_path / "te.safetensors"))
    ids = torch.randint(0, 49408, (1, 77))
    with torch.no_grad():
        assert torch.equal(te(ids), te2(ids))
    assert te2.width == 128 and len(te2.text_model.encoder.layers) == 1


# ------------------------------------------------------------------------------------ errors

def test_error_messages(refs, tmp_path):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    for fn, what in ((load_unet, "no UNet found"), (load_vae, "no VAE found"),
                     (load_text_encoder, "no CLIP text model"), (load_image_encoder, "no SAM image encoder")):
        with pytest.raises(WeightsError, match=what):
            fn(str(tmp_path / "junk.safetensors"))
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_vae(str(tmp_path / "nothing.ckpt"))

    sd = diffusers_vae_to_ldm(refs["vae"].state_dict())
    cut = {k: v for k, v in sd.items() if not k.startswith("decoder.mid.attn_1.")}
    save_file(cut, str(tmp_path / "cut.safetensors"))
    with pytest.raises(WeightsError, match=r"(?s)detected format: VAE state dict, LDM names.*missing keys: "
                                           r"decoder\.mid\.attn_1\.k\.bias.*\(10 in all\)"):
        load_vae(str(tmp_path / "cut.safetensors"), get_config("tiny", [
            "--vae_channels=8,16", "--vae_layers=1", "--vae_norm_groups=4", "--in_channels=3", "--image_size=16"]).model)

    grey = get_config("tiny", ["--vae_channels=8,16", "--vae_layers=1", "--vae_norm_groups=4", "--in_channels=1",
                               "--image_size=16"]).model
    save_file(sd, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch at encoder\.conv_in\.weight: checkpoint \(8, 3, 3, 3\) "
                                           r"vs model \(8, 1, 3, 3\)"):
        load_vae(str(tmp_path / "vae.safetensors"), grey)
    with pytest.raises(WeightsError, match=r"(?s)fits no preset.*missing keys: decoder\.up\.0\.block\.2\."):
        load_vae(str(tmp_path / "vae.safetensors"), get_config("sd15").model)
    sd15 = get_config("sd15").model

    unet_sd = {"model.diffusion_model." + k: v for k, v in _unet_ldm(refs["unet"]).items()}
    unet_sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(unet_sd, str(tmp_path / "u.safetensors"))
    with pytest.raises(WeightsError, match=r"(?s)SD single file.*unexpected keys: extra\.weight"):
        load_unet(str(tmp_path / "u.safetensors"))
    with pytest.raises(WeightsError, match=r"input_blocks\.0\.0\.weight.*fits no preset"):
        load_unet(str(tmp_path / "u.safetensors"), sd15)

    torch.save({"state_dict": {"a": torch.zeros(1)}, "fn": print}, tmp_path / "pickled.ckpt")
    with pytest.raises(WeightsError, match="tensors-only"):
        read_state_dict(str(tmp_path / "pickled.ckpt"))


def test_ldm_vae_with_linear_attention_weights(refs, tmp_path):
    """Some single files converted from diffusers keep (C, C) attention weights under LDM names."""
    sd = diffusers_vae_to_ldm(refs["vae"].state_dict())
    sd = {"first_stage_model." + k: (v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v) for k, v in sd.items()}
    assert any(v.ndim == 2 for v in sd.values())
    save_file(sd, str(tmp_path / "v.safetensors"))
    cfg = get_config("tiny", ["--vae_channels=8,16", "--vae_layers=1", "--vae_norm_groups=4", "--in_channels=3",
                              "--image_size=16"]).model
    _check_vae(load_vae(str(tmp_path / "v.safetensors"), cfg), refs["vae"])
