"""pipelines.inputspec: the spec record (checked like params.yaml), and `preprocess` — every image
mode as a viewer shows it, made gray or RGB, resized by each policy with the geometry it
promises — plus the digits demo's spec giving exactly the pixels the gray pipeline gave."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import inputspec
from pipelines.images import BadImage
from pipelines.inputspec import InputSpec, SpecError, channel_stats, preprocess
from tests import factories

RED, BLUE = (255, 0, 0), (0, 0, 255)


def spec(channels=3, height=16, width=16, resize="stretch", background=(0, 0, 0)) -> InputSpec:
    return InputSpec(channels=channels, height=height, width=width, resize=resize,
                     background=background)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def luma(rgb) -> int:
    return Image.new("RGB", (1, 1), tuple(rgb)).convert("L").getpixel((0, 0))


def halves(w: int = 32, h: int = 32) -> np.ndarray:
    """RGB: left half green-ish, right half orange-ish, a white block top-left (orientation)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (30, 160, 60)
    a[:, w // 2:] = (230, 120, 20)
    a[: h // 4, : w // 4] = 255
    return a


# -- the record -----------------------------------------------------------------------------------

def test_json_round_trip_and_legacy():
    s = InputSpec.legacy_gray(28)
    assert (s.channels, s.height, s.width, s.resize, s.background, s.mean, s.std) == \
        (1, 28, 28, "stretch", (0, 0, 0), (127.5,), (127.5,))
    assert InputSpec.from_json(s.to_json()) == s
    measured = spec().with_stats((120.0, 110.5, 100.25), (60.0, 55.0, 50.0))
    assert InputSpec.from_json(measured.to_json()) == measured


@pytest.mark.parametrize("change, message", [
    ({"channels": 2}, "input.channels must be 1 (grayscale) or 3 (RGB)"),
    ({"resize": "squash"}, "input.resize must be one of stretch, crop, pad"),
    ({"height": 4}, "input.height must be between 8 and 1024"),
    ({"background": [0, 0]}, "input.background must be three integers"),
    ({"mean": [1.0, 2.0, 3.0], "std": [1.0]}, "input.std has 1 values for 3 channel(s)"),
    ({"mean": [1.0, 2.0, 3.0], "std": []}, "input.mean and input.std must both be"),
    ({"mean": [1.0, 2.0], "std": [1.0, 2.0]}, "input.mean must be []"),
    ({"colour": True}, "unknown key input.colour"),
])
def test_from_json_refuses_with_a_clear_message(change, message):
    d = {**spec().to_json(), **change}
    with pytest.raises(SpecError, match="model.safetensors: " + message.replace("[", r"\[")
                       .replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        InputSpec.from_json(d, source="model.safetensors")


def test_missing_field_and_wrong_shape_are_refused():
    d = spec().to_json()
    del d["width"]
    with pytest.raises(SpecError, match="missing key input.width"):
        InputSpec.from_json(d)
    with pytest.raises(SpecError, match="must be a mapping"):
        InputSpec.from_json([1, 2, 3])
    with pytest.raises(SpecError, match="2 values for 1 channel"):
        spec(channels=1).with_stats((1.0, 2.0), (1.0, 2.0))


def test_from_params_reads_the_input_section():
    p = factories.params({"input.channels": 3, "input.height": 32, "input.width": 48,
                          "input.resize": "pad", "input.background": [1, 2, 3],
                          "input.mean": [100.0], "input.std": [50.0]})
    s = inputspec.from_params(p)
    assert s == InputSpec(channels=3, height=32, width=48, resize="pad", background=(1, 2, 3),
                          mean=(100.0,) * 3, std=(50.0,) * 3)  # one value: each channel


# -- the digits demo keeps its pixels --------------------------------------------------------------

def test_digits_demo_spec_gives_the_former_gray_pixels():
    """params.yaml's spec (the digits demo) is the legacy one, and on every demo scan it gives
    the pixels the former pipeline gave: gray, bilinear (antialiased) stretch to 28 x 28."""
    s = inputspec.from_params(factories.params())
    assert (s.channels, s.height, s.width, s.resize, s.background) == (1, 28, 28, "stretch",
                                                                        (0, 0, 0))
    assert s == InputSpec.legacy_gray(28).__class__(**{**vars(InputSpec.legacy_gray(28)),
                                                        "mean": (), "std": ()})
    for i in range(0, factories.digit_count(), 3):  # 599 scans of all ten classes
        data = factories.digit_png(i)
        former = np.asarray(Image.open(io.BytesIO(data)).convert("L").resize(
            (28, 28), Image.Resampling.BILINEAR))
        out = preprocess(data, s)
        assert out.shape == (28, 28, 1) and out.dtype == np.uint8
        assert np.array_equal(out[..., 0], former), i


# -- modes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_rgba_transparency_is_composited_onto_the_background(channels):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., :3] = 255               # white everywhere underneath ...
    a[4:12, 4:12, 3] = 255         # ... opaque only in the middle
    out = preprocess(factories.png_bytes(a), spec(channels=channels, background=RED))
    want_bg = RED if channels == 3 else (luma(RED),)
    assert tuple(out[0, 0]) == want_bg and tuple(out[15, 15]) == want_bg
    assert tuple(out[8, 8]) == ((255, 255, 255) if channels == 3 else (255,))


@pytest.mark.parametrize("channels", [1, 3])
def test_la_and_palette_transparency_use_the_background(channels):
    gray = np.full((16, 16), 200, np.uint8)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, 8:] = 255                                    # right half opaque
    la = encode(Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]))
    pal = Image.fromarray(np.where(alpha > 0, 200, 7).astype(np.uint8)).convert("P")
    pa = encode(pal, transparency=7)                     # index 7 transparent
    for data in (la, pa):
        out = preprocess(data, spec(channels=channels, background=BLUE))
        assert tuple(out[8, 2]) == (BLUE if channels == 3 else (luma(BLUE),))
        assert tuple(out[8, 13]) == ((200,) * channels)


@pytest.mark.parametrize("channels", [1, 3])
def test_exif_rotated_jpeg_is_upright(channels):
    stored = halves(48, 32)                               # landscape, white block top-left
    exif = Image.Exif()
    exif[0x0112] = 6                                      # display rotated 90 degrees clockwise
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    out = preprocess(data, spec(channels=channels, height=48, width=32))  # portrait now
    shown = np.rot90(stored, -1)
    want = shown if channels == 3 else np.asarray(Image.fromarray(shown).convert("L"))[..., None]
    assert np.abs(out.astype(int) - want.astype(int)).mean() < 6
    assert out[:12, -8:].mean() > 240  # the white block went to the top-right


def test_cmyk_jpeg_becomes_rgb():
    rgb = halves()
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = preprocess(data, spec(height=32, width=32))
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 8
    gray = preprocess(data, spec(channels=1, height=32, width=32))
    assert abs(int(gray[16, 24, 0]) - luma((230, 120, 20))) < 8


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_not_clipped(channels):
    v = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535
    data = encode(Image.fromarray(v))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = preprocess(data, spec(channels=channels))
    assert np.array_equal(out, np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1),
                                         channels, axis=2))


def test_lab_tiff_becomes_rgb_or_its_lightness():
    rgb = halves()
    lab = Image.fromarray(rgb).convert("LAB")
    lab.info.clear()
    data = encode(lab, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    out = preprocess(data, spec(height=32, width=32))
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6
    gray = preprocess(data, spec(channels=1, height=32, width=32))
    assert np.array_equal(gray[..., 0], np.asarray(lab.getchannel("L")))


def test_one_bit_and_palette_images():
    bits = Image.fromarray(np.eye(16, dtype=bool))
    out = preprocess(encode(bits), spec())
    assert set(np.unique(out)) == {0, 255} and tuple(out[3, 3]) == (255, 255, 255)
    pal = Image.fromarray(halves()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    out = preprocess(encode(pal), spec(height=32, width=32))
    assert np.abs(out.astype(int) - np.asarray(pal.convert("RGB"), dtype=int)).max() == 0


# -- geometry -------------------------------------------------------------------------------------

def bands(w: int, h: int) -> bytes:
    """Three vertical (w > h) or horizontal bands: red | green | blue."""
    a = np.zeros((h, w, 3), np.uint8)
    if w >= h:
        a[:, : w // 3], a[:, w // 3: 2 * w // 3], a[:, 2 * w // 3:] = RED, (0, 255, 0), BLUE
    else:
        a[: h // 3], a[h // 3: 2 * h // 3], a[2 * h // 3:] = RED, (0, 255, 0), BLUE
    return factories.png_bytes(a)


def test_stretch_fills_the_output_ignoring_aspect():
    out = preprocess(bands(60, 20), spec(height=12, width=30))
    assert out.shape == (12, 30, 3)
    assert tuple(out[6, 2]) == RED and tuple(out[6, 15]) == (0, 255, 0) and \
        tuple(out[6, 27]) == BLUE


@pytest.mark.parametrize("w, h", [(60, 20), (20, 60)])
def test_crop_keeps_the_centre(w, h):
    out = preprocess(bands(w, h), spec(height=10, width=10, resize="crop"))
    assert out.shape == (10, 10, 3)
    inner = out[1:-1, 1:-1]  # the border pixels' filter support reaches just past the box
    assert (inner == (0, 255, 0)).all()  # only the middle band is left ...
    assert out[..., 0].max() < 64 and out[..., 2].max() < 64  # ... barely a trace of the others


@pytest.mark.parametrize("channels", [1, 3])
def test_pad_keeps_the_aspect_with_background_bars(channels):
    bg = (10, 20, 200)
    out = preprocess(bands(60, 20), spec(channels=channels, height=30, width=30, resize="pad",
                                         background=bg))
    fill = bg if channels == 3 else (luma(bg),)
    assert out.shape == (30, 30, channels)
    # 60 x 20 -> 30 x 10, centred: rows 10..19 hold the picture, 10 rows of bars above and below
    assert all(tuple(px) == fill for px in out[:10].reshape(-1, channels))
    assert all(tuple(px) == fill for px in out[20:].reshape(-1, channels))
    middle = out[10:20]
    assert not any(tuple(px) == fill for px in middle.reshape(-1, channels))
    if channels == 3:
        assert tuple(out[15, 2]) == RED and tuple(out[15, 27]) == BLUE
    tall = preprocess(bands(20, 60), spec(height=30, width=30, resize="pad", background=bg))
    assert all(tuple(px) == bg for px in tall[:, :10].reshape(-1, 3))  # bars left and right
    assert tuple(tall[2, 15]) == RED and tuple(tall[27, 15]) == BLUE


def test_big_jpeg_decodes_reduced_and_looks_the_same():
    """A 1600 x 1200 JPEG to 32 x 32 decodes at 1/8 scale first (libjpeg's DCT scaling); the
    result is within a few levels of the full decode + resize."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG", quality=90)
    out = preprocess(data, spec(height=32, width=32, resize="crop"))
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (32, 32), Image.Resampling.BILINEAR, box=(200, 0, 1400, 1200)), dtype=int)
    assert np.abs(out.astype(int) - full).mean() < 3


def test_stack_and_a_bad_image_named_by_position():
    s = spec(channels=1, height=12, width=20, resize="pad")
    blobs = [factories.digit_png(i) for i in range(4)]
    x = inputspec.stack(blobs, s)
    assert x.shape == (4, 12, 20, 1) and x.dtype == np.uint8
    assert all(np.array_equal(x[i], preprocess(b, s)) for i, b in enumerate(blobs))
    assert inputspec.stack([], s).shape == (0, 12, 20, 1)
    with pytest.raises(BadImage, match=r"^image 2 of 3: corrupt image"):
        inputspec.stack([blobs[0], blobs[1], blobs[2][:70]], s)


# -- channel statistics ---------------------------------------------------------------------------

def test_channel_stats_are_exact_and_chunked(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (37, 5, 7, 3), dtype=np.uint8)
    x[..., 2] = 9                                                   # a constant channel
    path = tmp_path / "x.npy"
    np.save(path, x)
    mapped = np.load(path, mmap_mode="r")
    for chunk in (1, 200, 10**9):                                  # one image a time .. all
        mean, std = channel_stats(mapped, chunk_bytes=chunk)
        assert np.allclose(mean, x.reshape(-1, 3).mean(0), rtol=0, atol=1e-9)
        assert np.allclose(std[:2], x.reshape(-1, 3).std(0)[:2], rtol=0, atol=1e-9)
        assert std[2] == 1.0  # constant: 1, so the normalisation stays finite
    with pytest.raises(ValueError, match=r"\(N, H, W, C\) uint8"):
        channel_stats(x.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        channel_stats(x[:0])
