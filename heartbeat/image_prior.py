"""Image-prior encoders: SAM / MedSAM's ViT-B image encoder, and the offline default (our VAE's encoder).

    prior = ImagePrior("vae", tokens, dim, vae=vae)       # frozen; architecture only, no I/O
    prior = heartbeat.weights.build_image_prior(cfg, vae=vae, path=None)   # what a config names (+ files)
    tokens = prior(x)            # x (B, C, H, W) in [-1, 1], C = 1 or 3 -> (B, cfg.prior_tokens, cfg.prior_dim)

SAM ViT-B (`SAMImageEncoder`, parameter names of segment_anything's `image_encoder.*` without the
prefix): 16x16 patches -> 768 wide, + absolute position embedding (1, 64, 64, 768); 12 pre-LN blocks,
12 heads, windowed attention (14x14 windows, padded) with decomposed relative positions, global
attention in blocks 2, 5, 8, 11; neck conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d to 256
channels. (B, 3, 1024, 1024) -> (B, 256, 64, 64); 89,670,912 parameters.

Preprocessing (`preprocess`):
    medsam (default, MedSAM's): grey -> 3 channels, resize to 1024 (bicubic), per-image min-max to [0, 1].
    sam    (SAM's own): pixel values 0..255, minus ImageNet mean (123.675, 116.28, 103.53), divided by
           std (58.395, 57.12, 57.375); SAM resizes the longest side to 1024 and zero-pads, which for
           square echo frames is the same resize.

Offline default (`cfg.prior == "vae"`): the project's VAE encoder, frozen; with
`cfg.prior_dim == cfg.latent_channels` the tokens are the scaled latent mean, with
`cfg.prior_dim == cfg.vae_channels[-1]` they are the encoder's last hidden map (after norm_out + SiLU),
which carries far more appearance information per token (the recommended setting).
Both are adaptive-average-pooled to a sqrt(prior_tokens) x sqrt(prior_tokens) grid.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae import as_channels

SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of (B, C, H, W)."""

    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(ch)), nn.Parameter(torch.zeros(ch)), eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * ((x - u) / torch.sqrt(s + self.eps)) + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, cin: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, dim)


def rel_pos_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for offsets q - k over a side of `size`: (size, size, head_dim).

    A table trained for another size (2 * size - 1 rows expected) is linearly resampled, as SAM does.
    """
    n = 2 * size - 1
    if rel_pos.shape[0] != n:
        rel_pos = F.interpolate(rel_pos.t()[None], size=n, mode="linear")[0].t()
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[(idx[:, None] - idx[None, :] + size - 1).long()]


class Attention(nn.Module):
    """Multi-head self-attention on (B, H, W, C) with decomposed relative positions (MViTv2/SAM)."""

    def __init__(self, dim: int, heads: int, rel_size: tuple[int, int]):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size[0] - 1, self.hd))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size[1] - 1, self.hd))

    def forward(self, x):
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)  # each (B, heads, HW, hd)
        Rh, Rw = rel_pos_table(H, self.rel_pos_h), rel_pos_table(W, self.rel_pos_w)  # (H, H, hd), (W, W, hd)
        rq = q.reshape(B, self.heads, H, W, self.hd)  # unscaled q, as SAM
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", rq, Rh)  # (B, heads, H, W, H)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", rq, Rw)  # (B, heads, H, W, W)
        bias = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, self.heads, H * W, H * W)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, HW, hd)
        return self.proj(o.transpose(1, 2).reshape(B, H, W, C))


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; window > 0: attention inside non-overlapping windows (zero-padded)."""

    def __init__(self, dim, heads, mlp_ratio, window, grid):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, (window, window) if window else (grid, grid))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window = window

    def forward(self, x):
        h = self.norm1(x)
        if self.window:
            B, H, W, C = h.shape
            w = self.window
            ph, pw = (w - H % w) % w, (w - W % w) % w
            h = F.pad(h, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            h = h.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, C)  # windows become batch
            h = self.attn(h)
            h = h.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)[:, :H, :W]
        else:
            h = self.attn(h)
        x = x + h
        return x + self.mlp(self.norm2(x))


class SAMImageEncoder(nn.Module):
    """SAM's ViT image encoder. forward((B, 3, img, img) preprocessed) -> (B, out_chans, img/patch, img/patch)."""

    def __init__(self, img_size=1024, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, out_chans=256, window_size=14, global_attn_indexes=(2, 5, 8, 11)):
        super().__init__()
        self.img_size, grid = img_size, img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, 0 if i in global_attn_indexes else window_size, grid)
            for i in range(depth)])
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels or x.shape[-1] != self.img_size \
                or x.shape[-2] != self.img_size:
            raise ValueError(f"SAMImageEncoder: expected (B, 3, {self.img_size}, {self.img_size}), got "
                             f"{tuple(x.shape)}; run preprocess(x) first")
        x = self.patch_embed(x) + self.pos_embed  # (B, g, g, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


def preprocess(x: torch.Tensor, size: int = 1024, mode: str = "medsam") -> torch.Tensor:
    """x (B, 1 or 3, H, W) in [-1, 1] -> (B, 3, size, size) as the encoder expects (see module doc)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"image prior: expected (B, 1 or 3, H, W) in [-1, 1], got {tuple(x.shape)}")
    x = x.float().expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    if mode == "medsam":
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-8)
    if mode == "sam":
        px = ((x + 1) * 127.5).clamp(0, 255)
        mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (SAM_MEAN, SAM_STD))
        return (px - mean) / std
    raise ValueError(f"preprocess mode {mode!r}: choose medsam or sam")


def _pool_tokens(f: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, tokens, C) by adaptive average pooling to a square grid."""
    s = math.isqrt(tokens)
    return F.adaptive_avg_pool2d(f, (s, s)).flatten(2).transpose(1, 2)


class ImagePrior(nn.Module):
    """A frozen encoder + pooling. forward(x (B, C, H, W) in [-1, 1]) -> (B, tokens, dim); no gradients."""

    def __init__(self, kind: str, tokens: int, dim: int, sam: SAMImageEncoder | None = None, vae=None,
                 feature: str = "hidden", sam_mode: str = "medsam"):
        super().__init__()
        if math.isqrt(tokens) ** 2 != tokens:
            raise ValueError(f"prior_tokens={tokens} must be a square number (tokens form a grid): e.g. 16, 64")
        self.kind, self.tokens, self.dim, self.feature, self.sam_mode = kind, tokens, dim, feature, sam_mode
        if kind == "medsam":
            self.sam = sam
        else:  # share the VAE's modules (frozen in place): no second copy of the weights
            self.encoder, self.quant_conv = vae.encoder, vae.quant_conv
            self.vae_in, self.factor, self.scale = vae.in_channels, vae.factor, vae.latent_scale
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image prior: expected (B, 1 or 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        if self.kind == "medsam":
            return _pool_tokens(self.sam(preprocess(x, self.sam.img_size, self.sam_mode)).float(), self.tokens)
        x = x.to(self.encoder.conv_in.weight.dtype)
        x = as_channels(x, self.vae_in)
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image prior: H, W = {tuple(x.shape[-2:])} must be multiples of the VAE factor {self.factor}")
        return self.from_vae_features(self.encoder.features(x))

    @torch.no_grad()
    def from_vae_features(self, h: torch.Tensor) -> torch.Tensor:
        """Tokens from the shared VAE encoder's last hidden map h (Encoder.features), for callers that
        already ran the encoder on the same frames (the encoder cache)."""
        if self.feature == "latent":
            h = self.scale * self.quant_conv(self.encoder.conv_out(h)).chunk(2, dim=1)[0]
        return _pool_tokens(h.float(), self.tokens)
