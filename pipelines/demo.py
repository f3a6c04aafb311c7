"""The demo projects: a data set from pipelines/datasets.py (the digit scans by default, the
Twemoji colour drawings with `--dataset emoji`), imported into Label Studio with annotations the
way a small team would leave them: most tasks labeled once, some twice with the odd
disagreement, a few skipped, a ground-truth subset for the fixed eval set, some left unlabeled
for pre-annotations, and a few bad items (a stale class name, a corrupt file, a file that is
not an image) to show quarantine.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import datasets
from pipelines.datasets import SCAN_SIDE  # noqa: F401  (re-exported: tests/benchmarks use it)
from pipelines.labelconfig import choice_result
from pipelines.labelstudio import Studio

EVAL_TASKS = datasets.get("digits").eval_tasks          # ground truth, frozen as data/eval
UNLABELED_TASKS = datasets.get("digits").unlabeled_tasks
ANNOTATORS = ("annotator-a", "annotator-b", "annotator-c")
SLIP_RATE = 0.02       # an annotator picks a wrong class on 2 % of first annotations
DISAGREE_RATE = 0.15   # a second opinion disagrees on 15 % of doubly annotated tasks
SKIP_RATE = 0.03       # tasks an annotator skipped
DOUBLE_RATE = 0.15     # tasks annotated twice


def write_dataset(folder: Path, dataset: datasets.Dataset) -> tuple[list[str], list[int]]:
    """Save the set's images (plus a mirrored copy for the stale label and two broken files)
    into `folder`; return (file names, true label indices)."""
    items = dataset.items()
    folder.mkdir(parents=True, exist_ok=True)
    for item in items:
        if not (folder / item.name).exists():
            (folder / item.name).write_bytes(item.data)
    Image.open(folder / items[7].name).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        folder / "stale-label.png")  # a distinct image for the task with a stale class name
    (folder / "broken-truncated.png").write_bytes((folder / items[0].name).read_bytes()[:60])
    (folder / "broken-not-an-image.png").write_bytes(b"this is a text file, not a scan\n")
    return [i.name for i in items], [i.label for i in items]


def write_images(folder: Path) -> tuple[list[str], list[int]]:
    """The digit scans as PNGs (plus the bad files); (file names, true labels)."""
    return write_dataset(folder, datasets.get("digits"))


def _annotation(label: str, user: int, *, ground_truth: bool = False) -> dict:
    # ground_truth must be explicit: Label Studio marks imported annotations as ground truth
    # by default.
    return {"result": choice_result(label), "completed_by": user, "ground_truth": ground_truth}


def seed(studio: Studio, project_id: int, files_root: Path, classes: tuple[str, ...], *,
         seed: int = 0, limit: int | None = None, eval_tasks: int | None = None,
         unlabeled_tasks: int | None = None, dataset: str = "digits") -> dict:
    """Import the demo tasks (the first `limit` images of `dataset`, all by default) with their
    annotations. `classes` are the project's names for the set's classes, in the set's order."""
    ds = datasets.get(dataset)
    if len(classes) != len(ds.classes):
        raise datasets.DatasetError(f"the {dataset} set has {len(ds.classes)} classes, the "
                                    f"project {len(classes)}")
    eval_tasks = ds.eval_tasks if eval_tasks is None else eval_tasks
    unlabeled_tasks = ds.unlabeled_tasks if unlabeled_tasks is None else unlabeled_tasks
    folder = files_root / ds.folder
    names, truth = write_dataset(folder, ds)
    names, truth = names[:limit], truth[:limit]
    # Label Studio compares the path with its document root as text: no symlinks in it
    studio.add_local_storage(project_id, str(folder.resolve()))
    users = [studio.ensure_user(name) for name in ANNOTATORS]
    reviewer = studio.check()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    roles = datasets.eval_roles([truth[i] for i in order], eval_tasks=eval_tasks,
                                unlabeled_tasks=unlabeled_tasks, classes=len(classes),
                                stratified=ds.stratified_eval)
    counts = {"eval_ground_truth": 0, "unlabeled": 0, "single": 0, "double": 0, "skipped": 0,
              "slips": 0, "bad": 0}
    tasks = []
    for role, i in zip(roles, order):
        task = {"data": {"image": f"/data/local-files/?d={ds.folder}/{names[i]}"}}
        label = classes[truth[i]]
        if role == "eval":
            task["annotations"] = [_annotation(label, reviewer, ground_truth=True)]
            counts["eval_ground_truth"] += 1
        elif role == "unlabeled":
            counts["unlabeled"] += 1
        else:
            r = rng.random()
            a, b = rng.choice(len(users), size=2, replace=False)
            wrong = classes[(truth[i] + 1 + rng.integers(len(classes) - 1)) % len(classes)]
            first = wrong if rng.random() < SLIP_RATE else label
            if r < SKIP_RATE:
                task["annotations"] = [{"result": [], "was_cancelled": True,
                                        "completed_by": users[a], "ground_truth": False}]
                counts["skipped"] += 1
            elif r < SKIP_RATE + DOUBLE_RATE:
                second = wrong if rng.random() < DISAGREE_RATE else label
                task["annotations"] = [_annotation(first, users[a]), _annotation(second, users[b])]
                counts["double"] += 1
                counts["slips"] += (first != label) + (second != label)
            else:
                task["annotations"] = [_annotation(first, users[a])]
                counts["single"] += 1
                counts["slips"] += first != label
        tasks.append(task)
    # Bad input an annotation pipeline meets in practice: a stale class name, broken files.
    tasks.append({"data": {"image": f"/data/local-files/?d={ds.folder}/stale-label.png"},
                  "annotations": [_annotation(ds.stale_label, users[0])]})
    for broken in ("broken-truncated.png", "broken-not-an-image.png"):
        tasks.append({"data": {"image": f"/data/local-files/?d={ds.folder}/{broken}"},
                      "annotations": [_annotation(classes[0], users[1])]})
    counts["bad"] = 3
    for start in range(0, len(tasks), 500):
        studio.import_tasks(project_id, tasks[start:start + 500])
    counts["tasks"] = len(tasks)
    return counts


def workspace(dest: Path, *, studio: Studio, project_id: int, dataset: datasets.Dataset,
              studio_dir: Path) -> Path:
    """The demo project's own labelgate workspace at `dest`, written once by `labelgate init`
    (pipelines.workspace) with the set's params (input spec, recipe). Its `.labelgate/studio`
    links to the checkout's embedded Label Studio (`studio_dir`), so `labelgate --root DEST
    pull | run` there finds the server and its key as the demo did."""
    from pipelines import workspace as ws
    from pipelines.layout import Layout
    dest = Path(dest)
    if not ((dest / "params.yaml").exists() and (dest / "dvc.yaml").exists()):
        # force: a folder an interrupted earlier demo left is ours to complete
        ws.init(dest, connection=studio.conn, project=project_id,
                overrides=dict(dataset.params), force=dest.exists())
    link = Layout(dest).studio
    if not link.exists() and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(Path(studio_dir).resolve(), link.parent.resolve()),
                        target_is_directory=True)
    return dest.resolve()
