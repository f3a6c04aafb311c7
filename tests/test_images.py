"""pipelines.images: a hostile corpus is refused with a readable reason; odd but legitimate
encodings all come out (through the digits demo's gray spec) the way a viewer would show them;
the colour-aware fingerprint catches copies of real colour photos and keeps distinct ones apart."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

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


def test_deprecated_gray_aliases_match_the_spec():
    """images.to_array / images.stack stay until every caller uses inputspec."""
    blobs = [factories.digit_png(i) for i in range(5)]
    x = images.stack(blobs, 28)
    assert x.shape == (5, 28, 28) and x.dtype == np.uint8
    for i, blob in enumerate(blobs):
        assert np.array_equal(x[i], to_array(blob, 28))
        assert np.array_equal(images.to_array(blob, 28), to_array(blob, 28))
    assert images.stack([], 28).shape == (0, 28, 28)


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


# -- near-duplicates on real colour photos (scikit-learn's sample images) --------------------------

@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    import sklearn
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    out = {}
    for name in ("china.jpg", "flower.jpg"):
        img = Image.open(folder / name).convert("RGB")
        img.thumbnail((320, 320))
        out[name] = img
    return out


def crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


COPIES = {
    "jpeg q60": lambda im: encode(im, "JPEG", quality=60),
    "webp": lambda im: encode(im, "WEBP", quality=80),
    "half size": lambda im: encode(im.resize((im.width // 2, im.height // 2)), "PNG"),
    "8 % off one corner": lambda im: encode(crop(im, 0.08, 0.08, 0, 0), "JPEG", quality=85),
    "3 % all round + half size": lambda im: encode(
        crop(im, 0.03, 0.03, 0.03, 0.03).resize((im.width // 2, im.height // 2)), "JPEG"),
    "brighter": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.15), "JPEG"),
    "lower contrast": lambda im: encode(ImageEnhance.Contrast(im).enhance(0.7), "JPEG"),
    "mirrored": lambda im: encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"),
}


def test_copies_of_real_photos_are_caught(photos):
    names = list(photos)
    eval_fps = np.stack([images.fingerprint(encode(photos[n], "JPEG", quality=95))
                         for n in names])
    assert eval_fps.shape[1:] == images.no_fingerprints().shape[1:]
    for kind, make in COPIES.items():
        copies = np.stack([images.fingerprint(make(photos[n])) for n in names])
        best, where = images.nearest_similarity(copies, eval_fps)
        assert (best >= images.AUTO_FLOOR).all(), (kind, best)
        assert where.tolist() == [0, 1], kind


def test_distinct_photos_and_parts_of_one_photo_stay_apart(photos):
    """Two photos, and the four quarters of each (same light and colours, other content)."""
    parts = [encode(img, "JPEG", quality=95) for img in photos.values()]
    for img in photos.values():
        parts += [encode(crop(img, *box), "JPEG", quality=95) for box in
                  ((0, 0, .5, .5), (.5, 0, 0, .5), (0, .5, .5, 0), (.5, .5, 0, 0))]
    fps = np.stack([images.fingerprint(p) for p in parts])
    near = images.self_similarity(fps)
    assert images.nearest_similarity(fps[:1], fps[1:2])[0][0] < 0.5  # the two photos
    assert near.max() < images.AUTO_FLOOR    # nothing distinct reaches the lowest threshold
    assert images.auto_threshold(fps) == images.AUTO_FLOOR


def test_a_colour_swapped_photo_is_not_a_copy(photos):
    """The fingerprint sees colour: red and blue swapped is another picture (a gray one would
    call it the same: the luma barely moves)."""
    img = photos["flower.jpg"]
    swapped = Image.fromarray(np.asarray(img)[..., ::-1].copy())
    a, b = (images.fingerprint(encode(x, "PNG")) for x in (img, swapped))
    assert images.nearest_similarity(a[None], b[None])[0][0] < images.AUTO_FLOOR
    gray = {k: images.fingerprint(encode(x, "PNG"), chroma=0.0) for k, x in (("a", img),
                                                                              ("b", swapped))}
    assert images.nearest_similarity(gray["a"][None], gray["b"][None])[0][0] > \
        images.nearest_similarity(a[None], b[None])[0][0]


def test_gray_pictures_compare_by_luma_alone():
    data = factories.digit_png(4)
    fp = images.fingerprint(data)
    side = images.FINGERPRINT_SIDE
    assert np.abs(fp[:, side * side:]).max() < 1e-6  # no colour
    as_rgb = encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    assert np.allclose(images.fingerprint(as_rgb), fp, atol=1e-6)
    assert np.allclose(images.mirror(images.mirror(fp[None])), fp[None])


def test_digits_demo_threshold_keeps_distinct_digits_and_catches_copies():
    """The digits demo: the threshold `null` picks from 300 eval digits lets the other digits
    through (distinct scans of one class look much alike at 8 x 8) and still catches a
    re-encoded, enlarged, brightened copy."""
    eval_fps = np.stack([images.fingerprint(factories.digit_png(i)) for i in range(300)])
    thr = images.auto_threshold(eval_fps)
    assert images.AUTO_FLOOR < thr <= images.AUTO_CEILING
    others = np.stack([images.fingerprint(factories.digit_png(i)) for i in range(300, 700)])
    best, _ = images.nearest_similarity(others, eval_fps)
    assert (best >= thr).mean() <= 0.01
    img = Image.open(io.BytesIO(factories.digit_png(7))).convert("L")
    copy = encode(ImageEnhance.Brightness(img.resize((40, 40))).enhance(1.1), "JPEG", quality=70)
    best, where = images.nearest_similarity(images.fingerprint(copy)[None], eval_fps)
    assert best[0] >= thr and where[0] == 7


def test_nearest_similarity_of_nothing():
    none = images.no_fingerprints()
    one = images.fingerprint(factories.digit_png(1))[None]
    best, where = images.nearest_similarity(one, none)
    assert best.tolist() == [0.0] and where.tolist() == [-1]
    assert images.nearest_similarity(none, one)[0].shape == (0,)
    assert images.self_similarity(one).tolist() == [-1.0]
    assert images.auto_threshold(one) == images.AUTO_FLOOR
