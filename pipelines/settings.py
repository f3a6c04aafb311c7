"""params.yaml -> typed, frozen settings. The one loader; every stage reads its section from here.

An invalid file is a `ParamsError` naming the key (``train.epochs``) and what was expected, so a
typo never reaches a stage as a silent default.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import stat
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import yaml


class ParamsError(ValueError):
    """params.yaml is missing, unreadable, or a key has the wrong type/value."""


@dataclass(frozen=True)
class Base:
    seed: int
    classes: tuple[str, ...]


@dataclass(frozen=True)
class Input:
    """The input spec: what every image becomes before a model sees it (pipelines/inputspec.py),
    stored in every model file."""
    channels: int                   # 1 (grayscale) | 3 (RGB)
    height: int                     # pixels
    width: int                      # pixels
    resize: str                     # stretch | crop | pad
    background: tuple[int, ...]     # RGB 0..255: transparency is composited onto it, pad fills with it
    mean: tuple[float, ...]         # per channel, 0..255 scale; () = measured on the training split
    std: tuple[float, ...]


@dataclass(frozen=True)
class Studio:
    project_title: str
    port: int


# Keys earlier versions read, and where that fact lives now: a params.yaml that still has one
# gets this message instead of "unknown key".
MOVED = {"studio.image_key": "the image's task data key is read from the project's labeling "
                             "config (<Image value=\"$key\">) now; remove studio.image_key",
         "base.image_size": "the input size is the `input` section now (input.height and "
                            "input.width, with input.channels and input.resize); replace "
                            "base.image_size: N by input.height: N and input.width: N",
         "review.max_suspects": "the number of new review flags per run scales with the "
                                "project now: replace review.max_suspects by "
                                "review.max_new_fraction (e.g. 0.02) and review.min_new "
                                "(e.g. 50)"}


@dataclass(frozen=True)
class Pull:
    connect_timeout_s: float
    read_timeout_s: float
    max_image_bytes: int
    image_hosts: tuple[str, ...]  # extra origins images may come from (never sent the API key)


@dataclass(frozen=True)
class Storage:
    """Object storage labelgate reads and writes itself, with the user's own credentials
    (the standard AWS chain: AWS_* variables, ~/.aws files, `profile`), never Label Studio's key."""
    buckets: tuple[str, ...]  # the only buckets read or written; () = none (images via Label Studio)
    endpoint_url: str         # "" = AWS S3; an S3-compatible server's URL otherwise
    region: str               # "" = from the environment / profile
    profile: str              # "" = the default credential chain
    workers: int              # concurrent object reads


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
    near_duplicate_similarity: float | None  # an eval copy from here on; None = from the eval set


@dataclass(frozen=True)
class Train:
    arch: str              # auto | a name in TRAIN_ARCHS (pipelines/archs.py's registry)
    init: str              # scratch | weights (init_weights) | production (warm start)
    init_weights: str      # local safetensors file with backbone weights; "" = none
    init_sha256: str       # its sha256 (64 hex digits), checked before loading
    freeze_backbone: bool  # only the head trains (the backbone's BatchNorm stays in eval mode)
    backbone_lr_scale: float  # backbone lr / head lr when initialised from weights or production
    epochs: int
    batch_size: int        # per optimizer step on CPU
    batch_size_cuda: int   # per optimizer step on CUDA
    optimizer: str         # adamw | sgd (nesterov, momentum 0.9)
    lr: float              # peak lr at batch 128 (AdamW: x sqrt(batch/128), SGD: x batch/128)
    weight_decay: float    # AdamW: decoupled; SGD: L2. Never on norms and biases
    label_smoothing: float  # cross-entropy target smoothing (0 = off)
    schedule: str          # onecycle (linear up, linear down to 0) | cosine (linear warm-up, cosine to 0)
    warmup: float          # share of all steps spent warming up to the peak lr
    shift_px: int          # random crop after reflect padding = shifts of up to this many pixels
    hflip: bool            # random horizontal flips (never for digits; photos want true)
    color_jitter: float    # brightness/contrast (and saturation for RGB) factors in 1 +- this
    resident_max_mb: float  # splits up to this size (MB, uint8) live on the device; bigger stream
    device: str
    compile: bool          # torch.compile on CUDA
    deterministic: bool
    pool: str              # Prefect work pool whose `labelgate-train` deployment trains; "" = here
    exchange: str          # s3://bucket/prefix where a pool's training job and model travel
    pool_timeout_s: float  # how long a run waits for the training pool (queue + training)
    pool_heartbeat_s: float  # seconds between a pool job's heartbeats; 4 missed = worker gone


@dataclass(frozen=True)
class Review:
    folds: int            # out-of-fold models for the label-error search
    epochs: int           # per fold model (method cnn_folds)
    method: str           # auto | cnn_folds | frozen_features: how out-of-fold predictions are made
    max_new_fraction: float  # new flags per run: at most this share of the labeled images ...
    min_new: int          # ... but never fewer than this many (small projects)


@dataclass(frozen=True)
class Preannotate:
    uncertainty: str      # margin | entropy: how a prediction's score (certainty) is computed


@dataclass(frozen=True)
class Evaluate:
    batch_size: int


@dataclass(frozen=True)
class Gate:
    min_accuracy: float | None       # absolute floor; None: none (the baseline test judges)
    min_class_recall: float | None   # per class; None: significantly above chance (1/K)
    max_accuracy_drop: float         # margins vs production; the gate widens each to
    max_class_recall_drop: float     # noise_z x the measured seed-to-seed spread
    max_class_precision_drop: float
    min_class_support: int
    alpha: float
    max_ece_increase: float
    noise_z: float                   # margin = max(configured, noise_z x seed spread)
    calibration_seeds: int           # trainings `labelgate calibrate` measures the spread with
    max_latency_ms_p95: float | None   # shown against the measured latency in the report
    max_mmacs_per_image: float | None  # judged: compute per image (None: no absolute budget)
    max_model_mb: float | None         # judged (None: no absolute budget)
    max_compute_ratio: float | None    # judged: at most this x production's compute per image
    max_size_ratio: float | None       # judged: at most this x production's file size
    critical_task_ids: tuple[int, ...]
    on_inconclusive: str
    reviewer_wait_s: float           # ask_reviewer: how long the paused run waits for an answer


@dataclass(frozen=True)
class Schedule:
    cron: str
    min_new_labels: int     # `labelgate serve` also runs when this many new resolved labels exist
    check_every_s: float    # how often it looks (the debounce: a burst causes one run)
    pool: str               # Prefect work pool the retraining deployment runs on; "" = in `serve`


@dataclass(frozen=True)
class Lineage:
    commit: bool          # commit the DVC metadata each run changed (dvc.lock, data/*.dvc)
    push: str             # auto | always | never: `dvc push` data and model to the DVC remote


@dataclass(frozen=True)
class Params:
    base: Base
    input: Input
    studio: Studio
    pull: Pull
    storage: Storage
    validate: Validate
    prepare: Prepare
    train: Train
    evaluate: Evaluate
    gate: Gate
    review: Review
    preannotate: Preannotate
    schedule: Schedule
    lineage: Lineage


# -- limits of the file itself --------------------------------------------------------------------
MAX_FILE_BYTES = 128 * 1024  # the real file is ~5 KB; pure-Python PyYAML: ~2 s of CPU per 128 KB
MAX_VALUES = 20_000          # YAML nodes once aliases are expanded (a billion-laughs bomb stops here)
MAX_DEPTH = 16               # section -> key -> list -> item is depth 3
MAX_CLASSES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"

# Pillow's image modes (PIL.Image.MODES and the raw 16-bit ones): what validate.allowed_modes may name.
PIL_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
             "LAB", "HSV", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 6, 6, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def show(value: object) -> str:
    """A bounded repr for messages: never more than a few hundred characters, whatever the value
    (a 10,000-item list, a 1 MB string, an alias bomb), with the item count of long lists."""
    text = _REPR.repr(value)
    if isinstance(value, (list, tuple, dict, set)) and len(value) > _REPR.maxlist:
        text += f" ({len(value)} items)"
    return text


def brief(items: typing.Iterable[object], *, first: int = 5) -> str:
    """A list for an error message: the first few, then a count. `['0', '1', '2', '3', '4', …
    (1000 in all)]` rather than 13,671 characters of class names."""
    items = list(items)
    shown = ", ".join(_REPR.repr(x) for x in items[:first])
    more = f", … ({len(items)} in all)" if len(items) > first else ""
    return f"[{shown}{more}]"


# -- rules beyond the type ------------------------------------------------------------------------
Rule = tuple[typing.Callable[[typing.Any], bool], str]


def _num(n: float) -> str:
    return f"{n:g}" if isinstance(n, float) else str(n)


def _between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False,
             what: str = "") -> Rule:
    """lo <= v <= hi (or < with the open flags). NaN never passes (every comparison is False)."""
    def ok(v):
        return (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if lo_open and hi_open:
        text = f"between {_num(lo)} and {_num(hi)}, exclusive"
    elif lo_open:
        text = f"above {_num(lo)} and at most {_num(hi)}"
    elif hi_open:
        text = f"at least {_num(lo)} and below {_num(hi)}"
    else:
        text = f"between {_num(lo)} and {_num(hi)}"
    return ok, f"{what} {text}" if what else text


def _one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _text(lo: int, hi: int, what: str = "characters") -> Rule:
    return ((lambda v: lo <= len(v) <= hi and v.isprintable() and v == v.strip()),
            f"{lo} to {hi} printable {what}, no leading or trailing spaces")


def _is_origin(value: str) -> bool:
    if len(value) > 2048:
        return False
    try:  # urlsplit and .port raise ValueError on e.g. `http://[::1` or `:99999`
        parts = urlsplit(value)
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
            and parts.path in ("", "/") and not parts.query and not parts.fragment
            and value.isprintable() and " " not in value)


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _is_bucket(value: str) -> bool:
    return _BUCKET.fullmatch(value) is not None and ".." not in value


def _is_pool(value: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}", value) is not None


def _is_s3_prefix(value: str) -> bool:
    """s3://bucket/prefix with a valid bucket and a plain relative prefix (no dot segments)."""
    if not value.startswith("s3://") or len(value) > 1024 or not value.isprintable():
        return False
    bucket, _, prefix = value[5:].partition("/")
    segments = [p for p in prefix.split("/") if p]
    return (_is_bucket(bucket) and " " not in prefix and "\\" not in prefix
            and all(p not in (".", "..") for p in segments))


_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?#-]{1,60}")

# train.arch's choices besides `auto`: pipelines/archs.py's trainable architectures (tests hold
# the two lists equal; settings must not import torch, so the names are written out here).
TRAIN_ARCHS = ("smallcnn", "resnet-fast", "resnet-fast-narrow", "resnet18", "mobilenet_v3_large",
               "efficientnet_b0")

# Checks beyond the type, keyed by dotted name: (predicate, what it must be). Every int and float
# setting has one (tests/test_settings.py checks that), so nothing absurd reaches a stage:
# `base.seed: -1` crashed NumPy, `read_timeout_s: 1e308` crashed the socket layer, and
# `train.batch_size: 1000000000` trained a garbage model at lr 5.6.
_RULES: dict[str, Rule] = {
    # NumPy seeds must fit 32 bits; stages add small offsets (rank, fold) to the seed.
    "base.seed": _between(0, 2**31 - 1),
    "input.channels": ((lambda v: v in (1, 3)), "1 (grayscale) or 3 (RGB)"),
    "input.height": _between(8, 1024),   # pixels; 1024 x 1024 x 3 B = 3 MB per packed image
    "input.width": _between(8, 1024),
    "input.resize": _one_of("stretch", "crop", "pad"),
    "input.background": ((lambda v: len(v) == 3 and all(0 <= c <= 255 for c in v)),
                         "three integers 0..255 (an RGB colour), e.g. [0, 0, 0]"),
    "input.mean": ((lambda v: len(v) in (0, 1, 3) and all(0.0 <= c <= 255.0 for c in v)),
                   "[] (measured on the training split) or one value per channel, 0..255"),
    "input.std": ((lambda v: len(v) in (0, 1, 3) and all(0.0 < c <= 255.0 for c in v)),
                  "[] (measured on the training split) or one value per channel, above 0 and "
                  "at most 255"),
    "base.classes": ((lambda v: 2 <= len(v) <= MAX_CLASSES and len(set(v)) == len(v)
                      and all(0 < len(c) <= 200 and c.isprintable() and c == c.strip()
                              for c in v)),
                     f"at least two and at most {MAX_CLASSES} distinct, non-empty class names "
                     "(printable, at most 200 characters, no leading or trailing spaces)"),
    "studio.project_title": _text(3, 50),  # Label Studio's own limits on a project title
    "studio.port": _between(1, 65535, what="a TCP port"),
    "pull.connect_timeout_s": _between(0, 600, lo_open=True),      # seconds
    "pull.read_timeout_s": _between(0, 3600, lo_open=True),        # seconds
    "pull.max_image_bytes": _between(1, 64 * 2**20),  # 64 MiB: parsing a bigger file costs minutes
    "pull.image_hosts": ((lambda v: len(v) <= 100 and all(_is_origin(o) for o in v)),
                         "a list of origins like https://bucket.example.com (scheme and host, "
                         "optional port; no path, query or user; at most 100)"),
    "storage.buckets": ((lambda v: len(v) <= 100 and all(_is_bucket(b) for b in v)),
                        "a list of S3 bucket names (3-63 lower-case letters, digits, dots and "
                        "hyphens; at most 100)"),
    "storage.endpoint_url": ((lambda v: v == "" or _is_origin(v)),
                             "\"\" (AWS) or an origin like http://127.0.0.1:9000 (scheme, host, "
                             "optional port; no path, query or user)"),
    "storage.region": ((lambda v: v == "" or re.fullmatch(r"[a-z0-9-]{2,40}", v) is not None),
                       "\"\" or a region name such as eu-west-1"),
    "storage.profile": ((lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", v) is not None),
                        "\"\" or an AWS profile name (letters, digits, _.+-)"),
    "storage.workers": _between(1, 256),
    "validate.allowed_modes": ((lambda v: 1 <= len(v) <= len(PIL_MODES) and len(set(v)) == len(v)
                                and set(v) <= set(PIL_MODES)),
                               "a non-empty list of distinct Pillow modes from " + ", ".join(PIL_MODES)),
    "validate.min_side": _between(1, 65535),   # pixels
    "validate.max_side": _between(1, 65535),   # pixels (PNG/JPEG decoders' own ceilings)
    "validate.min_per_class": _between(0, 10_000_000),
    "prepare.val_fraction": _between(0.0, 1.0, lo_open=True, hi_open=True),
    "prepare.min_annotations": _between(1, 1000),
    "prepare.min_agreement": _between(0.0, 1.0),
    "prepare.near_duplicate_similarity": ((lambda v: v is None or 0.0 < v <= 1.0),
                                          "null (set from the eval set) or above 0 and at most 1"),
    "train.arch": _one_of("auto", *TRAIN_ARCHS),
    "train.init": _one_of("scratch", "weights", "production"),
    "train.init_weights": ((lambda v: len(v) <= 4096 and v.isprintable() and v == v.strip()),
                           "\"\" or a path to a local .safetensors file"),
    "train.init_sha256": ((lambda v: v == "" or re.fullmatch(r"[0-9a-f]{64}", v) is not None),
                          "\"\" or 64 lowercase hex digits (sha256sum of init_weights)"),
    "train.backbone_lr_scale": _between(0.0, 1.0),   # 0 = backbone fixed but BN stats adapt
    "train.epochs": _between(1, 10_000),
    "train.batch_size": _between(1, 65_536),
    "train.batch_size_cuda": _between(1, 65_536),
    "train.optimizer": _one_of("adamw", "sgd"),
    "train.lr": _between(0.0, 1.0, lo_open=True),   # AdamW: 1e-3 typical; SGD: 0.1; 1 already absurd
    "train.weight_decay": _between(0.0, 1.0),       # AdamW: 0.01-0.1 typical; SGD: 5e-4
    "train.label_smoothing": _between(0.0, 0.5),   # 0.5: half the target mass spread evenly
    "train.schedule": _one_of("onecycle", "cosine"),
    "train.warmup": _between(0.0, 0.5),            # share of all steps
    "train.shift_px": _between(0, 64),             # pixels
    "train.color_jitter": _between(0.0, 0.9),      # 0.9: factors 0.1..1.9, already extreme
    "train.resident_max_mb": _between(0.0, 16_777_216.0),  # MB; 0 = always stream; 16 TB
    "train.device": _one_of("auto", "cpu", "cuda"),
    "evaluate.batch_size": _between(1, 65_536),
    "gate.min_accuracy": ((lambda v: v is None or 0.0 <= v <= 1.0),
                          "null (no absolute floor) or between 0 and 1"),
    "gate.min_class_recall": ((lambda v: v is None or 0.0 <= v <= 1.0),
                              "null (above chance, 1/number of classes) or between 0 and 1"),
    "gate.noise_z": _between(0.0, 10.0),   # standard deviations of a seed-to-seed difference
    "gate.calibration_seeds": ((lambda v: v == 0 or 2 <= v <= 20),
                               "0 (never calibrate: the configured margins alone) or 2 to 20"),
    "gate.max_compute_ratio": ((lambda v: v is None or 0.0 < v <= 1000.0),
                               "null (no budget relative to production) or above 0, e.g. 1.25"),
    "gate.max_size_ratio": ((lambda v: v is None or 0.0 < v <= 1000.0),
                            "null (no budget relative to production) or above 0, e.g. 1.25"),
    "gate.max_accuracy_drop": _between(0.0, 1.0),
    "gate.max_class_recall_drop": _between(0.0, 1.0),
    "gate.max_class_precision_drop": _between(0.0, 1.0),
    "gate.min_class_support": _between(1, 10_000_000),
    "gate.alpha": _between(0.0, 1.0, lo_open=True, hi_open=True),
    "gate.max_ece_increase": _between(0.0, 1.0),
    "gate.max_latency_ms_p95": ((lambda v: v is None or 0.0 < v <= 600_000.0),  # ms per image
                                "null (no budget) or above 0 and at most 600000 (ms)"),
    "gate.max_mmacs_per_image": ((lambda v: v is None or 0.0 < v <= 1e9),  # million MACs
                                 "null (no absolute budget) or above 0 and at most 1e9"),
    "gate.max_model_mb": ((lambda v: v is None or 0.0 < v <= 100_000.0),  # MB
                          "null (no absolute budget) or above 0 and at most 100000 (MB)"),
    "gate.critical_task_ids": ((lambda v: len(v) <= 100_000 and all(1 <= i < 2**63 for i in v)),
                               "a list of at most 100000 Label Studio task ids (positive integers)"),
    "gate.on_inconclusive": _one_of("keep_production", "ask_reviewer"),
    "gate.reviewer_wait_s": _between(1.0, 90 * 86_400.0),  # seconds: up to 90 days
    "review.folds": _between(2, 20),
    "review.epochs": _between(1, 10_000),
    "review.method": _one_of("auto", "cnn_folds", "frozen_features"),
    "review.max_new_fraction": _between(0.0, 1.0),
    "review.min_new": _between(0, 1_000_000),
    "preannotate.uncertainty": _one_of("margin", "entropy"),
    "schedule.min_new_labels": _between(1, 10_000_000),
    "schedule.check_every_s": _between(1.0, 7 * 86_400.0),  # seconds: one second to a week
    "schedule.pool": ((lambda v: v == "" or _is_pool(v)), "\"\" or a work pool name "
                      "(letters, digits, - and _; at most 100)"),
    "train.pool": ((lambda v: v == "" or _is_pool(v)), "\"\" or a work pool name "
                   "(letters, digits, - and _; at most 100)"),
    "train.exchange": ((lambda v: v == "" or _is_s3_prefix(v)),
                       "\"\" or s3://BUCKET/PREFIX (a bucket listed in storage.buckets)"),
    "train.pool_timeout_s": _between(60.0, 30 * 86_400.0),  # seconds: a minute to 30 days
    "train.pool_heartbeat_s": _between(1.0, 3600.0),  # seconds: a second to an hour
    "lineage.push": _one_of("auto", "always", "never"),
    "schedule.cron": ((lambda v: len(v) <= 200 and len(v.split()) == 5
                       and all(_CRON_FIELD.fullmatch(f) for f in v.split())),
                      "a 5-field cron expression such as \"0 3 * * *\""),
}


def _coerce(key: str, tp: object, value: object, source: str) -> object:
    def bad(what: str) -> ParamsError:
        return ParamsError(f"{source}: {key} must be {what}, got {show(value)}")

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
        if isinstance(value, int) and abs(value) > 2**53:  # also keeps float() from overflowing
            raise bad("a number of sensible size")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:  # `float | None`: YAML null means "none"
        return None if value is None else _coerce(key, args[0], value, source)
    if typing.get_origin(tp) is tuple:  # tuple[str, ...], tuple[int, ...] or tuple[float, ...]
        item = args[0]
        if item is float:
            if not isinstance(value, list):
                raise bad("a list of numbers")
            return tuple(_coerce(key, float, v, source) for v in value)
        ok = (lambda v: isinstance(v, str)) if item is str else \
            (lambda v: isinstance(v, int) and not isinstance(v, bool))
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise bad("a list of strings" if item is str else "a list of integers")
        return tuple(value)
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # a bug here, not in the file


def _name(key: object) -> str:
    """A key as it may appear in a message (keys are untrusted too: bounded)."""
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 60 else text[:57] + "..."


def _template_span(section: str, key: str | None, lines: list[str],
                   top: dict) -> range | None:
    """Line numbers of `section.key` in the template (with the comment block just above it and
    its continuation lines), or of the whole `section` when `key` is None."""
    if section not in top:
        return None
    knode, vnode = top[section]
    if key is None:
        first = knode.start_mark.line
        last = min((k.start_mark.line for k, _ in top.values() if k.start_mark.line > first),
                   default=len(lines)) - 1
        while last > first and (not lines[last].strip() or lines[last].startswith("#")):
            last -= 1
        return range(first, last + 1)
    pairs = [(k, v) for k, v in getattr(vnode, "value", ()) if getattr(k, "value", None) == key]
    if not isinstance(vnode, yaml.MappingNode) or not pairs:
        return None
    k, v = pairs[0]
    col, first, last = k.start_mark.column, k.start_mark.line, v.end_mark.line

    def comment(i: int, deeper: bool) -> bool:
        indent = len(lines[i]) - len(lines[i].lstrip())
        return lines[i].lstrip().startswith("#") and (indent > col if deeper else indent == col)

    while first > 0 and comment(first - 1, deeper=False):
        first -= 1
    while last + 1 < len(lines) and comment(last + 1, deeper=True):
        last += 1
    return range(first, last + 1)


def template(name: str) -> str:
    """A file of the workspace templates (package data, pipelines/templates/: its params.yaml
    and dvc.yaml are this repo's own, so defaults live in one place)."""
    return resources.files("pipelines").joinpath("templates", name).read_text(encoding="utf-8")


def _missing(source: str, missing: list[tuple[str, str | None]]) -> str:
    """One message for every (section, key) a params file lacks (key None: the whole section),
    quoting labelgate's template params.yaml (package data: pipelines/templates/params.yaml, the
    repo's own; the one place defaults live) so that the lines can be pasted: a params.yaml from
    `labelgate init` of an older release lacks the keys added since."""
    names = [f"key {sec}.{key}" if key else f"section '{sec}'" for sec, key in missing]
    plain = f"{source}: missing {', '.join(names)}"
    try:
        text = template("params.yaml")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return plain
    lines = text.splitlines()
    top = ({k.value: (k, v) for k, v in root.value} if isinstance(root, yaml.MappingNode)
           else {})
    groups: dict[str, set[int]] = {}   # where to paste -> template line numbers
    for sec, key in missing:
        span = _template_span(sec, key, lines, top)
        if span is None:
            return plain
        groups.setdefault(f"under `{sec}:`" if key else "at the end of the file",
                          set()).update(span)
    parts = [f"{where}:\n" + "\n".join(lines[i] for i in sorted(numbers))
             for where, numbers in groups.items()]
    return (f"{plain} (a params.yaml written by an older labelgate lacks what was added since); "
            "paste these lines of labelgate's template params.yaml, comments included:\n"
            + "\n".join(parts))


def _section(name: str, cls: type, raw: object, source: str) -> object:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: section '{name}' must be a mapping, got {show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted((k for k in raw if k not in names), key=repr)  # keys may be any YAML scalar
    moved = [MOVED[f"{name}.{k}"] for k in unknown if f"{name}.{k}" in MOVED]
    if moved:
        raise ParamsError(f"{source}: {moved[0]}")
    if unknown:
        raise ParamsError(f"{source}: unknown key {name}.{_name(unknown[0])} "
                          f"(known: {', '.join(names)})")
    values = {}
    for field in names:
        key = f"{name}.{field}"
        if field not in raw:
            raise ParamsError(f"{source}: missing key {key}")
        value = _coerce(key, hints[field], raw[field], source)
        rule = _RULES.get(key)
        if rule and not rule[0](value):
            raise ParamsError(f"{source}: {key} must be {rule[1]}, got {show(raw[field])}")
        values[field] = value
    return cls(**values)


def parse(raw: object, *, source: str = "params.yaml") -> Params:
    """Typed settings from an already-parsed YAML document; messages start with `source`."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections")
    hints = typing.get_type_hints(Params)
    unknown = sorted((k for k in raw if k not in hints), key=repr)
    if unknown:
        raise ParamsError(f"{source}: unknown section '{_name(unknown[0])}' "
                          f"(known: {', '.join(hints)})")
    sections, missing = {}, []
    for name, cls in hints.items():
        if name not in raw:
            missing.append((name, None))
            continue
        known = [f.name for f in dataclasses.fields(cls)]
        absent = [f for f in known if f not in raw[name]] if isinstance(raw[name], dict) else []
        if absent and all(k in known for k in raw[name]):
            missing += [(name, f) for f in absent]   # all told at once, after other errors
            continue
        sections[name] = _section(name, cls, raw[name], source)
    if missing:
        raise ParamsError(_missing(source, missing))
    params = Params(**sections)
    if len(params.input.mean) != len(params.input.std):
        raise ParamsError(f"{source}: input.mean and input.std must both be [] (measured) or "
                          f"both given, got {len(params.input.mean)} and "
                          f"{len(params.input.std)} values")
    if params.train.pool and not params.train.exchange:
        raise ParamsError(f"{source}: train.pool {params.train.pool!r} needs train.exchange "
                          "(s3://BUCKET/PREFIX): the training job and the model travel there")
    exchange_bucket = params.train.exchange[5:].partition("/")[0]
    if exchange_bucket and exchange_bucket not in params.storage.buckets:
        raise ParamsError(f"{source}: train.exchange's bucket {exchange_bucket!r} is not listed "
                          "in storage.buckets (only listed buckets are read or written)")
    if params.validate.min_side > params.validate.max_side:
        raise ParamsError(f"{source}: validate.min_side must not exceed validate.max_side "
                          f"(got {params.validate.min_side} > {params.validate.max_side})")
    return params


# -- reading the file -----------------------------------------------------------------------------

def _build(loader: yaml.SafeLoader, node: yaml.Node, place: str) -> None:
    """Build one scalar now, so that a failure names its key; cached for construct_document."""
    try:  # e.g. a 5,000-digit integer, `2001-13-45` read as a date, `!!float abc`
        loader.construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise ParamsError(f"{place} (line {node.start_mark.line + 1}) cannot be read: "
                          f"{str(exc)[:200]}") from None


def _check_tree(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Walk the composed YAML graph before building Python objects from it: bounded depth and
    size once aliases are expanded (billion laughs, self-referencing anchors), no key given
    twice (PyYAML would silently keep the last one), and every scalar buildable. Errors name the
    dotted key (`train.epochs`, `base.classes[3]`)."""
    budget = MAX_VALUES
    stack: list[tuple[yaml.Node, str, int]] = [(root, "", 0)]
    while stack:
        node, where, depth = stack.pop()
        place = where or "the top level"
        budget -= 1
        if budget < 0:
            raise ParamsError(f"{place} is too large: over {MAX_VALUES} values once "
                              "YAML aliases are expanded (an alias bomb?); write the values out")
        if depth > MAX_DEPTH:
            raise ParamsError(f"{place} is nested more than {MAX_DEPTH} levels deep "
                              "(or an alias refers to itself)")
        if node.tag not in loader.yaml_constructors:  # `!!python/object:...`, `!custom`
            raise ParamsError(f"{place} (line {node.start_mark.line + 1}) has the YAML tag "
                              f"{_name(node.tag)}, which a params file cannot use")
        children: list[tuple[yaml.Node, str, int]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *anchor`: checked as part of this mapping
                    children.append((value_node, where, depth + 1))
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    raise ParamsError(f"{place} has a key that is a list or mapping "
                                      f"(line {key_node.start_mark.line + 1}); keys are plain names")
                child = f"{where}.{_name(key_node.value)}" if where else _name(key_node.value)
                _build(loader, key_node, child)
                line = key_node.start_mark.line + 1
                if key_node.value in seen:
                    raise ParamsError(f"{child} is given twice (lines "
                                      f"{seen[key_node.value]} and {line}); keep one")
                seen[key_node.value] = line
                children.append((value_node, child, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(node.value)]
        else:
            _build(loader, node, place)
        stack.extend(reversed(children))  # depth first, in document order


def _child(where: str, index: object) -> str:
    """The dotted name of a child node: `train` + key `epochs` -> `train.epochs`; index 3 ->
    `base.classes[3]`."""
    if isinstance(index, int):
        return f"{where}[{index}]"
    name = _name(index.value) if isinstance(index, yaml.ScalarNode) else "?"
    return f"{where}.{name}" if where else name


class _Loader(yaml.SafeLoader):
    """SafeLoader (no Python objects, ever) whose composer stops at MAX_DEPTH with the dotted
    name of the place, instead of a RecursionError at ~300 levels of `[[[...`."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name  # marks say `in "<file>", line 4` rather than "<unicode string>"
        self._where = [""]

    def compose_node(self, parent, index):
        where = self._where[-1] if parent is None else _child(self._where[-1], index)
        if len(self._where) > MAX_DEPTH:
            raise ParamsError(f"{where or 'the top level'} is nested more than {MAX_DEPTH} "
                              "levels deep")
        self._where.append(where)
        try:
            return super().compose_node(parent, index)
        finally:
            self._where.pop()


def _read_yaml(text: str, name: str) -> object:
    loader = _Loader(text, name)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_tree(loader, node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(path: str | Path = "params.yaml") -> Params:
    """Typed settings from a params file; every problem is a ParamsError that says what to fix."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path} (run from the project root or pass "
                          "--params)") from None
    except (OSError, ValueError) as exc:  # permission denied, a NUL in the path, ...
        raise ParamsError(f"cannot read params file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ParamsError(f"{path} is a directory, not a params file; pass the params.yaml "
                          "inside it")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or /dev/zero would block or never end
        raise ParamsError(f"{path} is not a regular file; pass a params.yaml file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ParamsError(f"cannot read params file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ParamsError(f"{path} is over {MAX_FILE_BYTES // 1024} KB; a params file is a few "
                          "KB of settings")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParamsError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
    try:
        raw = _read_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {str(exc)[:500]}") from None
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML: nested too deeply") from None
    except ParamsError as exc:  # from _check_tree, which names the key
        raise ParamsError(f"{path}: {exc}") from None
    if raw is None:
        raise ParamsError(f"{path} is empty (or only comments); it needs the sections "
                          f"{', '.join(typing.get_type_hints(Params))}")
    return parse(raw, source=str(path))


# -- the environment ------------------------------------------------------------------------------

def check_studio_env(url: str, key: str) -> str:
    """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY as read from the environment (or the embedded
    server's credentials): the URL without a trailing slash, or a ParamsError naming the variable
    and what to fix. The key is never echoed (it is a secret); the URL is, bounded."""
    import httpx  # here, not at the top: every stage imports settings, few talk to Label Studio
    where = "LABEL_STUDIO_URL"
    if not isinstance(url, str) or not url.strip():
        raise ParamsError(f"{where} is empty; set it to Label Studio's address, e.g. "
                          "http://127.0.0.1:8080")
    url = url.strip()
    if len(url) > 2048 or not url.isascii() or not url.isprintable() or " " in url:
        raise ParamsError(f"{where} must be a plain http(s) URL (ASCII, no spaces or control "
                          f"characters, at most 2048 characters), got {show(url)}")
    try:  # urlsplit and .port raise ValueError on `http://[::1` or `http://host:99999`
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ParamsError(f"{where} is not a valid URL ({exc}), got {show(url)}; e.g. "
                          "http://127.0.0.1:8080 or http://[::1]:8080") from None
    try:  # what the client will parse: stricter than urlsplit (`http://[::1]]:8080`)
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ParamsError(f"{where} is not a valid URL ({exc}), got {show(url)}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ParamsError(f"{where} must start with http:// or https:// and name a host, got "
                          f"{show(url)}")
    if "@" in parts.netloc:
        raise ParamsError(f"{where} must not carry a user name or password; the API key goes "
                          "in LABEL_STUDIO_API_KEY")
    if parts.query or parts.fragment:
        raise ParamsError(f"{where} must not have a query or fragment, got {show(url)}")
    if port == 0:
        raise ParamsError(f"{where} has port 0, got {show(url)}")
    what = "LABEL_STUDIO_API_KEY"
    if not isinstance(key, str) or not key.strip():
        raise ParamsError(f"{what} is empty; copy the access token from Label Studio's Account & "
                          "Settings page")
    if key != key.strip():
        raise ParamsError(f"{what} has leading or trailing spaces or a newline; copy the token "
                          "again without them")
    bad = next((i for i, ch in enumerate(key) if not (ch.isascii() and ch.isprintable())
                or ch.isspace()), None)
    if bad is not None:  # an HTTP header carries ASCII only: httpx would raise mid-request
        raise ParamsError(f"{what} has a non-ASCII, space or control character at position "
                          f"{bad + 1} (of {len(key)}); copy the access token from Label Studio "
                          "again")
    if len(key) > 4096:
        raise ParamsError(f"{what} is {len(key)} characters long; a Label Studio token is "
                          "40 (legacy) to a few hundred (JWT)")
    return url.rstrip("/")
