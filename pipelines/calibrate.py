"""calibrate: measure seed noise and propose the gate's margins from it.

    labelgate calibrate --seeds 5

Retrains on the current prepared data (data/prepared) with k different seeds, evaluates each on
the fixed eval set, and proposes `gate` margins no smaller than the largest seed-to-seed
difference seen: a retrain that changes nothing but the seed should never fail the gate.
Writes reports/calibration/calibration.json; params.yaml is left for a person to edit.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np

from pipelines import evalset, predict, stats, train
from pipelines.device import pick_device
from pipelines.files import atomic_write_json
from pipelines.metrics import classification
from pipelines.settings import Params

STEP = 0.005  # proposals are rounded up to this


def _up(x: float) -> float:
    return round(math.ceil(max(x, 0.0) / STEP - 1e-9) * STEP, 6)


def seed_run(prepared_dir: str | Path, ev: evalset.EvalSet, *, params: Params, seed: int) -> dict:
    """Train with `seed` and evaluate on the fixed eval set: metrics and ECE."""
    p = dataclasses.replace(params, base=dataclasses.replace(params.base, seed=seed))
    device = pick_device(params.train.device)
    with tempfile.TemporaryDirectory() as tmp:
        train.run(prepared_dir, tmp, params=p)
        model = predict.load_file(Path(tmp) / "model.safetensors", device=device)
        probs = predict.probabilities(model, ev.x, batch_size=params.evaluate.batch_size)
    pred = probs.argmax(1)
    return {"seed": seed, **classification(ev.y, pred, params.base.classes),
            "ece": stats.ece(probs.max(1), pred == ev.y)}


def propose(runs: list[dict], classes: tuple[str, ...]) -> dict:
    """Margins from the spread between seed runs (largest pairwise drop of each metric), never
    below one eval image's worth (a margin of 0 would call any single flipped image a drop)."""
    pairs = list(itertools.permutations(runs, 2))
    acc = max(a["accuracy"] - b["accuracy"] for a, b in pairs)
    recall = max(a["per_class"][c]["recall"] - b["per_class"][c]["recall"]
                 for a, b in pairs for c in classes)
    precision = max(a["per_class"][c]["precision"] - b["per_class"][c]["precision"]
                    for a, b in pairs for c in classes)
    ece = max(b["ece"] - a["ece"] for a, b in pairs)
    one_image = 1 / max(runs[0]["n"], 1)
    smallest_class = min((runs[0]["per_class"][c]["support"] for c in classes
                          if runs[0]["per_class"][c]["support"]), default=1)
    one_of_class = 1 / smallest_class
    return {"max_accuracy_drop": _up(max(acc, one_image)),
            "max_class_recall_drop": _up(max(recall, one_of_class)),
            "max_class_precision_drop": _up(max(precision, one_of_class)),
            "max_ece_increase": _up(max(ece, STEP))}


def run(prepared_dir: str | Path, eval_dir: str | Path, out_dir: str | Path, *, params: Params,
        seeds: int = 5) -> dict:
    if seeds < 2:
        raise ValueError("calibrate needs at least 2 seeds to measure a spread")
    ev = evalset.load(eval_dir, params=params)
    runs = [seed_run(prepared_dir, ev, params=params, seed=params.base.seed + 1000 * (i + 1))
            for i in range(seeds)]
    accs = np.array([r["accuracy"] for r in runs])
    result = {"seeds": [r["seed"] for r in runs], "eval_hash": ev.hash,
              "accuracy": {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)),
                           "min": float(accs.min()), "max": float(accs.max())},
              "ece": [r["ece"] for r in runs],
              "proposed": propose(runs, params.base.classes),
              "current": {k: getattr(params.gate, k) for k in
                          ("max_accuracy_drop", "max_class_recall_drop",
                           "max_class_precision_drop", "max_ece_increase")}}
    atomic_write_json(Path(out_dir) / "calibration.json", result)
    return result
