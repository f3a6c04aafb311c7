"""preannotate: the production model's predictions for unlabeled tasks, pushed to Label Studio
as pre-annotations tagged with the registry id (`model_version`). Only a registry-verified
production model is ever used: a model that failed the gate never reaches annotators.

Each prediction's score is the model's certainty (`preannotate.uncertainty`: the margin between
the two most likely classes, or 1 - normalised entropy), and the project is switched to Label
Studio's "Uncertainty sampling" on the production model's version: annotators who press "Label
all tasks" get the most uncertain task first. When a new model is promoted, the older models'
predictions on unlabeled tasks are retired (deleted), so annotators only ever see the current
production model's suggestions.

`run` is the reconcile "Label Studio shows the current production model": idempotent, it
brings Label Studio to the pointer from whatever state it finds (a model change, a crash
half-way through an earlier sync, new unlabeled tasks). The flow calls it on every run; the
reviewer commands that move the pointer (approve, rollback, evalset rebaseline) call it through
`studiosync.StudioSync` right after the change. When Label Studio cannot be reached then, the change
stands and the sync happens on the next run or command.
"""
from __future__ import annotations

from pathlib import Path

from pipelines import predict, registry
from pipelines.device import pick_device
from pipelines.files import exclusive
from pipelines.labelconfig import choice_result
from pipelines.labelstudio import ImageFetchError, Studio
from pipelines.settings import Params

QUEUE_VIEW = "labelgate: most uncertain first"


def run(studio: Studio, project_id: int, registry_dir: str | Path, *, params: Params) -> dict:
    """Make Label Studio show the production model: its predictions on every unlabeled task,
    other labelgate models' predictions on unlabeled tasks retired (annotators' own and other
    tools' predictions are left alone), the queue ordered by its uncertainty. Idempotent."""
    registry_dir = Path(registry_dir)
    if registry.production(registry_dir) is None:
        return {"pushed": 0, "retired": 0, "reason": "no production model"}
    # one sync at a time (a reviewer's rollback and a flow run may meet): two would push the
    # same task's suggestion twice
    with exclusive(registry_dir / ".studio.lock", wait=True):
        return _sync(studio, project_id, registry_dir, params=params)


def _sync(studio: Studio, project_id: int, registry_dir: Path, *, params: Params) -> dict:
    model = predict.load_production(registry_dir, device=pick_device(params.train.device))
    if model is None:  # `run` checked; the pointer is read again here, so say it again
        return {"pushed": 0, "retired": 0, "reason": "no production model"}
    version = model.version
    ours = registry.model_ids(registry_dir)
    unlabeled = studio.unlabeled_tasks(project_id)
    stale = [p["id"] for t in unlabeled for p in t["predictions"]
             if p["model_version"] != version and p["model_version"] in ours
             and p["id"] is not None]
    retired = studio.delete_predictions(stale) if stale else 0
    config = studio.labeling_config(project_id)  # the project's control names and image key
    key = config.image_key
    tasks = [t for t in unlabeled if isinstance(t["data"].get(key), str)
             and not any(p["model_version"] == version for p in t["predictions"])]
    answers = predict.predict_images(
        model, tasks,
        lambda task: studio.fetch_image(task["data"][key], max_bytes=params.pull.max_image_bytes),
        how=params.preannotate.uncertainty, errors=(ImageFetchError,))
    ready = [(task["id"], p) for task, p in answers if isinstance(p, predict.Prediction)]
    failed = len(answers) - len(ready)  # annotators will see these without a suggestion
    pushed = 0
    if ready:
        pushed = studio.create_predictions(project_id, [
            {"task": task_id, "model_version": version, "score": round(p.certainty, 5),
             "result": choice_result(p.label, config)} for task_id, p in ready])
    # Label Studio refuses (400) a queue model_version no prediction carries: a project whose
    # tasks are all labeled (or whose unlabeled images all failed) has no queue to order yet
    if pushed or any(p["model_version"] == version for t in unlabeled for p in t["predictions"]):
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



def describe(result: dict) -> str:
    """One line for a person: what `run` did."""
    if result.get("reason"):
        return f"Label Studio unchanged: {result['reason']}"
    return (f"Label Studio follows {result['model_version']}: {result['pushed']} unlabeled tasks "
            f"got its suggestions, {result['retired']} older suggestions retired"
            + (f", {result['image_errors']} images unreadable" if result["image_errors"] else ""))
