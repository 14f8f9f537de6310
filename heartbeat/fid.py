"""FID features: InceptionV3 pool3 (2048-d) of the TF "2015-12-05" graph, the standard FID network.

Two weight files are accepted (nothing is downloaded; the user names a local file):
  * pytorch-fid's state dict `pt_inception-2015-12-05-6726825d.pth`: loaded into `FIDInceptionV3`
    below, written here from the Inception-v3 paper (Szegedy et al. 2016) with the FID port's
    departures from torchvision's model: average pools that exclude padding
    (count_include_pad=False) in the A, C and E blocks, a max pool in the last E block's pool
    branch, BatchNorm eps 1e-3, 1008 output classes. Parameter names follow that file
    (Conv2d_1a_3x3.conv.weight, Conv2d_1a_3x3.bn.running_mean, Mixed_5b.branch1x1.conv.weight,
    ..., fc.weight). Protocol as pytorch-fid: frames in [0, 1] -> bilinear resize to 299 x 299
    (align_corners=False) -> scaled to [-1, 1] -> pool3.
  * the TorchScript `inception-2015-12-05.pt` of StyleGAN2-ADA / clean-fid: called as documented
    for that file, `net(images_uint8_range, return_features=True)` with (N, 3, H, W) values in
    [0, 255]; it resizes to 299 internally.

    net = load_inception(path)             # either file
    feats = inception_features(net, frames)  # frames (N, H, W) uint8 grey -> (N, 2048) float64

Grey frames are replicated to three channels. The two files give close but not identical
features (different resize implementations); FID values are only comparable within one file.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the FID graph's average pool: padding not counted
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        k17, k71 = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **k17)
        self.branch7x7_3 = BasicConv2d(c7, 192, **k71)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **k17)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **k71)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **k17)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """max_pool=False: Mixed_7b (average pool, padding not counted); True: Mixed_7c (max pool)."""

    def __init__(self, cin, max_pool: bool):
        super().__init__()
        k13, k31 = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **k13)
        self.branch3x3_2b = BasicConv2d(384, 384, **k31)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **k13)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **k31)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
            self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """forward(x (N, 3, H, W) in [0, 1]) -> (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)     # in the file; not used for pool3 features

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return x.mean((2, 3))                # (N, 2048), the global average pool "pool3"


def load_inception(path) -> nn.Module:
    """A pytorch-fid state dict (.pth) or a StyleGAN2-ADA TorchScript (.pt) -> eval-mode module
    with an attribute `kind` ("state_dict" | "torchscript"). Raises FileNotFoundError / ValueError
    with the fix in the message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights {path} not found: pass --inception=FILE with "
                                "pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
                                "inception-2015-12-05.pt (StyleGAN2-ADA TorchScript)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(str(path), map_location="cpu").eval()
        net.kind = "torchscript"
        return net
    except Exception:  # not TorchScript: try a state dict
        pass
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: neither a TorchScript module nor a state dict")
    net = FIDInceptionV3()
    load_state_dict_checked(net, sd, str(path))
    net.kind = "state_dict"
    return net.eval()


def load_state_dict_checked(net: nn.Module, sd: dict, name: str) -> None:
    """Load strictly except BatchNorm's num_batches_tracked counters (present or not)."""
    own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    got = {k for k in sd if not k.endswith("num_batches_tracked")}
    if own != got:
        missing, extra = sorted(own - got), sorted(got - own)
        raise ValueError(f"{name} is not a pytorch-fid FID Inception state dict: missing "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                         f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
    net.load_state_dict({k: sd[k] for k in got}, strict=False)


@torch.no_grad()
def inception_features(net: nn.Module, frames, batch_size: int = 32, device="cpu") -> np.ndarray:
    """frames (N, H, W) or (N, 3, H, W) uint8 -> (N, 2048) float64 pool3 features, computed on
    `device` (where the caller has put `net`)."""
    frames = torch.as_tensor(np.asarray(frames))
    if frames.dtype != torch.uint8:
        raise ValueError(f"inception_features expects uint8 frames, got {frames.dtype}")
    if frames.ndim == 3:
        frames = frames[:, None]
    frames = frames.expand(-1, 3, -1, -1)
    kind = getattr(net, "kind", "state_dict")
    out = []
    for i in range(0, len(frames), batch_size):
        x = frames[i:i + batch_size].contiguous().to(device)
        if kind == "torchscript":
            f = net(x, return_features=True)          # uint8 [0, 255] in, resized inside
        else:
            f = net(x.float() / 255.0)
        out.append(f.double().reshape(len(x), -1).cpu())
    return torch.cat(out).numpy()
