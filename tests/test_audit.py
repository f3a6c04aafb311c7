"""The pre-annotation acceptance audit on a real Label Studio: annotations started from a
suggestion (`parent_prediction`) are pulled with the suggestion itself, and counted as accepted
unchanged or changed, per annotator and per suggested class."""
from __future__ import annotations

import httpx

from pipelines import audit, pull, rawstore
from pipelines.labelconfig import choice_result
from tests import factories


def test_acceptance_is_counted_from_what_annotators_started_with(make_project, tmp_path):
    project = make_project(limit=20, eval_tasks=2, unlabeled_tasks=4)
    st, pid = project["studio"], project["id"]
    conn = st.conn
    api = httpx.Client(base_url=conn.url, headers={"Authorization": f"Token {conn.api_key}"},
                       timeout=30)
    tasks = [t["id"] for t in st.unlabeled_tasks(pid)][:4]
    st.create_predictions(pid, [{"task": t, "model_version": "m0001-test", "score": 0.5,
                                 "result": choice_result("3")} for t in tasks])
    preds = {p["task"]: p for p in st.predictions(pid, model_version="m0001-test")}
    answers = [("3", False), ("3", False), ("5", False), ("3", True)]  # last one: a skip
    for task_id, (label, skipped) in zip(tasks, answers):
        api.post(f"/api/tasks/{task_id}/annotations/", json={
            "result": [] if skipped else choice_result(label), "was_cancelled": skipped,
            "parent_prediction": preds[task_id]["id"]}).raise_for_status()
    params = factories.params({"studio.project_title": project["title"]})
    pull.run(tmp_path / "raw", studio=st, project_id=pid, params=params)
    state = rawstore.load(tmp_path / "raw")
    assert {preds[t]["id"] for t in tasks} <= set(state.predictions)
    result = audit.acceptance(state)
    assert result["annotations"] == 3 and result["accepted"] == 2 and result["unknown"] == 0
    (who, row), = result["by_annotator"].items()
    assert row == {"n": 3, "accepted": 2, "rate": round(2 / 3, 4)}
    assert result["by_class"] == {"3": {"n": 3, "accepted": 2, "rate": round(2 / 3, 4)}}
