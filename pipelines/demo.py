"""The demo project: 1,797 real handwritten digit scans (scikit-learn's copy of the UCI
optical-digits set), imported into Label Studio with annotations the way a small team would
leave them: most tasks labeled once, some twice with the odd disagreement, a few skipped, a
ground-truth subset for the fixed eval set, some left unlabeled for pre-annotations, and a few
bad items (an unknown label, a corrupt file, a file that is not an image) to show quarantine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.labelconfig import choice_result
from pipelines.labelstudio import Studio

SCAN_SIDE = 32          # the 8x8 scans are saved upscaled: PNGs like a small scanner would give
EVAL_TASKS = 300        # ground truth, frozen as data/eval
UNLABELED_TASKS = 120   # left for annotators, pre-annotated by the production model
ANNOTATORS = ("annotator-a", "annotator-b", "annotator-c")


def write_images(folder: Path) -> tuple[list[str], list[int]]:
    """Save the digit scans as PNGs (plus two broken files); return (file names, true labels)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(digits.images):  # (8, 8) floats in 0..16
        name = f"digit-{i:04d}.png"
        if not (folder / name).exists():
            pixels = (img * (255 / 16)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((SCAN_SIDE, SCAN_SIDE),
                                                Image.Resampling.BICUBIC).save(folder / name)
        names.append(name)
    Image.open(folder / names[7]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        folder / "stale-label.png")  # a distinct image for the task with a stale class name
    (folder / "broken-truncated.png").write_bytes((folder / names[0]).read_bytes()[:60])
    (folder / "broken-not-an-image.png").write_bytes(b"this is a text file, not a scan\n")
    return names, [int(t) for t in digits.target]


def _annotation(label: str, user: int, *, ground_truth: bool = False) -> dict:
    # ground_truth must be explicit: Label Studio marks imported annotations as ground truth
    # by default.
    return {"result": choice_result(label), "completed_by": user, "ground_truth": ground_truth}


def seed(studio: Studio, project_id: int, files_root: Path, classes: tuple[str, ...], *,
         seed: int = 0, limit: int | None = None, eval_tasks: int = EVAL_TASKS,
         unlabeled_tasks: int = UNLABELED_TASKS) -> dict:
    """Import the demo tasks (the first `limit` scans, all by default) with their annotations."""
    folder = files_root / "demo"
    names, truth = write_images(folder)
    names, truth = names[:limit], truth[:limit]
    studio.add_local_storage(project_id, str(folder))
    users = [studio.ensure_user(name) for name in ANNOTATORS]
    reviewer = studio.check()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    counts = {"eval_ground_truth": 0, "unlabeled": 0, "single": 0, "double": 0, "skipped": 0,
              "bad": 0}
    tasks = []
    for rank, i in enumerate(order):
        task = {"data": {"image": f"/data/local-files/?d=demo/{names[i]}"}}
        label = classes[truth[i]]
        if rank < eval_tasks:
            task["annotations"] = [_annotation(label, reviewer, ground_truth=True)]
            counts["eval_ground_truth"] += 1
        elif rank < eval_tasks + unlabeled_tasks:
            counts["unlabeled"] += 1
        else:
            r = rng.random()
            a, b = rng.choice(len(users), size=2, replace=False)
            wrong = classes[(truth[i] + 1 + rng.integers(len(classes) - 1)) % len(classes)]
            first = wrong if rng.random() < 0.02 else label  # 2 % annotator slips
            if r < 0.03:
                task["annotations"] = [{"result": [], "was_cancelled": True,
                                        "completed_by": users[a], "ground_truth": False}]
                counts["skipped"] += 1
            elif r < 0.18:
                second = wrong if rng.random() < 0.15 else label  # second opinions disagree
                task["annotations"] = [_annotation(first, users[a]), _annotation(second, users[b])]
                counts["double"] += 1
            else:
                task["annotations"] = [_annotation(first, users[a])]
                counts["single"] += 1
        tasks.append(task)
    # Bad input an annotation pipeline meets in practice: a stale class name, broken files.
    tasks.append({"data": {"image": "/data/local-files/?d=demo/stale-label.png"},
                  "annotations": [_annotation("seven", users[0])]})
    for broken in ("broken-truncated.png", "broken-not-an-image.png"):
        tasks.append({"data": {"image": f"/data/local-files/?d=demo/{broken}"},
                      "annotations": [_annotation(classes[0], users[1])]})
    counts["bad"] = 3
    for start in range(0, len(tasks), 500):
        studio.import_tasks(project_id, tasks[start:start + 500])
    counts["tasks"] = len(tasks)
    return counts
