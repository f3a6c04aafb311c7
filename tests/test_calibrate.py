"""pipelines.calibrate and pipelines.noise without training: when a project must (re)calibrate,
what the stored noise file holds, and the margins it gives. The trainings themselves:
tests/test_gate_planted.py."""
from __future__ import annotations

import dataclasses

import pytest

from pipelines import calibrate, noise
from pipelines.jsonrecord import RecordError
from tests import factories

TEN = tuple(str(c) for c in range(10))


def measured(params, *, eval_hash="e" * 64, recipe=None):
    return noise.SeedNoise(
        eval_hash=eval_hash, recipe=recipe or noise.recipe_hash(params), classes=TEN,
        seeds=(1042, 2042, 3042), accuracy=(0.90, 0.88, 0.89), ece=(0.02, 0.03, 0.02),
        recall={c: (0.9, 0.85, 0.88) for c in TEN}, precision={c: (0.9, 0.9, 0.88) for c in TEN},
        measured_at="2026-11-30T03:00:00Z")


def test_needed_says_why_until_the_noise_is_current(tmp_path):
    params = factories.params()
    assert "no seed noise" in calibrate.needed(tmp_path, eval_hash="e" * 64, params=params)
    measured(params).write(tmp_path / noise.NOISE_JSON)
    assert calibrate.needed(tmp_path, eval_hash="e" * 64, params=params) is None
    assert "another eval set" in calibrate.needed(tmp_path, eval_hash="f" * 64, params=params)
    changed = factories.params({"train.epochs": 3})
    assert "another recipe" in calibrate.needed(tmp_path, eval_hash="e" * 64, params=changed)
    # where it runs is not the recipe
    moved = factories.params({"train.device": "cpu", "train.batch_size_cuda": 512})
    assert calibrate.needed(tmp_path, eval_hash="e" * 64, params=moved) is None
    (tmp_path / noise.NOISE_JSON).write_text('{"eval_hash": 3}')
    assert "cannot be read" in calibrate.needed(tmp_path, eval_hash="e" * 64, params=params)


def test_the_noise_file_round_trips_and_is_checked(tmp_path):
    params = factories.params()
    m = measured(params)
    m.write(tmp_path / noise.NOISE_JSON)
    assert noise.read(tmp_path) == m
    with pytest.raises(RecordError, match="seeds"):
        dataclasses.replace(m, accuracy=(0.9, 0.8))
    with pytest.raises(RecordError, match="recall"):
        dataclasses.replace(m, recall={"0": (0.9, 0.8, 0.7)})


def test_summary_shows_the_margins_the_gate_will_use():
    params = factories.params()
    out = calibrate.summary(measured(params), params)
    assert out["accuracy"]["std"] == pytest.approx(0.01)
    # 3 sd of a seed-to-seed difference: 3 x sqrt(2) x 0.01 = 0.042 > the configured 0.01
    assert out["margins"]["accuracy"] == pytest.approx(3 * 2 ** 0.5 * 0.01)
    assert out["proposed"]["max_accuracy_drop"] == 0.045      # rounded up to 0.005
    assert out["current"]["max_accuracy_drop"] == params.gate.max_accuracy_drop
