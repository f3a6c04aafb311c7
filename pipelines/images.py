"""Image decoding — one copy, under pipelines/inputspec.py (the one preprocessing function) and
pipelines/neardup.py (leakage fingerprints): decode within budgets, EXIF orientation, any mode
to gray or RGB as a viewer shows it, and the blank check.

Every public function either returns pixels or raises BadImage with a readable reason, for any
bytes at all: a bad image becomes its task's quarantine reason and never stops a run. Decoding
is bounded before any pixel is decoded: by pixel count (memory and time grow with it) and, for
JPEG, by scan count (each progressive scan is one more pass over the whole image)."""
from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Formats annotators' images may come in; anything else (even if Pillow could open it) is
# quarantined. Pillow's decompression-bomb *warning* becomes an error (see `_open`).
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"})

# Decode budget in pixels, checked from the header before decoding: 4096 x 4096, the largest
# image `validate.max_side`'s default (4096 px) admits (raising max_side does not raise this).
# Pillow holds 1-4 B per pixel (2 for 16-bit gray), so one decoded frame is <= 64 MiB, and
# preprocessing adds at most ~3 copies (RGBA compositing). Time grows with pixels too: at the
# budget, an RGBA PNG took 1.2 s and a progressive RGB JPEG 1.4-1.6 s to preprocess (2 shared
# cores, load ~5). Without it, one 9,400 x 9,400 16-bit PNG took ~2.4 GB. Images between this
# and Pillow's own bomb limit (89.5 Mpx, its error/warning) are refused here.
MAX_PIXELS = 4096 * 4096

# Scans allowed in one JPEG. Encoders write 1 (baseline), 6 / 10 / 18 (libjpeg's progressive
# script for gray / YCbCr / CMYK), ~10 (mozjpeg); 45 JPEGs found on this machine had 1-10.
# Each scan is one more pass over every block, however few bytes it takes (a 33-byte empty
# scan at 4096 px), so a few KB of scans can decode for minutes: the "scan bomb",
# libjpeg-turbo's LJT-01-003; Pillow has no decode timeout. Measured here: ~0.75-1.5 ns per
# pixel per scan; 2,000 scans at 4096 px would take ~50 s; 64 scans at MAX_PIXELS took 1.8 s,
# the worst case accepted. (JPEG inside TIFF: libtiff stops at 100 scans per strip itself.)
MAX_JPEG_SCANS = 64

# What Pillow may raise on hostile bytes; each one is about the file, so it becomes the reason.
# OSError / ValueError (decoders) and SyntaxError (the EXIF parser) are what ~45,000 fuzzed
# decodes here produced; IndexError, TypeError, KeyError, EOFError and struct.error are
# Pillow's own list of "malformed header" errors (it converts them only inside Image.open);
# ZeroDivisionError / OverflowError come from header arithmetic. MemoryError is not here: the
# budgets keep decodes far from it, and a machine out of memory says nothing about the image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, TypeError,
                  struct.error, ZeroDivisionError, OverflowError)

# EXIF Orientation -> the transpose that shows the image upright (what browsers, and so the
# annotators in Label Studio, see).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


# (upright width, height) of the stored image -> the smallest (width, height) the caller needs
Draft = Callable[[int, int], tuple[int, int]]


class BadImage(ValueError):
    """The bytes are not an acceptable image; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str
    format: str


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow holds per pixel once decoded (RGB is padded to 4 bytes)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _check_budget(img: Image.Image, data: bytes) -> None:
    """Refuse, from the header alone, what would cost too much memory or time to decode."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        bpp = _bytes_per_pixel(img.mode)
        raise BadImage(
            f"image too large to decode: {w} x {h} px = {w * h:,} pixels ({img.mode}, {bpp} B "
            f"per pixel: {w * h * bpp / 1e6:,.0f} MB decoded), over the budget of "
            f"{MAX_PIXELS:,} pixels (images.MAX_PIXELS)")
    if img.format in ("JPEG", "MPO"):
        # Entropy-coded data escapes 0xFF as FF 00, so FF DA occurs only as a start-of-scan
        # marker or by chance inside metadata (EXIF thumbnail, ICC): this count can only be
        # too high, never too low, and real files stay far below the limit.
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise BadImage(
                f"JPEG with {scans} scans refused: over the limit of {MAX_JPEG_SCANS} "
                f"(images.MAX_JPEG_SCANS); each scan is one more pass over all {w * h:,} pixels, "
                "so decoding time has no bound (a progressive 'scan bomb')")


def _open(data: bytes, *, draft: Draft | None = None) -> Image.Image:
    """Decode the first frame (animated GIF/WebP/PNG, multi-page TIFF: frame 0 only); `draft`
    lets a JPEG decode at a reduced scale (see `decode`)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            _check_budget(img, data)
            if draft is not None and img.format == "JPEG":
                turned = _orientation(img) >= 5  # orientations 5..8 swap width and height
                w, h = draft(*(img.size[::-1] if turned else img.size))
                img.draft(None, (h, w) if turned else (w, h))
            img.load()  # decodes every pixel: truncated files fail here, not later
        except BadImage:
            raise  # a budget refusal (BadImage is a ValueError: keep it from the arm below)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise BadImage(f"decompression bomb refused: {exc}") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image in an accepted format "
                           f"({', '.join(sorted(ALLOWED_FORMATS))})") from None
        except _DECODE_ERRORS as exc:
            raise BadImage(f"corrupt image: {_describe(exc)}") from None
    return img


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _orientation(img: Image.Image) -> int:
    """EXIF Orientation, 1 (as stored) when absent or unreadable: a browser ignores an EXIF
    block it cannot parse and shows the pixels as stored, so that is what annotators labeled."""
    try:
        value = img.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _sixteen_to_eight(img: Image.Image) -> Image.Image:
    """16-bit (I;16*) or 32-bit (I) gray -> L, scaled, not clipped: Pillow's convert("L") clips
    at 255, and 16-bit PNGs open as "I;16" with 0..65535. round(v / 257) in integers
    (v / 257 never ends in .5): 4 B per pixel, not 8."""
    wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
    return Image.fromarray(((2 * wide + 257) // 514).astype(np.uint8), "L")


def _lab_to_rgb(img: Image.Image) -> Image.Image:
    """CIE L*a*b* -> sRGB through littleCMS (Pillow's convert has no LAB -> RGB): round trips
    of random sRGB colours come back within 1.2 levels on average (out-of-gamut ones clip)."""
    from PIL import ImageCms
    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                        ImageCms.createProfile("sRGB"), "LAB", "RGB")
    return ImageCms.applyTransform(img, transform)


def convert(img: Image.Image, *, channels: int,
            background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Any decoded mode -> "L" (channels 1) or "RGB" (channels 3), as a viewer shows it:
    transparency (RGBA, LA, PA, La, RGBa, P with a transparent index) composited onto
    `background` (an RGB colour; its luma for gray), 16-bit gray scaled (not clipped) to 8-bit,
    CMYK / YCbCr / HSV to RGB, LAB to its lightness (gray) or to sRGB, 1-bit to 0/255.
    Raises BadImage for pixels that have no such meaning."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    target = "L" if channels == 1 else "RGB"
    try:
        if img.mode.startswith("I;16") or img.mode == "I":
            return _sixteen_to_eight(img).convert(target)
        if img.mode == "LAB":
            return img.getchannel("L") if channels == 1 else _lab_to_rgb(img)
        if img.mode == "La":
            img = img.convert("LA")  # premultiplied: Pillow converts it to LA only
        if img.mode in ("RGBA", "LA", "PA", "RGBa") or (
                img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            under = Image.new("RGBA", rgba.size, (*background, 255))
            img = Image.alpha_composite(under, rgba)
        return img.convert(target)
    except _DECODE_ERRORS as exc:
        raise BadImage(f"cannot convert {img.mode} pixels to "
                       f"{'grayscale' if channels == 1 else 'RGB'}: {_describe(exc)}") from None


def upright(img: Image.Image) -> Image.Image:
    """EXIF orientation applied: the picture as a browser, and so an annotator, shows it."""
    orientation = _orientation(img)
    return img if orientation == 1 else img.transpose(_UPRIGHT[orientation])


def decode(data: bytes, *, draft: Draft | None = None) -> Image.Image:
    """Decoded (within the budgets), upright, in the file's own mode. `draft((w, h))` -> the
    smallest (w, h) still needed, both upright: a JPEG may then decode at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling), never below that, when only a thumbnail of it is needed: a
    4000 x 3000 photo for a 224 px input decodes at 500 x 375 (inputspec's docstring has the
    measured time)."""
    return upright(_open(data, draft=draft))


def inspect(data: bytes, *, channels: int = 1,
            background: tuple[int, int, int] = (0, 0, 0)) -> ImageInfo:
    """Decode fully and describe; raises BadImage with a readable reason. The blank check runs
    on what the model would see (`channels`, `background`: the input spec's), so an image that
    preprocesses to one flat value is refused."""
    img = _open(data)
    seen = convert(upright(img), channels=channels, background=background)
    lo_hi = seen.getextrema()
    flat = lo_hi[0] == lo_hi[1] if channels == 1 else all(lo == hi for lo, hi in lo_hi)
    if flat:
        value = lo_hi[0] if channels == 1 else tuple(lo for lo, _ in lo_hi)
        raise BadImage(f"blank image (every pixel is {value} after preprocessing)")
    return ImageInfo(width=img.width, height=img.height, mode=img.mode, format=img.format or "?")
