"""The "enough new labels" trigger for `labelgate serve`.

Every `schedule.check_every_s` seconds: an incremental pull (seconds, exactly-once; the flow's
own pull then finds nothing new and trains on that snapshot), then a count of tasks whose
**resolved** label (non-skipped votes, consensus complete under the `prepare` policy) is new or
changed since the dataset version of the last finished run. At `schedule.min_new_labels` or
more it starts one retraining run. A burst of labels therefore causes one run: the check is on
an interval, a run in progress holds the run lock (a second start is skipped and says so), and
a finished run moves the baseline to its dataset version.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from pipelines import pull, rawstore
from pipelines.files import read_json, read_jsonl
from pipelines.layout import Layout
from pipelines.labelconfig import chosen
from pipelines.prepare import task_label
from pipelines.settings import Params


def _seq(version: str | None) -> int:
    """The last snapshot number in a dataset version (`pulls-000007-…` -> 7); 0 if none."""
    return int(version.split("-")[1]) if version and version.startswith("pulls-") else 0


def resolved_label(task: dict, params: Params, choices_name: str) -> str | None:
    """The task's label as validate + prepare would give it, or None (skipped, disputed,
    incomplete, or quarantined for a vote that chose no known class)."""
    votes = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not votes:
        return None
    label, _ = task_label([chosen(a.get("result"), choices_name) for a in votes],
                          [bool(a.get("ground_truth")) for a in votes], params)
    return label


def new_resolved_labels(raw_dir: str | Path, since_version: str | None, *,
                        params: Params) -> int:
    """Tasks with a resolved label that is new or different since `since_version`."""
    raw_dir = Path(raw_dir)
    since = _seq(since_version)
    before, now = rawstore.load(raw_dir, upto=since), rawstore.load(raw_dir)
    changed = {int(t["id"]) for snap in rawstore.snapshot_dirs(raw_dir) if int(snap.name) > since
               for t in read_jsonl(snap / "tasks.jsonl")}
    count = 0
    for task_id in changed:
        task = now.tasks.get(task_id)
        label = resolved_label(task, params, now.choices_name) if task else None
        old = before.tasks.get(task_id)
        if label is not None and label != (resolved_label(old, params, before.choices_name)
                                           if old else None):
            count += 1
    return count


def check(layout: Layout, params: Params, studio, project_id: int) -> dict:
    """One look: pull what changed, count new resolved labels against the last run."""
    pulled = pull.run(layout.raw, studio=studio, project_id=project_id, params=params)
    last = read_json(layout.last_run) if layout.last_run.exists() else {}
    count = new_resolved_labels(layout.raw, last.get("dataset_version"), params=params)
    return {"new_resolved_labels": count, "threshold": params.schedule.min_new_labels,
            "fire": count >= params.schedule.min_new_labels, "pull": pulled}


def watch(layout: Layout, params: Params, studio, project_id: int, start_run: Callable[[], object],
          *, stop: threading.Event, log: Callable[[str], None] = print) -> None:
    """Check every `schedule.check_every_s` until `stop` is set; start a run when due."""
    while not stop.is_set():
        try:
            result = check(layout, params, studio, project_id)
            if result["fire"]:
                log(f"{result['new_resolved_labels']} new resolved labels (>= "
                    f"{result['threshold']}): triggering a retraining run")
                start_run()
        except Exception as exc:  # noqa: BLE001 — a failed look must not end the watcher
            log(f"label trigger: check failed, will retry: {exc}")
        stop.wait(params.schedule.check_every_s)
