"""Near-duplicate leakage on real colour photos: how similar are copies of an image (re-encoded,
resized, slightly cropped, brightened, mirrored ...) and how similar are distinct images, under
the fingerprint prepare uses (neardup.fingerprint + neardup.nearest_similarity) and the simpler
ones it replaced? This is the measurement behind params.yaml's prepare.near_duplicate_similarity
and neardup.AUTO_*.

    python benchmarks/near_duplicates.py [--photos DIR ...] [--max-side 768] [--tiles 3]

Photos: every colour JPEG/PNG found under the --photos folders (default: scikit-learn's sample
images, scikit-image's data folder when installed, and /usr/share/backgrounds, where Debian's
mate-backgrounds / ukui-wallpapers / lomiri-wallpapers-* packages put theirs). Each photo is
made an "original" (its long side scaled to --max-side, saved as JPEG q 95); distinct pairs are
all pairs of originals, and — a harder set — all pairs of non-overlapping tiles of the same
photos (--tiles x --tiles per photo: same light, same colours, different content). Also the
digits demo: the largest similarity between distinct scans (no digit may look like an eval copy).

Prints, per method: for each kind of copy the lowest similarity to its original and the share
of photos whose copy reaches the threshold; for distinct photos / tiles / digits the highest
similarity and the share of images with a distinct neighbour at or above the threshold (they
would be excluded from training for nothing); the thresholds `null` (auto) picks for the
photos and for a digits-demo eval set.
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
from pipelines import images, inputspec, neardup  # noqa: E402

DEFAULT_FOLDERS = ("sklearn", "skimage", "/usr/share/backgrounds")
# mate-backgrounds' artwork folders: one design in several colourways (copies, in effect)
SKIP_DIRS = ("mate/abstract", "mate/desktop")
# a real-world copy: mate-backgrounds ships this picture at three sizes
REAL_COPIES = ("/usr/share/backgrounds/mate/abstract/Elephants.jpg",
               "/usr/share/backgrounds/mate/abstract/Elephants_3840x2160.jpg",
               "/usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg")
DIGITS_EVAL = 300  # the digits demo freezes 300 eval images


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
                            (".jpg", ".jpeg", ".png", ".webp")
                            and not any(d in str(p) for d in SKIP_DIRS))
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
    """Non-overlapping k x k tiles of each picture that are not nearly flat (luma std >= 8
    levels: a patch of clear sky is the same image as any other)."""
    out = []
    for name, img in pictures:
        w, h = img.width // k, img.height // k
        for i in range(k):
            for j in range(k):
                t = img.crop((j * w, i * h, (j + 1) * w, (i + 1) * h))
                if np.asarray(t.convert("L"), dtype=np.float64).std() >= 8:
                    out.append((f"{name}[{i},{j}]", t))
    return out


def measure(method: dict, originals, tile_set, digits, threshold: float | None) -> dict:
    mirrored = method.get("mirrored", True)
    opts = {k: v for k, v in method.items() if k != "mirrored"}

    def fp(data: bytes) -> np.ndarray:
        return neardup.fingerprint(data, **opts)

    def sim(a: np.ndarray, b: np.ndarray) -> float:
        return float(neardup.nearest_similarity(a[None], b[None], mirrored=mirrored)[0][0])

    t = time.perf_counter()
    base = np.stack([fp(encode(img, quality=95)) for _, img in originals])
    ms = (time.perf_counter() - t) / len(originals) * 1000
    auto_photos = neardup.auto_threshold(base) if mirrored and len(opts.get("crops", "x")) > 1 \
        else None
    thr = threshold if threshold is not None else (auto_photos or neardup.AUTO_FLOOR)
    copies = {}
    for kind, make in {**COPIES, **INFORMATIVE}.items():
        copies[kind] = np.array([sim(base[i], fp(make(img)))
                                 for i, (_, img) in enumerate(originals)])
    photos = neardup.self_similarity(base, mirrored=mirrored)
    tile_near = neardup.self_similarity(np.stack([fp(encode(img, quality=95))
                                                 for _, img in tile_set]), mirrored=mirrored)
    dfps = np.stack([fp(d) for d in digits])
    ev, rest = dfps[:DIGITS_EVAL], dfps[DIGITS_EVAL:]
    digit_thr = neardup.auto_threshold(ev) if threshold is None else threshold
    digit_near, _ = neardup.nearest_similarity(rest, ev, mirrored=mirrored)
    digit_copies = {}
    for kind in ("jpeg q50", "resized 50%", "resized 25%", "crop 5% centred", "crop 10% one corner",
                 "brighter x1.25", "mirrored"):
        digit_copies[kind] = min(
            sim(dfps[i], fp(COPIES[kind](Image.open(io.BytesIO(digits[i])).convert("RGB"))))
            for i in range(0, len(digits), max(1, len(digits) // 60)))
    real = {}
    for p in map(Path, REAL_COPIES):
        try:
            real[p.name] = fp(p.read_bytes()) if p.exists() else None
        except images.BadImage:  # the 5640 px release is over images.MAX_PIXELS
            real[p.name] = None
    first = real.get(Path(REAL_COPIES[0]).name)
    real_sims = {n: sim(first, f) for n, f in real.items()
                 if f is not None and first is not None and n != Path(REAL_COPIES[0]).name}
    return {"ms": ms, "thr": thr, "auto_photos": auto_photos, "copies": copies,
            "photos": photos, "tiles": tile_near, "digit_thr": digit_thr,
            "digit_near": digit_near, "digit_copies": digit_copies, "real": real_sims}


def emoji_section(threshold: float | None, *, eval_n: int = 480) -> list[str]:
    """The colour demo's Twemoji set (pipelines.datasets "emoji": real artwork, 72 px palette
    PNGs on white): how alike distinct emoji are, whether its byte-identical flags are caught,
    and copies of a sample. Empty when the package is not installed."""
    from pipelines import datasets
    try:
        items = datasets.get("emoji").items()
    except datasets.DatasetError:
        return []
    white = (255, 255, 255)
    fps = np.stack([neardup.fingerprint(it.data, background=white) for it in items])
    rng = np.random.default_rng(0)
    ev = rng.choice(len(items), size=min(eval_n, len(items)), replace=False)
    thr = neardup.auto_threshold(fps[ev]) if threshold is None else threshold
    near = neardup.self_similarity(fps)
    same_bytes = {}
    for k, it in enumerate(items):
        same_bytes.setdefault(it.data, []).append(k)
    twins = [ks for ks in same_bytes.values() if len(ks) > 1]
    rest = np.setdiff1d(np.arange(len(items)), ev)
    best, _ = neardup.nearest_similarity(fps[rest], fps[ev])
    lines = [f"\n## the colour demo's emoji ({len(items)} Twemoji, on white)",
             f"threshold {thr:.4f} ({'auto from ' + str(len(ev)) + ' eval emoji' if threshold is None else 'given'}); "
             f"distinct emoji: highest {max(near[k] for k in range(len(items)) if not any(k in t for t in twins)):.4f}, "
             f"{(best >= thr).mean():.1%} of the other {len(rest)} have an eval neighbour at or "
             f"above it; byte-identical pairs ({len(twins)}) score "
             + ", ".join(f"{near[t[0]]:.4f}" for t in twins)]
    sample = items[::40]
    sample_fps = fps[::40]
    caught = {}
    for kind in ("jpeg q75", "resized 50%", "crop 5% one corner", "brighter x1.25", "mirrored"):
        sims = []
        for it, f in zip(sample, sample_fps):
            img = images.convert(images.decode(it.data), channels=3, background=white)
            c = neardup.fingerprint(COPIES[kind](img), background=white)
            sims.append(float(neardup.nearest_similarity(f[None], c[None])[0][0]))
        caught[kind] = (min(sims), float(np.mean(np.array(sims) >= thr)))
    lines.append("emoji copies (lowest, caught): " + ", ".join(
        f"{k} {lo:.4f} {c:.0%}" for k, (lo, c) in caught.items()))
    return lines


def decode_times(paths: list[Path], *, each: int = 3) -> list[tuple[str, float, float]]:
    """(what, ms full decode, ms as inputspec.preprocess does it) to a 224 x 224 centre crop,
    for the `each` largest baseline and progressive JPEGs within the pixel budget: the reduced
    (DCT-scaled) decode skips most of the work for baseline files; progressive ones must still
    gather every coefficient first."""
    kinds: dict[str, list] = {"baseline": [], "progressive": []}
    for p in paths:
        if p.suffix.lower() in (".jpg", ".jpeg"):
            with Image.open(p) as im:
                if im.width * im.height <= images.MAX_PIXELS:
                    kind = "progressive" if im.info.get("progressive") else "baseline"
                    kinds[kind].append((im.width * im.height, p, im.size, kind))
    spec = inputspec.InputSpec(channels=3, height=224, width=224, resize="crop",
                               background=(0, 0, 0))

    def full(d):
        return images.convert(images.decode(d), channels=3).resize((224, 224),
                                                                   Image.Resampling.BILINEAR)
    out = []
    for found in kinds.values():
        for _, p, size, kind in sorted(found, reverse=True)[:each]:
            data = p.read_bytes()
            timings = []
            for fn in (full, lambda d: inputspec.preprocess(d, spec)):
                fn(data)
                t = time.perf_counter()
                for _ in range(3):
                    fn(data)
                timings.append((time.perf_counter() - t) / 3 * 1000)
            out.append((f"{p.name} ({size[0]} x {size[1]}, {kind})", *timings))
    return out


def share(values: np.ndarray, thr: float) -> str:
    return f"{(values >= thr).mean():.1%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", nargs="*", default=list(DEFAULT_FOLDERS))
    ap.add_argument("--max-side", type=int, default=768)
    ap.add_argument("--tiles", type=int, default=3)
    ap.add_argument("--digits", type=int, default=1797, help="demo digits (the first 300 are "
                    "the eval set, the rest stand for training images)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="judge at this similarity (default: what `null` picks per data set)")
    ap.add_argument("--emoji", action=argparse.BooleanOptionalAction, default=True,
                    help="the colour demo's emoji too, when its package is installed (~1 min)")
    ap.add_argument("--alternatives", action="store_true",
                    help="also the whole picture only, and the former 16 px gray fingerprint")
    args = ap.parse_args(argv)
    from tests import factories
    paths = find_photos(args.photos)
    originals = load_originals(paths, args.max_side)
    if len(originals) < 2:
        print("fewer than two colour photos found; pass --photos DIR", file=sys.stderr)
        return 1
    tile_set = tiles(originals, args.tiles)
    n_digits = max(DIGITS_EVAL + 1, min(args.digits, factories.digit_count()))
    digits = [factories.digit_png(i) for i in range(n_digits)]
    print(f"{len(originals)} colour photos (long side <= {args.max_side} px), "
          f"{len(tile_set)} tiles of them, {len(digits)} demo digits "
          f"({DIGITS_EVAL} as the eval set)")
    methods = {"shipped: colour, 19 crops, mirrored": {}}
    if args.alternatives:
        methods["whole picture only, mirrored"] = {"crops": neardup.CROPS[:1]}
        methods["former: 16 px gray, whole picture, not mirrored"] = {
            "crops": neardup.CROPS[:1], "chroma": 0.0, "mirrored": False}
    for name, method in methods.items():
        r = measure(method, originals, tile_set, digits, args.threshold)
        thr = r["thr"]
        print(f"\n## {name}: {r['ms']:.1f} ms per fingerprint; photos judged at {thr:.4f}"
              + (f" (auto: {r['auto_photos']:.4f})" if r["auto_photos"] else ""))
        print("| copy of a photo | lowest similarity | photos whose copy is caught |\n|---|---|---|")
        for kind, v in r["copies"].items():
            note = " (informative)" if kind in INFORMATIVE else ""
            print(f"| {kind}{note} | {v.min():.4f} | {share(v, thr)} |")
        main_kinds = [v for k, v in r["copies"].items() if k not in INFORMATIVE]
        print(f"every kind: lowest {min(v.min() for v in main_kinds):.4f}, "
              f"caught {np.mean([(v >= thr).mean() for v in main_kinds]):.1%} on average, "
              f"worst kind {min((v >= thr).mean() for v in main_kinds):.1%}")
        print(f"distinct photos: highest {r['photos'].max():.4f}, "
              f"with a neighbour >= threshold {share(r['photos'], thr)}")
        print(f"distinct tiles of one photo: highest {r['tiles'].max():.4f}, "
              f"with a neighbour >= threshold {share(r['tiles'], thr)}")
        if r["real"]:
            print("a real copy, Elephants.jpg (mate-backgrounds) vs "
                  + ", ".join(f"{n}: {v:.4f}" for n, v in r["real"].items()))
        dt = r["digit_thr"]
        print(f"digits: threshold {dt:.4f} ({'auto, ' if args.threshold is None else ''}from "
              f"{DIGITS_EVAL} eval digits); {len(r['digit_near'])} other digits: highest "
              f"{r['digit_near'].max():.4f}, excluded at the threshold "
              f"{share(r['digit_near'], dt)}")
        print("digit copies, lowest: " + ", ".join(
            f"{k} {v:.4f}{'' if v >= dt else ' (missed)'}" for k, v in r["digit_copies"].items()))
    for line in (emoji_section(args.threshold) if args.emoji else []):
        print(line)
    timings = decode_times(paths)
    if timings:
        print("\n| JPEG to 224 x 224 | full decode, ms | inputspec.preprocess, ms |\n|---|---|---|")
        for what, full_ms, reduced_ms in timings:
            print(f"| {what} | {full_ms:.0f} | {reduced_ms:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
