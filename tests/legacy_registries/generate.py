"""How the registries in this folder were written: by labelgate's own registry and promote code
at an earlier commit (git history of pipelines/registry.py), not by hand.

    git archive 998239d pipelines validation | tar -x -C /tmp/old    # or 39ce8f9, c62805e
    PYTHONPATH=/tmp/old .venv/bin/python tests/legacy_registries/generate.py /tmp/out
    cp /tmp/out/registry/{ledger.jsonl,production.json} tests/legacy_registries/998239d/

The model files are stand-ins (b"model a" * 10, ...): the registry stores and hashes bytes, and
these tests never load them as models. Events: A PASS; B FAIL; then (registries with reviewer
commands) C INCONCLUSIVE -> pending review -> approved, D INCONCLUSIVE kept -> rejected by a
reviewer, rollback, evalset rebaseline; (the first registry) C PASS, rollback.
"""
import hashlib
import inspect
import json
import sys
from pathlib import Path

from pipelines import promote, registry
from validation import regression

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
reg = out / "registry"
new_tests = "result" in inspect.signature(regression._test).parameters


def test(name, ok, value, threshold):
    if new_tests:
        return regression._test(name, "pass" if ok else "fail", value, threshold, f"{name} detail")
    return regression._test(name, ok, value, threshold, f"{name} detail")


def model(tag):
    p = out / "models" / f"{tag}.safetensors"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(f"model {tag}".encode() * 10)
    return p


def decide(m, verdict, acc, prod_acc=None, prod_id=None, ask=False):
    tests = [test("accuracy floor", verdict != "FAIL", acc, 0.9)]
    if prod_id:
        tests.append(test("accuracy vs production", verdict != "FAIL", (prod_acc or 0) - acc, 0.01))
    d = {"verdict": verdict, "tests": tests,
         "candidate_sha256": hashlib.sha256(m.read_bytes()).hexdigest(),
         "candidate_accuracy": acc, "production_id": prod_id, "production_accuracy": prod_acc,
         "eval_hash": "e" * 64}
    if new_tests:
        d["action"] = f"{verdict} action"
        d["on_inconclusive"] = "ask_reviewer" if ask else "keep_production"
    p = out / f"decision-{m.stem}.json"
    p.write_text(json.dumps(d))
    return p


kw = {"code": "0" * 40} if "code" in inspect.signature(promote.run).parameters else {}


def prom(tag, verdict, acc, ask=False):
    m = model(tag)
    cur = registry.production(reg)
    return promote.run(m, decide(m, verdict, acc, 0.95 if cur else None,
                                 cur["id"] if cur else None, ask), reg,
                       dataset_version=f"pulls-00000{ord(tag) - 96}-abc", params_hash="p" * 64,
                       metrics={"val_acc": 0.9, "epochs": 3,
                                "train_class_counts": {"0": 5, "1": 6}}, **kw)


prom("a", "PASS", 0.95)
prom("b", "FAIL", 0.5)
if hasattr(registry, "approve"):
    c = prom("c", "INCONCLUSIVE", 0.94, ask=True)
    registry.approve(reg, c["id"], reason="looked at the flips", reviewer="ana")
    d = prom("d", "INCONCLUSIVE", 0.93)
    registry.reject(reg, d["id"], reason="not better", reviewer="bo")
    registry.rollback(reg, reason="complaints", reviewer="bo")
    registry.rebaseline(reg, eval_hash="f" * 64, accuracy=0.955, reason="bigger eval set",
                        reviewer="ana")
else:
    prom("c", "PASS", 0.97)
    registry.rollback(reg, reason="complaints")
