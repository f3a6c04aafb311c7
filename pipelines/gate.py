"""gate: regression tests of the candidate against production -> decision.json + report.md.

    python -m pipelines.gate --evaluation reports/evaluation/evaluation.json --out reports/gate

The tests live in validation/regression.py; thresholds in params.yaml `gate`. The first model
(no production yet) passes on the absolute floor alone. Exit code 0 whatever the verdict: a FAIL
is a result, not an error (promote reads the decision).
"""
from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from pipelines.files import atomic_write_bytes, atomic_write_json, read_json
from pipelines.settings import Params
from validation import regression


def _cell(text: object) -> str:
    """Annotator-supplied text (class names) made safe for a Markdown table cell."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ")


def report(decision: dict, evaluation: dict) -> str:
    cand, prod = evaluation["candidate"], evaluation["production"]
    lines = [f"# Gate verdict: **{decision['verdict']}**", "",
             f"- candidate `{cand['sha256'][:12]}`: accuracy **{cand['accuracy']:.4f}** on "
             f"{evaluation['eval_n']} fixed eval images (eval set `{evaluation['eval_hash'][:12]}`)",
             (f"- production `{prod['id']}`: accuracy {prod['accuracy']:.4f}" if prod
              else "- no production model yet: judged on the absolute floor alone"), "",
             "## Regression tests", "", "| test | result | value | threshold | detail |",
             "|---|---|---|---|---|"]
    for t in decision["tests"]:
        lines.append(f"| {_cell(t['name'])} | {'pass' if t['passed'] else '**FAIL**'} | "
                     f"{t['value']:.4f} | {t['threshold']:.4f} | {_cell(t['detail'])} |")
    lines += ["", "## Per class", "",
              "| class | support | production recall | candidate recall | candidate precision |",
              "|---|---|---|---|---|"]
    for cls, m in cand["per_class"].items():
        p = prod["per_class"][cls]["recall"] if prod else None
        lines.append(f"| {_cell(cls)} | {m['support']} | {'' if p is None else f'{p:.4f}'} | "
                     f"{m['recall']:.4f} | {m['precision']:.4f} |")
    classes = evaluation["classes"]
    lines += ["", "## Candidate confusion matrix (rows: truth, columns: predicted)", "",
              "| | " + " | ".join(_cell(c) for c in classes) + " |",
              "|---|" + "---|" * len(classes)]
    for cls, row in zip(classes, cand["confusion"]):
        lines.append(f"| **{_cell(cls)}** | " + " | ".join(str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def run(evaluation_path: str | Path, out_dir: str | Path, *, params: Params) -> dict:
    evaluation = read_json(evaluation_path)
    g = params.gate
    tests = regression.run_tests(evaluation["candidate"], evaluation["production"],
                                 min_accuracy=g.min_accuracy,
                                 max_accuracy_drop=g.max_accuracy_drop,
                                 max_class_recall_drop=g.max_class_recall_drop)
    prod = evaluation["production"]
    decision = {"verdict": regression.verdict(tests), "tests": tests,
                "candidate_sha256": evaluation["candidate"]["sha256"],
                "candidate_accuracy": evaluation["candidate"]["accuracy"],
                "production_id": prod["id"] if prod else None,
                "production_accuracy": prod["accuracy"] if prod else None,
                "eval_hash": evaluation["eval_hash"]}
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "decision.json", decision)
    atomic_write_bytes(out_dir / "report.md", report(decision, evaluation).encode())
    return decision


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.gate", description=__doc__)
    ap.add_argument("--evaluation", default="reports/evaluation/evaluation.json")
    ap.add_argument("--out", default="reports/gate")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    decision = run(args.evaluation, args.out, params=settings.load(args.params))
    failed = [t["name"] for t in decision["tests"] if not t["passed"]]
    print(f"gate: {decision['verdict']}" + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
