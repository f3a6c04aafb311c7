"""Label Studio labeling configs: the one labelgate writes, and reading a project's own.

labelgate trains single-label image classifiers, so a project it can use has exactly one
`<Image>` and one single-choice `<Choices>` pointing at it. The names of those two controls and
the task data key of the image are the project's (`<Image name="photo" value="$img"/>`), read
from its config -- never assumed -- and recorded with every pull snapshot, so every later
reader (validate, the audit, pre-annotations) uses the names the annotations were made with.
"""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

FROM_NAME = "label"  # <Choices name=...> in the config labelgate generates
TO_NAME = "image"    # <Image name=...>
IMAGE_KEY = "image"  # <Image value="$image">


class UnsupportedConfig(ValueError):
    """The project's labeling config is not one labelgate can train on; says what is."""


SUPPORTED = ("labelgate supports image classification: one <Image name=... value=\"$key\"/> "
             "and one <Choices name=... toName=... choice=\"single\"> (or single-radio) with "
             "<Choice value=.../> children pointing at it")


@dataclass(frozen=True)
class LabelingConfig:
    choices_name: str
    image_name: str
    image_key: str               # task.data key holding the image URL
    classes: tuple[str, ...]
    sha256: str                  # of the whole config text: any change is visible

    def as_meta(self) -> dict:
        return {"choices_name": self.choices_name, "image_name": self.image_name,
                "image_key": self.image_key}


DEFAULT = LabelingConfig(FROM_NAME, TO_NAME, IMAGE_KEY, (), "")


def label_config(classes: tuple[str, ...] | list[str]) -> str:
    """Image-classification labeling config; class names are XML-escaped (they are untrusted)."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (f'<View><Image name="{TO_NAME}" value="${IMAGE_KEY}"/>'
            f'<Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInLine="true">'
            f"{choices}</Choices></View>")


def parse(text: str) -> LabelingConfig:
    """The controls labelgate needs from a project's labeling config, or UnsupportedConfig
    naming what is there and what is supported."""
    try:
        root = ET.fromstring(text)  # expat >= 2.4 refuses entity-expansion bombs
    except ET.ParseError as exc:
        raise UnsupportedConfig(f"the labeling config is not valid XML ({exc})") from None
    images = [e for e in root.iter() if e.tag == "Image"]
    choices = [e for e in root.iter() if e.tag == "Choices"]
    if len(images) != 1:
        raise UnsupportedConfig(f"the labeling config has {len(images)} <Image> controls"
                                f"{_others(root)}; {SUPPORTED}")
    image = images[0]
    name, value = image.get("name") or "", image.get("value") or ""
    if not name or not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig(f"the <Image> control needs a name and value=\"$key\" "
                                f"(has name={name!r}, value={value!r}); {SUPPORTED}")
    mine = [c for c in choices if name in (c.get("toName") or "").split(",")]
    if len(mine) != 1:
        raise UnsupportedConfig(f"the labeling config has {len(mine)} <Choices> for the image "
                                f"{name!r}{_others(root)}; {SUPPORTED}")
    control = mine[0]
    if (control.get("choice") or "single") not in ("single", "single-radio"):
        raise UnsupportedConfig(f"<Choices name={control.get('name')!r}> has "
                                f"choice={control.get('choice')!r} (multi-label); {SUPPORTED}")
    classes = tuple(c.get("value") or c.get("alias") or "" for c in control.iter("Choice"))
    if not classes:
        raise UnsupportedConfig(f"<Choices name={control.get('name')!r}> has no <Choice "
                                f"value=.../> children (no classes to learn); {SUPPORTED}")
    if "" in classes or len(set(classes)) != len(classes):
        raise UnsupportedConfig(f"<Choices name={control.get('name')!r}> needs distinct, "
                                "non-empty <Choice value=.../> children")
    return LabelingConfig(choices_name=control.get("name") or "", image_name=name,
                          image_key=value[1:], classes=classes,
                          sha256=hashlib.sha256(text.encode()).hexdigest())


# Control tags of the tasks labelgate does not do, named in the refusal so the user sees why.
_OTHER_TASKS = {"RectangleLabels": "object detection", "PolygonLabels": "segmentation",
                "BrushLabels": "segmentation", "KeyPointLabels": "keypoints",
                "EllipseLabels": "object detection", "Labels": "span labeling",
                "TextArea": "free text", "Rating": "rating", "Number": "a number",
                "Taxonomy": "hierarchical labels", "Ranker": "ranking", "Pairwise": "comparison",
                "Video": "video", "Audio": "audio", "Text": "text", "HyperText": "HTML",
                "TimeSeries": "time series"}


def _others(root: ET.Element) -> str:
    """`` (it has RectangleLabels: object detection)`` for the controls of other tasks."""
    found = sorted({e.tag for e in root.iter() if e.tag in _OTHER_TASKS})
    if not found:
        return ""
    return " (it has " + ", ".join(f"<{t}>: {_OTHER_TASKS[t]}" for t in found) + ")"


@dataclass(frozen=True)
class ClassChange:
    """How a class list changed, in words a user can check against Label Studio."""
    old: tuple[str, ...]
    new: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    renamed: tuple[tuple[str, str], ...]   # (old name, new name) at the same position
    reordered: bool                         # the same names in another order

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def describe(self) -> str:
        from pipelines.settings import brief  # one way to show a long list
        parts = []
        if self.renamed:
            parts.append("renamed " + ", ".join(f"{a!r} -> {b!r}" for a, b in self.renamed[:5])
                         + (f", … ({len(self.renamed)} in all)" if len(self.renamed) > 5 else ""))
        if self.added:
            parts.append(f"added {brief(self.added)}")
        if self.removed:
            parts.append(f"removed {brief(self.removed)}")
        if self.reordered:
            parts.append("the same names in another order (class indices change)")
        return "; ".join(parts) or "no change"


def class_change(old: tuple[str, ...] | list[str], new: tuple[str, ...] | list[str]) -> ClassChange:
    """old -> new. A name gone and another new at the same position counts as a rename (what
    editing a <Choice value> in Label Studio does); other differences are additions/removals."""
    old, new = tuple(old), tuple(new)
    gone = [c for c in old if c not in set(new)]
    came = [c for c in new if c not in set(old)]
    renamed = []
    for i, name in enumerate(old):
        if name in gone and i < len(new) and new[i] in came:
            renamed.append((name, new[i]))
    added = tuple(c for c in came if c not in {b for _, b in renamed})
    removed = tuple(c for c in gone if c not in {a for a, _ in renamed})
    kept_old = [c for c in old if c in set(new)]
    kept_new = [c for c in new if c in set(old)]
    return ClassChange(old=old, new=new, added=added, removed=removed, renamed=tuple(renamed),
                       reordered=kept_old != kept_new)


def choice_result(label: str, config: LabelingConfig = DEFAULT) -> list[dict]:
    """The `result` of an annotation or prediction choosing `label`."""
    return [{"from_name": config.choices_name, "to_name": config.image_name, "type": "choices",
             "value": {"choices": [label]}}]


def chosen(result: object, choices_name: str = FROM_NAME) -> str | None:
    """The single class a `result` (of an annotation or a prediction) chose in the Choices
    control `choices_name`, or None (no choice, several, or not a result at all). The one
    answer to "which label is this": validate, consensus, the audit and triggers all use it."""
    if not isinstance(result, list):
        return None
    picked = [label for r in result if isinstance(r, dict)
              and r.get("from_name") == choices_name and r.get("type") == "choices"
              for label in ((r.get("value") or {}).get("choices") or [])]
    return picked[0] if len(picked) == 1 and isinstance(picked[0], str) else None
