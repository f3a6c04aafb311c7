"""promote: record the gated candidate in the registry; on PASS, make it production atomically.

    python -m pipelines.promote --model models/candidate/model.safetensors \
        --decision reports/gate/decision.json --registry models/registry --raw data/raw

Not a dvc.yaml stage: it changes the registry, which evaluate reads. The order of writes makes a
crash at any point safe: blob (content-addressed) -> ledger event -> production pointer (one
atomic rename). Until the rename, the old production model is the production model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines import rawstore, registry
from pipelines.files import read_json, sha256_file


def run(model_file: str | Path, decision_path: str | Path, registry_dir: str | Path, *,
        dataset_version: str, params_hash: str, metrics: dict | None = None) -> dict:
    """Returns the ledger event written (or `{"event": "unchanged", ...}`)."""
    decision = read_json(decision_path)
    sha = sha256_file(model_file)
    if sha != decision["candidate_sha256"]:
        raise registry.RegistryError(
            f"{model_file} changed after it was gated (sha256 {sha[:12]}… != "
            f"{decision['candidate_sha256'][:12]}…): re-run evaluate and gate")
    with registry.lock(registry_dir):
        current = registry.production(registry_dir)
        if current and current["sha256"] == sha:
            return {"event": "unchanged", "id": current["id"], "verdict": decision["verdict"]}
        seen = next((e for e in registry.ledger(registry_dir)
                     if e.get("event") == "candidate" and e["sha256"] == sha
                     and e["eval_hash"] == decision["eval_hash"]), None)
        if seen is not None and decision["verdict"] != "PASS":
            return {"event": "unchanged", "id": seen["id"], "verdict": decision["verdict"]}
        model_id = seen["id"] if seen else registry.next_id(registry_dir, sha)
        record = {"id": model_id, "sha256": sha, "dataset_version": dataset_version,
                  "eval_hash": decision["eval_hash"], "params_hash": params_hash,
                  "metrics": {**(metrics or {}), "eval_accuracy": decision["candidate_accuracy"]},
                  "verdict": decision["verdict"], "tests": decision["tests"],
                  "previous": current["id"] if current else None}
        if seen is None:
            registry.append(registry_dir, {"event": "candidate", **record})
        if decision["verdict"] != "PASS":
            return {"event": "rejected", **record}
        registry.store(registry_dir, model_file)
        event = registry.append(registry_dir, {"event": "promoted", **record})
        pointer = {k: record[k] for k in ("id", "sha256", "dataset_version", "eval_hash",
                                           "metrics", "previous")}
        registry.set_production(registry_dir, {**pointer, "since": event["at"], "via": "gate"})
        return event


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
                    params_hash=sha256_file(args.params))
    except registry.RegistryError as exc:
        print(f"promote failed: {exc}", file=sys.stderr)
        return 1
    print(f"promote: {event['event']} {event['id']} ({event.get('verdict')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
