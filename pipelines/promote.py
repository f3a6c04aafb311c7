"""promote: record the gated candidate in the registry; on PASS, make it production atomically.

    python -m pipelines.promote --model models/candidate/model.safetensors \
        --decision reports/gate/decision.json --registry models/registry --raw data/raw

Not a dvc.yaml stage: it changes the registry, which evaluate reads. One registry operation
(`registry.operation`): blob (content-addressed) -> plan -> ledger "candidate" -> production
pointer (one atomic rename, PASS only) -> the decision's ledger line. Until the rename, the old
production model is the production model; a crash after the plan is completed by the next
registry command, and re-running promote for the same candidate only finishes it.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from pipelines import rawstore, registry
from pipelines.files import sha256_file
from pipelines.records import (FAIL, INCONCLUSIVE, PASS, Candidate, Decision, PendingReview,
                               ProductionChange, RecordError, Rejected)


def code_version(root: str | Path = ".") -> str:
    """What built the candidate: labelgate's version and the sha256 of the train stage's code
    stamp (.labelgate/code/train.sha256: every module train imports), then the git commit of
    `root` (`+dirty` with uncommitted changes). In labelgate's checkout that commit is the
    code's; in a workspace made by `labelgate init` it is the user's data repository, and the
    stamp is what names the code."""
    from pipelines import codestamp
    stamp = Path(root) / codestamp.stamp_path("train")
    code = (f"labelgate {codestamp.version()} train-code "
            f"{hashlib.sha256(stamp.read_bytes()).hexdigest()[:12]}" if stamp.exists()
            else f"labelgate {codestamp.version()}")
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"{code}; git unknown"
    return f"{code}; git {rev}" + ("+dirty" if dirty else "")


def run(model_file: str | Path, decision_path: str | Path, registry_dir: str | Path, *,
        dataset_version: str, params_hash: str, metrics: dict | None = None,
        code: str = "unknown", lineage: dict | None = None) -> dict:
    """Returns what it did, as JSON: the candidate's ledger line with `event` promoted,
    pending_review or rejected (or `{"event": "unchanged", ...}`). `lineage`: the commit and
    DVC hashes the candidate was built from (pipelines/lineage.py), kept in its ledger line for
    `labelgate checkout`."""
    decision = Decision.read(decision_path)
    sha = sha256_file(model_file)
    if sha != decision.candidate_sha256:
        raise registry.RegistryError(
            f"{model_file} changed after it was gated (sha256 {sha[:12]}… != "
            f"{decision.candidate_sha256[:12]}…): re-run evaluate and gate")

    def plan(at: str) -> tuple[list[dict], dict]:
        current = registry.production(registry_dir)
        if current and current.sha256 == sha:
            return [], {"event": "unchanged", "id": current.id, "verdict": decision.verdict}
        seen = next((e for e in registry.candidates(registry_dir).values()
                     if e.sha256 == sha and e.eval_hash == decision.eval_hash), None)
        if seen is not None and decision.verdict != PASS:
            return [], {"event": "unchanged", "id": seen.id, "verdict": decision.verdict}
        # Every candidate's bytes are kept (content-addressed), so a reviewer can approve it
        # later; stored before the plan, which may point production at them.
        registry.store(registry_dir, model_file)
        model_id = seen.id if seen else registry.next_id(registry_dir, sha)
        record = Candidate(
            at=at, id=model_id, sha256=sha, dataset_version=dataset_version,
            eval_hash=decision.eval_hash, params_hash=params_hash, code_version=code,
            metrics={**(metrics or {}), "eval_accuracy": decision.candidate_accuracy},
            verdict=decision.verdict, tests=decision.tests, decision=decision.action,
            production_at_gate=current.id if current else None, lineage=lineage)
        steps = [] if seen else [registry.line(record)]
        if decision.verdict == PASS:
            pointer = registry.production_pointer(record, at=at, via="gate",
                                                  previous=current.id if current else None)
            steps += [registry.pointer_step(pointer),
                      registry.line(ProductionChange(event="promoted", at=at, pointer=pointer))]
            return steps, {**record.to_json(), "event": "promoted", "since": at}
        if decision.verdict == INCONCLUSIVE and decision.on_inconclusive == "ask_reviewer":
            steps.append(registry.line(PendingReview(at=at, id=model_id)))
            return steps, {**record.to_json(), "event": "pending_review"}
        reason = ("failed: " + ", ".join(decision.failed()) if decision.verdict == FAIL
                  else "inconclusive: production kept")
        steps.append(registry.line(Rejected(at=at, id=model_id, by="gate", reason=reason)))
        return steps, {**record.to_json(), "event": "rejected"}

    return registry.operation(registry_dir, ["promote", sha, decision.eval_hash], plan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.promote", description=__doc__)
    ap.add_argument("--model", default="models/candidate/model.safetensors")
    ap.add_argument("--decision", default="reports/gate/decision.json")
    ap.add_argument("--registry", default="models/registry")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        event = run(args.model, args.decision, args.registry,
                    dataset_version=rawstore.dataset_version(args.raw),
                    params_hash=sha256_file(args.params), code=code_version())
    except (registry.RegistryError, RecordError) as exc:
        print(f"promote failed: {exc}", file=sys.stderr)
        return 1
    print(f"promote: {event['event']} {event['id']} ({event.get('verdict')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
