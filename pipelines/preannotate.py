"""preannotate: the production model's predictions for unlabeled tasks, pushed to Label Studio
as pre-annotations tagged with the registry id (`model_version`). Only a registry-verified
production model is ever used: a model that failed the gate never reaches annotators.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines import images, net, registry
from pipelines.device import pick_device
from pipelines.labelstudio import ImageFetchError, Studio, choice_result
from pipelines.settings import Params


def run(studio: Studio, project_id: int, registry_dir: str | Path, *, params: Params) -> dict:
    device = pick_device(params.train.device)
    loaded = registry.load_production(registry_dir, device=device)
    if loaded is None:
        return {"pushed": 0, "reason": "no production model"}
    model, classes, image_size, pointer = loaded
    tasks = [t for t in studio.unlabeled_tasks(project_id, without_model_version=pointer["id"])
             if isinstance(t["data"].get(params.studio.image_key), str)]
    arrays, kept, failed = [], [], 0
    for task in tasks:
        try:
            data = studio.fetch_image(task["data"][params.studio.image_key],
                                      max_bytes=params.pull.max_image_bytes)
            arrays.append(images.to_array(data, image_size))
            kept.append(task["id"])
        except (ImageFetchError, images.BadImage):
            failed += 1  # annotators will see these without a suggestion
    if not kept:
        return {"pushed": 0, "model_version": pointer["id"], "image_errors": failed}
    probs = net.predict_proba(model, np.stack(arrays), device=device)
    predictions = [{"task": task_id, "model_version": pointer["id"],
                    "score": round(float(p.max()), 5),
                    "result": choice_result(classes[int(p.argmax())])}
                   for task_id, p in zip(kept, probs)]
    pushed = studio.create_predictions(project_id, predictions)
    return {"pushed": pushed, "model_version": pointer["id"], "image_errors": failed}
