"""Suspected label errors: confident learning on out-of-fold predictions finds planted wrong
labels in the real demo scans, and the flags reach annotators in a real Label Studio (a
prediction tag + a saved Data Manager tab), with outcomes recorded once they re-annotate."""
from __future__ import annotations

import httpx
import numpy as np

from pipelines import images, review
from pipelines.files import read_jsonl
from tests import factories


def test_confident_errors_picks_the_confidently_other_class():
    y = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9],   # 3rd: labeled 0, clearly a 1
                      [0.2, 0.8], [0.3, 0.7], [0.7, 0.3]])  # 6th: labeled 1, leans 0
    # t_0 = mean(0.9, 0.8, 0.1) = 0.6, t_1 = mean(0.8, 0.7, 0.3) = 0.6
    assert review.confident_errors(probs, y).tolist() == [2, 5]  # least believed first


def test_planted_wrong_labels_are_found_in_the_demo_scans():
    params = factories.params({"train.device": "cpu", "review.epochs": 5})
    n = factories.digit_count()
    truth = np.array([factories.digit_label(i) for i in range(n)])
    x = images.stack([factories.digit_png(i) for i in range(n)], params.base.image_size)
    rng = np.random.default_rng(0)
    planted = rng.choice(n, 20, replace=False)
    y = truth.copy()
    y[planted] = (truth[planted] + rng.integers(1, 10, 20)) % 10
    probs = review.out_of_fold(x, y, np.arange(n), params=params)
    found = review.confident_errors(probs, y)[:params.review.max_suspects]
    hits = len(set(found.tolist()) & set(planted.tolist()))
    assert hits >= 15, (hits, len(found))             # recall >= 75 % (measured: 17 of 20)
    assert hits / len(found) >= 0.8, (hits, len(found))  # and few false alarms (measured: 0)


def _api(project, method, path, **kw):
    conn = project["studio"].conn
    r = httpx.request(method, conn.url + path, headers={"Authorization": f"Token {conn.api_key}"},
                      timeout=30, **kw)
    r.raise_for_status()
    return r.json() if r.content else None


def test_flags_reach_label_studio_and_outcomes_are_recorded(make_project, tmp_path):
    project = make_project(limit=30, eval_tasks=4, unlabeled_tasks=4)
    st, pid = project["studio"], project["id"]
    tasks = _api(project, "GET", f"/api/tasks?project={pid}&fields=all&page_size=100")
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    labeled = [t for t in tasks if t["annotations"] and not t["annotations"][0]["was_cancelled"]
               and t["annotations"][0]["result"]][:3]
    resolved = [{"task_id": t["id"], "label": t["annotations"][0]["result"][0]["value"]
                 ["choices"][0], "votes": {"x": 1}} for t in labeled]
    suspects = [{"task_id": r["task_id"], "label": r["label"],
                 "suggested": "7" if r["label"] != "7" else "1",
                 "label_probability": 0.01 * (i + 1), "suggested_probability": 0.9}
                for i, r in enumerate(resolved[:2])]
    ledger = tmp_path / "flags.jsonl"

    out = review.flag(st, pid, suspects, resolved, ledger)
    assert out == {"flagged": 2, "open": 2, "relabeled": 0, "confirmed": 0, "gone": 0}
    flags = st.predictions(pid, model_version=review.REVIEW_VERSION)
    assert sorted(p["task"] for p in flags) == sorted(s["task_id"] for s in suspects)
    # the saved tab annotators open lists exactly the flagged tasks, least believed first
    views = _api(project, "GET", f"/api/dm/views?project={pid}")
    view = next(v for v in views if v["data"].get("title") == review.VIEW_TITLE)
    listed = _api(project, "GET", f"/api/tasks?project={pid}&view={view['id']}&fields=task_only")
    assert [t["id"] for t in listed["tasks"]] == [s["task_id"] for s in suspects]

    # running again with the same suspects adds nothing
    assert review.flag(st, pid, suspects, resolved, ledger)["flagged"] == 0
    assert len(st.predictions(pid, model_version=review.REVIEW_VERSION)) == 2

    # an annotator relabels the first flagged task; the second is re-annotated unchanged
    first, second = suspects
    resolved[0] = {**resolved[0], "label": first["suggested"], "votes": {first["suggested"]: 1}}
    resolved[1] = {**resolved[1], "votes": {second["label"]: 2}}
    out = review.flag(st, pid, suspects, resolved, ledger)
    assert out["relabeled"] == 1 and out["confirmed"] == 1 and out["open"] == 0
    assert st.predictions(pid, model_version=review.REVIEW_VERSION) == []      # flags removed
    events = read_jsonl(ledger)
    assert [e["event"] for e in events] == ["flagged", "flagged", "relabeled", "confirmed"]
    assert events[2]["from"] == first["label"] and events[2]["to"] == first["suggested"]
    # a confirmed label is not flagged again
    assert review.flag(st, pid, [second], resolved, ledger)["flagged"] == 0
