"""Near-duplicate leakage on real colour photos: how similar are copies of an image (re-encoded,
resized, slightly cropped, brightened, mirrored ...) and how similar are distinct images, under
the fingerprint prepare uses (images.fingerprint) and its alternatives? This is the measurement
behind params.yaml's prepare.near_duplicate_similarity.

    python benchmarks/near_duplicates.py [--photos DIR ...] [--max-side 768] [--tiles 3]

Photos: every colour JPEG/PNG found under the --photos folders (default: scikit-learn's sample
images, scikit-image's data folder when installed, and /usr/share/backgrounds, where Debian's
mate-backgrounds / ukui-wallpapers / lomiri-wallpapers-* packages put theirs). Each photo is
made an "original" (its long side scaled to --max-side, saved as JPEG q 95); distinct pairs are
all pairs of originals, and — a harder set — all pairs of non-overlapping tiles of the same
photos (--tiles x --tiles per photo: same light, same colours, different content). Also the
digits demo: the largest similarity between distinct scans (no digit may look like an eval copy).

Prints, per method: the lowest similarity of each kind of copy, the highest of distinct pairs,
and the margins around the threshold in use. Similarities are cosines; a pair counts as a copy
when the best of (a vs b, a vs mirrored b) reaches the threshold.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipelines import images, inputspec  # noqa: E402

DEFAULT_FOLDERS = ("sklearn", "skimage", "/usr/share/backgrounds")
# the same artwork shipped at three sizes by mate-backgrounds: real copies, not distinct images
KNOWN_COPIES = ("Elephants_3840x2160.jpg", "Elephants_5640x3172.jpg")


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def crop(img: Image.Image, frac: float, *, centred: bool = True) -> Image.Image:
    """Cut `frac` of the width and of the height: split between both sides, or all off the
    top-left corner (a shifted framing)."""
    w, h = img.size
    dw, dh = round(w * frac), round(h * frac)
    if centred:
        return img.crop((dw // 2, dh // 2, w - (dw - dw // 2), h - (dh - dh // 2)))
    return img.crop((dw, dh, w, h))


def scaled(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))),
                      Image.Resampling.LANCZOS)


# kind of copy -> how it is made from the original picture (an RGB image)
COPIES = {
    "jpeg q50": lambda im: encode(im, quality=50),
    "jpeg q75": lambda im: encode(im, quality=75),
    "webp q80": lambda im: encode(im, "WEBP", quality=80),
    "png": lambda im: encode(im, "PNG"),
    "resized 50%": lambda im: encode(scaled(im, 0.5), quality=90),
    "resized 25%": lambda im: encode(scaled(im, 0.25), quality=90),
    "resized 150%": lambda im: encode(scaled(im, 1.5), quality=90),
    "to 32 px (thumbnail)": lambda im: encode(im.resize((32, 32), Image.Resampling.BOX), "PNG"),
    "crop 2% centred": lambda im: encode(crop(im, 0.02), quality=90),
    "crop 5% centred": lambda im: encode(crop(im, 0.05), quality=90),
    "crop 10% centred": lambda im: encode(crop(im, 0.10), quality=90),
    "crop 5% one corner": lambda im: encode(crop(im, 0.05, centred=False), quality=90),
    "crop 10% one corner": lambda im: encode(crop(im, 0.10, centred=False), quality=90),
    "brighter x1.25": lambda im: encode(ImageEnhance.Brightness(im).enhance(1.25), quality=90),
    "darker x0.7": lambda im: encode(ImageEnhance.Brightness(im).enhance(0.7), quality=90),
    "contrast x1.4": lambda im: encode(ImageEnhance.Contrast(im).enhance(1.4), quality=90),
    "contrast x0.6": lambda im: encode(ImageEnhance.Contrast(im).enhance(0.6), quality=90),
    "saturation x1.5": lambda im: encode(ImageEnhance.Color(im).enhance(1.5), quality=90),
    "mirrored": lambda im: encode(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=90),
    "crop 5% + 50% + q70": lambda im: encode(scaled(crop(im, 0.05), 0.5), quality=70),
    "crop 10% + brighter + mirrored": lambda im: encode(
        ImageEnhance.Brightness(crop(im, 0.10)).enhance(1.2).transpose(
            Image.Transpose.FLIP_LEFT_RIGHT), quality=85),
}
# reported, not used to choose: a gray copy of a colour photo has lost its colour on purpose
INFORMATIVE = {"grayscale copy": lambda im: encode(im.convert("L"), quality=90)}


def find_photos(folders: list[str]) -> list[Path]:
    paths: list[Path] = []
    for folder in folders:
        if folder == "sklearn":
            import sklearn
            folder = str(Path(sklearn.__file__).parent / "datasets" / "images")
        elif folder == "skimage":
            import importlib.util
            found = importlib.util.find_spec("skimage")
            if found is None or not found.submodule_search_locations:
                continue
            folder = str(Path(list(found.submodule_search_locations)[0]) / "data")
        root = Path(folder)
        if root.is_dir():
            paths += sorted(p for p in root.rglob("*") if p.suffix.lower() in
                            (".jpg", ".jpeg", ".png", ".webp") and p.name not in KNOWN_COPIES)
    return paths


def load_originals(paths: list[Path], max_side: int) -> list[tuple[str, Image.Image]]:
    """(name, RGB picture) for each colour photo, long side at most `max_side`."""
    out = []
    for p in paths:
        try:
            img = images.convert(images.decode(p.read_bytes(),
                                               draft=lambda w, h: (max_side, max_side)),
                                 channels=3, background=(0, 0, 0))
        except images.BadImage:
            continue
        a = np.asarray(img, dtype=np.int16)
        if min(img.size) < 64 or np.abs(a - a.mean(2, keepdims=True)).mean() < 2:
            continue  # too small, or gray: not a colour photo
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out.append((p.name, img))
    return out


def tiles(pictures: list[tuple[str, Image.Image]], k: int) -> list[tuple[str, Image.Image]]:
    out = []
    for name, img in pictures:
        w, h = img.width // k, img.height // k
        out += [(f"{name}[{i},{j}]", img.crop((j * w, i * h, (j + 1) * w, (i + 1) * h)))
                for i in range(k) for j in range(k)]
    return out


def best_pairwise(fps: np.ndarray) -> tuple[float, tuple[int, int]]:
    """Highest similarity between two different rows, mirrored or not, and the pair."""
    sim = np.maximum(fps @ fps.T, fps @ images.mirror(fps).T)
    np.fill_diagonal(sim, -1.0)
    i, j = np.unravel_index(np.argmax(sim), sim.shape)
    return float(sim[i, j]), (int(i), int(j))


def pair_sim(a: np.ndarray, b: np.ndarray) -> float:
    return float(max(a @ b, a @ images.mirror(b[None])[0]))


def measure(method: dict, originals, tile_set, digits) -> dict:
    fp = lambda data: images.fingerprint(data, **method)  # noqa: E731
    base = [encode(img, quality=95) for _, img in originals]
    base_fps = np.stack([fp(b) for b in base])
    copies = {}
    for kind, make in {**COPIES, **INFORMATIVE}.items():
        copies[kind] = min(pair_sim(base_fps[i], fp(make(img)))
                           for i, (_, img) in enumerate(originals))
    photos, (pi, pj) = best_pairwise(base_fps)
    tile_fps = np.stack([fp(encode(img, quality=95)) for _, img in tile_set])
    tile_best, (ti, tj) = best_pairwise(tile_fps)
    digit_best, _ = best_pairwise(np.stack([fp(d) for d in digits]))
    return {"copies": copies, "photos": photos,
            "photos_pair": (originals[pi][0], originals[pj][0]), "tiles": tile_best,
            "tiles_pair": (tile_set[ti][0], tile_set[tj][0]), "digits": digit_best}


def decode_times(originals_paths: list[Path]) -> tuple[float, float, str] | None:
    """ms per image for the biggest JPEG: preprocess to 224 x 224 with and without the reduced
    JPEG decode (the fingerprint uses the same draft)."""
    jpegs = [p for p in originals_paths if p.suffix.lower() in (".jpg", ".jpeg")]
    if not jpegs:
        return None
    p = max(jpegs, key=lambda q: Image.open(q).width * Image.open(q).height)
    data = p.read_bytes()
    if Image.open(io.BytesIO(data)).width * Image.open(io.BytesIO(data)).height \
            > images.MAX_PIXELS:
        return None
    spec = inputspec.InputSpec(channels=3, height=224, width=224, resize="crop",
                               background=(0, 0, 0))

    def full(d):
        return images.convert(images.decode(d), channels=3).resize((224, 224))
    timings = []
    for fn in (full, lambda d: inputspec.preprocess(d, spec)):
        fn(data)
        t = time.perf_counter()
        for _ in range(3):
            fn(data)
        timings.append((time.perf_counter() - t) / 3 * 1000)
    size = Image.open(io.BytesIO(data)).size
    return timings[0], timings[1], f"{p.name} ({size[0]} x {size[1]})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="*", default=list(DEFAULT_FOLDERS))
    ap.add_argument("--max-side", type=int, default=768)
    ap.add_argument("--tiles", type=int, default=3)
    ap.add_argument("--digits", type=int, default=1797, help="distinct demo digits to compare")
    ap.add_argument("--threshold", type=float, default=None,
                    help="default: params.yaml prepare.near_duplicate_similarity")
    ap.add_argument("--alternatives", action="store_true",
                    help="also measure other thumbnail sides and chroma weights")
    args = ap.parse_args(argv)
    if args.threshold is None:
        from pipelines import settings
        args.threshold = settings.load(Path(__file__).resolve().parent.parent / "params.yaml") \
            .prepare.near_duplicate_similarity
    from tests import factories
    paths = find_photos(args.photos)
    originals = load_originals(paths, args.max_side)
    if len(originals) < 2:
        print("fewer than two colour photos found; pass --photos DIR", file=sys.stderr)
        return 1
    tile_set = tiles(originals, args.tiles)
    digits = [factories.digit_png(i) for i in range(min(args.digits, factories.digit_count()))]
    print(f"{len(originals)} colour photos (long side <= {args.max_side} px), "
          f"{len(tile_set)} tiles, {len(digits)} demo digits; threshold {args.threshold}")
    methods = {"shipped": {}}
    if args.alternatives:
        methods |= {f"side {s}, chroma {c}": {"side": s, "chroma": c}
                    for s in (8, 16, 32) for c in (0.0, 0.5, 1.0)}
    for name, method in methods.items():
        r = measure(method, originals, tile_set, digits)
        worst_copy = min(v for k, v in r["copies"].items() if k not in INFORMATIVE)
        print(f"\n## {name} {method or images.FINGERPRINT_DEFAULTS}")
        print("| copy kind | lowest similarity to its original |\n|---|---|")
        for kind, v in r["copies"].items():
            mark = " (informative)" if kind in INFORMATIVE else \
                (" MISSED" if v < args.threshold else "")
            print(f"| {kind} | {v:.4f}{mark} |")
        print(f"lowest copy: {worst_copy:.4f}  "
              f"highest distinct photos: {r['photos']:.4f} {r['photos_pair']}  "
              f"highest distinct tiles: {r['tiles']:.4f} {r['tiles_pair']}  "
              f"highest distinct digits: {r['digits']:.4f}")
        print(f"margins at {args.threshold}: copies +{worst_copy - args.threshold:.4f}, "
              f"photos -{args.threshold - r['photos']:.4f}, "
              f"tiles -{args.threshold - r['tiles']:.4f}, "
              f"digits -{args.threshold - r['digits']:.4f}")
    timing = decode_times(paths)
    if timing:
        print(f"\npreprocess to 224 x 224 of {timing[2]}: full decode {timing[0]:.0f} ms, "
              f"reduced JPEG decode {timing[1]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
