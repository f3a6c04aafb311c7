"""review: suspected label errors, found with held-out (out-of-fold) predictions.

    python -m pipelines.review --prepared data/prepared --out data/review
        [--features-from models/candidate/model.safetensors]

Every labeled training/validation image gets a prediction from a model that never saw its label
(pipelines/outoffold.py: k small-CNN fits, or linear heads on frozen features for big models).
Confident learning (Northcutt et al., 2021) then flags an image whose given label i is probably
wrong: it is confidently another class j — p_j at least class j's average self-confidence t_j —
while the model is not confident in i. All suspects are written to `data/review/suspects.jsonl`,
least believed first; `summary.json` says how many may be flagged per run (`flag_limit`: a share
of the labeled images, `review.max_new_fraction`, never below `review.min_new`).

`flag()` then sends them back to Label Studio: NEW suspects first, up to the limit (flags still
open from earlier runs stay flagged and do not take slots; a label an annotator confirmed is not
flagged again). Each gets a prediction tagged `labelgate-review` suggesting the other class
(score = the model's belief in the given label), and a saved Data Manager tab "labelgate:
suspected label errors" lists them, least believed first. When annotators re-annotate a flagged
task, the next run records the outcome (relabeled or confirmed) in the flag ledger and removes
the flag.

On a 10,000-task digit project with 131 wrong training labels the old fixed cap of 50 found 38 %
of them, and 160 new systematic 3 -> 5 errors got none of the 50 slots because older open flags
held them: hence a limit that grows with the project and goes to new suspects.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from pipelines import inputspec, net, outoffold, packed, train
from pipelines.files import (append_jsonl, atomic_write_json, atomic_write_jsonl, read_jsonl,
                             utc_now)
from pipelines.labelconfig import choice_result
from pipelines.labelstudio import Studio
from pipelines.settings import Params

REVIEW_VERSION = "labelgate-review"   # model_version of the review flags in Label Studio
VIEW_TITLE = "labelgate: suspected label errors"


def flag_limit(n_images: int, r) -> int:
    """New flags per run for a project of `n_images` labeled images (`r`: params.review)."""
    return max(r.min_new, math.ceil(r.max_new_fraction * n_images))


def confident_errors(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of probable label errors, most suspicious first. Per class j, t_j is the mean
    predicted probability of j over images labeled j; image n (labeled i) is an issue when some
    j != i has p_j >= t_j and p_j is its largest such probability (the confident joint's
    off-diagonal)."""
    k = probs.shape[1]
    thresholds = np.array([probs[y == j, j].mean() if (y == j).any() else 1.0 for j in range(k)])
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -1.0)
    confident = masked.argmax(1)
    has = above.any(1)
    issues = np.flatnonzero(has & (confident != y))
    self_conf = probs[np.arange(len(y)), y]
    return issues[np.argsort(self_conf[issues], kind="stable")]


def run(prepared_dir: str | Path, out_dir: str | Path, *, params: Params,
        features_from: str | Path | None = None) -> dict:
    """data/prepared/{train,val} -> `out_dir`/suspects.jsonl (every suspect, least believed
    first) and summary.json. `features_from`: a model file whose backbone the frozen-feature
    method uses (else it trains one)."""
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    try:
        parts = [packed.read_split(prepared_dir / s) for s in ("train", "val")]
    except packed.PackedError as exc:
        raise train.TrainingError(str(exc)) from None
    # the review sees every labeled image, train and val alike
    y = np.concatenate([p.y for p in parts])
    task_ids = np.concatenate([p.task_id for p in parts])
    classes = params.base.classes
    spec = inputspec.from_params(params)
    probs, method = outoffold.predict([p.x for p in parts], y, task_ids, params=params, spec=spec,
                                      model_file=features_from)
    issues = confident_errors(probs, y)
    rows = [{"task_id": int(task_ids[n]), "label": classes[int(y[n])],
             "suggested": classes[int(probs[n].argmax())],
             "label_probability": round(float(probs[n, y[n]]), 5),
             "suggested_probability": round(float(probs[n].max()), 5)}
            for n in issues]
    acc = float((probs.argmax(1) == y).mean()) if len(y) else 0.0
    summary = {"images": int(len(y)), "folds": params.review.folds, "method": method,
               "out_of_fold_accuracy": round(acc, 5), "suspects": len(rows),
               "flag_limit": flag_limit(len(y), params.review)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "suspects.jsonl", rows)
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def flag(studio: Studio, project_id: int, suspects: list[dict], resolved: list[dict],
         ledger: str | Path, *, limit: int | None = None) -> dict:
    """Send suspects to Label Studio for review; record outcomes of earlier flags.

    `suspects`: most suspicious first; the first `limit` NEW ones are flagged (None: all):
    open flags and confirmed labels are skipped before counting, so older flags never take the
    slots of new errors. `resolved`: data/prepared/resolved.jsonl (the current label and votes
    of every task); `ledger`: the append-only flag ledger ({event: flagged | relabeled |
    confirmed | gone})."""
    ledger = Path(ledger)
    history = read_jsonl(ledger) if ledger.exists() else []
    open_flags: dict[int, dict] = {}
    closed: set[int] = set()
    for e in history:
        if e["event"] == "flagged":
            open_flags[e["task_id"]] = e
        else:
            open_flags.pop(e["task_id"], None)
            if e["event"] == "confirmed":
                closed.add(e["task_id"])
    now = utc_now()
    current = {r["task_id"]: r for r in resolved}
    outcomes = []
    for task_id, f in open_flags.items():
        row = current.get(task_id)
        if row is None:
            outcomes.append({"event": "gone", "task_id": task_id, "at": now})
        elif row.get("votes") != f["votes"]:
            relabeled = row.get("label") != f["label"]
            outcomes.append({"event": "relabeled" if relabeled else "confirmed",
                             "task_id": task_id, "at": now, "from": f["label"],
                             "to": row.get("label"), "votes": row.get("votes")})
    done = {o["task_id"] for o in outcomes}
    new = [s for s in suspects if s["task_id"] not in open_flags and s["task_id"] not in closed
           and s["task_id"] in current]
    waiting = max(0, len(new) - limit) if limit is not None else 0
    new = new if limit is None else new[:limit]
    flagged = [{"event": "flagged", "at": now, **s, "votes": current[s["task_id"]].get("votes")}
               for s in new]
    config = studio.labeling_config(project_id)  # the project's control names
    existing = studio.predictions(project_id, model_version=REVIEW_VERSION)
    stale = [p["id"] for p in existing if p["task"] in done]
    if stale:
        studio.delete_predictions(stale)
    studio.create_predictions(project_id, [
        {"task": s["task_id"], "model_version": REVIEW_VERSION,
         "score": s["label_probability"],
         "result": choice_result(s["suggested"], config)}
        for s in new])
    studio.ensure_view(project_id, VIEW_TITLE, {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:predictions_model_versions", "operator": "contains",
             "type": "List", "value": [REVIEW_VERSION]}]},
        "ordering": ["tasks:predictions_score"]})
    append_jsonl(ledger, outcomes + flagged)  # fsynced, like the registry ledger
    counts = {k: sum(1 for o in outcomes if o["event"] == k)
              for k in ("relabeled", "confirmed", "gone")}
    return {"flagged": len(flagged), "open": len(open_flags) - len(done) + len(flagged),
            "not_flagged_over_limit": waiting, **counts}


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.review", description=__doc__)
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--out", default="data/review")
    ap.add_argument("--features-from", default=None,
                    help="a model file whose backbone gives the features (method frozen_features)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        summary = run(args.prepared, args.out, params=settings.load(args.params),
                      features_from=args.features_from)
    except (train.TrainingError, settings.ParamsError, net.ModelFileError) as exc:
        print(f"review failed: {exc}", file=sys.stderr)
        return 1
    print(f"review: {summary['suspects']} suspected label errors among {summary['images']} "
          f"images ({summary['method']}, out-of-fold accuracy "
          f"{summary['out_of_fold_accuracy']:.4f}); up to {summary['flag_limit']} new flags "
          "per run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
