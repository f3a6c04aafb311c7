"""params.yaml -> typed, frozen settings. The one loader; every stage reads its section from here.

An invalid file is a `ParamsError` naming the key (``train.epochs``) and what was expected, so a
typo never reaches a stage as a silent default.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or a key has the wrong type/value."""


@dataclass(frozen=True)
class Base:
    seed: int
    classes: tuple[str, ...]
    image_size: int  # pixels per side after preprocessing


@dataclass(frozen=True)
class Studio:
    project_title: str
    image_key: str
    port: int


@dataclass(frozen=True)
class Pull:
    connect_timeout_s: float
    read_timeout_s: float
    max_image_bytes: int
    image_hosts: tuple[str, ...]  # extra origins images may come from (never sent the API key)


@dataclass(frozen=True)
class Validate:
    allowed_modes: tuple[str, ...]
    min_side: int
    max_side: int
    min_per_class: int


@dataclass(frozen=True)
class Prepare:
    val_fraction: float
    min_annotations: int      # fewer non-skipped votes -> disputed
    min_agreement: float      # share of votes the winning label needs
    ground_truth_wins: bool
    near_duplicate_similarity: float  # fingerprint cosine at which an image counts as an eval copy


@dataclass(frozen=True)
class Train:
    epochs: int
    batch_size: int        # per optimizer step on CPU
    batch_size_cuda: int   # per optimizer step on CUDA
    lr: float              # Adam at batch 128, scaled by sqrt(batch / 128)
    shift_px: int          # random-translation augmentation, pixels (0 = off)
    device: str
    compile: bool          # torch.compile on CUDA
    deterministic: bool


@dataclass(frozen=True)
class Review:
    folds: int            # out-of-fold models for the label-error search
    epochs: int           # per fold model
    max_suspects: int     # flagged per run, most suspicious first


@dataclass(frozen=True)
class Preannotate:
    uncertainty: str      # margin | entropy: how a prediction's score (certainty) is computed


@dataclass(frozen=True)
class Evaluate:
    batch_size: int


@dataclass(frozen=True)
class Gate:
    min_accuracy: float
    max_accuracy_drop: float
    max_class_recall_drop: float
    max_class_precision_drop: float
    min_class_support: int
    alpha: float
    max_ece_increase: float
    max_latency_ms_p95: float
    max_model_mb: float
    critical_task_ids: tuple[int, ...]
    on_inconclusive: str


@dataclass(frozen=True)
class Schedule:
    cron: str
    min_new_labels: int     # `labelgate serve` also runs when this many new resolved labels exist
    check_every_s: float    # how often it looks (the debounce: a burst causes one run)


@dataclass(frozen=True)
class Params:
    base: Base
    studio: Studio
    pull: Pull
    validate: Validate
    prepare: Prepare
    train: Train
    evaluate: Evaluate
    gate: Gate
    review: Review
    preannotate: Preannotate
    schedule: Schedule


def _is_origin(value: str) -> bool:
    parts = urlsplit(value)
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and parts.path in ("", "/") and not parts.query and not parts.fragment)


# Checks beyond the type, keyed by dotted name: (predicate, what it must be).
_RULES: dict[str, tuple[typing.Callable[[object], bool], str]] = {
    "base.image_size": (lambda v: 8 <= v <= 512, "between 8 and 512"),
    "base.classes": (lambda v: len(v) >= 2 and len(set(v)) == len(v) and all(v),
                     "at least two distinct, non-empty class names"),
    "studio.port": (lambda v: 1 <= v <= 65535, "a TCP port (1-65535)"),
    "pull.connect_timeout_s": (lambda v: v > 0, "> 0"),
    "pull.read_timeout_s": (lambda v: v > 0, "> 0"),
    "pull.max_image_bytes": (lambda v: v > 0, "> 0"),
    "pull.image_hosts": (lambda v: all(_is_origin(o) for o in v),
                         "a list of origins like https://bucket.example.com (scheme and host, "
                         "optional port; no path, query or user)"),
    "validate.min_side": (lambda v: v >= 1, ">= 1"),
    "validate.max_side": (lambda v: v >= 1, ">= 1"),
    "validate.min_per_class": (lambda v: v >= 0, ">= 0"),
    "prepare.val_fraction": (lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)"),
    "prepare.min_annotations": (lambda v: v >= 1, ">= 1"),
    "prepare.min_agreement": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "prepare.near_duplicate_similarity": (lambda v: 0.0 < v <= 1.0, "between 0 (exclusive) and 1"),
    "train.epochs": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.batch_size_cuda": (lambda v: v >= 1, ">= 1"),
    "train.shift_px": (lambda v: 0 <= v <= 8, "between 0 and 8"),
    "train.lr": (lambda v: v > 0, "> 0"),
    "train.device": (lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    "evaluate.batch_size": (lambda v: v >= 1, ">= 1"),
    "gate.min_accuracy": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gate.max_accuracy_drop": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gate.max_class_recall_drop": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gate.max_class_precision_drop": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gate.min_class_support": (lambda v: v >= 1, ">= 1"),
    "gate.alpha": (lambda v: 0.0 < v < 1.0, "between 0 and 1 (exclusive)"),
    "gate.max_ece_increase": (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"),
    "gate.max_latency_ms_p95": (lambda v: v > 0, "> 0"),
    "gate.max_model_mb": (lambda v: v > 0, "> 0"),
    "gate.on_inconclusive": (lambda v: v in ("keep_production", "ask_reviewer"),
                             "keep_production or ask_reviewer"),
    "review.folds": (lambda v: 2 <= v <= 20, "between 2 and 20"),
    "review.epochs": (lambda v: v >= 1, ">= 1"),
    "review.max_suspects": (lambda v: v >= 0, ">= 0"),
    "preannotate.uncertainty": (lambda v: v in ("margin", "entropy"), "margin or entropy"),
    "schedule.min_new_labels": (lambda v: v >= 1, ">= 1"),
    "schedule.check_every_s": (lambda v: v >= 1, ">= 1"),
    "schedule.cron": (lambda v: len(v.split()) == 5, "a 5-field cron expression"),
}


def _coerce(key: str, tp: object, value: object) -> object:
    def bad(what: str) -> ParamsError:
        return ParamsError(f"params.yaml: {key} must be {what}, got {value!r}")

    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string; accept it as the number it spells.
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if typing.get_origin(tp) is tuple:  # tuple[str, ...] or tuple[int, ...]
        item = typing.get_args(tp)[0]
        ok = (lambda v: isinstance(v, str)) if item is str else \
            (lambda v: isinstance(v, int) and not isinstance(v, bool))
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise bad("a list of strings" if item is str else "a list of integers")
        return tuple(value)
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # a bug here, not in the file


def _section(name: str, cls: type, raw: object) -> object:
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: section '{name}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key {name}.{unknown[0]} (known: {', '.join(names)})")
    values = {}
    for field in names:
        key = f"{name}.{field}"
        if field not in raw:
            raise ParamsError(f"params.yaml: missing key {key}")
        value = _coerce(key, hints[field], raw[field])
        rule = _RULES.get(key)
        if rule and not rule[0](value):
            raise ParamsError(f"params.yaml: {key} must be {rule[1]}, got {raw[field]!r}")
        values[field] = value
    return cls(**values)


def parse(raw: object) -> Params:
    """Typed settings from an already-parsed YAML document."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Params)
    sections = {}
    for name, cls in hints.items():
        if name not in raw:
            raise ParamsError(f"params.yaml: missing section '{name}'")
        sections[name] = _section(name, cls, raw[name])
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ParamsError(f"params.yaml: unknown section '{unknown[0]}'")
    params = Params(**sections)
    if params.validate.min_side > params.validate.max_side:
        raise ParamsError("params.yaml: validate.min_side must not exceed validate.max_side")
    return params


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path} (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw)
