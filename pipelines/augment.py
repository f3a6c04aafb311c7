"""On-device augmentation of uint8 batches: random crops of reflect-padded images (= shifts),
horizontal flips, light colour jitter. One gather per batch on the device, no per-sample Python,
and every random draw comes from the caller's generator, so a seed fixes the result on any path
(resident or streamed) that feeds the same rows in the same order.

    x = augment.batch(xb, aug, gen)   # (B, H, W, C) uint8 -> (B, C, H, W) float 0..255, channels_last
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ITU-R BT.601 luma weights: the grey a saturation change blends towards (what PIL's "L" uses)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Augment:
    shift_px: int = 0          # crop offset of up to +-shift_px after reflect padding (0 = off)
    hflip: bool = False        # mirror half of the images left-right (never for digits)
    color_jitter: float = 0.0  # brightness and contrast (and saturation on RGB) x U(1-j, 1+j)

    @classmethod
    def from_train(cls, t) -> Augment:
        """From settings.Train (duck-typed: review/calibrate pass the same section)."""
        return cls(shift_px=t.shift_px, hflip=t.hflip, color_jitter=t.color_jitter)

    @property
    def active(self) -> bool:
        return bool(self.shift_px or self.hflip or self.color_jitter)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n-1), 2(n-1)] folded back into [0, n-1] like torch's "reflect" padding
    (the edge pixel is not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _draws(aug: Augment, n: int, device: torch.device, gen: torch.Generator | None):
    """All random numbers of one batch, in a fixed order, for `n` images (the global batch: DDP
    ranks draw the same numbers and each takes its own rows)."""
    shifts = flips = factors = None
    if aug.shift_px:
        shifts = torch.randint(-aug.shift_px, aug.shift_px + 1, (n, 2), device=device,
                               generator=gen)
    if aug.hflip:
        flips = torch.rand(n, device=device, generator=gen) < 0.5
    if aug.color_jitter:
        factors = 1.0 + aug.color_jitter * (2.0 * torch.rand(n, 3, device=device,
                                                             generator=gen) - 1.0)
    return shifts, flips, factors


def batch(x: torch.Tensor, aug: Augment | None = None, gen: torch.Generator | None = None, *,
          draws_for: int | None = None, pick: slice = slice(None)) -> torch.Tensor:
    """`(B, H, W, C)` uint8 on the device -> `(B, C, H, W)` float pixel values 0..255 in
    channels_last memory (the permute of NHWC storage), augmented when `aug` says so.

    `draws_for` / `pick`: draw for a global batch of that many images and keep the rows `pick`
    (a DDP rank's slice) - `x` then holds only those rows."""
    if aug is None or not aug.active:
        return x.permute(0, 3, 1, 2).float()
    b, h, w, c = x.shape
    shifts, flips, factors = (d[pick] if d is not None else None
                              for d in _draws(aug, draws_for or b, x.device, gen))
    if shifts is not None or flips is not None:
        rows = torch.arange(h, device=x.device).expand(b, h)
        cols = torch.arange(w, device=x.device).expand(b, w)
        if flips is not None:
            cols = torch.where(flips[:, None], w - 1 - cols, cols)
        if shifts is not None:
            # at most side - 1: reflect padding cannot reach further than the image itself
            rows = _reflect(rows + shifts[:, :1].clamp(-(h - 1), h - 1), h)
            cols = _reflect(cols + shifts[:, 1:].clamp(-(w - 1), w - 1), w)
        n = torch.arange(b, device=x.device)
        x = x[n[:, None, None], rows[:, :, None], cols[:, None, :]]   # one gather, still uint8
    out = x.permute(0, 3, 1, 2).float()
    if factors is not None:
        out = _jitter(out, factors)
    return out


def _jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast (around each image's mean grey), then saturation (RGB only: blend
    with the pixel's grey), each factor `(B,)`; clamped back into 0..255."""
    bright, contrast, sat = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = x * bright
    if x.shape[1] == 3:
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        grey = (x * luma).sum(1, keepdim=True)
    else:
        grey = x
    x = (x - grey.mean((1, 2, 3), keepdim=True)) * contrast + grey.mean((1, 2, 3), keepdim=True)
    if x.shape[1] == 3:
        grey = (x * luma).sum(1, keepdim=True)
        x = (x - grey) * sat + grey
    return x.clamp_(0.0, 255.0)
