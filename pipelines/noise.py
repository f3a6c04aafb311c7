"""Seed noise measured on this project, and the gate margins that follow from it.

    models/registry/noise.json   SeedNoise   calibrate -> evaluate (attached to the evaluation) -> gate

`labelgate calibrate` trains the same recipe on the same prepared data with k seeds and
evaluates each on the fixed eval set; the per-seed metrics are stored here (the spreads are
derived from them, never stored twice). The gate widens each configured margin to
`gate.noise_z` standard deviations of a seed-to-seed *difference* (sqrt(2) x the per-run
spread): on a 10-class gray non-digit set a retrain that only changed the seed moved one class's
recall 0.474 -> 0.268 and another's precision 0.837 -> 0.735 at paired p = 0.0005. The paired
test cannot tell that from a regression (a seed change IS systematic on the same eval images),
so the margin has to carry it.

Per-class spreads from k = 3 seeds are themselves noisy (2 degrees of freedom), so a class's
spread is the larger of its own and the pooled spread over all classes (K x (k - 1) degrees of
freedom): an unstable class keeps its wide margin, a class that happened to agree across the few
seeds does not get a margin of zero.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipelines.jsonrecord import Record, RecordError, digest, record

NOISE_JSON = "noise.json"
# train keys that change where a run happens, not what it learns
_NOT_RECIPE = frozenset({"device", "compile", "batch_size_cuda", "resident_max_mb"})


@record
class SeedNoise(Record):
    """k trainings of one recipe that differ only by seed, on the eval set `eval_hash`."""
    eval_hash: str = digest()
    recipe: str = digest()  # recipe_hash(params) of the runs
    classes: tuple[str, ...]
    seeds: tuple[int, ...]
    accuracy: tuple[float, ...]                      # one per seed
    ece: tuple[float, ...]
    recall: Mapping[str, tuple[float, ...]]          # class -> one per seed
    precision: Mapping[str, tuple[float, ...]]
    measured_at: str

    def _check(self) -> None:
        k = len(self.seeds)
        if k < 2:
            raise RecordError("a spread needs at least 2 seeds", field="seeds")
        for name in ("accuracy", "ece"):
            if len(getattr(self, name)) != k:
                raise RecordError(f"{len(getattr(self, name))} values for {k} seeds", field=name)
        for name in ("recall", "precision"):
            per = getattr(self, name)
            if set(per) != set(self.classes):
                raise RecordError("one entry per class expected", field=name)
            bad = next((c for c, v in per.items() if len(v) != k), None)
            if bad is not None:
                raise RecordError(f"{len(per[bad])} values for {k} seeds", field=f"{name}[{bad!r}]")


def recipe_hash(params) -> str:
    """sha256 of what decides how a model learns: the input spec, the classes, the train
    section (minus where it runs), the seed excluded. A calibration of another recipe is
    shown as such."""
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in _NOT_RECIPE}
    doc = {"input": dataclasses.asdict(params.input), "classes": list(params.base.classes),
           "train": train}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def read(registry_dir: str | Path) -> SeedNoise | None:
    """The project's calibration, or None when none was measured yet."""
    path = Path(registry_dir) / NOISE_JSON
    return SeedNoise.read(path) if path.exists() else None


def _sd(values) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _pooled(per: Mapping[str, tuple[float, ...]]) -> float:
    """Root mean of the per-class variances."""
    return math.sqrt(float(np.mean([_sd(v) ** 2 for v in per.values()]))) if per else 0.0


@dataclasses.dataclass(frozen=True)
class Margins:
    """The margin of each comparative test, and where it came from (shown in the report)."""
    accuracy: float
    ece: float
    recall: Mapping[str, float]
    precision: Mapping[str, float]
    origin: Mapping[str, str]   # test key ("accuracy", "recall:cls", ...) -> in words
    note: str                   # the calibration used, or why none


def margins(noise: SeedNoise | None, g, classes: tuple[str, ...], *, eval_hash: str) -> Margins:
    """max(configured margin, g.noise_z x sqrt(2) x seed spread) per test. `noise` from another
    eval set is not used (its per-class numbers describe other images)."""
    configured = {"accuracy": g.max_accuracy_drop, "ece": g.max_ece_increase,
                  **{f"recall:{c}": g.max_class_recall_drop for c in classes},
                  **{f"precision:{c}": g.max_class_precision_drop for c in classes}}
    names = {"accuracy": "gate.max_accuracy_drop", "ece": "gate.max_ece_increase",
             "recall": "gate.max_class_recall_drop", "precision": "gate.max_class_precision_drop"}
    if noise is None:
        note = "seed noise not measured on this project (`labelgate calibrate`): configured margins"
        spreads: dict[str, float] = {}
    elif noise.eval_hash != eval_hash:
        note = (f"seed noise was measured on another eval set ({noise.eval_hash[:12]}): not "
                "used; run `labelgate calibrate` again")
        spreads = {}
    elif tuple(noise.classes) != tuple(classes):
        note = "seed noise was measured for other classes: not used; run `labelgate calibrate`"
        spreads = {}
    else:
        note = (f"seed noise measured on this eval set with {len(noise.seeds)} seeds "
                f"({noise.measured_at})")
        pooled = {"recall": _pooled(noise.recall), "precision": _pooled(noise.precision)}
        spreads = {"accuracy": _sd(noise.accuracy), "ece": _sd(noise.ece),
                   **{f"{kind}:{c}": max(_sd(getattr(noise, kind)[c]), pooled[kind])
                      for kind in ("recall", "precision") for c in classes}}
    out, origin = {}, {}
    factor = g.noise_z * math.sqrt(2)  # the sd of a difference of two independent runs
    for key, conf in configured.items():
        from_noise = factor * spreads.get(key, 0.0)
        out[key] = max(conf, from_noise)
        name = names[key.split(":")[0]]
        origin[key] = (f"margin {out[key]:.4f} = {g.noise_z:g} x sqrt 2 x seed spread "
                       f"{spreads[key]:.4f}" if from_noise > conf else
                       f"margin {conf:.4f} ({name}"
                       + (f"; seed noise {from_noise:.4f}" if key in spreads else "") + ")")
    return Margins(accuracy=out["accuracy"], ece=out["ece"],
                   recall={c: out[f"recall:{c}"] for c in classes},
                   precision={c: out[f"precision:{c}"] for c in classes},
                   origin=origin, note=note)
