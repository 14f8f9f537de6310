"""The conditional denoiser: Stable Diffusion 1.5's UNet with its original (CompVis/LDM) names.

    unet = UNet(cfg)                                        # cfg: ModelConfig
    eps = unet(z_t, t, text=ctx, image=img, local=loc)      # z_t (B, 4, h, w) -> (B, 4, h, w)
    unet.inflate()                                          # in place: the video model
    eps = unet(z_t, t, ...)                                 # z_t (B, F, 4, h, w) -> (B, F, 4, h, w)

Structure (names of an SD1.5 `model.diffusion_model.*` state dict without the prefix):
    time_embed.{0,2}                   Linear(c0, 4 c0), SiLU, Linear(4 c0, 4 c0)
    input_blocks.0.0                   conv_in: latent_channels + local_channels -> c0 (the local
                                       channels' weights start at zero)
    input_blocks.{i}.{0,1}             ResBlock (+ SpatialTransformer on attn_levels); .0.op = Downsample
    middle_block.{0,1,2}               ResBlock, SpatialTransformer, ResBlock
    output_blocks.{i}.{0,1,2}          ResBlock on [x, skip] (+ SpatialTransformer) (+ Upsample `.conv`)
    out.{0,2}                          GroupNorm(+SiLU), conv -> latent_channels (zero-init as SD)
SpatialTransformer: norm, proj_in (1x1 conv), transformer_blocks.{k}.{norm1, attn1, norm2, attn2,
norm3, ff.net.0.proj (GEGLU), ff.net.2}, proj_out (1x1 conv, zero-init).

New parameters relative to SD1.5 (all start at zero output; see `is_new_parameter`):
    transformer_blocks.{k}.attn2.{to_q_img, to_k_img, to_v_img}   image-prior branch (to_v_img = 0)
    transformer_blocks.{k}.{norm_temporal, attn_temporal.*}       after inflate(): temporal attention
    input_blocks.0.0.weight[:, latent_channels:]                  conv_in's local-condition channels
    guidance_embed.{0,2}            a distilled student only (cfg.guidance_inputs = G > 0): Linear(G c0,
                                    4 c0), SiLU, Linear(4 c0, 4 c0) (zero-init) on the sinusoidal embeddings
                                    of its G guidance scales, added to the timestep embedding
                                    (heartbeat/distill.py, after Meng et al. 2023 §3.1 "w-conditioning")

Video (after inflate): every spatial layer sees (B*F, C, h, w) (what a (1,3,3) conv would do); the
timestep embedding and the text/image contexts are repeated per frame once per forward; each
transformer block runs attn1 -> attn2 -> attn_temporal -> ff. Gradient checkpointing is per block
(every entry of input_blocks / middle_block / output_blocks) when cfg.grad_checkpointing.

Reading SD1.5 / diffusers files (and renaming diffusers' names to these) is heartbeat/weights.py's.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import DualCrossAttention, SelfAttention, TemporalAttention
from .nn import (Downsample, GroupNorm32, ResBlock, Upsample, as_layout, checkpoint, layout_weights,
                 timestep_embedding, zero_module)


class GEGLU(nn.Module):
    """proj: Linear(dim, 2 inner); a * gelu(gate). (N, L, dim) -> (N, L, inner)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """SD's GEGLU feed-forward: net.0 GEGLU(dim, 4 dim), net.1 Dropout, net.2 Linear(4 dim, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 (self) -> attn2 (text + image cross) -> [attn_temporal] -> ff, each pre-LayerNorm + residual.

    x (B*F, L, dim), L = h*w tokens; text/image (B*F, Lc, context_dim) or None; frames = F.
    `norm_temporal` / `attn_temporal` exist after inflate() only.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, share_q: bool = False, backend: str = "auto"):
        super().__init__()
        self.dim, self.heads, self.backend = dim, heads, backend
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, heads, backend)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = DualCrossAttention(dim, context_dim, heads, share_q=share_q, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.norm_temporal = None
        self.attn_temporal = None

    def add_temporal(self, max_frames: int) -> None:
        ref = self.norm1.weight
        self.norm_temporal = nn.LayerNorm(self.dim).to(device=ref.device, dtype=ref.dtype)
        self.attn_temporal = TemporalAttention(self.dim, self.heads, max_frames, self.backend).to(
            device=ref.device, dtype=ref.dtype)

    def forward(self, x, text=None, image=None, frames: int = 1):
        x = self.attn1(self.norm1(x)) + x
        if text is not None or image is not None:
            x = self.attn2(self.norm2(x), text, image) + x
        if self.attn_temporal is not None:
            N, L, C = x.shape
            xv = x.view(N // frames, frames, L, C)  # (B, F, L, C): the tokens as they lie, no copy
            x = (xv + self.attn_temporal(self.norm_temporal(xv))).view(N, L, C)
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """norm -> proj_in (1x1) -> transformer_blocks -> proj_out (1x1, zero-init) + residual.

    x (B*F, C, H, W) -> same; C split into `heads` heads (SD1.5: 8, head dims 40/80/160).
    """

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int,
                 share_q: bool = False, backend: str = "auto"):
        super().__init__()
        self.norm = GroupNorm32(groups, ch, eps=1e-6, backend=backend)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, context_dim, share_q, backend) for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x, text=None, image=None, frames: int = 1):
        N, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.permute(0, 2, 3, 1).reshape(N, H * W, C)  # pixels become tokens (a copy from NCHW)
        for blk in self.transformer_blocks:
            h = blk(h, text, image, frames)
        # tokens back to (N, C, H, W): the permuted view has channels-last strides; left so, it would
        # reach proj_out and, through the residual add, every later conv (weights re-laid per call)
        h = as_layout(h.view(N, H, W, C).permute(0, 3, 1, 2))
        return self.proj_out(h) + x


class Block(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks (SD's TimestepEmbedSequential)."""

    def forward(self, x, emb, text, image, frames):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, text, image, frames)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """SD1.5's conditional UNet from a ModelConfig; see the module docstring for names and shapes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        chs, L = tuple(cfg.unet_channels), cfg.unet_layers
        if len(cfg.attn_levels) != len(chs):
            raise ValueError(f"attn_levels has {len(cfg.attn_levels)} entries but unet_channels has {len(chs)}")
        c0, ted, g, be = chs[0], 4 * chs[0], cfg.norm_groups, cfg.attn_backend
        share_q = bool(getattr(cfg, "share_image_q", False))

        def transformer(ch):
            if ch % cfg.heads:
                raise ValueError(f"UNet width {ch} is not divisible by heads={cfg.heads}")
            return SpatialTransformer(ch, cfg.heads, cfg.transformer_depth, cfg.context_dim, g, share_q, be)

        self.time_embed = nn.Sequential(nn.Linear(c0, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.guidance_inputs = int(getattr(cfg, "guidance_inputs", 0))
        if self.guidance_inputs:   # a student starts as its teacher: the embedding adds exactly zero
            self.guidance_embed = nn.Sequential(nn.Linear(self.guidance_inputs * c0, ted), nn.SiLU(),
                                                zero_module(nn.Linear(ted, ted)))
        conv_in = nn.Conv2d(cfg.latent_channels + cfg.local_channels, c0, 3, padding=1)
        with torch.no_grad():
            conv_in.weight[:, cfg.latent_channels:].zero_()  # local channels start silent
        self.input_blocks = nn.ModuleList([Block([conv_in])])
        skips, ch = [c0], c0
        for lvl, cout in enumerate(chs):
            for _ in range(L):
                layers = [ResBlock(ch, ted, cout, g, backend=be)]
                ch = cout
                if cfg.attn_levels[lvl]:
                    layers.append(transformer(ch))
                self.input_blocks.append(Block(layers))
                skips.append(ch)
            if lvl != len(chs) - 1:
                self.input_blocks.append(Block([Downsample(ch)]))
                skips.append(ch)
        self.middle_block = Block([ResBlock(ch, ted, ch, g, backend=be), transformer(ch),
                                   ResBlock(ch, ted, ch, g, backend=be)])
        self.output_blocks = nn.ModuleList()
        for lvl in reversed(range(len(chs))):
            for i in range(L + 1):
                layers = [ResBlock(ch + skips.pop(), ted, chs[lvl], g, backend=be)]
                ch = chs[lvl]
                if cfg.attn_levels[lvl]:
                    layers.append(transformer(ch))
                if lvl and i == L:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(layers))
        self.out = nn.Sequential(GroupNorm32(g, ch, silu=True, backend=be), nn.Identity(),  # .1 = SiLU (fused)
                                 zero_module(nn.Conv2d(ch, cfg.latent_channels, 3, padding=1)))
        self.downsamples = len(chs) - 1
        if cfg.temporal:
            self.inflate()
        layout_weights(self)  # conv weights in the one layout, once (heartbeat/nn.py)

    # ----------------------------------------------------------------------------- video

    def transformer_blocks(self):
        return [m for m in self.modules() if isinstance(m, BasicTransformerBlock)]

    def inflate(self) -> "UNet":
        """Add a zero-output temporal attention (+ LayerNorm) to every transformer block; in place."""
        for blk in self.transformer_blocks():
            if blk.attn_temporal is None:
                blk.add_temporal(self.cfg.max_frames)
        self.cfg.temporal = True
        return self

    @staticmethod
    def is_temporal_name(name: str) -> bool:
        return ".attn_temporal." in name or ".norm_temporal." in name

    @staticmethod
    def is_image_branch_name(name: str) -> bool:
        return re.search(r"\.attn2\.to_[qkv]_img\.", name) is not None

    @staticmethod
    def is_guidance_name(name: str) -> bool:
        return name.startswith("guidance_embed.") or ".guidance_embed." in name

    @staticmethod
    def is_new_parameter(name: str) -> bool:
        """Parameters SD1.5 does not have (conv_in's extra channels are part of an SD tensor)."""
        return UNet.is_temporal_name(name) or UNet.is_image_branch_name(name) or UNet.is_guidance_name(name)

    def parameter_breakdown(self) -> dict:
        """Parameter counts: sd (what SD1.5's layout holds, conv_in at latent_channels inputs),
        image_branch (to_*_img), local_conv_in (conv_in's local channels), temporal, total."""
        out = dict(sd=0, image_branch=0, local_conv_in=0, temporal=0, total=0)
        for n, p in self.named_parameters():
            out["total"] += p.numel()
            if self.is_temporal_name(n):
                out["temporal"] += p.numel()
            elif self.is_image_branch_name(n):
                out["image_branch"] += p.numel()
            elif self.is_guidance_name(n):
                pass                                    # a student's guidance embedding: in total only
            elif n == "input_blocks.0.0.weight":
                local = p[:, self.cfg.latent_channels:].numel()
                out["local_conv_in"] += local
                out["sd"] += p.numel() - local
            else:
                out["sd"] += p.numel()
        return out

    def temporal_parameters(self):
        return [p for n, p in self.named_parameters() if self.is_temporal_name(n)]

    def spatial_parameters(self):
        return [p for n, p in self.named_parameters() if not self.is_temporal_name(n)]

    # ---------------------------------------------------------------------------- forward

    def forward(self, z_t, t, text=None, image=None, local=None, guidance=None):
        """z_t (B, C, h, w) or (B, F, C, h, w) (after inflate); t (B,) or a scalar;
        text (B, Lt, context_dim) | None; image (B, Li, context_dim) | None (None: branch skipped);
        local (B[, F], local_channels, h, w) | None (None: zeros); guidance (B, guidance_inputs), a
        student's scales (required by a student, refused otherwise). Returns the prediction shaped like z_t."""
        cfg = self.cfg
        if z_t.ndim == 5:
            if not cfg.temporal:
                raise ValueError(f"z_t has shape {tuple(z_t.shape)} (B, F, C, h, w) but the UNet is not inflated; "
                                 "call unet.inflate() first or pass (B, C, h, w)")
            B, Fr = z_t.shape[:2]
        elif z_t.ndim == 4:
            B, Fr = z_t.shape[0], 1
        else:
            raise ValueError(f"z_t must be (B, {cfg.latent_channels}, h, w) or (B, F, {cfg.latent_channels}, h, w); "
                             f"got shape {tuple(z_t.shape)}")
        C, h, w = z_t.shape[-3:]
        if C != cfg.latent_channels:
            raise ValueError(f"z_t has {C} channels, expected latent_channels={cfg.latent_channels}")
        m = 2 ** self.downsamples
        if h % m or w % m:
            raise ValueError(f"z_t spatial size {h}x{w} must be divisible by {m} (2 ** downsampling levels)")
        x = z_t.reshape(B * Fr, C, h, w)  # frames become batch
        t = torch.as_tensor(t, device=z_t.device)
        if t.ndim == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape ({B},) (one timestep per sample); got {tuple(t.shape)}")
        text = self._check_context("text", text, B)
        image = self._check_context("image", image, B)
        if cfg.local_channels:
            x = torch.cat([x, self._local(local, B, Fr, h, w, x)], dim=1)  # (B*F, C + local_channels, h, w)
        elif local is not None:
            raise ValueError("local was given but the UNet has local_channels=0")
        x = as_layout(x)  # the one layout from here on (heartbeat/nn.py MEMORY_FORMAT)

        emb = timestep_embedding(t, cfg.unet_channels[0]).to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(emb)  # (B, 4 c0)
        if self.guidance_inputs or guidance is not None:
            emb = emb + self._guidance(guidance, B).to(emb.dtype)
        if Fr > 1:  # per-frame copies, once per forward
            emb = emb.repeat_interleave(Fr, dim=0)
            text = None if text is None else text.repeat_interleave(Fr, dim=0)  # (B*F, Lt, ctx)
            image = None if image is None else image.repeat_interleave(Fr, dim=0)
        ck = cfg.grad_checkpointing
        hs = []
        for blk in self.input_blocks:
            x = checkpoint(blk, x, emb, text, image, Fr, enabled=ck)
            hs.append(x)
        x = checkpoint(self.middle_block, x, emb, text, image, Fr, enabled=ck)
        for blk in self.output_blocks:
            x = torch.cat([x, hs.pop()], dim=1)  # skip connection on channels
            x = checkpoint(blk, x, emb, text, image, Fr, enabled=ck)
        x = self.out(x)
        return x.reshape(z_t.shape).contiguous()  # NCHW out whatever MEMORY_FORMAT is

    def _guidance(self, g, B):
        G = self.guidance_inputs
        if not G:
            raise ValueError("guidance scales were given but this UNet is not a distilled student (guidance_inputs=0)")
        if g is None or tuple(g.shape) != (B, G):
            raise ValueError(f"a distilled student needs guidance=(B, {G}) scales (1 joint + one per condition); "
                             f"got {None if g is None else tuple(g.shape)}")
        c0 = self.cfg.unet_channels[0]
        e = timestep_embedding(g.reshape(-1).float() * 100.0, c0).view(B, G * c0)   # scales 0..10 -> 0..1000
        return self.guidance_embed(e.to(self.guidance_embed[0].weight.dtype))

    def _check_context(self, name, c, B):
        if c is None:
            return None
        want = self.cfg.context_dim
        if c.ndim != 3 or c.shape[0] != B or c.shape[2] != want:
            raise ValueError(f"{name} must have shape ({B}, tokens, {want}) (batch, tokens, context_dim); "
                             f"got {tuple(c.shape)}")
        return c

    def _local(self, local, B, Fr, h, w, x):
        lc = self.cfg.local_channels
        if local is None:
            return x.new_zeros(B * Fr, lc, h, w)
        if local.ndim == 4 and tuple(local.shape) == (B, lc, h, w):
            if Fr > 1:
                local = local.repeat_interleave(Fr, dim=0)  # one map for every frame
            return local.to(x.dtype)
        if local.ndim == 5 and tuple(local.shape) == (B, Fr, lc, h, w) and (Fr > 1 or self.cfg.temporal):
            return local.reshape(B * Fr, lc, h, w).to(x.dtype)  # frames become batch
        want = f"({B}, {lc}, {h}, {w})" + (f" or ({B}, {Fr}, {lc}, {h}, {w})" if self.cfg.temporal else "")
        raise ValueError(f"local must have shape {want} (local_channels={lc} at latent size); got {tuple(local.shape)}")

