"""FVD features: Kinetics-400 I3D logits (400-d) of 16-frame clips (Unterthiner et al. 2018).

Weights: the TorchScript `i3d_torchscript.pt` used by StyleGAN-V and its followers, a port of the
TF-Hub "i3d-kinetics-400" model that the original FVD code uses. Nothing is downloaded; the user
names a local file. Protocol (docs/METRICS.md):

  1. a clip's first 16 frames (clips shorter than 16 frames are refused),
  2. grey replicated to 3 channels, values to [0, 1],
  3. each frame resized bilinearly (align_corners=False) so its shorter side is 224, centre-cropped
     to 224 x 224 (square frames: a plain resize),
  4. values to [-1, 1], layout (N, 3, 16, 224, 224),
  5. `net(x, rescale=False, resize=False, return_features=True)` -> (N, 400): the logits layer
     before the softmax (preprocessing is done here, so the module's own is switched off).

FVD = Frechet distance between Gaussians fitted to the real and generated (N, 400) features,
reported as is (not divided by 16 or by anything else).

    net = load_i3d(path)
    feats = i3d_features(net, clips)     # clips (N, F, H, W) uint8 -> (N, 400) float64
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FVD_FRAMES = 16
FVD_SIZE = 224


def load_i3d(path) -> torch.nn.Module:
    """Load the TorchScript I3D (`i3d_torchscript.pt`); clear errors for a missing or wrong file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"I3D weights {path} not found: pass --i3d=FILE with the TorchScript "
                                "i3d_torchscript.pt (StyleGAN-V's FVD detector)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise ValueError(f"{path} is not a TorchScript file ({type(e).__name__}); FVD needs the "
                         "TorchScript i3d_torchscript.pt") from None


def preprocess_clips(clips: torch.Tensor) -> torch.Tensor:
    """(N, F, H, W) uint8 -> (N, 3, 16, 224, 224) float32 in [-1, 1] (steps 1-4 above)."""
    if clips.ndim != 4 or clips.dtype != torch.uint8:
        raise ValueError(f"FVD clips must be uint8 (N, F, H, W), got {clips.dtype} {tuple(clips.shape)}")
    N, Fr, H, W = clips.shape
    if Fr < FVD_FRAMES:
        raise ValueError(f"FVD needs clips of at least {FVD_FRAMES} frames, got {Fr}")
    x = clips[:, :FVD_FRAMES].float().div(255).reshape(N * FVD_FRAMES, 1, H, W)  # frames as batch
    s = FVD_SIZE / min(H, W)
    th, tw = max(FVD_SIZE, math.ceil(H * s)), max(FVD_SIZE, math.ceil(W * s))
    x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    top, left = (th - FVD_SIZE) // 2, (tw - FVD_SIZE) // 2
    x = x[:, :, top:top + FVD_SIZE, left:left + FVD_SIZE]
    x = x.reshape(N, FVD_FRAMES, 1, FVD_SIZE, FVD_SIZE).permute(0, 2, 1, 3, 4)  # (N, 1, T, h, w)
    return (x * 2 - 1).expand(-1, 3, -1, -1, -1).contiguous()


@torch.no_grad()
def i3d_features(net, clips, batch_size: int = 8, device="cpu") -> np.ndarray:
    """clips (N, F, H, W) uint8 -> (N, 400) float64 I3D logits features, computed on `device`
    (where the caller has put `net`)."""
    clips = torch.as_tensor(np.asarray(clips))
    out = []
    for i in range(0, len(clips), batch_size):
        x = preprocess_clips(clips[i:i + batch_size].to(device))
        f = net(x, rescale=False, resize=False, return_features=True)
        out.append(f.double().reshape(len(x), -1).cpu())
    return torch.cat(out).numpy()
