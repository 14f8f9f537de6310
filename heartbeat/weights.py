"""The one reader of foreign weight files: Stable Diffusion 1.5 (single file or diffusers), CLIP
(HF, OpenAI, tokenizer files) and SAM / MedSAM, into HeartBeat modules (docs/ARCHITECTURE.md §Public API).
The modules themselves (unet.py, vae.py, text.py, image_prior.py) are architecture only and read no
file; this module builds them and fills them. (Long because every foreign format is here, by design.)

    unet = load_unet(path)             # SD1.5 single file (.ckpt / .safetensors) or diffusers folder / unet file
    vae = load_vae(path)               # same sources, or a bare VAE state dict (LDM or diffusers names)
    te = load_text_encoder(path)       # HF CLIPTextModel (folder, file, SD1.5 single file) or OpenAI CLIP
    ie = load_image_encoder(path)      # SAM / MedSAM .pth (image_encoder.* keys, or bare)
    te = build_text_encoder(cfg, path) # the text encoder a ModelConfig names (byte, or CLIP from files)
    prior = build_image_prior(cfg, vae, path)   # the frozen image prior a ModelConfig names
    tok = read_tokenizer(path)         # CLIP BPE: vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz

Our modules use the original names (CompVis LDM for UNet/VAE, Hugging Face for the CLIP text model,
segment_anything for SAM), so most formats load by stripping a prefix; diffusers UNet/VAE names and
OpenAI CLIP names are converted here. The format is detected from the keys. Missing or unexpected
keys raise an error listing them, the detected format and the preset whose shapes fit; a shape
mismatch names the key and both shapes. Parameters new in HeartBeat (image-prior cross-attention,
the local-condition channels of conv_in, temporal layers) are absent from SD checkpoints and keep
their zero initialisation; SD's 4-channel conv_in weight fills the first 4 input channels.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import warnings

import torch
from safetensors.torch import load_file

from .config import PRESETS, ModelConfig
from .image_prior import ImagePrior, SAMImageEncoder
from .text import BOS, EOS, BPETokenizer, ByteTokenizer, TextEncoder, bytes_to_unicode
from .unet import UNet
from .vae import AutoencoderKL

# ------------------------------------------------------------------------------------ reading

_SD_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.transformer."}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                 "pytorch_model.bin")


class WeightsError(ValueError):
    """A checkpoint that does not fit: the message says what was found and what was expected."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .ckpt / .pt / .pth / .bin file (unwrapping 'state_dict' / 'model'), on CPU."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.endswith(".safetensors"):
        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"{path}: cannot be read as a tensors-only torch checkpoint ({type(e).__name__}: "
                               f"{str(e)[:200]}); convert it to .safetensors") from None
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _read_config(folder: str) -> dict:
    f = os.path.join(folder, "config.json")
    if not os.path.isfile(f):
        return {}
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def _resolve(path: str, sub: str) -> tuple[dict, dict, str]:
    """(state dict, config.json dict, description) for a file, a component folder or a pipeline folder."""
    if os.path.isdir(path):
        folder = os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path
        for name in _WEIGHT_FILES:
            f = os.path.join(folder, name)
            if os.path.isfile(f):
                return read_state_dict(f), _read_config(folder), f
        singles = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".ckpt", ".pth", ".pt", ".bin")))
        if singles:
            return read_state_dict(os.path.join(folder, singles[0])), _read_config(folder), os.path.join(folder, singles[0])
        raise FileNotFoundError(f"{path}: no weights found (looked for {sub}/ with one of {', '.join(_WEIGHT_FILES)})")
    cfg = _read_config(os.path.dirname(path))
    return read_state_dict(path), cfg, path


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _fits(field: str, value) -> str:
    names = [n for n, f in PRESETS.items() if getattr(f().model, field) == value]
    return f"fits preset {names[0]}" if names else f"{field}={value} fits no preset"


def _sample(keys, n=8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)})")


def load_into(module: torch.nn.Module, sd: dict, fmt: str, fits: str = "", allow_missing=None) -> torch.nn.Module:
    """Copy `sd` into `module` strictly: every key must exist with the same shape, except model keys for
    which allow_missing(key) is true (they keep their initial values). Raises WeightsError otherwise."""
    check_fit(module, sd, fmt, fits, allow_missing)
    module.load_state_dict(sd, strict=False)
    return module


def check_fit(module: torch.nn.Module, sd: dict, fmt: str, fits: str = "", allow_missing=None,
              ignore_unexpected=None, what: str = "checkpoint") -> None:
    """The checks of load_into without copying (`module` may live on the meta device): every key of the
    module in `sd` (but those allow_missing(key) excuses), no key of `sd` the module lacks (but those
    ignore_unexpected(key) excuses), equal shapes. One WeightsError naming `what`, the module (its
    `describe()` when it has one), the format and what fits. Every state-dict check of the project."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in sd if k not in own and not (ignore_unexpected and ignore_unexpected(k))]
    target = module.describe() if hasattr(module, "describe") else type(module).__name__
    where = f"detected format: {fmt}" + (f"; {fits}" if fits else "")
    if missing or unexpected:
        msg = [f"{what} does not fit {target} ({where})"]
        if missing:
            msg.append(f"missing keys: {_sample(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_sample(unexpected)}")
        raise WeightsError("\n  ".join(msg))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]  # in the model's order
    if bad:
        k = bad[0]
        more = f"; {len(bad) - 1} more: {_sample(bad[1:], 4)}" if len(bad) > 1 else ""
        raise WeightsError(f"{what} does not fit {target}: shape mismatch at {k}: checkpoint {tuple(sd[k].shape)} "
                           f"vs model {tuple(own[k].shape)} ({where}{more})")


# ---------------------------------------------------------------------------------------- VAE

def diffusers_vae_to_ldm(sd: dict) -> dict:
    """diffusers AutoencoderKL names (old query/key/value/proj_attn or new to_q/to_k/to_v/to_out.0) -> LDM names.
    Linear attention weights (C, C) become 1x1 conv weights (C, C, 1, 1)."""
    n_up = 1 + max([int(m.group(1)) for k in sd for m in [re.match(r"decoder\.up_blocks\.(\d+)\.", k)] if m] or [0])
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
        n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", n)
        n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", n)
        n = re.sub(r"\.mid_block\.resnets\.0\.", ".mid.block_1.", n)
        n = re.sub(r"\.mid_block\.resnets\.1\.", ".mid.block_2.", n)
        n = re.sub(r"\.mid_block\.attentions\.0\.", ".mid.attn_1.", n)
        n = n.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for old, new in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
                         ("query", "q"), ("key", "k"), ("value", "v"), ("proj_attn", "proj_out")):
            n = n.replace(f".attn_1.{old}.", f".attn_1.{new}.")
        if ".attn_1." in n and n.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[n] = v
    return out


def _vae_format(sd: dict) -> tuple[dict, str]:
    if any(k.startswith(_SD_PREFIX["vae"]) for k in sd):
        sd, fmt = _strip(sd, _SD_PREFIX["vae"]), "SD single file (first_stage_model.*)"
    elif any(k.startswith("vae.") for k in sd):
        sd, fmt = _strip(sd, "vae."), "prefixed VAE (vae.*)"
    else:
        fmt = "VAE state dict"
    if any(".down_blocks." in k or ".mid_block." in k for k in sd):
        return diffusers_vae_to_ldm(sd), fmt + ", diffusers names"
    if "encoder.conv_in.weight" not in sd:
        raise WeightsError(f"no VAE found: expected encoder.conv_in.weight (LDM/diffusers names, optionally under "
                           f"first_stage_model. or vae.); keys look like {_sample(sd, 5)}")
    # SD single files converted from diffusers sometimes hold (C, C) attention weights
    sd = {k: (v[:, :, None, None] if ".attn_1." in k and k.endswith("weight") and v.ndim == 2 else v) for k, v in sd.items()}
    return sd, fmt + ", LDM names"


def vae_config_from(sd: dict, base: ModelConfig | None = None, json_cfg: dict | None = None) -> ModelConfig:
    """A ModelConfig whose VAE fields fit the (LDM-named) state dict."""
    levels = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m)
    chs = tuple(int(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    layers = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m)
    if base is None:
        base = next((f().model for f in PRESETS.values() if f().model.vae_channels == chs), ModelConfig())
    json_cfg = json_cfg or {}
    return dataclasses.replace(
        base, vae_channels=chs, vae_layers=layers, in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
        latent_channels=int(sd["post_quant_conv.weight"].shape[0]),
        vae_norm_groups=int(json_cfg.get("norm_num_groups", base.vae_norm_groups)),
        latent_scale=float(json_cfg.get("scaling_factor", base.latent_scale)))


def load_vae(path: str, cfg: ModelConfig | None = None):
    """An AutoencoderKL from an SD1.5 single file, a diffusers folder (vae/) or file, or a bare state dict.
    cfg=None: the architecture is read from the shapes (and config.json: norm groups, scaling factor)."""
    raw, jcfg, src = _resolve(path, "vae")
    sd, fmt = _vae_format(raw)
    c = vae_config_from(sd, None, jcfg) if cfg is None else cfg
    fits = _fits("vae_channels", vae_config_from(sd).vae_channels)
    try:
        with torch.device("meta"):  # check keys and shapes before allocating anything
            check_fit(AutoencoderKL(c), sd, f"{fmt} from {src}", fits)
    except ValueError as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{e} (the widths come from {src}; GroupNorm groups cannot be read from weights: "
                           "pass cfg with the right vae_norm_groups, or keep config.json beside the weights)") from None
    return load_into(AutoencoderKL(c), sd, f"{fmt} from {src}", fits).eval()


# ------------------------------------------------------------------------------- text encoder

def openai_clip_to_hf(sd: dict) -> dict:
    """OpenAI CLIP text names (token_embedding, positional_embedding, transformer.resblocks.N.*, ln_final) -> HF names.
    The fused in_proj (3C, C) is split into q/k/v; visual.*, text_projection and logit_scale are dropped."""
    out = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"]}
    for k, v in sd.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)$", k)
        if not m:
            continue
        p, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{p}self_attn.{name}.{kind}"] = part
            continue
        for old, new in (("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                         ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")):
            if rest.startswith(old):
                out[p + new + rest[len(old):]] = v
                break
        else:
            out[k] = v  # unknown: reported as unexpected
    return out


def _find_tokenizer(path: str) -> str | None:
    cands = [path, os.path.join(path, "tokenizer")] if os.path.isdir(path) else []
    base = os.path.dirname(path) if not os.path.isdir(path) else os.path.dirname(os.path.abspath(path).rstrip("/"))
    cands += [base, os.path.join(base, "tokenizer")]
    for c in cands:
        if os.path.isfile(os.path.join(c, "vocab.json")) and os.path.isfile(os.path.join(c, "merges.txt")):
            return c
        gz = os.path.join(c, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.isfile(gz):
            return gz
    return None


def read_tokenizer(path: str, length: int = 77) -> BPETokenizer:
    """`path`: a folder with vocab.json + merges.txt (SD1.5 `tokenizer/`), or bpe_simple_vocab_16e6.txt.gz."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "tokenizer")):
            path = os.path.join(path, "tokenizer")
        vf, mf = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if not (os.path.isfile(vf) and os.path.isfile(mf)):
            raise FileNotFoundError(f"{path}: no vocab.json + merges.txt; give an SD1.5 tokenizer/ folder "
                                    "or OpenAI's bpe_simple_vocab_16e6.txt.gz")
        with open(vf, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(mf, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(l.split()) for l in lines if l and not l.startswith("#version")]
        return BPETokenizer(vocab, merges, length)
    if path.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(l.split()) for l in lines[1:49152 - 256 - 2 + 1] if l.strip()]  # as OpenAI's simple_tokenizer
        syms = list(bytes_to_unicode().values())
        syms = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + [BOS, EOS]
        return BPETokenizer({s: i for i, s in enumerate(syms)}, merges, length)
    raise FileNotFoundError(f"{path}: not a tokenizer folder (vocab.json + merges.txt) nor a .txt.gz BPE file")


def load_text_encoder(path: str, tokenizer: str | None = None, heads: int | None = None):
    """A CLIP TextEncoder from an HF CLIPTextModel (folder text_encoder/ or file), an SD1.5 single file
    (cond_stage_model.transformer.*) or OpenAI CLIP weights. The tokenizer comes from `tokenizer`, or
    vocab.json + merges.txt / bpe_simple_vocab_16e6.txt.gz found at or beside `path` (tokenizer/);
    without one `.tokenize` raises and ids must be given. The head count comes from `heads`, else
    config.json (num_attention_heads), else CLIP's convention width // 64 (right for ViT-L/14 and ViT-B)."""
    raw, jcfg, src = _resolve(path, "text_encoder")
    if any(k.startswith(_SD_PREFIX["text"]) for k in raw):
        sd, fmt = _strip(raw, _SD_PREFIX["text"]), "SD single file (cond_stage_model.transformer.*), HF names"
    elif any(k.startswith("text_model.") for k in raw):  # CLIPTextModel (transformers < 5) or a full CLIPModel
        sd, fmt = {k: v for k, v in raw.items() if k.startswith("text_model.")}, "HF CLIPTextModel"
    elif "embeddings.token_embedding.weight" in raw:  # transformers >= 5 names CLIPTextModel's keys without text_model.
        sd, fmt = {"text_model." + k: v for k, v in raw.items()}, "HF CLIPTextModel (transformers 5 names)"
    elif "token_embedding.weight" in raw and "positional_embedding" in raw:
        sd, fmt = openai_clip_to_hf(raw), "OpenAI CLIP"
    else:
        raise WeightsError(f"{src}: no CLIP text model found (expected text_model.* [HF], cond_stage_model.transformer.* "
                           f"[SD1.5] or token_embedding/positional_embedding [OpenAI]); keys look like {_sample(raw, 5)}")
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer in older HF files
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise WeightsError(f"{src} ({fmt}): no text_model.embeddings.token_embedding.weight")
    vocab, width = sd["text_model.embeddings.token_embedding.weight"].shape
    tokens = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max([int(m.group(1)) for k in sd for m in [re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)] if m] or [-1])
    heads = int(heads or jcfg.get("num_attention_heads", max(1, width // 64)))  # CLIP's convention: head dim 64
    tpath = tokenizer or _find_tokenizer(path)
    tok = read_tokenizer(tpath, tokens) if tpath else None
    mlp = sd.get("text_model.encoder.layers.0.mlp.fc1.weight")
    te = TextEncoder(vocab, tokens, width, layers, heads, tok, mlp_width=None if mlp is None else mlp.shape[0])
    fits = "fits preset sd15 (CLIP ViT-L/14)" if (width, layers) == (768, 12) else f"width {width}, {layers} layers: no preset"
    return load_into(te, sd, f"{fmt} from {src}", fits).eval()


# ------------------------------------------------------------------------------ image encoder

def load_image_encoder(path: str):
    """A SAMImageEncoder from a SAM / MedSAM checkpoint (full model with image_encoder.* keys, or bare).
    The architecture (ViT-B/L/H, window, global blocks) is read from the shapes."""
    raw = read_state_dict(path)
    if any(k.startswith("image_encoder.") for k in raw):
        sd, fmt = _strip(raw, "image_encoder."), "SAM full model (image_encoder.*)"
    elif "patch_embed.proj.weight" in raw:
        sd, fmt = raw, "bare SAM image encoder"
    else:
        raise WeightsError(f"{path}: no SAM image encoder found (expected image_encoder.* or patch_embed.proj.weight); "
                           f"keys look like {_sample(raw, 5)}")
    try:
        dim, cin, patch, _ = sd["patch_embed.proj.weight"].shape
        grid = sd["pos_embed"].shape[1]
        depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
        rel = [sd[f"blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        head_dim = rel[0][1]
        glob = tuple(i for i in range(depth) if rel[i][0] == 2 * grid - 1)
        window = next(((r[0] + 1) // 2 for r in rel if r[0] != 2 * grid - 1), 0)
        hidden = sd["blocks.0.mlp.lin1.weight"].shape[0]
        out = sd["neck.0.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"{path} ({fmt}): missing key {e.args[0]} needed to read the architecture") from None
    enc = SAMImageEncoder(img_size=grid * patch, patch_size=patch, in_chans=cin, embed_dim=dim, depth=depth,
                          num_heads=dim // head_dim, mlp_ratio=hidden / dim, out_chans=out, window_size=window,
                          global_attn_indexes=glob)
    fits = "ViT-B (SAM/MedSAM)" if (dim, depth) == (768, 12) else f"ViT with width {dim}, depth {depth}"
    return load_into(enc, sd, f"{fmt} from {path}", fits).eval()


# ------------------------------------------------------------------- built from a config

def build_text_encoder(cfg, path: str | None = None) -> TextEncoder:
    """The text encoder `cfg.text_encoder` names ("clip" or "byte").

    clip: `path` may hold weights (an SD1.5 single file, a diffusers/HF folder with text_encoder/, an
    OpenAI CLIP file): they are loaded with heartbeat.weights.load_text_encoder, tokenizer files
    found at or beside them. Or `path` holds only tokenizer files (a tokenizer/ folder with
    vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz): a randomly initialised CLIP of the
    config's size with that tokenizer. No path: no tokenizer (`.tokenize` raises; feed ids).
    byte: no files; vocabulary of 259.
    """
    backend = getattr(cfg, "attn_backend", "auto")
    if cfg.text_width != cfg.context_dim:
        raise ValueError(f"text_width={cfg.text_width} must equal context_dim={cfg.context_dim} "
                         "(text tokens are the cross-attention context)")
    if cfg.text_encoder == "byte":
        if path:
            raise ValueError("text_encoder=byte reads no files; use --text_encoder=clip to load a tokenizer")
        return TextEncoder(ByteTokenizer.vocab_size, cfg.text_tokens, cfg.text_width, cfg.text_layers,
                           cfg.text_heads, ByteTokenizer(cfg.text_tokens), backend=backend)
    if cfg.text_encoder != "clip":
        raise ValueError(f"text_encoder={cfg.text_encoder!r}: choose clip or byte")
    if path and _holds_weights(path):
        te = load_text_encoder(path, heads=cfg.text_heads)
        if te.width != cfg.text_width or len(te.text_model.encoder.layers) != cfg.text_layers:
            raise ValueError(f"{path}: a text model {te.width} wide with {len(te.text_model.encoder.layers)} layers, "
                             f"but the config says text_width={cfg.text_width}, text_layers={cfg.text_layers}; "
                             "use the matching preset (sd15 for CLIP ViT-L/14)")
        return te
    tok = read_tokenizer(path, cfg.text_tokens) if path else None
    vocab = tok.vocab_size if tok is not None else 49408
    return TextEncoder(vocab, cfg.text_tokens, cfg.text_width, cfg.text_layers, cfg.text_heads, tok, backend=backend)


def _holds_weights(path: str) -> bool:
    if os.path.isfile(path):
        return not path.endswith(".gz")
    names = set(os.listdir(path)) if os.path.isdir(path) else set()
    return "text_encoder" in names or any(n.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth")) for n in names)


def build_image_prior(cfg, vae=None, path: str | None = None) -> ImagePrior:
    """The frozen prior that `cfg.prior` names.

    vae:    cfg.prior_dim == latent_channels -> scaled latent mean; == vae_channels[-1] -> hidden map.
            Uses `vae` (an AutoencoderKL; its encoder is frozen in place and shared), else loads
            `path` with heartbeat.weights.load_vae, else builds a randomly initialised VAE (tests only:
            a warning says so).
    medsam: `path` is a SAM / MedSAM ViT-B checkpoint (.pth); cfg.prior_dim must be its 256 channels.
    """
    if cfg.prior == "medsam":
        if not path:
            raise ValueError("prior=medsam needs a SAM/MedSAM ViT-B checkpoint path (e.g. medsam_vit_b.pth); "
                             "or use --prior=vae, which needs no download")
        sam = load_image_encoder(path)
        out = sam.neck[0].out_channels
        if cfg.prior_dim != out:
            raise ValueError(f"prior=medsam: {path} gives {out}-channel features but prior_dim={cfg.prior_dim}; "
                             f"set --prior_dim={out}")
        return ImagePrior("medsam", cfg.prior_tokens, out, sam=sam)
    if cfg.prior != "vae":
        raise ValueError(f"prior={cfg.prior!r}: choose vae or medsam")
    if vae is None:
        if path:
            vae = load_vae(path, cfg)
        else:
            warnings.warn("build_image_prior: no VAE given; using a randomly initialised VAE encoder "
                          "(pass the trained VAE for meaningful prior tokens)")
            vae = AutoencoderKL(cfg)
    hidden = vae.encoder.conv_out.in_channels
    if cfg.prior_dim == vae.latent_channels:
        feature = "latent"
    elif cfg.prior_dim == hidden:
        feature = "hidden"
    else:
        raise ValueError(f"prior=vae: prior_dim={cfg.prior_dim} matches neither latent_channels="
                         f"{vae.latent_channels} (latent mean) nor vae_channels[-1]={hidden} (hidden map); "
                         f"set --prior_dim={hidden} (recommended) or {vae.latent_channels}")
    return ImagePrior("vae", cfg.prior_tokens, cfg.prior_dim, vae=vae, feature=feature)


# --------------------------------------------------------------------------------------- UNet

def _unet_format(sd: dict) -> tuple[dict, str]:
    if any(k.startswith(_SD_PREFIX["unet"]) for k in sd):
        sd, fmt = _strip(sd, _SD_PREFIX["unet"]), "SD single file (model.diffusion_model.*)"
    elif any(k.startswith("unet.") for k in sd):
        sd, fmt = _strip(sd, "unet."), "prefixed UNet (unet.*)"
    else:
        fmt = "UNet state dict"
    if any(k.startswith(("down_blocks.", "mid_block.")) for k in sd):
        try:
            return diffusers_unet_to_ldm(sd), fmt + ", diffusers names"
        except KeyError as e:
            raise WeightsError(f"{fmt}, diffusers names: {e.args[0]}") from None
    if "input_blocks.0.0.weight" not in sd:
        raise WeightsError("no UNet found: expected input_blocks.0.0.weight (LDM names, optionally under "
                           f"model.diffusion_model. or unet.) or diffusers down_blocks.*; keys look like {_sample(sd, 5)}")
    return sd, fmt + ", LDM names"


def unet_config_from(sd: dict, base: ModelConfig | None = None, json_cfg: dict | None = None) -> ModelConfig:
    """A ModelConfig whose UNet fields fit the (LDM-named) state dict; what shapes cannot tell (heads,
    norm groups, local channels) comes from config.json, else from `base`, else the preset with these widths."""
    idx = {int(m.group(1)) for k in sd for m in [re.match(r"input_blocks\.(\d+)\.", k)] if m}
    downs = sorted(i for i in idx if f"input_blocks.{i}.0.op.weight" in sd)
    levels = len(downs) + 1
    L = (len(idx) - 1 - len(downs)) // levels
    chs = tuple(int(sd[f"input_blocks.{1 + l * (L + 1)}.0.out_layers.3.weight"].shape[0]) for l in range(levels))
    attn = tuple(f"input_blocks.{1 + l * (L + 1)}.1.proj_in.weight" in sd for l in range(levels))
    ctx = next((int(v.shape[1]) for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    depth = 1 + max([int(m.group(1)) for k in sd for m in [re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k)] if m] or [0])
    zch = int(sd["out.2.weight"].shape[0])
    if base is None:
        base = next((f().model for f in PRESETS.values() if f().model.unet_channels == chs), ModelConfig())
    json_cfg = json_cfg or {}
    heads = json_cfg.get("attention_head_dim", base.heads)  # diffusers' SD1.x configs store the head count here
    heads = heads[0] if isinstance(heads, (list, tuple)) else heads
    cin = int(sd["input_blocks.0.0.weight"].shape[1])
    c = dataclasses.replace(base, unet_channels=chs, unet_layers=L, attn_levels=attn, latent_channels=zch,
                            context_dim=ctx or base.context_dim, transformer_depth=depth, heads=int(heads),
                            norm_groups=int(json_cfg.get("norm_num_groups", base.norm_groups)),
                            local_channels=cin - zch if cin > zch else base.local_channels,
                            temporal=any(".attn_temporal." in k for k in sd))
    if c.text_width != c.context_dim and c.text_encoder == "byte":
        c = dataclasses.replace(c, text_width=c.context_dim)
    return c


def load_unet(path: str, cfg: ModelConfig | None = None):
    """A heartbeat UNet from an SD1.5 single file (.ckpt / .safetensors), a diffusers folder (unet/) or file,
    or a HeartBeat UNet state dict. SD's conv_in (latent channels only) fills the first input channels;
    parameters SD lacks (image-prior branch, local-condition channels, temporal layers) keep their zero init.
    A checkpoint with temporal layers inflates the model first."""
    raw, jcfg, src = _resolve(path, "unet")
    sd, fmt = _unet_format(raw)
    shapes = unet_config_from(sd, None, jcfg)
    c = shapes if cfg is None else dataclasses.replace(cfg)
    fits = _fits("unet_channels", shapes.unet_channels)
    fmt = f"{fmt} from {src}"
    inflate = any(UNet.is_temporal_name(k) for k in sd) and not c.temporal

    def build():
        u = UNet(c)
        return u.inflate() if inflate else u

    with torch.device("meta"):  # check keys and shapes before allocating anything
        probe = build()
    w = sd.get("input_blocks.0.0.weight")
    own = probe.state_dict()["input_blocks.0.0.weight"].shape
    if w is not None and w.shape != own:  # SD's latent-only conv_in into ours with local channels
        if w.shape[0] != own[0] or w.shape[2:] != own[2:] or w.shape[1] > own[1]:
            raise WeightsError(f"shape mismatch at input_blocks.0.0.weight: checkpoint {tuple(w.shape)} vs model "
                               f"{tuple(own)} (detected format: {fmt}; {fits})")
        full = w.new_zeros(own)  # the local-condition channels start silent
        full[:, :w.shape[1]] = w
        sd = dict(sd, **{"input_blocks.0.0.weight": full})
    check_fit(probe, sd, fmt, fits, allow_missing=UNet.is_new_parameter)
    return load_into(build(), sd, fmt, fits, allow_missing=UNet.is_new_parameter).eval()


# ------------------------------------------------------------------------ diffusers names

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_unet_to_ldm(state_dict: dict) -> dict:
    """Rename a diffusers UNet2DConditionModel state dict (SD1.x layout) to our / CompVis names.

    The number of res blocks per level and which up blocks carry attention are read from the keys.
    Attention and feed-forward names inside transformer blocks are the same in both formats.
    Unknown keys raise KeyError naming them.
    """
    keys = list(state_dict)
    L = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k)))
    up_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out, unknown = {}, []
    for k, v in state_dict.items():
        new = None
        for a, b in _TOP.items():
            if k.startswith(a + "."):
                new = b + k[len(a):]
        if (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            new = f"input_blocks.{1 + i * (L + 1) + j}." + ("0." + _res(rest) if kind == "resnets" else "1." + rest)
        elif (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (L + 1)}.0.op.{m.group(2)}"
        elif (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            kind, j, rest = m.groups()
            new = ("middle_block.1." + rest if kind == "attentions"
                   else f"middle_block.{2 * int(j)}." + _res(rest))
        elif (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)):
            i, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            new = f"output_blocks.{i * (L + 1) + j}." + ("0." + _res(rest) if kind == "resnets" else "1." + rest)
        elif (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)):
            i = int(m.group(1))
            new = f"output_blocks.{i * (L + 1) + L}.{2 if i in up_attn else 1}.conv.{m.group(2)}"
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(f"diffusers_unet_to_ldm: {len(unknown)} unknown key(s): {', '.join(unknown[:10])}")
    return out


def pad_conv_in(state_dict: dict, cfg) -> dict:
    """Give an SD state dict's conv_in (4 input channels) zero weights for cfg.local_channels more.

    Returns a new dict (other tensors shared). A conv_in that already has them is left as is.
    """
    key = "input_blocks.0.0.weight"
    w = state_dict[key]
    want = cfg.latent_channels + cfg.local_channels
    if w.shape[1] == want:
        return dict(state_dict)
    if w.shape[1] != cfg.latent_channels:
        raise ValueError(f"{key} has {w.shape[1]} input channels; expected {cfg.latent_channels} (SD) or {want}")
    extra = w.new_zeros(w.shape[0], cfg.local_channels, *w.shape[2:])
    return {**state_dict, key: torch.cat([w, extra], dim=1)}  # local channels start silent


def _res(rest: str) -> str:
    name, _, param = rest.rpartition(".")
    if name not in _RES:
        raise KeyError(f"diffusers_unet_to_ldm: unknown ResnetBlock2D parameter {rest!r}")
    return f"{_RES[name]}.{param}"
