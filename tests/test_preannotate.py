"""Pre-annotations against the real Label Studio: the production model's suggestions with a
certainty score, the labeling stream ordered most-uncertain-first (Community "Uncertainty
sampling"), and an older model's suggestions retired when production changes."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from pipelines import net, preannotate, registry
from tests import factories

CLASSES = tuple(str(i) for i in range(10))


def make_production(reg, tmp_path, seed: int) -> str:
    """An (untrained) model made production through the registry: sha-verified like any other."""
    torch.manual_seed(seed)
    path = tmp_path / f"m{seed}.safetensors"
    net.save(net.Net(len(CLASSES), 28), path, classes=CLASSES, image_size=28)
    sha, _ = registry.store(reg, path)
    record = {"id": f"m{seed:04d}-{sha[:10]}", "sha256": sha, "eval_hash": "e" * 64,
              "dataset_version": "pulls-000001-x", "metrics": {}}
    with registry.lock(reg):
        registry.make_production(reg, record, event="promoted", via="gate",
                                 previous=(registry.production(reg) or {}).get("id"))
    return record["id"]


def test_certainty_orders_uncertain_first():
    probs = np.array([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3]])
    margin = preannotate.certainty(probs, "margin")
    entropy = preannotate.certainty(probs, "entropy")
    assert margin == pytest.approx([0.0, 0.85, 0.0])
    assert entropy[2] == pytest.approx(0.0, abs=1e-9) and entropy[1] > entropy[0] > entropy[2]
    assert ((0 <= entropy) & (entropy <= 1)).all()


def test_predictions_queue_and_retirement_on_a_real_label_studio(make_project, tmp_path):
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=8)
    st, pid = project["studio"], project["id"]
    params = factories.params({"train.device": "cpu"})
    reg = tmp_path / "registry"

    first = make_production(reg, tmp_path, seed=1)
    out = preannotate.run(st, pid, reg, params=params)
    assert out == {"pushed": 8, "retired": 0, "model_version": first, "image_errors": 0}
    preds = st.predictions(pid)
    assert {p["model_version"] for p in preds} == {first} and len(preds) == 8
    # the labeling stream serves the most uncertain task first
    lowest = min(preds, key=lambda p: p["score"])
    assert st.next_task_id(pid) == lowest["task"]
    # and the Data Manager tab lists the unlabeled tasks in that order
    conn = st.conn
    auth = {"Authorization": f"Token {conn.api_key}"}
    views = httpx.get(f"{conn.url}/api/dm/views?project={pid}", headers=auth).json()
    view = next(v for v in views if v["data"].get("title") == preannotate.QUEUE_VIEW)
    listed = httpx.get(f"{conn.url}/api/tasks?project={pid}&view={view['id']}&fields=task_only",
                       headers=auth).json()["tasks"]
    score = {p["task"]: p["score"] for p in preds}
    assert [t["id"] for t in listed] == sorted(score, key=lambda t: (score[t], t))

    second = make_production(reg, tmp_path, seed=2)
    out = preannotate.run(st, pid, reg, params=params)
    assert out["pushed"] == 8 and out["retired"] == 8 and out["model_version"] == second
    preds = st.predictions(pid)
    assert {p["model_version"] for p in preds} == {second} and len(preds) == 8
    # the stream now ranks by the new model's scores (this user keeps the task it was handed
    # and still holds a lock on, so the ordering is checked through the project's settings)
    assert st.queue_settings(pid) == {"sampling": "Uncertainty sampling", "model_version": second}
    assert st.next_task_id(pid) == lowest["task"]

    # nothing new: nothing pushed twice, nothing retired
    assert preannotate.run(st, pid, reg, params=params)["pushed"] == 0
    assert len(st.predictions(pid)) == 8
