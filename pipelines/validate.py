"""validate: raw snapshots -> manifest (one row per accepted image) + quarantine (one row per
rejected task, with its reason) + the Great Expectations result.

Every annotated task in the raw store ends up in exactly one of manifest.jsonl and
quarantine.jsonl; summary.json shows the counts adding up. A failed blocking expectation (too few
examples of a class) stops the pipeline here, before training, with a readable message.

    python -m pipelines.validate --raw data/raw --out data/validated
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipelines import images, inputspec, rawstore
from pipelines.files import atomic_write_json, atomic_write_jsonl
from pipelines.labelconfig import chosen
from pipelines.settings import Params


class ValidationFailed(RuntimeError):
    pass


def _annotator(annotation: dict) -> str:
    who = annotation.get("completed_by")
    return str(who.get("id") if isinstance(who, dict) else who)


def collect(state: rawstore.RawState, params: Params) -> tuple[list[dict], list[dict], list[dict]]:
    """(candidate manifest rows, annotation rows, quarantine rows) before the GE suites."""
    rows, votes, quarantine = [], [], []
    name = state.choices_name
    spec = inputspec.from_params(params)  # the blank check runs on what the model would see
    for task_id in sorted(state.tasks):
        task = state.tasks[task_id]
        annotations = task.get("annotations") or []
        live = [a for a in annotations if not a.get("was_cancelled")]
        skipped = len(annotations) - len(live)

        def reject(kind: str, reason: str) -> None:
            quarantine.append({"task_id": task_id, "kind": kind, "reason": reason,
                               "annotation_ids": [a.get("id") for a in annotations]})

        if not live:
            reject("skipped", f"skipped by every annotator ({skipped} skip(s)), no label")
            continue
        image = state.images.get(task_id) or {}
        if image.get("error") or not image.get("sha256"):
            reject("image unavailable", image.get("error") or "image not fetched")
            continue
        sha = image["sha256"]
        if sha not in state.packs:
            reject("image unavailable", "image bytes missing from the raw store")
            continue
        try:
            info = images.inspect(state.image_bytes(sha), channels=spec.channels,
                                  background=spec.background)
        except images.BadImage as exc:
            reject("bad image", str(exc))
            continue
        for a in live:
            votes.append({"task_id": task_id, "annotation_id": a.get("id"), "label": chosen(a.get("result"), name),
                          "annotator": _annotator(a), "ground_truth": bool(a.get("ground_truth"))})
        rows.append({
            "task_id": task_id,
            "annotation_ids": [a.get("id") for a in live],
            "annotators": [_annotator(a) for a in live],
            "labels": [chosen(a.get("result"), name) for a in live],
            "ground_truth": [bool(a.get("ground_truth")) for a in live],
            "skipped": skipped, "n_votes": len(live),
            "image_sha256": sha, "image_url": image.get("url"),
            "width": info.width, "height": info.height, "mode": info.mode, "format": info.format,
        })
    return rows, votes, quarantine


def run(raw_dir: str | Path, out_dir: str | Path, *, params: Params) -> dict:
    from validation import suites  # GE import costs ~3 s: only when validating

    out_dir = Path(out_dir)
    state = rawstore.load(raw_dir)
    if not state.tasks:
        raise ValidationFailed(f"{raw_dir} holds no annotated tasks: run `labelgate pull` first")
    rows, votes, quarantine = collect(state, params)
    v = params.validate

    def quarantined(row: dict, kind: str, reason: str) -> None:
        quarantine.append({"task_id": row["task_id"], "kind": kind, "reason": reason,
                           "annotation_ids": row["annotation_ids"]})

    vote_df = pd.DataFrame(votes, columns=["task_id", "annotation_id", "label", "annotator",
                                           "ground_truth"])
    by_votes = suites.run_suite(suites.annotation_suite(params.base.classes), vote_df)
    # Duplicates are resolved among rows whose labels passed, so a valid copy of an image is
    # never rejected in favour of a copy that is itself rejected.
    first_task_of_image: dict[str, int] = {}
    labeled = []
    for row in rows:
        if row["task_id"] in by_votes.flagged:
            quarantined(row, *by_votes.flagged[row["task_id"]])
        elif row["image_sha256"] in first_task_of_image:
            quarantined(row, "duplicate image",
                        f"same image as task {first_task_of_image[row['image_sha256']]}")
        else:
            first_task_of_image[row["image_sha256"]] = row["task_id"]
            labeled.append(row)
    manifest_df = pd.DataFrame(labeled, columns=["task_id", "image_sha256", "width", "height",
                                                 "mode", "n_votes"])
    by_rows = suites.run_suite(suites.manifest_suite(allowed_modes=v.allowed_modes,
                                                     min_side=v.min_side, max_side=v.max_side),
                               manifest_df)
    accepted = []
    for row in labeled:
        if row["task_id"] in by_rows.flagged:
            quarantined(row, *by_rows.flagged[row["task_id"]])
        else:
            accepted.append(row)

    # Which classes the accepted rows vote for, at least once (consensus happens in prepare).
    counts = {c: 0 for c in params.base.classes}
    for row in accepted:
        for label in set(row["labels"]):
            counts[label] += 1
    count_df = pd.DataFrame({"label": list(counts), "count": list(counts.values())})
    by_counts = suites.run_suite(suites.class_count_suite(params.base.classes, v.min_per_class),
                                 count_df, key="label")

    quarantine.sort(key=lambda q: q["task_id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out_dir / "manifest.jsonl", accepted)
    atomic_write_jsonl(out_dir / "quarantine.jsonl", quarantine)
    atomic_write_json(out_dir / "ge_result.json", {"annotations": by_votes.result,
                                                   "manifest": by_rows.result,
                                                   "class_counts": by_counts.result})
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["kind"]] = reasons.get(q["kind"], 0) + 1
    summary = {"tasks": len(state.tasks), "accepted": len(accepted),
               "quarantined": len(quarantine), "quarantine_reasons": reasons,
               "class_counts": counts, "snapshots": state.snapshots,
               "suite_success": by_counts.success}
    assert summary["accepted"] + summary["quarantined"] == summary["tasks"], summary
    atomic_write_json(out_dir / "summary.json", summary)
    if not by_counts.success:
        short = {c: n for c, n in counts.items() if n < v.min_per_class}
        raise ValidationFailed(
            f"data contract failed, stopping before training: {'; '.join(by_counts.blocking)}. "
            f"Classes below validate.min_per_class={v.min_per_class}: {short}. "
            "Label more examples of these classes or lower the minimum.")
    return summary


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.validate", description=__doc__)
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--out", default="data/validated")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        summary = run(args.raw, args.out, params=settings.load(args.params))
    except (ValidationFailed, settings.ParamsError, rawstore.CorruptStore) as exc:
        print(f"validate failed: {exc}", file=sys.stderr)
        return 1
    print(f"validate: {summary['accepted']} accepted, {summary['quarantined']} quarantined "
          f"{summary['quarantine_reasons']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
