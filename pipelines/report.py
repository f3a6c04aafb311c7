"""report: the promotion review report, its own stage after the decision.

    python -m pipelines.report --decision reports/gate/decision.json \
        --evaluation reports/evaluation --latency reports/latency.json --out reports/gate

Writes report.html (the page a reviewer reads) and report.md (the Prefect artifact), rendered by
pipelines/reviewpage.py. It reads the data, the label review, the raw store and the measured
latency only to explain the verdict: the decision (pipelines/gate.py) depends on none of them,
so none of them can change or re-run it.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pipelines import audit, evalset, rawstore
from pipelines.files import atomic_write_bytes, read_json, read_jsonl
from pipelines.records import Decision, Evaluation, Predictions, RecordError, read_evaluation
from pipelines.reviewpage import html_page, latency_note, markdown
from pipelines.settings import Params


def _data_changes(evaluation: Evaluation, *, raw: Path, validated: Path, prepared: Path) -> dict:
    """What changed in the data since production's dataset version (counts only)."""
    prod = evaluation.production
    out: dict = {"production_train_counts": prod.train_class_counts if prod else None}
    if (prepared / "summary.json").exists():
        summary = read_json(prepared / "summary.json")
        out["candidate_train_counts"] = summary.get("train_class_counts")
        for key in ("excluded_eval_overlap", "excluded_near_duplicates", "disputed"):
            out[key] = summary.get(key, 0)
    if (validated / "summary.json").exists():
        out["quarantine"] = read_json(validated / "summary.json").get("quarantine_reasons", {})
    version = (prod.dataset_version if prod else None) or ""
    since = int(version.split("-")[1]) if version.startswith("pulls-") else 0
    totals = {"added": 0, "changed": 0, "removed": 0}
    for snap in rawstore.snapshot_dirs(raw):
        if int(snap.name) > since and (snap / "changes.json").exists():
            for k, ids in read_json(snap / "changes.json").items():
                totals[k] = totals.get(k, 0) + len(ids)
    out.update(totals)
    return out


def context(evaluation: Evaluation, predictions: Predictions, *, params: Params,
            latency: dict | None,
            eval_dir: Path, candidate_dir: Path, raw: Path, validated: Path, prepared: Path,
            review: Path) -> dict:
    """Everything the page shows besides the decision and the evaluation; a missing input
    (no raw store, no review yet) leaves its section out."""
    history = []
    if (candidate_dir / "history.csv").exists():
        with open(candidate_dir / "history.csv", newline="") as f:
            history = list(csv.DictReader(f))
    meta = rawstore.latest_meta(raw) if raw.exists() else None
    return {"predictions": predictions, "history": history, "latency": latency,
            "latency_budget_ms": params.gate.max_latency_ms_p95,
            "background": params.input.background,  # thumbnails' transparency, as the model sees it
            "images": evalset.image_bytes(eval_dir) if (eval_dir / "meta.json").exists() else {},
            "ls": ({"url": meta.get("label_studio_url"), "project_id": meta["project_id"]}
                   if meta else None),
            "data": _data_changes(evaluation, raw=raw, validated=validated, prepared=prepared),
            "acceptance": audit.acceptance(rawstore.load(raw)) if meta else None,
            "suspects": (read_jsonl(review / "suspects.jsonl")
                         if (review / "suspects.jsonl").exists() else None),
            "flag_limit": (read_json(review / "summary.json").get("flag_limit")
                           if (review / "summary.json").exists() else None)}


def run(decision_file: str | Path, evaluation_dir: str | Path, out_dir: str | Path, *,
        params: Params, latency_file: str | Path | None = None,
        eval_dir: str | Path = "data/eval", candidate_dir: str | Path = "models/candidate",
        raw: str | Path = "data/raw", validated: str | Path = "data/validated",
        prepared: str | Path = "data/prepared", review: str | Path = "data/review") -> Path:
    """decision.json + the evaluation (+ the data, for context) -> `out_dir`/report.md and
    report.html; returns the page's path."""
    decision = Decision.read(decision_file)
    evaluation, predictions = read_evaluation(evaluation_dir)
    if decision.eval_hash != evaluation.eval_hash or (
            decision.candidate_sha256 != evaluation.candidate.sha256):
        raise RecordError(f"the decision is about candidate {decision.candidate_sha256[:12]} "
                          f"on eval set {decision.eval_hash[:12]}, the evaluation about "
                          f"{evaluation.candidate.sha256[:12]} on {evaluation.eval_hash[:12]}: "
                          "run the gate again", source=str(decision_file))
    latency = (read_json(latency_file) if latency_file is not None and Path(latency_file).exists()
               else None)
    ctx = context(evaluation, predictions, params=params, latency=latency, eval_dir=Path(eval_dir),
                  candidate_dir=Path(candidate_dir), raw=Path(raw), validated=Path(validated),
                  prepared=Path(prepared), review=Path(review))
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "report.md", markdown(decision, evaluation, ctx).encode())
    return atomic_write_bytes(out_dir / "report.html",
                              html_page(decision, evaluation, ctx).encode())


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.report", description=__doc__)
    ap.add_argument("--decision", default="reports/gate/decision.json")
    ap.add_argument("--evaluation", default="reports/evaluation")
    ap.add_argument("--latency", default="reports/latency.json")
    ap.add_argument("--eval", default="data/eval")
    ap.add_argument("--candidate", default="models/candidate")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--validated", default="data/validated")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--review", default="data/review")
    ap.add_argument("--out", default="reports/gate")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = settings.load(args.params)
    try:
        page = run(args.decision, args.evaluation, args.out, params=params,
                   latency_file=args.latency, eval_dir=args.eval, candidate_dir=args.candidate,
                   raw=args.raw, validated=args.validated, prepared=args.prepared,
                   review=args.review)
    except RecordError as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    latency = read_json(args.latency) if Path(args.latency).exists() else None
    print(f"report: {page} (latency {latency_note(latency, params.gate.max_latency_ms_p95)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
