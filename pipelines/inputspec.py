"""The input spec and the one preprocessing function every consumer uses (validate, prepare, the
eval set, training, predict, the ML backend, pre-annotations, the report), so a model sees in
production exactly what it saw in training. The spec is stored in every model file.

    spec = from_params(params)                  # params.yaml `input`
    x = preprocess(data, spec)                  # (H, W, C) uint8, C = spec.channels
    xs = stack(blobs, spec)                     # (N, H, W, C) uint8
    mean, std = channel_stats(xs)               # per channel, 0..255 scale

Resizing is Pillow's antialiased bilinear (what torchvision's `Resize` does by default), with a
JPEG decoded at 1/2..1/8 scale first when the output is that much smaller (libjpeg's DCT
scaling). To a 224 x 224 centre crop on this machine (2 cores, shared): a baseline 3840 x 2400
JPEG took 390 ms decoded in full and 93 ms so (4096 x 2304: 461 -> 65 ms); a progressive
4224 x 3168 one 845 -> 470 ms (a progressive file must gather every coefficient first).
benchmarks/near_duplicates.py prints these.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from pipelines import images
from pipelines.images import BadImage

RESIZE_POLICIES = ("stretch", "crop", "pad")
_RESAMPLE = Image.Resampling.BILINEAR  # antialiased on downscale (its support grows with the scale)


class SpecError(ValueError):
    """An input spec (from a model file or params) that is not usable; the message says why."""


@dataclass(frozen=True)
class InputSpec:
    """What every image becomes before a model sees it: `(height, width, channels)` uint8.

    resize: stretch (to height x width, aspect ignored) | crop (the shorter side scaled to cover
    height x width, centre crop) | pad (fit inside, centred on `background` bars).
    background: RGB 0..255 that transparency is composited onto and pad fills with.
    mean / std: per channel on the 0..255 scale, applied inside the model; () = not measured yet.
    """
    channels: int
    height: int
    width: int
    resize: str
    background: tuple[int, int, int]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def legacy_gray(cls, size: int) -> InputSpec:
        """What format-1 model files (arch "convnet-32-64-128") and the digits demo mean: gray,
        `size` x `size`, stretched, transparency on black, normalised (x - 127.5) / 127.5."""
        return cls(channels=1, height=size, width=size, resize="stretch", background=(0, 0, 0),
                   mean=(127.5,), std=(127.5,))

    def with_stats(self, mean: Iterable[float], std: Iterable[float]) -> InputSpec:
        return _checked(replace(self, mean=tuple(float(m) for m in mean),
                                std=tuple(float(s) for s in std)), source="with_stats")

    def to_json(self) -> dict:
        d = asdict(self)
        return {**d, "background": list(self.background), "mean": list(self.mean),
                "std": list(self.std)}

    @classmethod
    def from_json(cls, d: object, *, source: str = "input spec") -> InputSpec:
        """The spec a model file stores, checked by the same rules as params.yaml's `input`
        section (pipelines/settings.py): a wrong or missing field is a SpecError naming it."""
        from pipelines import settings
        try:
            raw = settings._section("input", settings.Input, d, source)
        except settings.ParamsError as exc:
            raise SpecError(str(exc)) from None
        return _from_settings(raw, source=source, broadcast=False)


def _checked(spec: InputSpec, *, source: str) -> InputSpec:
    for name in ("mean", "std"):
        values = getattr(spec, name)
        if len(values) not in (0, spec.channels):
            raise SpecError(f"{source}: input.{name} has {len(values)} values for "
                            f"{spec.channels} channel(s): give one per channel, or [] to measure")
        if any(not math.isfinite(v) or not 0.0 <= v <= 255.0 for v in values) or (
                name == "std" and any(v <= 0.0 for v in values)):
            raise SpecError(f"{source}: input.{name} must be on the 0..255 scale "
                            f"(std above 0), got {list(values)}")
    if len(spec.mean) != len(spec.std):
        raise SpecError(f"{source}: input.mean and input.std must both be [] (measured) or both "
                        f"given, got {len(spec.mean)} and {len(spec.std)} values")
    return spec


def _from_settings(raw, *, source: str, broadcast: bool) -> InputSpec:
    def per_channel(values: tuple[float, ...]) -> tuple[float, ...]:
        # params.yaml: one value for 3 channels means the same for each; a model file must
        # hold one per channel
        return values * raw.channels if broadcast and len(values) == 1 else values
    return _checked(InputSpec(channels=raw.channels, height=raw.height, width=raw.width,
                              resize=raw.resize, background=tuple(raw.background),
                              mean=per_channel(raw.mean), std=per_channel(raw.std)),
                    source=source)


def from_params(params) -> InputSpec:
    """The spec params.yaml's `input` section describes (mean/std () when to be measured)."""
    return _from_settings(params.input, source="params.yaml", broadcast=True)


# -- geometry -------------------------------------------------------------------------------------

def _decode_size(w: int, h: int, spec: InputSpec) -> tuple[int, int]:
    """The smallest (width, height) the decoded image may have and still give the output at full
    quality: the resize below never upsamples what a reduced JPEG decode shrank."""
    if spec.resize == "stretch":
        return spec.width, spec.height
    scale = (max if spec.resize == "crop" else min)(spec.width / w, spec.height / h)
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _resize(img: Image.Image, spec: InputSpec, fill: tuple[int, ...] | int) -> Image.Image:
    w, h = img.size
    W, H = spec.width, spec.height
    if spec.resize == "stretch":
        return img if (w, h) == (W, H) else img.resize((W, H), _RESAMPLE)
    if spec.resize == "crop":
        # the centred box of the output's aspect, resampled straight to W x H (one resampling,
        # no rounding of an intermediate size)
        if w * H > h * W:              # wider than the output: cut the sides
            cw = h * W / H
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:                          # taller: cut top and bottom
            ch = w * H / W
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        if (w, h) == (W, H):
            return img
        return img.resize((W, H), _RESAMPLE, box=box)
    # pad: fit inside, centred, bars of the background colour
    scale = min(W / w, H / h)
    nw, nh = min(W, max(1, round(w * scale))), min(H, max(1, round(h * scale)))
    inner = img if (nw, nh) == (w, h) else img.resize((nw, nh), _RESAMPLE)
    if (nw, nh) == (W, H):
        return inner
    canvas = Image.new(img.mode, (W, H), fill)
    canvas.paste(inner, ((W - nw) // 2, (H - nh) // 2))
    return canvas


def _fill(spec: InputSpec) -> tuple[int, ...] | int:
    if spec.channels == 3:
        return spec.background
    return Image.new("RGB", (1, 1), spec.background).convert("L").getpixel((0, 0))


def preprocess(data: bytes, spec: InputSpec) -> np.ndarray:
    """`(spec.height, spec.width, spec.channels)` uint8 from image bytes: decoded within the
    budgets (images.py), EXIF orientation applied, any mode made gray or RGB (transparency onto
    spec.background), resized by spec.resize. Raises images.BadImage with a readable reason."""
    if spec.resize not in RESIZE_POLICIES:
        raise SpecError(f"input.resize must be one of {', '.join(RESIZE_POLICIES)}, "
                        f"got {spec.resize!r}")
    img = images.decode(data, draft=lambda w, h: _decode_size(w, h, spec))
    img = images.convert(img, channels=spec.channels, background=spec.background)
    try:
        img = _resize(img, spec, _fill(spec))
    except (OSError, ValueError) as exc:  # Pillow on pathological geometry (e.g. 1 x 4096 px)
        raise BadImage(f"cannot resize {img.width} x {img.height} px to "
                       f"{spec.width} x {spec.height} ({spec.resize}): {exc}") from None
    out = np.asarray(img, dtype=np.uint8)
    return out[..., None] if spec.channels == 1 else out


def stack(blobs: Iterable[bytes], spec: InputSpec) -> np.ndarray:
    """`(N, H, W, C)` uint8 in order — one array per split, never one file per image. A bad
    image raises BadImage naming its position ("image 3 of 6: ...")."""
    blobs = list(blobs)
    out = np.empty((len(blobs), spec.height, spec.width, spec.channels), dtype=np.uint8)
    for i, x in enumerate(iter_preprocessed(blobs, spec)):
        out[i] = x
    return out


def iter_preprocessed(blobs: list[bytes], spec: InputSpec) -> Iterator[np.ndarray]:
    for i, blob in enumerate(blobs):
        try:
            yield preprocess(blob, spec)
        except BadImage as exc:
            raise BadImage(f"image {i} of {len(blobs)}: {exc}") from None


def channel_stats(x: np.ndarray, *, chunk_bytes: int = 16 * 2**20) -> tuple[tuple[float, ...],
                                                                          tuple[float, ...]]:
    """(mean, std) per channel on the 0..255 scale of `(N, H, W, C)` uint8, read ~`chunk_bytes`
    (16 MB) at a time, so a memory-mapped split larger than RAM works. Exact: a histogram of
    the 256 values per channel, so no float accumulation error at any N."""
    if x.ndim != 4 or x.dtype != np.uint8:
        raise ValueError(f"channel_stats wants (N, H, W, C) uint8, got {x.shape} {x.dtype}")
    n, c = x.shape[0], x.shape[3]
    if n == 0 or x[0].size == 0:
        raise ValueError("channel_stats of an empty split")
    step = max(1, chunk_bytes // x[0].nbytes)
    hist = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, n, step):
        part = np.asarray(x[i:i + step])
        for ch in range(c):
            hist[ch] += np.bincount(part[..., ch].ravel(), minlength=256)
    values = np.arange(256, dtype=np.float64)
    count = hist.sum(1)
    mean = (hist @ values) / count
    var = np.maximum((hist @ (values * values)) / count - mean * mean, 0.0)
    # a constant channel has std 0; 1.0 keeps the normalisation finite (x - mean stays 0)
    std = np.where(var > 0, np.sqrt(var), 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
