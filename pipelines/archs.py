"""The architecture registry: a name -> a backbone, `(N, C, H, W)` normalised floats ->
`(N, D)` features, for any H x W and C = 1 or 3. pipelines/net.py puts the normalisation in
front and a Linear(D, K) head behind (net.Classifier); this module only knows backbones.

    smallcnn            the seed's CNN made size-independent (global pooling): digits, tiny sets
    resnet-fast         a fast residual net for small images (airbench-style), widths 64/256/256
    resnet-fast-narrow  the same at a quarter of the width: trains in minutes on 2 CPU cores
    resnet18            torchvision, for photos (weights=None: nothing is ever downloaded)
    mobilenet_v3_large  torchvision, photos on a CPU budget
    efficientnet_b0     torchvision
    convnet-32-64-128   legacy, load-only: what format-1 model files hold (28 x 28 digits)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from pipelines.inputspec import InputSpec

LEGACY = "convnet-32-64-128"
AUTO = "auto"


class ArchError(ValueError):
    pass


@dataclass(frozen=True)
class Arch:
    name: str
    family: str      # "cnn" | "fast" | "torchvision" | "legacy": the training recipe's family
    build: Callable[[InputSpec], tuple[nn.Module, int]]  # spec -> (backbone, feature dim D)


def _conv_bn(cin: int, cout: int, act: type[nn.Module] = nn.ReLU) -> list[nn.Module]:
    # no conv bias: the BatchNorm right after it has one
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), act()]


# -- smallcnn -------------------------------------------------------------------------------------

def smallcnn(spec: InputSpec) -> tuple[nn.Module, int]:
    """conv32 -> conv64 -> pool -> conv128 -> pool -> conv128 -> global average -> 128 features.
    The seed's conv32/conv64 start, with BatchNorm, and global pooling instead of its
    Flatten + Linear (that layer grew with the image: 397 MB of weights at 224 px). ~48 MMACs
    and 0.25 M parameters at 32 x 32."""
    return nn.Sequential(
        *_conv_bn(spec.channels, 32), *_conv_bn(32, 64), nn.MaxPool2d(2),
        *_conv_bn(64, 128), nn.MaxPool2d(2), *_conv_bn(128, 128),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.25)), 128


# -- resnet-fast ----------------------------------------------------------------------------------

class _Group(nn.Module):
    """conv -> 2x2 max pool -> BN -> GELU, then a residual pair of conv-BN-GELU: the ResNet-9 /
    airbench block (pooling right after the conv halves the cost of everything behind it)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                  nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU())
        self.res = nn.Sequential(*_conv_bn(cout, cout, nn.GELU), *_conv_bn(cout, cout, nn.GELU))

    def forward(self, x):
        x = self.down(x)
        return x + self.res(x)


class FastResNet(nn.Module):
    """A 2x2 "whitening" stem (airbench: 2 * C * 2 * 2 filters, no padding; `whiten_init` can
    set them from the data's patch covariance, else they are learnt), three groups, global max
    pooling (airbench's final MaxPool(3) on a 3x3 map, made size-independent)."""

    def __init__(self, channels: int, widths: tuple[int, int, int]) -> None:
        super().__init__()
        stem = 2 * channels * 4
        self.whiten = nn.Conv2d(channels, stem, 2, bias=True)
        self.act = nn.GELU()
        self.groups = nn.Sequential(_Group(stem, widths[0]), _Group(widths[0], widths[1]),
                                    _Group(widths[1], widths[2]))
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.pool(self.groups(self.act(self.whiten(x))))


def resnet_fast(width: float) -> Callable[[InputSpec], tuple[nn.Module, int]]:
    """airbench94's widths (64, 256, 256) times `width`, rounded to multiples of 8 (tensor-core
    friendly). 1.0: 161 MMACs and 3.2 M parameters at 32 x 32 RGB; 0.25: 12.8 MMACs, 0.2 M."""
    widths = tuple(max(8, round(w * width / 8) * 8) for w in (64, 256, 256))

    def build(spec: InputSpec) -> tuple[nn.Module, int]:
        return FastResNet(spec.channels, widths), widths[-1]
    return build


def whiten_init(backbone: FastResNet, patches, *, eps: float = 5e-4) -> None:
    """airbench's whitening init of the stem: `patches` `(P, C, 2, 2)` float, normalised as the
    model sees them (P >= a few thousand, e.g. all 2x2 patches of 500 training images). The
    filters become the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and
    their negatives (so a GELU keeps both signs). Optional: the stem trains either way."""
    import torch
    p = patches.reshape(len(patches), -1).double()
    p = p - p.mean(0)
    eigval, eigvec = torch.linalg.eigh(p.T @ p / len(p))
    filters = (eigvec.T / torch.sqrt(eigval + eps)[:, None]).flip(0)  # largest first
    filters = filters.reshape(-1, *patches.shape[1:]).float()
    with torch.no_grad():
        backbone.whiten.weight.copy_(torch.cat([filters, -filters]))
        backbone.whiten.bias.zero_()


# -- torchvision ----------------------------------------------------------------------------------

def _channels(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """The torchvision stem for `channels` inputs (same shape otherwise); 3 keeps it as is.
    Pretrained RGB filters are summed into it by finetune.init_from_weights."""
    if channels == conv.in_channels:
        return conv
    return nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def resnet18(spec: InputSpec) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18 as is (7x7/2 stem + max pool): keys stay torchvision's, so a
    torchvision state dict saved as safetensors initialises it (finetune.init_from_weights)."""
    from torchvision import models
    m = models.resnet18(weights=None)
    m.conv1 = _channels(m.conv1, spec.channels)
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def _torchvision_classifier(name: str, spec: InputSpec) -> tuple[nn.Module, int]:
    """A torchvision net whose stem is `features[0][0]` and whose last layer is
    `classifier[-1]` (MobileNetV3, EfficientNet): stem for `spec.channels`, features are the
    penultimate layer."""
    from torchvision import models
    m = getattr(models, name)(weights=None)
    m.features[0][0] = _channels(m.features[0][0], spec.channels)
    dim = m.classifier[-1].in_features
    m.classifier[-1] = nn.Identity()
    return m, dim


def mobilenet_v3_large(spec: InputSpec) -> tuple[nn.Module, int]:
    """torchvision's MobileNetV3-Large; features are the 1280-wide penultimate layer."""
    return _torchvision_classifier("mobilenet_v3_large", spec)


def efficientnet_b0(spec: InputSpec) -> tuple[nn.Module, int]:
    """torchvision's EfficientNet-B0; features are the 1280-wide pooled layer."""
    return _torchvision_classifier("efficientnet_b0", spec)


# -- legacy ---------------------------------------------------------------------------------------

class _LegacyConvNet(nn.Module):
    """The seed's net (format-1 files) without its last Linear: conv32 -> conv64 -> pool ->
    fc128. Square gray images only (what those files were)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(inplace=True), nn.Conv2d(32, 64, 3),
            nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten())
        n = (side - 4) // 2  # two valid 3x3 convs, one 2x2 pool: 28 -> 12
        self.hidden = nn.Sequential(nn.Linear(64 * n * n, 128), nn.ReLU(inplace=True),
                                    nn.Dropout(0.5))

    def forward(self, x):
        return self.hidden(self.features(x))


def legacy_convnet(spec: InputSpec) -> tuple[nn.Module, int]:
    return _LegacyConvNet(spec.height), 128


def legacy_state(state: dict) -> dict:
    """A format-1 state dict (net.Net's keys) in the Classifier's keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("features."):
            out["backbone." + key] = value
        elif key.startswith("head.0."):
            out["backbone.hidden.0." + key[len("head.0."):]] = value
        elif key.startswith("head.3."):
            out["head." + key[len("head.3."):]] = value
        else:
            out[key] = value  # left for load_state_dict to name as unexpected
    return out


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("smallcnn", "cnn", smallcnn),
    Arch("resnet-fast", "fast", resnet_fast(1.0)),
    Arch("resnet-fast-narrow", "fast", resnet_fast(0.25)),
    Arch("resnet18", "torchvision", resnet18),
    Arch("mobilenet_v3_large", "torchvision", mobilenet_v3_large),
    Arch("efficientnet_b0", "torchvision", efficientnet_b0),
    Arch(LEGACY, "legacy", legacy_convnet),
)}
# What params' `train.arch` may name (settings holds its list to this one); the legacy net is
# load-only: its Linear grows with the image.
NAMES: tuple[str, ...] = (AUTO, *(n for n, a in ARCHS.items() if a.family != "legacy"))

SMALL_PX = 64  # below this shorter side, images are "small" (CIFAR, digits, thumbnails)


def resolve_arch(name: str, spec: InputSpec, device_type: str) -> str:
    """`name` checked, or for "auto" the architecture for this input and device:

    - shorter side < 64 px (CIFAR-like, digits): resnet-fast on CUDA (airbench's shape and
      widths, which reach 94 % on CIFAR-10 in seconds on one GPU); resnet-fast-narrow on CPU (12x fewer MACs; measured the
      fastest to train of all here, ~2x smallcnn, and 97 % on 400 held-out digit scans after 4
      epochs on 1,400 in ~1 min on one loaded core). The ImageNet nets downsample 32x in
      their stems and waste most of a small image.
    - photos (>= 64 px): resnet18 on CUDA (the standard fine-tuning baseline, 1.8 GMACs at
      224 px; dense convs keep a GPU busy under bf16 + channels_last, where depthwise ones
      leave it memory-bound); mobilenet_v3_large on CPU (0.22 GMACs at 224 px, 8x fewer than
      resnet18, and torchvision's tables give it more ImageNet top-1: 75.3 vs 69.8 %).
    """
    if name == AUTO:
        small = min(spec.height, spec.width) < SMALL_PX
        cuda = device_type == "cuda"
        if small:
            return "resnet-fast" if cuda else "resnet-fast-narrow"
        return "resnet18" if cuda else "mobilenet_v3_large"
    if name not in ARCHS:
        raise ArchError(f"unknown architecture {name!r}; choose one of {', '.join(NAMES)}")
    if ARCHS[name].family == "legacy":
        raise ArchError(f"{name!r} is the legacy digits net, kept only to load old model files; "
                        f"train one of {', '.join(NAMES)} instead")
    return name


def stem_key(backbone: nn.Module) -> str:
    """State-dict key (under `backbone.`) of the first convolution's weight: the one layer that
    sees the input channels (1 <-> 3 adaptation). Every backbone here registers it first."""
    name = next(n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d))
    return f"backbone.{name}.weight"


def get(name: str) -> Arch:
    """The registry entry of a model file's arch; a clear error for a name this version lacks."""
    try:
        return ARCHS[name]
    except KeyError:
        raise ArchError(f"unknown architecture {name!r} (this labelgate knows "
                        f"{', '.join(ARCHS)}): the file was written by another program or a "
                        "newer labelgate") from None
