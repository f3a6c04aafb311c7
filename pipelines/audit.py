"""The pre-annotation acceptance audit: how often annotators submitted the suggested label
unchanged, per annotator and per suggested class. A pre-filled answer can bias people; a rate
near 100 % for one annotator, or for one class, is worth a look.

Reads the raw store: each annotation's `parent_prediction` (the suggestion it started from) and
the predictions the pull stored beside it (rawstore `predictions.jsonl`).
"""
from __future__ import annotations

from collections import defaultdict

from pipelines import rawstore
from pipelines.labelconfig import chosen


def acceptance(state: rawstore.RawState) -> dict:
    """{"annotations": n pre-annotated, "accepted": n unchanged, "unknown": n whose suggestion
    is no longer known, "by_annotator": {id: {n, accepted, rate}}, "by_class": {...}}."""
    by_annotator: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    by_class: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    total = accepted = unknown = 0
    for task in state.tasks.values():
        for ann in task.get("annotations") or []:
            parent = ann.get("parent_prediction")
            if not isinstance(parent, int) or ann.get("was_cancelled"):
                continue
            pred = state.predictions.get(parent)
            suggested = chosen(pred.get("result"), state.choices_name) if pred else None
            if suggested is None:
                unknown += 1
                continue
            same = chosen(ann.get("result"), state.choices_name) == suggested
            total += 1
            accepted += same
            for table, key in ((by_annotator, str(ann.get("completed_by"))),
                               (by_class, suggested)):
                table[key][0] += 1
                table[key][1] += same

    def rows(table):
        return {k: {"n": n, "accepted": a, "rate": round(a / n, 4)}
                for k, (n, a) in sorted(table.items())}
    return {"annotations": total, "accepted": accepted, "unknown": unknown,
            "by_annotator": rows(by_annotator), "by_class": rows(by_class)}
