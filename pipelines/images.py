"""Image decoding and preprocessing — one copy, used by validate, prepare, evalset and predict,
so the production model sees exactly what training saw.

Every public function either returns pixels or raises BadImage with a readable reason, for any
bytes at all: a bad image becomes its task's quarantine reason and never stops a run. Decoding
is bounded before any pixel is decoded: by pixel count (memory and time grow with it) and, for
JPEG, by scan count (each progressive scan is one more pass over the whole image)."""
from __future__ import annotations

import io
import struct
import warnings
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


def _open(data: bytes) -> Image.Image:
    """Decode the first frame (animated GIF/WebP/PNG, multi-page TIFF: frame 0 only)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
            _check_budget(img, data)
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


def _gray(img: Image.Image) -> Image.Image:
    """What the model sees, before resizing: EXIF orientation applied, transparency composited
    onto black (digits are light ink on dark), 16-bit intensities scaled (not clipped) to 8-bit,
    LAB reduced to its lightness. Raises BadImage for a mode with no grayscale meaning."""
    try:
        orientation = _orientation(img)
        if orientation != 1:
            img = img.transpose(_UPRIGHT[orientation])
        if img.mode.startswith("I;16") or img.mode == "I":
            # Pillow's convert("L") clips these at 255; 16-bit PNGs open as "I;16" with 0..65535.
            # round(v / 257) in integers (v / 257 never ends in .5): 4 B per pixel, not 8.
            wide = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
            return Image.fromarray(((2 * wide + 257) // 514).astype(np.uint8), "L")
        if img.mode == "LAB":
            return img.getchannel("L")  # L* (lightness) is the gray; Pillow has no LAB -> RGB
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        return img.convert("L")
    except _DECODE_ERRORS as exc:
        raise BadImage(f"cannot convert {img.mode} pixels to grayscale: {_describe(exc)}") from None


def inspect(data: bytes) -> ImageInfo:
    """Decode fully and describe; raises BadImage with a readable reason. The blank check runs
    on what the model would see, so an image that preprocesses to one flat value is refused."""
    img = _open(data)
    lo, hi = _gray(img).getextrema()
    if lo == hi:
        raise BadImage(f"blank image (every pixel is {lo} after preprocessing)")
    return ImageInfo(width=img.width, height=img.height, mode=img.mode, format=img.format or "?")


def to_array(data: bytes, size: int) -> np.ndarray:
    """`(size, size)` uint8 grayscale: EXIF orientation applied, bilinear resize."""
    img = _gray(_open(data))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def stack(blobs: list[bytes], size: int) -> np.ndarray:
    """`(N, size, size)` uint8 — one array per split, never one file per image."""
    out = np.empty((len(blobs), size, size), dtype=np.uint8)  # 784 B per 28x28 image
    for i, blob in enumerate(blobs):
        try:
            out[i] = to_array(blob, size)
        except BadImage as exc:
            raise BadImage(f"image {i} of {len(blobs)}: {exc}") from None
    return out


FINGERPRINT_SIDE = 16


def fingerprint(data: bytes) -> np.ndarray:
    """A perceptual fingerprint: the 16x16 thumbnail of what the model sees, mean removed, unit
    length (float32, 256 values). The cosine of two fingerprints is ~1 for the same picture
    re-encoded, resized or brightened. Chosen over a 64-bit dHash, which on low-resolution
    images calls distinct pictures identical (69 of 1,497 demo digits matched an eval image
    exactly); here re-encoded copies scored >= 0.9987 and distinct digits <= 0.984."""
    img = _gray(_open(data)).resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE),
                                     Image.Resampling.BILINEAR)
    v = np.asarray(img, dtype=np.float32).ravel()
    v = v - v.mean()
    norm = float(np.linalg.norm(v))
    return v / norm if norm else v


def nearest_similarity(fps: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(highest cosine similarity, index of that row in `against`) for each fingerprint."""
    if len(fps) == 0 or len(against) == 0:
        return np.zeros(len(fps), dtype=np.float32), np.full(len(fps), -1)
    best, where = np.empty(len(fps), dtype=np.float32), np.empty(len(fps), dtype=np.int64)
    for i in range(0, len(fps), 4096):  # bounded memory: 4096 x M similarities at a time
        sim = fps[i:i + 4096] @ against.T
        best[i:i + 4096], where[i:i + 4096] = sim.max(1), sim.argmax(1)
    return best, where
