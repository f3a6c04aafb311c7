"""pipelines.images + pipelines.inputspec against a seeded, generated hostile corpus: every public
function (inspect, preprocess for gray and colour specs, stack, fingerprint) ends in pixels or in
BadImage with a reason, for any bytes; bombs
are refused from the header, by a budget the reason names, before a pixel is decoded.

The corpus (built once per session, seed 10): every Pillow mode the allowed formats can carry;
truncations of nine valid files at 24 cut points; random bit flips and byte overwrites of those
files; garbage EXIF blocks in PNG / WebP / JPEG; headers declaring 9,400 x 9,400 px in six
formats (a real 16-bit PNG among them); progressive JPEGs with thousands of scans; animated
files of 300 frames; and things that are not images (empty, text, HTML, JSON, SVG, ...).
`test_corpus_is_as_wide_as_promised` pins the counts per kind."""
from __future__ import annotations

import collections
import io
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipelines import images, inputspec, neardup
from pipelines.images import BadImage
from pipelines.inputspec import InputSpec
from tests import factories

SEED = 10
SIZE = 28     # the digits demo's input: 28 x 28 gray, stretched
SPEC = InputSpec.legacy_gray(SIZE)
COLOUR = InputSpec(channels=3, height=24, width=40, resize="crop", background=(255, 255, 255))


def to_array(data: bytes, size: int) -> np.ndarray:
    """`(size, size)` uint8: the gray stretched preprocessing the digits demo uses."""
    return inputspec.preprocess(data, InputSpec.legacy_gray(size))[..., 0]
HUGE = 9400   # px per side: 88.4 Mpx, over images.MAX_PIXELS, just under Pillow's own limit
FRAMES = 300  # per animated file (Pillow takes ~5 s to write a 1,000-page TIFF)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corner_pattern(side: int = 32, seed: int = 0) -> np.ndarray:
    """Dark noisy background, a bright block in the top-left quadrant only (never blank, and
    any flip, rotation or lost band shows in `bright_quadrant`)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(10, 40, (side, side)).astype(np.uint8)
    a[: side // 2 - 2, : side // 2 - 2] = rng.integers(215, 250, (side // 2 - 2, side // 2 - 2))
    return a


def bright_quadrant(a: np.ndarray) -> int:
    """0..3 = top-left, top-right, bottom-left, bottom-right."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return int(np.argmax([a[:h, :w].mean(), a[:h, w:].mean(), a[h:, :w].mean(), a[h:, w:].mean()]))


# -- corpus builders ------------------------------------------------------------------------------

def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png16_bomb(width: int, height: int) -> bytes:
    """A valid 16-bit grayscale PNG of `width` x `height` black pixels in ~0.2 MB, built without
    ever holding the image: one deflate block of 100 rows, byte-aligned by a full flush (so it
    refers to nothing before it), repeated; then an empty final block and the Adler-32 of all
    the rows. Decoded, it is `2 * width * height` bytes (177 MB at 9,400 px; Pillow + the old
    float preprocessing took ~2.4 GB)."""
    rows = 100
    assert height % rows == 0
    unit = (b"\x00" + b"\x00\x00" * width) * rows    # filter byte + 16-bit samples, per row
    z = zlib.compressobj(9)
    block = z.compress(unit) + z.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(height // rows):
        adler = zlib.adler32(unit, adler)
    stream = block[:2] + block[2:] * (height // rows) + b"\x03\x00" + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", stream)
            + _png_chunk(b"IEND", b""))


def declare_size(data: bytes, fmt: str, w: int, h: int) -> bytes:
    """A small valid file whose header is rewritten to declare `w` x `h` px (the body stays
    tiny: only a decoder that trusted the header would allocate for it)."""
    if fmt == "JPEG":
        i = data.find(b"\xff\xc0")               # SOF0: FF C0, length, precision, Y, X
        return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
    if fmt == "BMP":
        return data[:18] + struct.pack("<ii", w, h) + data[26:]
    if fmt == "GIF":                             # the logical screen is the canvas Pillow decodes
        return data[:6] + struct.pack("<HH", w, h) + data[10:]
    if fmt == "WEBP":                            # lossless: 14-bit (w-1) and (h-1) after 0x2f
        assert data[12:16] == b"VP8L" and data[20] == 0x2F
        bits = struct.unpack("<I", data[21:25])[0] & ~((1 << 28) - 1)
        return data[:21] + struct.pack("<I", (w - 1) | ((h - 1) << 14) | bits) + data[25:]
    if fmt == "TIFF":                            # ImageWidth (256) / ImageLength (257) in IFD 0
        assert data[:4] == b"II*\x00"
        out = bytearray(data)
        ifd = struct.unpack("<I", data[4:8])[0]
        for k in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
            e = ifd + 2 + 12 * k
            tag, typ = struct.unpack("<HH", data[e:e + 4])
            if tag in (256, 257):
                v = w if tag == 256 else h
                out[e + 8:e + 12] = struct.pack("<HH", v, 0) if typ == 3 else struct.pack("<I", v)
        return bytes(out)
    raise AssertionError(fmt)


def scan_bomb(side: int, extra_scans: int, *, flat: bool = True) -> bytes:
    """A progressive grayscale JPEG with its last scan repeated `extra_scans` times. On a flat
    image that scan is an end-of-band run of ~33 bytes, yet each copy makes libjpeg pass over
    every block again. Measured unbounded (Pillow 13, this machine, loaded): 4096 px with 100
    extra scans 2.5 s, 2048 px with 1,000 3.2 s; so 4096 px with 2,000 is ~50 s."""
    a = (np.full((side, side), 128, np.uint8) if flat
         else corner_pattern(side))
    data = encode(Image.fromarray(a), "JPEG", progressive=True, quality=90)
    assert data.endswith(b"\xff\xd9")
    last = data.rfind(b"\xff\xda")               # Pillow's output: FF DA only at scan starts
    return data[:-2] + data[last:-2] * extra_scans + b"\xff\xd9"


def jpeg_scans(data: bytes) -> int:
    return data.count(b"\xff\xda")


def animated(fmt: str, n: int) -> tuple[bytes, np.ndarray]:
    frames = [Image.fromarray(corner_pattern(32, seed=k)) for k in range(4)]
    frames = [frames[0], *(frames[1:] * (n // 3))][:n]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw), \
        np.asarray(frames[0])


# The modes each allowed format carries, as (mode we make, format, mode Pillow opens): every
# mode from the issue (CMYK, YCbCr, I;16, F, 1, P, PA, LA, RGBA, RGB) plus LAB, I, I;16B, L.
MODE_CASES = [
    ("1", "PNG", "1"), ("1", "BMP", "1"), ("1", "TIFF", "1"), ("1", "GIF", "L"),
    ("L", "PNG", "L"), ("L", "JPEG", "L"), ("L", "BMP", "L"), ("L", "TIFF", "L"),
    ("L", "GIF", "P"), ("L", "WEBP", "RGB"),
    ("P", "PNG", "P"), ("P", "GIF", "P"), ("P", "BMP", "P"), ("P", "TIFF", "P"),
    ("RGB", "PNG", "RGB"), ("RGB", "JPEG", "RGB"), ("RGB", "BMP", "RGB"), ("RGB", "WEBP", "RGB"),
    ("RGB", "TIFF", "RGB"), ("RGB", "GIF", "P"),
    ("RGBA", "PNG", "RGBA"), ("RGBA", "TIFF", "RGBA"),
    ("LA", "PNG", "LA"), ("LA", "TIFF", "LA"), ("PA", "TIFF", "PA"),
    ("CMYK", "JPEG", "CMYK"), ("CMYK", "TIFF", "CMYK"),
    ("YCbCr", "TIFF", "YCbCr"), ("YCbCr", "JPEG", "RGB"),
    ("LAB", "TIFF", "LAB"),
    ("I", "TIFF", "I"), ("I;16", "PNG", "I;16"), ("I;16", "TIFF", "I;16"),
    ("I;16B", "TIFF", "I;16B"), ("F", "TIFF", "F"),
]


def mode_image(mode: str) -> Image.Image:
    a = corner_pattern()
    if mode.startswith("I;16"):  # 0..65535 (Pillow's convert between 16-bit modes clips)
        dtype = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, a.shape[::-1], (a.astype(dtype) * 257).tobytes())
    img = Image.fromarray(a).convert("RGB").convert(mode)
    img.info.clear()  # LAB carries an lcms profile stamped with the time: keep the corpus fixed
    return img


def valid_files() -> dict[str, bytes]:
    """One non-blank file per (format, encoding) the mutations start from."""
    rgb = Image.fromarray(corner_pattern()).convert("RGB")
    return {
        "png": encode(rgb, "PNG"), "jpeg": encode(rgb, "JPEG"),
        "jpeg-progressive": encode(rgb, "JPEG", progressive=True), "gif": encode(rgb, "GIF"),
        "webp": encode(rgb, "WEBP"), "webp-lossless": encode(rgb, "WEBP", lossless=True),
        "tiff": encode(rgb, "TIFF"), "tiff-lzw": encode(rgb, "TIFF", compression="tiff_lzw"),
        "bmp": encode(rgb, "BMP"),
    }


GARBAGE_EXIF = {  # none of these has an Orientation a reader could find
    "random bytes": bytes(range(7, 7 + 40)),
    "Exif header, random body": b"Exif\x00\x00" + bytes(range(200, 240)),
    "TIFF header, IFD offset past the end": b"MM\x00\x2a\x7f\xff\xff\xff",
    "TIFF header, truncated IFD": b"II*\x00\x08\x00\x00\x00\x05\x00\x12\x01",
    "IFD entry count 65535": b"II*\x00\x08\x00\x00\x00\xff\xff" + b"\x00" * 12,
    "Orientation as ASCII '6'": (b"II*\x00\x08\x00\x00\x00\x01\x00"
                                 + struct.pack("<HHI4s", 0x0112, 2, 2, b"6\x00\x00\x00")
                                 + b"\x00" * 4),
    "Orientation 9 (no such value)": (b"II*\x00\x08\x00\x00\x00\x01\x00"
                                      + struct.pack("<HHIHH", 0x0112, 3, 1, 9, 0) + b"\x00" * 4),
    "Orientation with count 2**31": (b"MM\x00*\x00\x00\x00\x08\x00\x01"
                                     + struct.pack(">HHIHH", 0x0112, 3, 2**31, 6, 0)
                                     + b"\x00" * 4),
}

NOT_IMAGES = {
    "text": b"this is a text file, not a scan\n",
    "html": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "json": json.dumps({"detail": "Authentication credentials were not provided."}).encode(),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
    "pdf": b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
    "zip": b"PK\x03\x04" + b"\x00" * 26,
    "png signature only": b"\x89PNG\r\n\x1a\n",
    "jpeg SOI only": b"\xff\xd8\xff",
    "gif header only": b"GIF89a",
    "riff without webp": b"RIFF\x04\x00\x00\x00WAVE",
    "random": np.random.default_rng(SEED).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "nul bytes": b"\x00" * 1000,
}


def mutations(rng: np.random.Generator, data: bytes) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(6):                                   # 1-8 single-bit flips
        b = bytearray(data)
        for _ in range(rng.integers(1, 9)):
            j = rng.integers(len(b))
            b[j] ^= 1 << rng.integers(8)
        out.append(("bit flips", bytes(b)))
    for _ in range(3):                                   # a run of 1-63 random bytes
        b = bytearray(data)
        j, k = rng.integers(len(b)), rng.integers(1, 64)
        b[j:j + k] = rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        out.append(("overwritten run", bytes(b)))
    return out


def build_corpus() -> dict[str, list[tuple[str, bytes]]]:
    """kind -> [(name, bytes)]; deterministic for SEED."""
    rng = np.random.default_rng(SEED)
    base = valid_files()
    corpus: dict[str, list[tuple[str, bytes]]] = collections.defaultdict(list)
    for mode, fmt, _ in MODE_CASES:
        corpus["mode"].append((f"{mode} as {fmt}", encode(mode_image(mode), fmt)))
    for name, data in base.items():
        cuts = [1, 2, 4, 8, 16, *(len(data) * k // 20 for k in range(1, 20))]
        corpus["truncated"] += [(f"{name} cut at {c}/{len(data)}", data[:c]) for c in cuts]
        corpus["mutated"] += [(f"{name}: {what}", d) for what, d in mutations(rng, data)]
    rgb = Image.fromarray(corner_pattern()).convert("RGB")
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True}), ("JPEG", {"quality": 95})):
        corpus["garbage exif"] += [(f"{fmt}: {what}", encode(rgb, fmt, exif=blob, **kw))
                                   for what, blob in GARBAGE_EXIF.items()]
    corpus["huge"].append((f"PNG 16-bit {HUGE} px", png16_bomb(HUGE, HUGE)))
    small = {"JPEG": encode(rgb, "JPEG"), "BMP": encode(rgb, "BMP"), "GIF": encode(rgb, "GIF"),
             "WEBP": encode(rgb, "WEBP", lossless=True), "TIFF": encode(rgb, "TIFF")}
    corpus["huge"] += [(f"{fmt} declaring {HUGE} px", declare_size(d, fmt, HUGE, HUGE))
                       for fmt, d in small.items()]
    corpus["scan bomb"] += [(f"progressive JPEG {side} px + {n} scans", scan_bomb(side, n))
                            for side, n in ((4096, 2000), (512, 5000), (28, 20_000))]
    corpus["animated"] += [(f"{fmt}, {FRAMES} frames", animated(fmt, FRAMES)[0])
                           for fmt in ("GIF", "PNG", "WEBP", "TIFF")]
    corpus["not an image"] += [(name, d) for name, d in NOT_IMAGES.items()]
    corpus["not an image"].append(("zero bytes", b""))
    return dict(corpus)


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[tuple[str, bytes]]]:
    return build_corpus()


def everything(corpus) -> list[tuple[str, str, bytes]]:
    return [(kind, name, data) for kind, files in corpus.items() for name, data in files]


def outcome(fn, data: bytes):
    """('ok', value) or ('bad', reason); any other exception propagates and fails the test."""
    try:
        return "ok", fn(data)
    except BadImage as exc:
        assert str(exc).strip(), "a BadImage must carry a reason"
        return "bad", str(exc)


# -- the corpus as a whole ------------------------------------------------------------------------

def test_corpus_is_as_wide_as_promised(corpus):
    counts = {kind: len(files) for kind, files in corpus.items()}
    assert counts == {"mode": 35, "truncated": 9 * 24, "mutated": 9 * 9, "garbage exif": 24,
                      "huge": 6, "scan bomb": 3, "animated": 4, "not an image": 13}
    assert sum(counts.values()) == 382
    # the file is seeded: the same bytes every run
    again = build_corpus()
    assert all(again[k] == corpus[k] for k in corpus)


def test_every_public_function_ends_in_pixels_or_a_reason(corpus):
    """The contract: for any bytes, inspect / to_array / fingerprint / stack return the promised
    shape and dtype, or raise BadImage with a reason, and say the same thing twice. Whatever
    inspect (validate) accepts, the others (prepare, evalset, predict) accept too."""
    seen = collections.Counter()
    for kind, name, data in everything(corpus):
        info = outcome(images.inspect, data)
        arr = outcome(lambda d: to_array(d, SIZE), data)
        rgb = outcome(lambda d: inputspec.preprocess(d, COLOUR), data)
        fp = outcome(neardup.fingerprint, data)
        st = outcome(lambda d: inputspec.stack([d], SPEC), data)
        assert outcome(images.inspect, data) == info, name  # deterministic, reason and all
        if info[0] == "ok":
            assert isinstance(info[1], images.ImageInfo), name
            assert info[1].width * info[1].height <= images.MAX_PIXELS, name
            assert arr[0] == rgb[0] == fp[0] == st[0] == "ok", (name, arr, rgb, fp, st)
        if arr[0] == "ok":
            assert arr[1].shape == (SIZE, SIZE) and arr[1].dtype == np.uint8, name
            assert np.array_equal(arr[1], to_array(data, SIZE)), name
            assert st[1].shape == (1, SIZE, SIZE, 1) and np.array_equal(st[1][0, ..., 0], arr[1])
            assert rgb[1].shape == (24, 40, 3) and rgb[1].dtype == np.uint8, name
            assert fp[1].shape == neardup.no_fingerprints().shape[1:], name
            assert fp[1].dtype == np.float32 and np.isfinite(fp[1]).all(), name
        else:
            assert rgb[0] == fp[0] == st[0] == "bad", name
            assert st[1].startswith("image 0 of 1: "), st[1]
        seen[(kind, info[0])] += 1
    # each hostile kind really was refused (the corpus is not accidentally all-valid)
    for kind in ("truncated", "huge", "scan bomb", "not an image"):
        assert seen[(kind, "ok")] == 0, (kind, seen)
    for kind in ("mode", "garbage exif", "animated"):
        assert seen[(kind, "bad")] == 0, (kind, seen)
    assert seen[("mutated", "bad")] > 0


def test_truncations_are_refused_as_corrupt_or_unrecognised(corpus):
    for name, data in corpus["truncated"]:
        with pytest.raises(BadImage) as err:
            to_array(data, SIZE)
        reason = str(err.value)
        assert reason.startswith(("corrupt image: ", "not an image in an accepted format")), \
            (name, reason)


def test_not_images_are_refused_by_format(corpus):
    for name, data in corpus["not an image"]:
        with pytest.raises(BadImage) as err:
            images.inspect(data)
        expected = "empty file (0 bytes)" if not data else "not an image in an accepted format"
        assert str(err.value).startswith(expected), (name, str(err.value))


def test_stack_names_the_bad_image_among_good_ones(corpus):
    good = [d for _, d in corpus["mode"][:5]]
    bad_name, bad = corpus["truncated"][30]
    with pytest.raises(BadImage, match=r"^image 3 of 6: corrupt image"):
        inputspec.stack(good[:3] + [bad] + good[3:], SPEC)
    assert inputspec.stack(good, SPEC).shape == (5, SIZE, SIZE, 1)


# -- modes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, fmt, opened", MODE_CASES,
                         ids=[f"{m}-{f}" for m, f, _ in MODE_CASES])
def test_every_mode_converts_to_upright_gray(mode, fmt, opened):
    data = encode(mode_image(mode), fmt)
    info = images.inspect(data)
    assert (info.mode, info.format, info.width, info.height) == (opened, fmt, 32, 32)
    out = to_array(data, SIZE)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    assert bright_quadrant(out) == 0, out  # the picture survived the conversion, unmoved
    assert np.ptp(out) > 0


@pytest.mark.parametrize("mode, fmt, opened", MODE_CASES,
                         ids=[f"{m}-{f}" for m, f, _ in MODE_CASES])
def test_every_mode_converts_to_upright_rgb_as_gray_does(mode, fmt, opened):
    """The same picture through an RGB spec: three channels, the same picture (its luma is the
    gray spec's pixels, within rounding), nothing moved."""
    data = encode(mode_image(mode), fmt)
    spec = InputSpec(channels=3, height=SIZE, width=SIZE, resize="stretch", background=(0, 0, 0))
    out = inputspec.preprocess(data, spec)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    luma = np.asarray(Image.fromarray(out).convert("L"), dtype=int)
    assert bright_quadrant(luma) == 0
    diff = np.abs(luma - to_array(data, SIZE).astype(int))
    if mode == "LAB":  # gray is its L* (perceptual lightness), not the luma of its RGB
        assert diff.mean() < 12
    else:
        assert diff.max() <= 3, mode


def test_lab_tiff_is_its_lightness():
    """Pillow cannot convert LAB to RGB or L (`ValueError: conversion from LAB to RGB not
    supported`, which used to escape); the L* band is the gray."""
    rgb = Image.fromarray(corner_pattern()).convert("RGB")
    lab = rgb.convert("LAB")
    data = encode(lab, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    out = to_array(data, 32)
    assert np.array_equal(out, np.asarray(lab.getchannel("L")))
    assert np.abs(out.astype(int) - np.asarray(rgb.convert("L"), dtype=int)).mean() < 12


def test_16bit_scaling_is_round_half_up_of_v_over_257():
    v = np.arange(0, 65536, dtype=np.uint16)[::37][:1024].reshape(32, 32)
    out = to_array(encode(Image.fromarray(v), "PNG"), 32)
    assert np.array_equal(out, np.floor(v / 257 + 0.5).astype(np.uint8))


# -- EXIF -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
@pytest.mark.parametrize("what", list(GARBAGE_EXIF))
def test_unreadable_exif_shows_the_pixels_as_stored(fmt, what):
    """A browser (and so an annotator in Label Studio) ignores an EXIF block it cannot read;
    training sees the same. This used to raise SyntaxError from ImageOps.exif_transpose."""
    rgb = Image.fromarray(corner_pattern()).convert("RGB")
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(rgb, fmt, exif=GARBAGE_EXIF[what], **kw)
    assert np.array_equal(to_array(data, 32), to_array(encode(rgb, fmt, **kw), 32))
    images.inspect(data)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_valid_exif_orientation_in_png_and_webp_is_applied(fmt):
    stored = corner_pattern()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = to_array(encode(Image.fromarray(stored).convert("RGB"), fmt,
                                 exif=exif.tobytes(), **kw), 32)
    assert np.array_equal(out, np.rot90(stored, -1))


# -- budgets: refused from the header, never decoded ----------------------------------------------

@pytest.fixture
def load_calls(monkeypatch) -> list[str]:
    """Records every pixel decode Pillow starts (a spy; the real load still runs)."""
    calls: list[str] = []
    real = ImageFile.ImageFile.load

    def spy(self):
        calls.append(type(self).__name__)
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


def test_huge_images_are_refused_by_the_pixel_budget_before_decoding(corpus, load_calls):
    assert HUGE * HUGE < Image.MAX_IMAGE_PIXELS  # under Pillow's own bomb check: ours must act
    # refused from the header: the spy shows no pixel decode started (no wall-clock bound: this
    # must hold on a loaded machine too)
    for name, data in corpus["huge"]:
        with pytest.raises(BadImage) as err:
            to_array(data, SIZE)
        reason = str(err.value)
        assert reason.startswith("image too large to decode: "), (name, reason)
        assert f"{HUGE} x {HUGE} px = {HUGE * HUGE:,} pixels" in reason, reason
        assert f"over the budget of {images.MAX_PIXELS:,} pixels (images.MAX_PIXELS)" in reason
    assert load_calls == []
    assert "(I;16, 2 B per pixel: 177 MB decoded)" in str(
        pytest.raises(BadImage, images.inspect, corpus["huge"][0][1]).value)


def test_the_pixel_budget_is_exact(load_calls):
    side = 4096
    assert side * side == images.MAX_PIXELS
    at_budget = factories.png_header_only_bomb(side, side)        # all black: blank
    assert to_array(at_budget, SIZE).shape == (SIZE, SIZE)
    assert set(load_calls) == {"PngImageFile"}  # decoded: the spy sees decodes when they happen
    with pytest.raises(BadImage, match="blank"):
        images.inspect(at_budget)
    over = r"4097 x 4096 px = 16,781,312 pixels .*\(images\.MAX_PIXELS\)"
    with pytest.raises(BadImage, match=over):
        images.inspect(factories.png_header_only_bomb(side + 1, side))


def test_16bit_png_bomb_stays_within_memory(tmp_path):
    """In a fresh interpreter, so the peak RSS belongs to this decode alone: the 9,400 px
    16-bit PNG is refused at ~40 MB (the interpreter and imports), where decoding it took
    1.2-2.4 GB."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png16_bomb(HUGE, HUGE))
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the peak from before exec, i.e. the
    # size of the forking pytest process (1.2 GB late in a full run), not this decode's
    code = (
        "import sys\n"
        "from pipelines import images, inputspec, neardup\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "spec = inputspec.InputSpec.legacy_gray(28)\n"
        "for fn in (images.inspect, lambda d: inputspec.preprocess(d, spec), neardup.fingerprint):\n"
        "    try:\n"
        "        fn(data)\n"
        "        print('decoded')\n"
        "    except images.BadImage as exc:\n"
        "        print(exc)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n")
    run = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True,
                         text=True, timeout=120, check=True, cwd=factories.REPO)
    *reasons, peak_mb = run.stdout.split("\n")[:-1]
    assert len(reasons) == 3 and all("images.MAX_PIXELS" in r for r in reasons), run.stdout
    assert int(peak_mb) < 300, f"peak RSS {peak_mb} MB"


def test_scan_bombs_are_refused_by_counting_scans_before_decoding(corpus, load_calls):
    for name, data in corpus["scan bomb"]:
        scans = jpeg_scans(data)
        assert scans > 1000
        with pytest.raises(BadImage) as err:  # the 4096 px one would decode for ~50 s
            to_array(data, SIZE)
        assert str(err.value).startswith(
            f"JPEG with {scans} scans refused: over the limit of {images.MAX_JPEG_SCANS} "
            "(images.MAX_JPEG_SCANS)"), str(err.value)
    assert load_calls == []


def test_scan_bomb_is_a_real_jpeg_that_pillow_decodes_in_full():
    """The crafted file is valid: a decoder without a scan limit reads all 2,006 scans and
    shows the picture. (Small, so the unbounded decode is quick.)"""
    data = scan_bomb(32, 2000, flat=False)
    img = Image.open(io.BytesIO(data))
    img.load()
    assert img.size == (32, 32) and bright_quadrant(np.asarray(img)) == 0
    assert jpeg_scans(data) == 2006
    with pytest.raises(BadImage, match="JPEG with 2006 scans refused"):
        images.inspect(data)


def test_the_scan_limit_is_exact():
    normal = 6  # libjpeg's progressive script for one component
    at_limit = scan_bomb(64, images.MAX_JPEG_SCANS - normal, flat=False)
    assert jpeg_scans(at_limit) == images.MAX_JPEG_SCANS
    assert images.inspect(at_limit).format == "JPEG"
    over = scan_bomb(64, images.MAX_JPEG_SCANS - normal + 1, flat=False)
    with pytest.raises(BadImage, match=f"JPEG with {images.MAX_JPEG_SCANS + 1} scans refused"):
        images.inspect(over)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_animated_images_decode_the_first_frame_only(fmt):
    """Frame 0 is what the model sees, and nothing after it is read: cut in half (the later
    frames gone), GIF, APNG and multi-page TIFF still give frame 0 exactly. (libwebp's demuxer
    needs the whole container, so WebP is checked whole.)"""
    data, first = animated(fmt, FRAMES)
    if fmt != "WEBP":
        data = data[: len(data) // 2]
    out = to_array(data, 32)
    assert np.array_equal(out, first)
