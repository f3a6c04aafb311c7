"""gate: regression tests of the candidate against production -> decision.json.

    python -m pipelines.gate --evaluation reports/evaluation --out reports/gate

The decision reads the evaluation (reports/evaluation, deterministic: no timings) and
params.yaml `gate`, nothing else, so `dvc repro` reaches the same verdict wherever it runs and
re-decides only when one of those changed. The review page is another stage
(pipelines/report.py). The tests live in validation/regression.py. The first model (no
production yet) is judged on the absolute tests alone: better than the majority-class baseline,
every class above chance, and the floors and budgets the user set. The comparative margins come
from the seed noise measured on this project, which evaluate attaches to the evaluation
(pipelines/noise.py), so the decision still reads nothing else. Exit code 0 whatever the verdict: a FAIL
is a result, not an error (promote reads the decision). Exit code 1 when the eval set is not the
one production was judged on (comparing numbers from two eval sets is refused), or when
reports/evaluation is not what evaluate writes (pipelines/records.py: Evaluation, Predictions).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.records import Decision, Evaluation, Predictions, RecordError, read_evaluation
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
        return ("Waiting for a reviewer (gate.on_inconclusive = ask_reviewer): the flow run's "
                "Resume form in the Prefect UI, or `labelgate approve ID --reason ...` / "
                "`labelgate reject ID --reason ...`; no answer within gate.reviewer_wait_s "
                "keeps production.")
    return "Keep production (gate.on_inconclusive = keep_production)."


def decide(evaluation: Evaluation, predictions: Predictions, *, params: Params) -> Decision:
    """The decision (what promote, the report and the flow read) from an evaluation and its
    per-image predictions. Pure: no I/O."""
    prod = evaluation.production
    if prod and prod.judged_on_eval_hash and prod.judged_on_eval_hash != evaluation.eval_hash:
        raise GateError(
            f"the fixed eval set changed: production {prod.id} was judged on eval set "
            f"{prod.judged_on_eval_hash[:12]}, this evaluation used {evaluation.eval_hash[:12]}. "
            "Numbers from two eval sets are not comparable. If the change is intended, run "
            "`labelgate evalset rebaseline --reason \"...\"` (re-evaluates production on the new "
            "set and records why), then run again.")
    tests = regression.run_tests(evaluation, predictions, params.gate)
    verdict = regression.verdict(tests)
    return Decision(verdict=verdict, action=action(verdict, params), tests=tuple(tests),
                    candidate_sha256=evaluation.candidate.sha256,
                    candidate_accuracy=evaluation.candidate.accuracy,
                    production_id=prod.id if prod else None,
                    production_accuracy=prod.accuracy if prod else None,
                    eval_hash=evaluation.eval_hash,
                    on_inconclusive=params.gate.on_inconclusive,
                    margins_note=regression.margins_note(evaluation, params.gate))


def run(evaluation_dir: str | Path, out_dir: str | Path, *, params: Params) -> Decision:
    """reports/evaluation -> `out_dir`/decision.json; returns the decision."""
    decision = decide(*read_evaluation(evaluation_dir), params=params)
    decision.write(Path(out_dir) / "decision.json")
    return decision


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.gate", description=__doc__)
    ap.add_argument("--evaluation", default="reports/evaluation")
    ap.add_argument("--out", default="reports/gate")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        decision = run(args.evaluation, args.out, params=settings.load(args.params))
    except (GateError, RecordError) as exc:
        print(f"gate refused: {exc}", file=sys.stderr)
        return 1
    failed = [t.name for t in decision.tests if t.result in ("fail", "inconclusive")]
    print(f"gate: {decision.verdict}" + (f" (not passed: {', '.join(failed)})" if failed else "")
          + f" -> {decision.action}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
