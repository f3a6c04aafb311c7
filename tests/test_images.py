"""pipelines.images: a hostile corpus is refused with a readable reason; odd but legitimate
encodings all come out (through the digits demo's gray spec) the way a viewer would show them;
the blank check follows the spec's channels."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines import images, inputspec
from pipelines.images import BadImage
from pipelines.inputspec import InputSpec
from tests import factories


def to_array(data: bytes, size: int) -> np.ndarray:
    """`(size, size)` uint8: the gray stretched preprocessing of the digits demo."""
    return inputspec.preprocess(data, InputSpec.legacy_gray(size))[..., 0]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def corner_pattern(side: int = 32) -> np.ndarray:
    """Dark background, a bright block in the top-left quadrant only: any flip/rotation moves it."""
    a = np.full((side, side), 20, dtype=np.uint8)
    a[: side // 2 - 2, : side // 2 - 2] = 235
    return a


def quadrant_means(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return np.array([[a[:h, :w].mean(), a[:h, w:].mean()], [a[h:, :w].mean(), a[h:, w:].mean()]])


# -- the hostile corpus ---------------------------------------------------------------------------

def test_zero_bytes():
    with pytest.raises(BadImage, match="empty"):
        images.inspect(b"")


def test_truncated_png():
    good = factories.digit_png(0)
    images.inspect(good)  # the untruncated file is fine
    # Every cut that loses pixel data: in the signature, IHDR, or anywhere in IDAT. (Only the
    # zlib checksum and IEND may go missing: the last 12 + 4 + ~5 bytes carry no pixels.)
    for cut in [*range(1, len(good) - 30, 7), len(good) - 30]:
        with pytest.raises(BadImage) as err:
            images.inspect(good[:cut])
        reason = str(err.value)
        assert "corrupt" in reason or "not an image" in reason, reason


def test_text_file_is_not_an_image():
    with pytest.raises(BadImage, match="not an image in an accepted format"):
        images.inspect(b"this is a text file, not a scan\n")


def test_format_outside_the_allow_list_is_refused():
    # Pillow can read ICO/PPM, but annotators' images may only come in ALLOWED_FORMATS.
    arr = corner_pattern(16)
    for fmt in ("PPM", "ICO"):
        assert fmt not in images.ALLOWED_FORMATS
        with pytest.raises(BadImage, match="not an image in an accepted format"):
            images.inspect(encode(Image.fromarray(arr).convert("RGB"), fmt))


def test_bomb_builder_makes_a_real_png():
    # The hand-written PNG encoder used below is a valid PNG (checked at a decodable size).
    small = factories.png_header_only_bomb(37, 21)
    img = Image.open(io.BytesIO(small))
    img.load()
    assert img.size == (37, 21) and img.format == "PNG"


@pytest.mark.parametrize("side", [20_000, 10_000])  # over 2x Pillow's limit, and between 1x-2x
def test_decompression_bomb_is_refused_without_decoding(side):
    data = factories.png_header_only_bomb(side, side)
    assert len(data) < 100_000  # tiny on disk, `side`^2 pixels once decoded
    # Pillow raises its bomb error/warning from the header, in Image.open, before any pixel is
    # decoded; the reason names the declared size.
    for refuse in (images.inspect, lambda d: to_array(d, 28)):
        with pytest.raises(BadImage, match="decompression bomb refused") as err:
            refuse(data)
        assert f"{side * side} pixels" in str(err.value)


def test_blank_image_is_refused():
    for value in (0, 255, 77):
        with pytest.raises(BadImage, match=f"blank image .*{value}"):
            images.inspect(factories.png_bytes(np.full((32, 32), value, dtype=np.uint8)))


def test_blank_colour_image_is_refused():
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[...] = (10, 200, 30)
    with pytest.raises(BadImage, match="blank"):
        images.inspect(factories.png_bytes(rgb))


def test_real_digit_is_described():
    info = images.inspect(factories.digit_png(3))
    assert (info.width, info.height) == (factories.SCAN_SIDE, factories.SCAN_SIDE)
    assert info.mode == "L" and info.format == "PNG"


def test_image_that_preprocesses_to_blank_is_refused():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # nothing visible: every pixel fully transparent
    data = factories.png_bytes(rgba)
    assert np.ptp(to_array(data, 28)) == 0  # what training would see: a constant image
    with pytest.raises(BadImage, match="blank"):
        images.inspect(data)


# -- to_array on legitimate but unusual encodings -------------------------------------------------

def check_matches(out: np.ndarray, expected: np.ndarray, size: int, tol: float) -> None:
    assert out.dtype == np.uint8 and out.shape == (size, size)
    ref = np.asarray(Image.fromarray(expected).resize((size, size), Image.Resampling.BILINEAR),
                     dtype=np.float64)
    assert np.abs(out.astype(np.float64) - ref).mean() < tol
    q = quadrant_means(out)
    assert q.argmax() == quadrant_means(ref).argmax()


def test_grayscale_png_round_trip():
    a = corner_pattern()
    out = to_array(factories.png_bytes(a), 32)
    assert np.array_equal(out, a)  # same size: no resize, exact


def test_rgba_is_composited_on_black():
    a = corner_pattern()
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = 255            # every pixel white underneath...
    rgba[..., 3] = np.where(a > 128, 255, 0)  # ...but only the "ink" is opaque
    out = to_array(factories.png_bytes(rgba), 28)
    expected = np.where(a > 128, 255, 0).astype(np.uint8)  # white ink on black
    check_matches(out, expected, 28, tol=2.0)


def test_palette_image():
    a = corner_pattern()
    p = Image.fromarray(a).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    data = encode(p)
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.asarray(p.convert("L"))
    out = to_array(data, 24)
    check_matches(out, expected, 24, tol=2.0)


def test_palette_with_transparency_is_composited_like_rgba():
    a = corner_pattern()
    p = Image.fromarray(a).convert("P")  # grayscale palette, index == value here
    data = encode(p, transparency=20)    # the background index is transparent
    out = to_array(data, 32)
    expected = np.where(a == 20, 0, a).astype(np.uint8)
    check_matches(out, expected, 32, tol=1.0)


def test_16bit_grayscale_keeps_its_orientation():
    a16 = np.where(corner_pattern() > 128, 65535, 0).astype(np.uint16)
    data = encode(Image.fromarray(a16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = to_array(data, 28)
    check_matches(out, np.where(a16 > 0, 255, 0).astype(np.uint8), 28, tol=3.0)


def test_16bit_grayscale_intensities_are_scaled_not_clipped():
    a8 = corner_pattern()
    a16 = a8.astype(np.uint16) * 257  # the same picture at 16 bits per pixel
    data = encode(Image.fromarray(a16))
    out = to_array(data, 32)
    assert np.abs(out.astype(int) - a8.astype(int)).max() <= 1


def test_cmyk_jpeg():
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    a = corner_pattern()
    rgb[...] = a[..., None]
    rgb[..., 0] = np.maximum(rgb[..., 0], 60)  # some colour, so C/M/Y all matter
    cmyk = Image.fromarray(rgb).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    out = to_array(data, 28)
    check_matches(out, expected, 28, tol=8.0)


@pytest.mark.parametrize("orientation, display", [
    (3, lambda a: np.rot90(a, 2)),    # stored upside down
    (6, lambda a: np.rot90(a, -1)),   # shown rotated 90 degrees clockwise (phone portrait)
    (8, lambda a: np.rot90(a, 1)),    # 90 degrees counter-clockwise
    (2, lambda a: a[:, ::-1]),        # mirrored
])
def test_exif_rotated_jpeg_is_shown_upright(orientation, display):
    stored = corner_pattern()
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    data = encode(Image.fromarray(stored).convert("RGB"), "JPEG", quality=95,
                  exif=exif.tobytes())
    out = to_array(data, 28)
    expected = np.ascontiguousarray(display(stored))
    check_matches(out, expected, 28, tol=8.0)
    # and not the stored orientation (the bright quadrant moved)
    assert quadrant_means(out).argmax() != quadrant_means(stored).argmax()


def test_resize_is_to_a_square_of_the_requested_size():
    data = factories.png_bytes(np.tile(np.arange(0, 200, 5, dtype=np.uint8), (20, 1)))  # 40 x 20
    out = to_array(data, 16)
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert (np.diff(out.astype(int), axis=1) >= 0).all()  # the left-to-right ramp survives


def test_to_array_refuses_what_inspect_refuses():
    with pytest.raises(BadImage):
        to_array(b"", 28)
    with pytest.raises(BadImage):
        to_array(factories.digit_png(0)[:60], 28)


def test_blank_check_follows_the_channels():
    """Red and a green of the same luma: one flat gray (blank for a gray model), two colours
    for an RGB model."""
    a = np.zeros((16, 16, 3), np.uint8)
    a[:, :8] = (255, 0, 0)
    a[:, 8:] = (0, 130, 0)  # luma 0.587 * 130 = 76 = 0.299 * 255
    data = factories.png_bytes(a)
    with pytest.raises(BadImage, match="blank"):
        images.inspect(data, channels=1)
    assert images.inspect(data, channels=3).mode == "RGB"
