"""preannotate: the production model's predictions for unlabeled tasks, pushed to Label Studio
as pre-annotations tagged with the registry id (`model_version`). Only a registry-verified
production model is ever used: a model that failed the gate never reaches annotators.

Each prediction's score is the model's certainty (`preannotate.uncertainty`: the margin between
the two most likely classes, or 1 - normalised entropy), and the project is switched to Label
Studio's "Uncertainty sampling" on the production model's version: annotators who press "Label
all tasks" get the most uncertain task first. When a new model is promoted, the older models'
predictions on unlabeled tasks are retired (deleted), so annotators only ever see the current
production model's suggestions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import images, net, registry
from pipelines.device import pick_device
from pipelines.labelstudio import ImageFetchError, Studio, choice_result
from pipelines.settings import Params

QUEUE_VIEW = "labelgate: most uncertain first"


def certainty(probs: np.ndarray, how: str) -> np.ndarray:
    """Per row, 0 (as uncertain as it gets) .. 1 (sure): `margin` = top-1 minus top-2
    probability; `entropy` = 1 - entropy / log(K)."""
    if how == "margin":
        top2 = np.sort(probs, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    p = np.clip(probs, 1e-12, 1.0)
    return 1.0 + (p * np.log(p)).sum(1) / np.log(probs.shape[1])


def run(studio: Studio, project_id: int, registry_dir: str | Path, *, params: Params) -> dict:
    device = pick_device(params.train.device)
    loaded = registry.load_production(registry_dir, device=device)
    if loaded is None:
        return {"pushed": 0, "retired": 0, "reason": "no production model"}
    model, classes, image_size, pointer = loaded
    version = pointer["id"]
    unlabeled = studio.unlabeled_tasks(project_id)
    stale = [p["id"] for t in unlabeled for p in t["predictions"]
             if p["model_version"] != version and p["id"] is not None]
    retired = studio.delete_predictions(stale) if stale else 0
    key = params.studio.image_key
    tasks = [t for t in unlabeled if isinstance(t["data"].get(key), str)
             and not any(p["model_version"] == version for p in t["predictions"])]
    arrays, kept, failed = [], [], 0
    for task in tasks:
        try:
            data = studio.fetch_image(task["data"][key], max_bytes=params.pull.max_image_bytes)
            arrays.append(images.to_array(data, image_size))
            kept.append(task["id"])
        except (ImageFetchError, images.BadImage):
            failed += 1  # annotators will see these without a suggestion
    pushed = 0
    if kept:
        probs = net.predict_proba(model, np.stack(arrays), device=device)
        scores = certainty(probs, params.preannotate.uncertainty)
        pushed = studio.create_predictions(project_id, [
            {"task": task_id, "model_version": version, "score": round(float(score), 5),
             "result": choice_result(classes[int(p.argmax())])}
            for task_id, p, score in zip(kept, probs, scores)])
    studio.set_uncertainty_queue(project_id, version)
    # the same order as a Data Manager tab, for people who pick tasks from the list
    studio.ensure_view(project_id, QUEUE_VIEW, {
        "filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number",
             "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal",
             "type": "Number", "value": 0}]},
        "ordering": ["tasks:predictions_score"]})
    return {"pushed": pushed, "retired": retired, "model_version": version,
            "image_errors": failed}
