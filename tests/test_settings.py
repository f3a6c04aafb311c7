"""pipelines.settings: the one params.yaml loader. Every invalid file is a ParamsError that names
the key or file, never a silent default."""
from __future__ import annotations

import dataclasses
import os
import random
import time
import typing

import httpx
import pytest
import yaml

from tests import factories
from pipelines import settings
from pipelines.settings import ParamsError
from tests.conftest import REPO

REPO_PARAMS = REPO / "params.yaml"


def write(tmp_path, raw: object, name: str = "params.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load_with(tmp_path, overrides: dict) -> settings.Params:
    return settings.load(write(tmp_path, factories.params_dict(overrides)))


def test_repo_params_yaml_loads_with_its_values():
    raw = factories.params_dict()
    p = settings.load(factories.PARAMS_YAML)
    assert isinstance(p, settings.Params)
    # Every section and key of the file is present, with the file's value, typed.
    for section, values in raw.items():
        sub = getattr(p, section)
        for key, value in values.items():
            got = getattr(sub, key)
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
    assert isinstance(p.base.classes, tuple)
    assert isinstance(p.train.lr, float) and isinstance(p.train.epochs, int)


def test_int_given_for_float_is_coerced_to_float(tmp_path):
    p = load_with(tmp_path, {"train.lr": 1})
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)


@pytest.mark.parametrize("key, value, expected", [
    ("train.epochs", "ten", "an integer"),
    ("train.epochs", 2.5, "an integer"),
    ("train.epochs", True, "an integer"),        # YAML `true` is not 1
    ("train.lr", "fast", "a number"),
    ("studio.project_title", 3, "a string"),
    ("base.classes", "0123456789", "a list of strings"),
    ("base.classes", [0, 1, 2], "a list of strings"),
])
def test_wrong_type_names_the_key(tmp_path, key, value, expected):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {key: value})
    msg = str(err.value)
    assert key in msg
    assert expected in msg
    assert repr(value) in msg  # shows what it got


@pytest.mark.parametrize("origin", ["https://bucket.example.com/path", "ftp://host",
                                    "https://user@host", "https://host?x=1", "bucket.example.com"])
def test_image_hosts_must_be_bare_origins(tmp_path, origin):
    with pytest.raises(ParamsError, match="pull.image_hosts must be a list of origins"):
        load_with(tmp_path, {"pull.image_hosts": [origin]})


def test_image_hosts_accepts_origins_with_ports(tmp_path):
    p = load_with(tmp_path, {"pull.image_hosts": ["https://b.example.com", "http://10.0.0.5:9000/"]})
    assert p.pull.image_hosts == ("https://b.example.com", "http://10.0.0.5:9000/")


def test_unknown_key_is_named_not_ignored(tmp_path):
    with pytest.raises(ParamsError, match=r"unknown key train\.epoch\b"):
        load_with(tmp_path, {"train.epoch": 3})  # a typo of `epochs`


def test_unknown_section_is_named(tmp_path):
    raw = factories.params_dict()
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ParamsError, match="unknown section 'trian'"):
        settings.load(write(tmp_path, raw))


@pytest.mark.parametrize("key", ["train.epochs", "gate.min_accuracy", "base.classes"])
def test_missing_key_is_named(tmp_path, key):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {key: factories.DELETE})
    assert f"missing key {key}" in str(err.value)


@pytest.mark.parametrize("section", ["gate", "schedule", "base"])
def test_missing_section_is_named(tmp_path, section):
    with pytest.raises(ParamsError, match=f"missing section '{section}'"):
        load_with(tmp_path, {section: factories.DELETE})


def test_section_that_is_not_a_mapping_is_named(tmp_path):
    with pytest.raises(ParamsError, match="section 'train' must be a mapping"):
        load_with(tmp_path, {"train": 12})


@pytest.mark.parametrize("key, value, expected", [
    ("prepare.val_fraction", 1.5, "between 0 and 1, exclusive"),
    ("prepare.val_fraction", 0, "between 0 and 1, exclusive"),
    ("train.epochs", 0, "between 1 and 10000"),
    ("train.lr", -0.1, "above 0 and at most 1"),
    ("train.device", "tpu", "one of auto, cpu, cuda"),
    ("studio.port", 70000, "a TCP port between 1 and 65535"),
    ("base.classes", ["0", "0", "1"], "distinct"),
    ("base.classes", ["only"], "at least two"),
    ("input.height", 4, "between 8 and 1024"),
    ("input.channels", 2, "1 (grayscale) or 3"),
    ("input.background", [0, 0], "three integers"),
    ("input.mean", [1.0, 2.0], "one value per channel"),
    ("gate.min_accuracy", 1.2, "between 0 and 1"),
    ("schedule.cron", "every night", "5-field cron"),
])
def test_rule_violation_names_key_and_rule(tmp_path, key, value, expected):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {key: value})
    msg = str(err.value)
    assert key in msg and expected in msg and repr(value) in msg


def test_nan_never_passes_a_numeric_rule(tmp_path):
    with pytest.raises(ParamsError, match="gate.min_accuracy"):
        load_with(tmp_path, {"gate.min_accuracy": float("nan")})


def test_min_side_above_max_side_is_refused(tmp_path):
    with pytest.raises(ParamsError, match="validate.min_side must not exceed validate.max_side"):
        load_with(tmp_path, {"validate.min_side": 100, "validate.max_side": 50})


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("base:\n  seed: 42\n  classes: [0, 1\ntrain: {epochs: 3\n")
    with pytest.raises(ParamsError) as err:
        settings.load(path)
    assert str(path) in str(err.value) and "not valid YAML" in str(err.value)


@pytest.mark.parametrize("text", ["- base\n- train\n", "just a string\n"])
def test_top_level_not_a_mapping(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        settings.load(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ParamsError) as err:
        settings.load(path)
    assert "not found" in str(err.value) and str(path) in str(err.value)


def test_params_error_is_a_value_error():
    # Stages' main() catch ValueError-family errors; ParamsError must stay one.
    assert issubclass(ParamsError, ValueError)


def test_settings_are_frozen():
    p = factories.params()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train.epochs = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train = p.prepare  # type: ignore[misc]
    assert p.train.epochs == factories.params_dict()["train"]["epochs"]
    # Lists become tuples: no stage can mutate the shared class list either.
    with pytest.raises((TypeError, AttributeError)):
        p.base.classes.append("x")  # type: ignore[attr-defined]


def test_factory_overrides_go_through_the_real_checks():
    assert factories.params({"train.epochs": 2}).train.epochs == 2
    assert factories.params(**{"prepare.val_fraction": 0.5}).prepare.val_fraction == 0.5
    with pytest.raises(ParamsError, match="train.epochs"):
        factories.params({"train.epochs": "two"})


def test_float_written_without_a_dot_is_a_number(tmp_path):
    text = (REPO_PARAMS.read_text().replace("lr: 0.002", "lr: 1e-3"))
    assert "lr: 1e-3" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert settings.load(path).train.lr == 0.001


def test_infinite_number_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text().replace("lr: 0.002", "lr: .inf"))
    with pytest.raises(settings.ParamsError, match="train.lr"):
        settings.load(path)


def test_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text().replace("  epochs: 12", "  epochs: 12\n  epochs: 3"))
    with pytest.raises(settings.ParamsError, match="epochs"):
        settings.load(path)


# --- issue 10: ranges, bounded messages, and a generated corpus of hostile files ---------------

def _fields() -> list[tuple[str, object]]:
    """(dotted key, type) of every setting, from the dataclasses themselves."""
    return [(f"{section}.{name}", tp)
            for section, cls in typing.get_type_hints(settings.Params).items()
            for name, tp in typing.get_type_hints(cls).items()]


NUMERIC = [key for key, tp in _fields() if tp in (int, float)]


def test_every_numeric_setting_has_a_range():
    """A setting added without a range fails here: nothing absurd may reach a stage."""
    assert len(NUMERIC) >= 30
    assert [k for k in NUMERIC if k not in settings._RULES] == []


@pytest.mark.parametrize("key", NUMERIC)
def test_every_numeric_setting_refuses_both_extremes(tmp_path, key):
    tp = dict(_fields())[key]
    for value in ((10**12, -(10**12)) if tp is int else (1e300, -1e300)):
        with pytest.raises(ParamsError) as err:
            load_with(tmp_path, {key: value})
        assert key in str(err.value) and "must be" in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("base.seed", -1),                         # once: a NumPy traceback in train
    ("base.seed", 2**32),
    ("pull.read_timeout_s", 1e308),            # once: a traceback from the socket layer
    ("pull.connect_timeout_s", 1e308),
    ("train.batch_size", 1_000_000_000),       # once: accepted, lr 5.6, a garbage model, exit 0
    ("train.batch_size_cuda", 1_000_000_000),
    ("train.lr", 5.6),
    ("schedule.check_every_s", 1e308),
])
def test_the_values_seen_in_issue_10_are_refused_at_load(tmp_path, key, value):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {key: value})
    msg = str(err.value)
    assert f"{key} must be between" in msg or f"{key} must be above" in msg, msg
    assert str(tmp_path / "params.yaml") in msg  # which file, too


def test_range_bounds_themselves_load(tmp_path):
    p = load_with(tmp_path, {"base.seed": 0, "pull.read_timeout_s": 3600, "train.batch_size": 65536,
                             "train.lr": 1, "studio.port": 65535, "input.height": 8})
    assert (p.base.seed, p.pull.read_timeout_s, p.train.batch_size, p.train.lr) == (0, 3600.0, 65536, 1.0)
    assert settings.load(write(tmp_path, factories.params_dict({"base.seed": 2**31 - 1}))).base.seed == 2**31 - 1


def test_a_thousand_class_message_is_short(tmp_path):
    """Once 13,671 characters: every class name repeated back. Now the first few and a count."""
    classes = [f"class_{i:04d}" for i in range(1000)]
    classes[-1] = classes[0]                   # one duplicate
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {"base.classes": classes})
    msg = str(err.value)
    assert "base.classes" in msg and "distinct" in msg and "(1000 items)" in msg
    assert len(msg) < 600, len(msg)


def test_brief_lists_the_first_few_and_a_count():
    names = [str(i) for i in range(1000)]
    assert settings.brief(names) == "['0', '1', '2', '3', '4', … (1000 in all)]"
    assert settings.brief(names[:3]) == "['0', '1', '2']"
    assert len(settings.brief(["x" * 10_000] * 1000)) < 600


def test_show_is_bounded_for_any_value():
    nested: list = []
    for _ in range(50):
        nested = [nested] * 10                 # shared references: 10^50 leaves when walked
    for value in (nested, "y" * 1_000_000, 7**1000, {i: i for i in range(10**4)}):
        assert len(settings.show(value)) < 400


def test_ten_thousand_classes_load(tmp_path):
    classes = [f"c{i}" for i in range(settings.MAX_CLASSES)]
    assert load_with(tmp_path, {"base.classes": classes}).base.classes == tuple(classes)
    with pytest.raises(ParamsError, match="base.classes"):
        load_with(tmp_path, {"base.classes": classes + ["one more"]})


# The corpus. Each case: (id, how to write the file, what must happen). What must happen is one
# thing: either it loads (and a value is checked) or a ParamsError whose message names the
# offending key (or, for file-level faults, the file). Never another exception, never more than
# ~1,000 characters of message, never more than a few seconds (bombs).
CORPUS_SEED = 20261110
GENERATED = 48
WRONG_TYPE = {
    int: ["ten", 2.5, True, None, [1], {"a": 1}, "1e3", 12.0],
    float: ["fast", True, None, [0.5], {"a": 1}, "0x1p3"],
    bool: ["yes", 1, None, [], 0.0],
    str: [3, None, [], {"k": "v"}, True, 1.5],
    float | None: ["fast", True, [0.5], {"a": 1}, "0x1p3"],  # null is a value here: "none"
}
WRONG_LIST = ["abc", 3, None, {"a": 1}, [None], [[1]], [True], [1.5]]
OUT_OF_RANGE = {
    int: [-1, -(10**12), 10**12, 2**63, 10**40],
    float: [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, -1.0, 1e12],
    float | None: [float("nan"), float("inf"), float("-inf"), 1e308, -1e308, -1.0, 1e12],
}


def _generated() -> list[tuple[str, dict, str]]:
    """Seeded random (key, hostile value) pairs over every setting; the expected error names
    the key. Values are chosen so that each is wrong for that key's type or range."""
    rng = random.Random(CORPUS_SEED)
    fields = _fields()
    cases = []
    for n in range(GENERATED):
        key, tp = rng.choice(fields)
        if typing.get_origin(tp) is tuple:
            pool = WRONG_LIST if typing.get_args(tp)[0] is int else \
                [v for v in WRONG_LIST if v not in ([1.5],)] + [[1], ["ok", 2]]
            if typing.get_args(tp)[0] is str:
                pool = [v for v in pool if v not in ([True],)] + [[True]]
        else:
            pool = WRONG_TYPE[tp] + (OUT_OF_RANGE.get(tp, []) if rng.random() < 0.5 else [])
        value = rng.choice(pool)
        cases.append((f"gen{n:02d}-{key}", factories.params_dict({key: value}), key))
    return cases


def _params_text() -> str:
    return REPO_PARAMS.read_text()


def _sub(old: str, new: str) -> str:
    text = _params_text()
    assert old in text, old
    return text.replace(old, new, 1)


LOL = "".join(f"lol{i}: &l{i} [" + ",".join([f"*l{i - 1}" if i else '"lol"'] * 10) + "]\n"
              for i in range(10))
CLASS_BOMB = ("classes: [&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
              "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
              "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]")
CLASSES_LINE = 'classes: ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]'

# (id, file content: str, bytes or a callable writing the file at the path, expected)
# expected: ("error", substring the message must contain) or ("loads", check(params) -> bool)
FIXED = [
    ("non-utf8-byte", _sub("seed: 42", "seed: 4\xff2").encode("latin-1"), ("error", "UTF-8")),
    ("latin-1-title", _sub("labelgate digits", "étiquettes").encode("latin-1"), ("error", "UTF-8")),
    ("utf-16", _params_text().encode("utf-16"), ("error", "UTF-8")),
    ("utf-8-bom", "\ufeff" + _params_text(), ("loads", lambda p: p.base.seed == 42)),
    ("crlf", _params_text().replace("\n", "\r\n"), ("loads", lambda p: p.train.epochs == 12)),
    ("directory", lambda path: path.mkdir(), ("error", "is a directory")),
    ("fifo", lambda path: os.mkfifo(path), ("error", "not a regular file")),
    ("symlink-loop", lambda path: path.symlink_to(path), ("error", "cannot read params file")),
    ("empty", "", ("error", "is empty")),
    ("comments-only", "# nothing here\n   \n", ("error", "is empty")),
    ("document-marker-only", "---\n", ("error", "is empty")),
    ("top-level-list", "- base\n- train\n", ("error", "top level must be a mapping")),
    ("top-level-scalar", "42\n", ("error", "top level must be a mapping")),
    ("two-documents", _params_text() + "\n---\nbase: {}\n", ("error", "single document")),
    ("too-big", _params_text() + "#" + "x" * 300_000 + "\n", ("error", "KB")),
    ("nul-byte", _sub("seed: 42", "seed: 4\x002"), ("error", "#x0000")),
    ("bell-char", _sub("labelgate digits", "label\x07gate"), ("error", "#x0007")),
    ("tab-indent", _sub("  seed: 42", "\tseed: 42"), ("error", "line 4")),
    ("unclosed-flow", _sub(CLASSES_LINE, 'classes: ["0", "1"'), ("error", "not valid YAML")),
    ("billion-laughs", LOL + _params_text(), ("error", "lol4")),
    ("billion-laughs-in-classes", _sub(CLASSES_LINE, CLASS_BOMB), ("error", "base.classes[")),
    ("bomb-as-value", _sub("seed: 42", "seed: &s0 [1,1,1,1,1,1,1,1,1,1]").replace(
        "height: 28", "height: [" + ",".join(["*s0"] * 10) + "]"), ("error", "base.seed")),
    ("self-alias", _sub("seed: 42", "seed: &r [*r]"), ("error", "base.seed")),
    ("self-alias-mapping", _sub("seed: 42", "seed: &m {a: *m}"), ("error", "base.seed")),
    ("deep-flow-list", _sub("seed: 42", "seed: " + "[" * 5000 + "]" * 5000), ("error", "base.seed")),
    ("deep-block-map", _sub("  epochs: 12\n", "  epochs:\n" + "".join(
        "  " * (i + 2) + "a:\n" for i in range(40)) + "  " * 42 + "1\n"), ("error", "train.epochs.a")),
    ("duplicate-key", _sub("  epochs: 12", "  epochs: 12\n  epochs: 3"), ("error", "train.epochs is given twice")),
    ("duplicate-section", _params_text() + "\ntrain:\n  epochs: 3\n", ("error", "train is given twice")),
    ("unknown-key", _sub("  epochs: 12", "  epochs: 12\n  epoch: 3"), ("error", "unknown key train.epoch")),
    ("unknown-section", _params_text() + "\ntrian:\n  epochs: 3\n", ("error", "unknown section 'trian'")),
    ("int-key", _sub("  epochs: 12", "  epochs: 12\n  1: 3"), ("error", "unknown key train.1")),
    ("null-key", _sub("  epochs: 12", "  epochs: 12\n  ~: 3"), ("error", "unknown key train.None")),
    ("bool-key", _sub("  epochs: 12", "  epochs: 12\n  on: 3"), ("error", "unknown key train.True")),
    ("list-key", _sub("  epochs: 12", "  epochs: 12\n  ? [a, b]\n  : 3"), ("error", "train has a key")),
    ("long-key", _sub("  epochs: 12", "  epochs: 12\n  " + "k" * 1000 + ": 3"), ("error", "unknown key train.kkk")),
    ("huge-explicit-key", _sub("  epochs: 12", "  epochs: 12\n  ? " + "k" * 20_000 + "\n  : 3"),
     ("error", "unknown key train.kkk")),
    ("date-key", _sub("  epochs: 12", "  epochs: 12\n  2001-13-45: 3"), ("error", "train.2001-13-45")),
    ("python-object", _sub("seed: 42", "seed: !!python/object/apply:os.system ['true']"), ("error", "base.seed")),
    ("python-name", _sub("seed: 42", "seed: !!python/name:os.system"), ("error", "base.seed")),
    ("custom-tag", _sub("seed: 42", "seed: !secret 42"), ("error", "base.seed")),
    ("binary-title", _sub("project_title: labelgate digits", "project_title: !!binary aGVsbG8gd29ybGQ="),
     ("error", "studio.project_title")),
    ("set-classes", _sub(CLASSES_LINE, "classes: !!set {a, b, c}"), ("error", "base.classes")),
    ("ordered-map-section", _sub("evaluate:\n  batch_size: 1024", "evaluate: !!omap [{batch_size: 1024}]"),
     ("error", "section 'evaluate' must be a mapping")),
    ("date-seed", _sub("seed: 42", "seed: 2001-01-01"), ("error", "base.seed")),
    ("impossible-date-seed", _sub("seed: 42", "seed: 2001-13-45"), ("error", "base.seed")),
    ("5000-digit-seed", _sub("seed: 42", "seed: " + "9" * 5000), ("error", "base.seed")),
    ("hex-epochs", _sub("  epochs: 12", "  epochs: 0x0c"), ("loads", lambda p: p.train.epochs == 12)),
    ("float-epochs", _sub("  epochs: 12", "  epochs: 12.0"), ("error", "train.epochs must be an integer")),
    ("nan-height", _sub("height: 28", "height: .nan"), ("error", "input.height")),
    ("inf-lr", _sub("lr: 0.002", "lr: -.inf"), ("error", "train.lr")),
    ("null-section", _sub("evaluate:\n  batch_size: 1024", "evaluate:"), ("error", "section 'evaluate'")),
    ("section-is-list", _sub("evaluate:\n  batch_size: 1024", "evaluate: [1024]"), ("error", "section 'evaluate'")),
    ("huge-title", _sub("project_title: labelgate digits", "project_title: " + "t" * 100_000),
     ("error", "studio.project_title")),
    ("title-with-newline", _sub("project_title: labelgate digits", 'project_title: "a\\nb c"'),
     ("error", "studio.project_title")),
    ("class-with-control-char", _sub(CLASSES_LINE, 'classes: ["a\\u0000", "b"]'), ("error", "base.classes")),
    ("class-with-spaces", _sub(CLASSES_LINE, 'classes: [" a", "b"]'), ("error", "base.classes")),
    ("huge-task-id-list", _sub("critical_task_ids: []", "critical_task_ids: [" + "1," * 30_000 + "1]"),
     ("error", "gate.critical_task_ids")),
    ("task-id-zero", _sub("critical_task_ids: []", "critical_task_ids: [0]"), ("error", "gate.critical_task_ids")),
    ("unknown-image-mode", _sub('allowed_modes: ["1", "L",', 'allowed_modes: ["XYZ", "L",'),
     ("error", "validate.allowed_modes")),
    ("image-host-bad-ipv6", _sub("image_hosts: []", 'image_hosts: ["http://[::1"]'), ("error", "pull.image_hosts")),
    ("image-host-bad-port", _sub("image_hosts: []", 'image_hosts: ["http://h:99999"]'), ("error", "pull.image_hosts")),
    # a key labelgate no longer reads: the message says where the fact lives now
    ("moved-image-key", _sub("project_title: labelgate digits", "project_title: labelgate digits\n  image_key: img"),
     ("error", "labeling config")),
    ("cron-garbage", _sub('cron: "0 3 * * *"', 'cron: "0 3 * * * ; rm -rf /"'), ("error", "schedule.cron")),
    ("min-side-over-max", _sub("min_side: 8", "min_side: 5000"), ("error", "validate.min_side")),
    ("merge-key", _sub("train:\n  epochs: 12\n", "train:\n  <<: {epochs: 5}\n"),
     ("loads", lambda p: p.train.epochs == 5)),
    ("merge-key-own-wins", _sub("train:\n  epochs: 12\n", "train:\n  <<: {epochs: 5}\n  epochs: 7\n"),
     ("loads", lambda p: p.train.epochs == 7)),
    ("small-alias", _sub("batch_size_cuda: 2048", "batch_size_cuda: *b").replace(
        "batch_size: 128 ", "batch_size: &b 128 ", 1), ("loads", lambda p: p.train.batch_size_cuda == 128)),
    ("merge-of-scalar", _sub("train:\n  epochs: 12\n", "train:\n  <<: 5\n  epochs: 12\n"), ("error", "not valid YAML")),
]


def _corpus() -> list[tuple[str, object, tuple]]:
    cases = [(name, content, expect) for name, content, expect in FIXED]
    for name, raw, key in _generated():
        cases.append((name, yaml.safe_dump(raw, sort_keys=False), ("error", key)))
    return cases


CORPUS = _corpus()


def test_the_corpus_is_wide():
    assert len(CORPUS) >= 100
    assert len({name for name, _, _ in CORPUS}) == len(CORPUS)
    assert sum(expect[0] == "loads" for _, _, expect in CORPUS) >= 6


@pytest.mark.parametrize("name, content, expect", CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_params_file(tmp_path, name, content, expect):
    path = tmp_path / "params.yaml"
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    started = time.monotonic()
    kind, what = expect
    if kind == "loads":
        assert what(settings.load(path))
    else:
        with pytest.raises(ParamsError) as err:
            settings.load(path)
        msg = str(err.value)
        assert what in msg, msg[:2000]
        assert len(msg) <= 1000, len(msg)
        assert str(path) in msg  # every message says which file
    assert time.monotonic() - started < 10  # bombs are cut short (typically < 0.2 s)
    assert not (tmp_path / "pwned").exists()


# --- the environment: LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY ------------------------------------

KEY = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("url, cleaned", [
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ("  https://ls.example.com  ", "https://ls.example.com"),
    ("http://[::1]:8080", "http://[::1]:8080"),
    ("https://example.com/label-studio/", "https://example.com/label-studio"),
    ("HTTP://LOCALHOST:8080", "HTTP://LOCALHOST:8080"),
    ("http://127.0.0.1:8080\n", "http://127.0.0.1:8080"),   # as `$(cat file)` leaves it
])
def test_studio_url_accepted(url, cleaned):
    got = settings.check_studio_env(url, KEY)
    assert got == cleaned
    # what labelgate then builds from it does not raise either
    request = httpx.Request("GET", f"{got}/api/projects", headers={"Authorization": f"Token {KEY}"})
    assert request.url.path.endswith("/api/projects")


@pytest.mark.parametrize("url, says", [
    ("http://[::1", "not a valid URL"),              # once: a ValueError traceback
    ("http://[::1]]:8080", "not a valid URL"),
    ("http://host:99999", "not a valid URL"),
    ("http://host:port", "not a valid URL"),
    ("http://host:0", "port 0"),
    ("", "is empty"),
    ("   ", "is empty"),
    ("ftp://host", "http:// or https://"),
    ("localhost:8080", "http:// or https://"),
    ("127.0.0.1:8080", "http:// or https://"),
    ("http://", "http:// or https://"),
    ("http:///api", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("javascript:alert(1)", "http:// or https://"),
    ("http://user:secret@host", "user name or password"),
    ("http://host/?token=x", "query or fragment"),
    ("http://host/#x", "query or fragment"),
    ("http://ho st", "plain http(s) URL"),
    ("http://ho\nst", "plain http(s) URL"),
    ("http://host/\x00", "plain http(s) URL"),
    ("http://hôst.example", "plain http(s) URL"),
    ("http://h/" + "a" * 3000, "plain http(s) URL"),
])
def test_studio_url_refused_with_a_message(url, says):
    with pytest.raises(ParamsError) as err:
        settings.check_studio_env(url, KEY)
    msg = str(err.value)
    assert msg.startswith("LABEL_STUDIO_URL") and says in msg, msg
    assert len(msg) < 400
    assert "secret" not in msg  # a password in the URL is not echoed


@pytest.mark.parametrize("key, says", [
    ("", "is empty"),
    ("  ", "is empty"),
    (KEY + "\n", "leading or trailing"),
    (" " + KEY, "leading or trailing"),
    (KEY[:20] + "é" + KEY[20:], "position 21"),   # once: a UnicodeEncodeError traceback
    (KEY[:5] + " " + KEY[5:], "position 6"),
    (KEY[:5] + "\x00" + KEY[5:], "position 6"),
    ("\u200b" + KEY, "position 1"),                  # a zero-width space pasted along
    ("a" * 5000, "5000 characters"),
])
def test_api_key_refused_without_echoing_it(key, says):
    with pytest.raises(ParamsError) as err:
        settings.check_studio_env("http://127.0.0.1:8080", key)
    msg = str(err.value)
    assert msg.startswith("LABEL_STUDIO_API_KEY") and says in msg, msg
    assert KEY[:12] not in msg and "a" * 20 not in msg  # the secret is never in the message


def test_a_refused_key_is_one_httpx_could_not_send():
    """Why the check exists: the header would fail mid-request, after connecting."""
    with pytest.raises(UnicodeEncodeError):
        httpx.Request("GET", "http://127.0.0.1:8080/", headers={"Authorization": "Token clé"})


def test_jwt_style_key_accepted():
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.abc-DEF_123"
    assert settings.check_studio_env("http://127.0.0.1:8080", jwt) == "http://127.0.0.1:8080"


def test_input_spec_reads_float_lists_and_pairs_mean_with_std(tmp_path):
    p = load_with(tmp_path, {"input.channels": 3, "input.mean": [125, 123.0, "1.14e2"],
                             "input.std": [63, 62.5, 66.7]})
    assert p.input.mean == (125.0, 123.0, 114.0) and p.input.std == (63.0, 62.5, 66.7)
    assert all(isinstance(v, float) for v in p.input.mean)
    assert load_with(tmp_path, {}).input.mean == ()
    with pytest.raises(ParamsError, match="input.mean and input.std must both be"):
        load_with(tmp_path, {"input.mean": [0.5]})
    with pytest.raises(ParamsError, match="input.std must be"):
        load_with(tmp_path, {"input.mean": [0.5], "input.std": [0.0]})


def test_base_image_size_names_where_the_size_lives_now(tmp_path):
    with pytest.raises(ParamsError, match="input.height: N and input.width: N"):
        load_with(tmp_path, {"base.image_size": 28})


# --- issue 11: the train section's model, init, recipe, augmentation and residency keys -------

@pytest.mark.parametrize("key, value, expected", [
    ("train.arch", "resnet-50", "one of auto, smallcnn"),
    ("train.arch", "convnet-32-64-128", "one of auto"),       # the legacy net is load-only
    ("train.init", "imagenet", "one of scratch, weights, production"),
    ("train.init_sha256", "ABC", "64 lowercase hex digits"),
    ("train.init_sha256", "A" * 64, "64 lowercase hex digits"),
    ("train.init_weights", " w.safetensors", "path to a local .safetensors file"),
    ("train.optimizer", "adam", "one of adamw, sgd"),
    ("train.schedule", "step", "one of onecycle, cosine"),
    ("train.label_smoothing", 0.6, "between 0 and 0.5"),
    ("train.warmup", 0.9, "between 0 and 0.5"),
    ("train.backbone_lr_scale", 2.0, "between 0 and 1"),
    ("train.color_jitter", 1.0, "between 0 and 0.9"),
    ("train.resident_max_mb", -1.0, "between 0 and"),
    ("train.weight_decay", 1.5, "between 0 and 1"),
    ("train.hflip", "yes", "true or false"),
])
def test_train_recipe_keys_are_checked(tmp_path, key, value, expected):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {key: value})
    assert key in str(err.value) and expected in str(err.value), str(err.value)


def test_train_recipe_keys_repo_values(tmp_path):
    t = load_with(tmp_path, {}).train
    assert not t.hflip                      # digits: a mirrored 2 is no 2
    assert t.init == "scratch" and t.init_weights == "" and t.init_sha256 == ""
    assert t.schedule in ("onecycle", "cosine") and 0 < t.label_smoothing < 0.5
    ok = load_with(tmp_path, {"train.init": "weights", "train.init_weights": "w/b.safetensors",
                              "train.init_sha256": "0123456789abcdef" * 4,
                              "train.resident_max_mb": 0}).train
    assert ok.init_sha256 == "0123456789abcdef" * 4 and ok.resident_max_mb == 0.0


def test_near_duplicate_similarity_is_null_or_a_similarity(tmp_path):
    """null: prepare sets the threshold from the eval set (neardup.auto_threshold); a number
    fixes it; 0 and above 1 are refused by name."""
    assert load_with(tmp_path, {}).prepare.near_duplicate_similarity is None
    assert load_with(tmp_path, {"prepare.near_duplicate_similarity": 0.98}) \
        .prepare.near_duplicate_similarity == 0.98
    for bad in (0, 1.5, "high"):
        with pytest.raises(ParamsError, match="prepare.near_duplicate_similarity must be"):
            load_with(tmp_path, {"prepare.near_duplicate_similarity": bad})


def test_default_modes_are_the_ones_preprocess_handles():
    """Every mode validate admits by default turns into gray and RGB pixels."""
    import numpy as np
    from PIL import Image

    from pipelines import images
    modes = settings.load(factories.PARAMS_YAML).validate.allowed_modes
    assert "CMYK" in modes and "I;16" in modes and "F" not in modes
    base = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1)))
    for mode in modes:
        if mode.startswith("I;16"):
            img = Image.frombytes(mode, base.size, (np.asarray(base).astype(
                ">u2" if mode == "I;16B" else "<u2") * 257).tobytes())
        else:
            img = base.convert("RGB").convert(mode) if mode != "LAB" else \
                base.convert("RGB").convert("LAB")
        for channels in (1, 3):
            out = images.convert(img, channels=channels)
            assert out.mode == ("L" if channels == 1 else "RGB"), (mode, channels)
            assert np.ptp(np.asarray(out)) > 0, (mode, channels)


# -- upgrades: a params.yaml written by an older labelgate ---------------------------------------

ADDED_KEYS = ("train.pool", "train.exchange", "train.pool_timeout_s", "train.pool_heartbeat_s",
              "gate.reviewer_wait_s", "schedule.pool")   # and the storage section


def _blocks(message: str) -> dict[str, str]:
    """The message's quoted blocks by where they go: "at the end of the file", "train", ..."""
    import re
    pieces = re.split(r"^(?:at the end of the file|under `(\w+):`):$",
                      message.split("comments included:\n", 1)[1], flags=re.M)
    assert pieces[0] == "", pieces[0]
    return {where or "at the end of the file": block.strip("\n")
            for where, block in zip(pieces[1::2], pieces[2::2])}


def _do_what_it_says(text: str, message: str) -> str:
    """The message's instructions carried out on `text`: each quoted block pasted where it
    says (right below the `section:` line, or at the end of the file)."""
    import re
    for where, block in _blocks(message).items():
        if where == "at the end of the file":
            text = text.rstrip("\n") + "\n" + block + "\n"
        else:
            at = re.search(rf"^{where}:\n", text, flags=re.M).end()
            text = text[:at] + block + "\n" + text[at:]
    return text


def test_an_older_params_yaml_gets_every_missing_key_with_the_template_lines_to_paste(tmp_path):
    """A params.yaml from the last release's `labelgate init` lacks the keys added since: one
    error names all of them and quotes the shipped template's lines, comments included;
    pasted as told, the file loads and equals the template."""
    old = factories.params_dict({"storage": factories.DELETE,
                                 **{key: factories.DELETE for key in ADDED_KEYS}})
    path = write(tmp_path, old)
    with pytest.raises(ParamsError) as err:
        settings.load(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: missing ")
    assert "section 'storage'" in msg and all(f"key {key}" in msg for key in ADDED_KEYS), msg
    for key in ADDED_KEYS:      # each key's own line, with the comment that says what it is
        section, field = key.split(".")
        block = _blocks(msg)[section]
        line = next(ln for ln in block.splitlines() if ln.startswith(f"  {field}:"))
        assert "#" in line, (key, line)
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(_do_what_it_says(path.read_text(), msg))
    assert settings.load(fixed) == settings.load(REPO_PARAMS)


def test_the_quoted_template_is_the_shipped_package_data():
    from importlib import resources
    shipped = resources.files("pipelines").joinpath("templates", "params.yaml")
    assert shipped.read_text(encoding="utf-8") == REPO_PARAMS.read_text(encoding="utf-8")


def test_one_missing_key_quotes_its_lines_and_other_errors_come_first(tmp_path):
    with pytest.raises(ParamsError) as err:
        load_with(tmp_path, {"gate.reviewer_wait_s": factories.DELETE})
    msg = str(err.value)
    assert "missing key gate.reviewer_wait_s (" in msg and "under `gate:`:\n  reviewer_wait_s:" in msg
    assert "section" not in msg.split("(")[0]
    # a typo next to a missing key: the unknown key is what to fix first
    with pytest.raises(ParamsError, match=r"unknown key train\.pol\b"):
        load_with(tmp_path, {"train.pool": factories.DELETE, "train.pol": ""})


def test_a_model_files_input_spec_gets_no_params_template_advice():
    from pipelines import inputspec
    with pytest.raises(inputspec.SpecError) as err:
        inputspec.InputSpec.from_json({"channels": 1}, source="model.safetensors")
    assert str(err.value) == "model.safetensors: missing key input.height"
