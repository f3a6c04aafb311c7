"""gate: regression tests of the candidate against production -> decision.json, report.md and
report.html (the review page).

    python -m pipelines.gate --evaluation reports/evaluation --out reports/gate

The tests live in validation/regression.py; thresholds in params.yaml `gate`. The first model
(no production yet) is judged on the absolute tests alone. Exit code 0 whatever the verdict: a
FAIL is a result, not an error (promote reads the decision). Exit code 1 when the eval set is
not the one production was judged on: comparing numbers from two eval sets is refused.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from pipelines import audit, evaluate, evalset, rawstore, report
from pipelines.files import atomic_write_bytes, atomic_write_json, read_json, read_jsonl
from pipelines.settings import Params
from validation import regression


class GateError(RuntimeError):
    pass


def action(verdict: str, params: Params) -> str:
    """What happens next, in words (the report's first line after the verdict)."""
    if verdict == regression.PASS:
        return "Promote: the candidate becomes the production model."
    if verdict == regression.FAIL:
        return "Reject: production stays; see the failed tests below."
    if params.gate.on_inconclusive == "ask_reviewer":
        return ("Waiting for a reviewer (gate.on_inconclusive = ask_reviewer): "
                "`labelgate approve ID --reason ...` or `labelgate reject ID --reason ...`.")
    return "Keep production (gate.on_inconclusive = keep_production)."


def _data_changes(evaluation: dict, *, raw: Path, validated: Path, prepared: Path) -> dict:
    """What changed in the data since production's dataset version (counts only)."""
    prod = evaluation["production"] or {}
    out: dict = {"production_train_counts": prod.get("train_class_counts")}
    if (prepared / "summary.json").exists():
        summary = read_json(prepared / "summary.json")
        out["candidate_train_counts"] = summary.get("train_class_counts")
        for key in ("excluded_eval_overlap", "excluded_near_duplicates", "disputed"):
            out[key] = summary.get(key, 0)
    if (validated / "summary.json").exists():
        out["quarantine"] = read_json(validated / "summary.json").get("quarantine_reasons", {})
    version = prod.get("dataset_version") or ""
    since = int(version.split("-")[1]) if version.startswith("pulls-") else 0
    totals = {"added": 0, "changed": 0, "removed": 0}
    for snap in rawstore.snapshot_dirs(raw):
        if int(snap.name) > since and (snap / "changes.json").exists():
            for k, ids in read_json(snap / "changes.json").items():
                totals[k] = totals.get(k, 0) + len(ids)
    out.update(totals)
    return out


def run(evaluation_dir: str | Path, out_dir: str | Path, *, params: Params,
        eval_dir: str | Path = "data/eval", candidate_dir: str | Path = "models/candidate",
        raw: str | Path = "data/raw", validated: str | Path = "data/validated",
        prepared: str | Path = "data/prepared", review: str | Path = "data/review") -> dict:
    evaluation_dir = Path(evaluation_dir)
    evaluation = read_json(evaluation_dir / "evaluation.json")
    rows = read_jsonl(evaluation_dir / "predictions.jsonl")
    prod = evaluation["production"]
    if prod and prod.get("judged_on_eval_hash") and prod["judged_on_eval_hash"] != evaluation["eval_hash"]:
        raise GateError(
            f"the fixed eval set changed: production {prod['id']} was judged on eval set "
            f"{prod['judged_on_eval_hash'][:12]}, this evaluation used {evaluation['eval_hash'][:12]}. "
            "Numbers from two eval sets are not comparable. If the change is intended, run "
            "`labelgate evalset rebaseline --reason \"...\"` (re-evaluates production on the new "
            "set and records why), then run again.")
    tests = regression.run_tests(evaluate.arrays(evaluation, rows), params.gate)
    verdict = regression.verdict(tests)
    decision = {"verdict": verdict, "action": action(verdict, params), "tests": tests,
                "candidate_sha256": evaluation["candidate"]["sha256"],
                "candidate_accuracy": evaluation["candidate"]["accuracy"],
                "production_id": prod["id"] if prod else None,
                "production_accuracy": prod["accuracy"] if prod else None,
                "eval_hash": evaluation["eval_hash"],
                "on_inconclusive": params.gate.on_inconclusive}
    candidate_dir, raw = Path(candidate_dir), Path(raw)
    history = []
    if (candidate_dir / "history.csv").exists():
        with open(candidate_dir / "history.csv", newline="") as f:
            history = list(csv.DictReader(f))
    meta = rawstore.latest_meta(raw) if raw.exists() else None
    accepted = audit.acceptance(rawstore.load(raw)) if meta else None
    context = {"rows": rows, "history": history,
               "images": evalset.image_bytes(eval_dir) if Path(eval_dir, "meta.json").exists() else {},
               "ls": ({"url": meta.get("label_studio_url"), "project_id": meta["project_id"]}
                      if meta else None),
               "data": _data_changes(evaluation, raw=raw, validated=Path(validated),
                                     prepared=Path(prepared)),
               "acceptance": accepted,
               "suspects": (read_jsonl(Path(review) / "suspects.jsonl")
                            if (Path(review) / "suspects.jsonl").exists() else None)}
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "decision.json", decision)
    atomic_write_bytes(out_dir / "report.md", report.markdown(decision, evaluation, context).encode())
    atomic_write_bytes(out_dir / "report.html", report.html_page(decision, evaluation, context).encode())
    return decision


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.gate", description=__doc__)
    ap.add_argument("--evaluation", default="reports/evaluation")
    ap.add_argument("--eval", default="data/eval")
    ap.add_argument("--candidate", default="models/candidate")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--validated", default="data/validated")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--review", default="data/review")
    ap.add_argument("--out", default="reports/gate")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        decision = run(args.evaluation, args.out, params=settings.load(args.params),
                       eval_dir=args.eval, candidate_dir=args.candidate, raw=args.raw,
                       validated=args.validated, prepared=args.prepared, review=args.review)
    except GateError as exc:
        print(f"gate refused: {exc}", file=sys.stderr)
        return 1
    failed = [t["name"] for t in decision["tests"] if t["result"] in ("fail", "inconclusive")]
    print(f"gate: {decision['verdict']}" + (f" (not passed: {', '.join(failed)})" if failed else "")
          + f" -> {decision['action']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
