"""calibrate: measure this project's seed noise, which the gate's margins then carry.

    labelgate calibrate [--seeds 3]

Trains the project's recipe on the current training split (data/prepared/train) with k seeds
(`gate.calibration_seeds`), evaluates each on the fixed eval set, and stores the per-seed
metrics as models/registry/noise.json (pipelines/noise.py). evaluate attaches it to the
evaluation and the gate widens each margin to `gate.noise_z` standard deviations of a
seed-to-seed difference: a retrain that changes nothing but the seed does not fail, a real
regression (beyond the noise, and paired-significant) still does.

Run it once when a project is set up (the flow does, when the noise is missing or was measured
on another eval set or recipe: `needed`), and again after changing the recipe or the eval set.
Also writes `out_dir`/calibration.json: the spreads and the margins they give, for people.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from pipelines import evalset, inputspec, net, noise, packed, stats, train
from pipelines.device import pick_device
from pipelines.files import atomic_write_json, utc_now
from pipelines.metrics import classification
from pipelines.settings import Params

SEED_STRIDE = 1000  # seed i = base.seed + 1000 * (i + 1): never the candidate's own seed


def seed_metrics(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray,
                 y_eval: np.ndarray, *, params: Params, spec: inputspec.InputSpec,
                 seed: int) -> dict:
    """Train with `seed` (`(N, H, W, C)` uint8 in, the train section's recipe) and evaluate on
    the eval images: accuracy, per-class precision/recall, ECE."""
    device = pick_device(params.train.device)
    model, _ = train.train_model(x_train, y_train, arch=params.train.arch, spec=spec,
                                 classes=params.base.classes, params=params,
                                 epochs=params.train.epochs, seed=seed, device=device)
    probs = net.predict_proba(model, x_eval, device=device,
                              batch_size=params.evaluate.batch_size)
    pred = probs.argmax(1)
    return {"seed": seed, **classification(y_eval, pred, params.base.classes),
            "ece": stats.ece(probs.max(1), pred == y_eval)}


def measure(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
            *, params: Params, eval_hash: str, seeds: int | None = None,
            spec: inputspec.InputSpec | None = None) -> noise.SeedNoise:
    """k trainings that differ only by seed -> the project's SeedNoise."""
    k = seeds or params.gate.calibration_seeds
    if k < 2:
        raise ValueError("calibrate needs at least 2 seeds to measure a spread")
    spec = spec or inputspec.from_params(params)
    classes = params.base.classes
    runs = [seed_metrics(x_train, y_train, x_eval, y_eval, params=params, spec=spec,
                         seed=params.base.seed + SEED_STRIDE * (i + 1)) for i in range(k)]
    return noise.SeedNoise(
        eval_hash=eval_hash, recipe=noise.recipe_hash(params), classes=classes,
        seeds=tuple(r["seed"] for r in runs),
        accuracy=tuple(round(r["accuracy"], 6) for r in runs),
        ece=tuple(round(r["ece"], 6) for r in runs),
        recall={c: tuple(round(r["per_class"][c]["recall"], 6) for r in runs) for c in classes},
        precision={c: tuple(round(r["per_class"][c]["precision"], 6) for r in runs)
                   for c in classes},
        measured_at=utc_now())


def needed(registry_dir: str | Path, *, eval_hash: str, params: Params) -> str | None:
    """Why the project should (re)calibrate now, or None when its noise is current."""
    try:
        found = noise.read(registry_dir)
    except noise.RecordError as exc:
        return f"the stored seed noise cannot be read ({exc})"
    if found is None:
        return "no seed noise measured on this project yet"
    if found.eval_hash != eval_hash:
        return "the seed noise was measured on another eval set"
    if found.recipe != noise.recipe_hash(params) or found.classes != params.base.classes:
        return "the seed noise was measured with another recipe (train/input/classes changed)"
    return None


def summary(measured: noise.SeedNoise, params: Params) -> dict:
    """For people: the accuracy spread and the margins the gate will use."""
    acc = np.array(measured.accuracy)
    m = noise.margins(measured, params.gate, measured.classes, eval_hash=measured.eval_hash)
    worst = max(measured.classes, key=lambda c: m.recall[c])
    return {"seeds": list(measured.seeds), "eval_hash": measured.eval_hash,
            "accuracy": {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)),
                         "min": float(acc.min()), "max": float(acc.max())},
            "margins": {"accuracy": m.accuracy, "ece": m.ece,
                        "recall": dict(m.recall), "precision": dict(m.precision)},
            "widest_recall_margin": {"class": worst, "margin": m.recall[worst]},
            # the gate.* keys as the gate applies them (largest over classes), beside params
            "proposed": {"max_accuracy_drop": _up(m.accuracy),
                         "max_class_recall_drop": _up(max(m.recall.values())),
                         "max_class_precision_drop": _up(max(m.precision.values())),
                         "max_ece_increase": _up(m.ece)},
            "current": {k: getattr(params.gate, k) for k in
                        ("max_accuracy_drop", "max_class_recall_drop",
                         "max_class_precision_drop", "max_ece_increase")}}


def _up(x: float, step: float = 0.005) -> float:
    return round(math.ceil(max(x, 0.0) / step - 1e-9) * step, 6)


def run(prepared_dir: str | Path, eval_dir: str | Path, out_dir: str | Path, *, params: Params,
        seeds: int | None = None, registry_dir: str | Path | None = None) -> dict:
    """data/prepared/train + data/eval -> `registry_dir`/noise.json (what the gate uses; in
    `out_dir` when no registry is given) and `out_dir`/calibration.json; returns the summary."""
    try:
        split = packed.read_split(Path(prepared_dir) / "train")
    except packed.PackedError as exc:
        raise train.TrainingError(str(exc)) from None
    ev = evalset.load(eval_dir, params=params)
    measured = measure(split.x, split.y, ev.x, ev.y, params=params, eval_hash=ev.hash,
                       seeds=seeds)
    measured.write(Path(registry_dir or out_dir) / noise.NOISE_JSON)
    result = summary(measured, params)
    atomic_write_json(Path(out_dir) / "calibration.json", result)
    return result


def ensure(prepared_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
           registry_dir: str | Path, *, params: Params, eval_hash: str) -> dict | None:
    """Calibrate when `needed` says so (the flow calls this once a project has a production
    model, so the second candidate is judged with this project's margins); None when current."""
    if params.gate.calibration_seeds == 0:  # the user's choice: configured margins alone
        return None
    reason = needed(registry_dir, eval_hash=eval_hash, params=params)
    if reason is None:
        return None
    print(f"calibrate: {reason}; training {params.gate.calibration_seeds} seeds",
          file=sys.stderr)
    return run(prepared_dir, eval_dir, out_dir, params=params, registry_dir=registry_dir)
