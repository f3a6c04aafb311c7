"""pipelines.settings: the one params.yaml loader. Every invalid file is a ParamsError that names
the key or file, never a silent default."""
from __future__ import annotations

import dataclasses

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
    ("studio.image_key", 3, "a string"),
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
    ("base.image_size", 4, "between 8 and 512"),
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


@pytest.mark.parametrize("text", ["", "- base\n- train\n", "just a string\n"])
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
