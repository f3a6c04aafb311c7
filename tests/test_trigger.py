"""The label trigger counts a task exactly when validate + prepare would give it a label."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from pipelines import prepare, rawstore, trigger, validate  # noqa: E402
from pipelines.files import read_jsonl  # noqa: E402
from tests import factories  # noqa: E402
from tests.factories import ls_task, task_url  # noqa: E402


def test_trigger_and_validate_agree_on_every_vote_pattern(tmp_path):
    digits = factories.digits_by_class(3)
    entries = [(ls_task(n + 1, str(cls), url=task_url(f"d{i}.png")), data)
               for n, (i, data, cls) in enumerate(digits)]
    spare = iter(factories.digits_by_class(1, start=digits[-1][0] + 1))
    patterns = {"stale class in a majority": ["3", "seven", "3"], "majority": ["3", "8", "3"],
                "tie": ["3", "8"], "no choice": ["3", None, "3"], "all stale": ["seven"]}
    ids = {}
    for name, votes in patterns.items():
        ids[name] = len(entries) + 1
        entries.append((ls_task(ids[name], votes, url=task_url(f"{name}.png")), next(spare)[1]))
    raw = tmp_path / "raw"
    factories.write_store(raw, entries)
    params = factories.params({"validate.min_per_class": 1})
    validate.run(raw, tmp_path / "validated", params=params)
    manifest = {r["task_id"]: r for r in read_jsonl(tmp_path / "validated" / "manifest.jsonl")}
    state = rawstore.load(raw)
    for name, task_id in ids.items():
        # the label the pipeline gives the task: quarantined -> none; else the consensus
        row = manifest.get(task_id)
        expected = (prepare.task_label(row["labels"], row["ground_truth"], params)[0]
                    if row else None)
        got = trigger.resolved_label(state.tasks[task_id], params, state.choices_name)
        assert got == expected, name
    assert trigger.resolved_label(state.tasks[ids["majority"]], params, state.choices_name) == "3"
    assert ids["stale class in a majority"] not in manifest  # quarantined by validate ...
    # ... so the trigger does not count it (it used to: 2 of 3 votes for "3")
    assert trigger.new_resolved_labels(raw, None, params=params) == len(digits) + 1
