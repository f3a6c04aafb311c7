"""pipelines.neardup: the colour-aware fingerprint catches copies of real colour photos
(re-encoded, resized, cropped at a corner, brightened, mirrored) and keeps distinct photos, parts
of one photo and colour variants apart; gray pictures compare by luma; the digits demo's
automatic threshold keeps distinct digits and catches a copy."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipelines import neardup
from tests import factories


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


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
    eval_fps = np.stack([neardup.fingerprint(encode(photos[n], "JPEG", quality=95))
                         for n in names])
    assert eval_fps.shape[1:] == neardup.no_fingerprints().shape[1:]
    for kind, make in COPIES.items():
        copies = np.stack([neardup.fingerprint(make(photos[n])) for n in names])
        best, where = neardup.nearest_similarity(copies, eval_fps)
        assert (best >= neardup.AUTO_FLOOR).all(), (kind, best)
        assert where.tolist() == [0, 1], kind


def test_distinct_photos_and_parts_of_one_photo_stay_apart(photos):
    """Two photos, and the four quarters of each (same light and colours, other content)."""
    parts = [encode(img, "JPEG", quality=95) for img in photos.values()]
    for img in photos.values():
        parts += [encode(crop(img, *box), "JPEG", quality=95) for box in
                  ((0, 0, .5, .5), (.5, 0, 0, .5), (0, .5, .5, 0), (.5, .5, 0, 0))]
    fps = np.stack([neardup.fingerprint(p) for p in parts])
    near = neardup.self_similarity(fps)
    assert neardup.nearest_similarity(fps[:1], fps[1:2])[0][0] < 0.5  # the two photos
    assert near.max() < neardup.AUTO_FLOOR    # nothing distinct reaches the lowest threshold
    assert neardup.auto_threshold(fps) == neardup.AUTO_FLOOR


def test_a_colour_swapped_photo_is_not_a_copy(photos):
    """The fingerprint sees colour: red and blue swapped is another picture (a gray one would
    call it the same: the luma barely moves)."""
    img = photos["flower.jpg"]
    swapped = Image.fromarray(np.asarray(img)[..., ::-1].copy())
    a, b = (neardup.fingerprint(encode(x, "PNG")) for x in (img, swapped))
    assert neardup.nearest_similarity(a[None], b[None])[0][0] < neardup.AUTO_FLOOR
    gray = {k: neardup.fingerprint(encode(x, "PNG"), chroma=0.0) for k, x in (("a", img),
                                                                              ("b", swapped))}
    assert neardup.nearest_similarity(gray["a"][None], gray["b"][None])[0][0] > \
        neardup.nearest_similarity(a[None], b[None])[0][0]


def test_gray_pictures_compare_by_luma_alone():
    data = factories.digit_png(4)
    fp = neardup.fingerprint(data)
    side = neardup.FINGERPRINT_SIDE
    assert np.abs(fp[:, side * side:]).max() < 1e-6  # no colour
    as_rgb = encode(Image.open(io.BytesIO(data)).convert("RGB"), "PNG")
    assert np.allclose(neardup.fingerprint(as_rgb), fp, atol=1e-6)
    assert np.allclose(neardup.mirror(neardup.mirror(fp[None])), fp[None])


def test_digits_demo_threshold_keeps_distinct_digits_and_catches_copies():
    """The digits demo: the threshold `null` picks from 300 eval digits lets the other digits
    through (distinct scans of one class look much alike at 8 x 8) and still catches a
    re-encoded, enlarged, brightened copy."""
    eval_fps = np.stack([neardup.fingerprint(factories.digit_png(i)) for i in range(300)])
    thr = neardup.auto_threshold(eval_fps)
    assert neardup.AUTO_FLOOR < thr <= neardup.AUTO_CEILING
    others = np.stack([neardup.fingerprint(factories.digit_png(i)) for i in range(300, 700)])
    best, _ = neardup.nearest_similarity(others, eval_fps)
    assert (best >= thr).mean() <= 0.01
    img = Image.open(io.BytesIO(factories.digit_png(7))).convert("L")
    copy = encode(ImageEnhance.Brightness(img.resize((40, 40))).enhance(1.1), "JPEG", quality=70)
    best, where = neardup.nearest_similarity(neardup.fingerprint(copy)[None], eval_fps)
    assert best[0] >= thr and where[0] == 7


def test_nearest_similarity_of_nothing():
    none = neardup.no_fingerprints()
    one = neardup.fingerprint(factories.digit_png(1))[None]
    best, where = neardup.nearest_similarity(one, none)
    assert best.tolist() == [0.0] and where.tolist() == [-1]
    assert neardup.nearest_similarity(none, one)[0].shape == (0,)
    assert neardup.self_similarity(one).tolist() == [-1.0]
    assert neardup.auto_threshold(one) == neardup.AUTO_FLOOR


@pytest.mark.slow
def test_the_benchmark_prints_its_measurements():
    """benchmarks/near_duplicates.py on the two photos every install has (numbers not asserted:
    they are the benchmark's to print)."""
    proc = subprocess.run(
        [sys.executable, str(factories.REPO / "benchmarks" / "near_duplicates.py"), "--photos",
         "sklearn", "--tiles", "2", "--digits", "320", "--no-emoji"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"^\| crop 10% one corner \| [\d.]+ \| [\d.]+% \|$", out, flags=re.M), out
    assert re.search(r"^every kind: lowest [\d.]+, caught [\d.]+% on average", out, flags=re.M)
    assert re.search(r"^digits: threshold 0\.9\d+ \(auto, from 300 eval digits\)", out, flags=re.M)
