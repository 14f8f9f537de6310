"""AutoencoderKL with Stable Diffusion 1.5's architecture and original (CompVis/LDM) parameter names.

    encoder: conv_in -> down[i].block[j] (+ down[i].downsample) -> mid.{block_1, attn_1, block_2}
             -> norm_out -> SiLU -> conv_out (2 * latent channels: mean and log-variance)
    quant_conv (1x1), post_quant_conv (1x1)
    decoder: conv_in -> mid -> up[i].block[j] (vae_layers + 1 per level, + up[i].upsample)
             -> norm_out -> SiLU -> conv_out

Widths come from `ModelConfig.vae_channels` (SD1.5: 128/256/512/512, factor 8), `vae_layers`,
`latent_channels`, `in_channels`, `vae_norm_groups`. The sd15 preset has exactly SD1.5's
83,653,863 parameters, so SD checkpoints load by name (heartbeat/weights.py).

    vae = AutoencoderKL(cfg)
    post = vae.encode(x)                  # x (B, in_channels, H, W) in [-1, 1]
    z = vae.latent_scale * post.mean      # (B, latent_channels, H/f, W/f), f = cfg.vae_factor
    x_rec = vae.decode(z / vae.latent_scale)

`vae_loss` is the from-scratch training objective (see its docstring). Activations and conv weights
are in heartbeat.nn.MEMORY_FORMAT (NCHW), one layout throughout (docs/ARCHITECTURE.md §Tensors).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, group_norm
from .nn import as_layout, layout_weights


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"VAE width {channels} is not divisible by vae_norm_groups={groups}; "
                         "choose --vae_channels that are multiples of --vae_norm_groups")
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


def _gn_silu(norm: nn.GroupNorm, x, backend: str):
    """GroupNorm (fp32 statistics) + SiLU through the dispatcher (a fused Triton kernel on CUDA)."""
    return group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=True, backend=backend)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, cin: int, cout: int, groups: int, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(_gn_silu(self.norm1, x, self.backend))
        h = self.conv2(_gn_silu(self.norm2, h, self.backend))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 conv projections q, k, v, proj_out."""

    def __init__(self, ch: int, groups: int, backend: str = "auto"):
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))
        self.backend = backend

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(2) for p in (self.q, self.k, self.v))  # (B, HW, 1, C)
        o = attention(q, k, v, backend=self.backend)  # (B, HW, 1, C)
        o = as_layout(o.squeeze(2).transpose(1, 2).reshape(B, C, H, W))  # a channels-last view: re-laid
        return x + self.proj_out(o)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then a stride-2 3x3 conv, as SD does (asymmetric: no information lost at the border)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int, groups: int, backend: str):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups, backend)
        self.attn_1 = AttnBlock(ch, groups, backend)
        self.block_2 = ResnetBlock(ch, ch, groups, backend)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ModuleList) and an optional `downsample` / `upsample`."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None, backend: str = "auto"):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout, groups, backend) for j in range(n)])
        if resample == "down":
            self.downsample = Downsample(cout)
        elif resample == "up":
            self.upsample = Upsample(cout)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, chs, layers, cin, zch, groups, backend="auto"):
        super().__init__()
        self.backend = backend
        self.conv_in = nn.Conv2d(cin, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = chs[0]
        for i, c in enumerate(chs):
            self.down.append(_Level(prev, c, layers, groups, "down" if i < len(chs) - 1 else None, backend))
            prev = c
        self.mid = _Mid(chs[-1], groups, backend)
        self.norm_out = _norm(chs[-1], groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * zch, 3, padding=1)

    def features(self, x):
        """The last hidden map, after norm_out + SiLU: (B, chs[-1], H/f, W/f)."""
        h = self.conv_in(x)
        for lvl in self.down:
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        return _gn_silu(self.norm_out, self.mid(h), self.backend)

    def forward(self, x):
        return self.conv_out(self.features(x))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h*f, w*f). up[i] is indexed like the encoder's down[i]."""

    def __init__(self, chs, layers, cout, zch, groups, backend="auto"):
        super().__init__()
        self.backend = backend
        self.conv_in = nn.Conv2d(zch, chs[-1], 3, padding=1)
        self.mid = _Mid(chs[-1], groups, backend)
        levels = [None] * len(chs)
        prev = chs[-1]
        for i in reversed(range(len(chs))):
            levels[i] = _Level(prev, chs[i], layers + 1, groups, "up" if i > 0 else None, backend)
            prev = chs[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(chs[0], groups)
        self.conv_out = nn.Conv2d(chs[0], cout, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            for blk in lvl.block:
                h = blk(h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(_gn_silu(self.norm_out, h, self.backend))


def as_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Frames (B, C, H, W) -> (B, channels, H, W): grey to RGB by repetition (SD's VAE takes RGB), RGB
    to grey by the channel mean; unchanged when C == channels."""
    if x.shape[1] == channels:
        return x
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True).expand(-1, channels, -1, -1)


class DiagonalGaussian:
    """The posterior N(mean, exp(logvar)) from moments (B, 2C, h, w); logvar clamped to [-30, 20] as SD."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w), in fp32: (B,)."""
        m, lv = self.mean.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """SD-compatible KL autoencoder. encode(x) -> DiagonalGaussian, decode(z) -> image (see module doc)."""

    def __init__(self, cfg):
        super().__init__()
        chs, zch = tuple(cfg.vae_channels), cfg.latent_channels
        self.in_channels, self.latent_channels, self.factor = cfg.in_channels, zch, 2 ** (len(chs) - 1)
        self.latent_scale = float(cfg.latent_scale)
        backend = getattr(cfg, "attn_backend", "auto")
        self.encoder = Encoder(chs, cfg.vae_layers, cfg.in_channels, zch, cfg.vae_norm_groups, backend)
        self.decoder = Decoder(chs, cfg.vae_layers, cfg.in_channels, zch, cfg.vae_norm_groups, backend)
        self.quant_conv = nn.Conv2d(2 * zch, 2 * zch, 1)
        self.post_quant_conv = nn.Conv2d(zch, zch, 1)
        layout_weights(self)  # conv weights in the one layout, once (heartbeat/nn.py)

    def _check(self, x, channels, what):
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}; "
                             + ("grey frames go to an SD VAE as 3 channels: x.expand(-1, 3, -1, -1)"
                                if what == "encode" else "pass latents with latent_channels channels"))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x (B, in_channels, H, W), H and W multiples of the factor -> posterior over (B, zch, H/f, W/f)."""
        return self.encode_with_features(x)[0]

    def encode_with_features(self, x: torch.Tensor) -> tuple[DiagonalGaussian, torch.Tensor]:
        """encode(x) and the encoder's last hidden map (Encoder.features), from one pass."""
        self._check(x, self.in_channels, "encode")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"AutoencoderKL.encode: H, W = {tuple(x.shape[-2:])} must be multiples of the "
                             f"VAE factor {self.factor}; resize or pad the frames")
        h = self.encoder.features(as_layout(x))
        return DiagonalGaussian(self.quant_conv(self.encoder.conv_out(h))), h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, zch, h, w) (unscaled: divide diffusion latents by latent_scale first) -> (B, in_channels, h*f, w*f)."""
        self._check(z, self.latent_channels, "decode")
        return self.decoder(self.post_quant_conv(as_layout(z))).contiguous()  # NCHW out, whatever the layout

    def forward(self, x, generator=None, sample: bool = True):
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample else post.mean), post


# ------------------------------------------------------------------------------- training loss

def _gauss_window(size: int = 11, sigma: float = 1.5, device=None, dtype=None):
    g = torch.exp(-(torch.arange(size, device=device, dtype=torch.float32) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).to(dtype)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5, valid region) of (B, C, H, W) images.

    The window shrinks for images smaller than 11 pixels.
    """
    C = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    w = _gauss_window(size, 1.5, a.device, a.dtype).expand(C, 1, size, size)
    f = lambda t: F.conv2d(t, w, groups=C)  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = f(a), f(b)
    s_aa, s_bb, s_ab = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.mean()


def laplacian_pyramid(x: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
    """Band-pass images x_j - up(down(x_j)) for j < levels-1, then the low-pass residual (2x2 average pools)."""
    out = []
    for _ in range(levels - 1):
        if min(x.shape[-2:]) < 2:
            break
        low = F.avg_pool2d(x, 2)
        out.append(x - F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False))
        x = low
    out.append(x)
    return out


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, generator: torch.Generator | None = None,
             kl_weight: float = 1e-6, lap_weight: float = 1.0, ssim_weight: float = 0.2,
             lap_levels: int = 4):
    """From-scratch VAE objective. x (B, C, H, W) in [-1, 1] -> (loss, logs).

    loss = L1(x, x_rec) + lap_weight * sum_j L1(Lap_j x, Lap_j x_rec) + ssim_weight * (1 - SSIM)
           + kl_weight * KL / (number of pixel values)

    Why these terms, with no downloadable perceptual network (SD's VAE used LPIPS + a patch GAN):
    - L1 alone lets the decoder average the speckle away (a blurry but low-L1 image). The Laplacian
      pyramid term (Bojanowski et al. 2018, "Lap1") adds the L1 of each band-pass level, so errors
      in fine texture weigh as much as errors in the low-pass mean: speckle must be reproduced.
    - SSIM compares local means, contrasts and correlations, i.e. the local statistics that make a
      B-mode image look like one, and penalises lost contrast that L1 tolerates.
    - KL per pixel value with weight 1e-6 matches SD's setting (there both terms are sums over
      their elements divided by the batch), keeping the latent nearly deterministic but bounded.
    - A patch GAN sharpens further but doubles the cost and is unstable on a short CPU run: left out.
    The decoder is fed a posterior sample, as in SD. logs: detached 0-dim tensors.
    """
    post = vae.encode(x)
    rec = vae.decode(post.sample(generator)).float()  # losses in fp32 under autocast
    x = x.float()
    l1 = (rec - x).abs().mean()
    lap = sum((a - b).abs().mean() for a, b in zip(laplacian_pyramid(rec, lap_levels), laplacian_pyramid(x, lap_levels)))
    s = ssim(rec, x) if ssim_weight else torch.zeros((), device=x.device)
    kl = post.kl().sum() / x.numel()
    loss = l1 + lap_weight * lap + ssim_weight * (1.0 - s) + kl_weight * kl
    logs = {"loss": loss, "l1": l1, "lap": lap, "ssim": s, "kl": kl,
            "logvar": post.logvar.float().mean(), "mse": F.mse_loss(rec, x)}
    return loss, {k: v.detach() for k, v in logs.items()}
