"""pipelines.registry and pipelines.promote: one production pointer that changes only by an atomic
rename, a content-addressed blob store checked on every load, an append-only ledger."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from pipelines import gate, net, promote, registry  # noqa: E402
from pipelines.files import read_json, sha256_file  # noqa: E402
from pipelines.metrics import classification  # noqa: E402
from pipelines.registry import RegistryError  # noqa: E402
from tests import factories  # noqa: E402

CLASSES = tuple(str(i) for i in range(10))
SIZE = 28
CPU = torch.device("cpu")
EVAL_HASH = "e" * 64


def make_model(path, seed: int):
    """A freshly initialised Net saved via net.save; distinct seeds give distinct files."""
    torch.manual_seed(seed)
    model = net.Net(len(CLASSES), SIZE).eval()
    net.save(model, path, classes=CLASSES, image_size=SIZE)
    return model


def predictions(accuracy: float, n: int = 200, seed: int = 0):
    """(y_true, y_pred) with exactly round(accuracy * n) correct. The same seed gives the same
    labels and nested error sets: a higher accuracy only fixes mistakes of a lower one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    pred = y.copy()
    wrong = rng.permutation(n)[:n - round(accuracy * n)]
    pred[wrong] = (y[wrong] + 1) % len(CLASSES)
    return y, pred


def gate_decision(tmp_path, model_file, accuracy: float, *, production: dict | None = None,
                  name: str = "gate"):
    """Run the real gate on an evaluation of `model_file` at `accuracy`: decision.json exactly as
    gate.run writes it (candidate_sha256 = the file's sha256). Returns (path, decision)."""
    y, pred = predictions(accuracy)
    evaluation = {"eval_hash": EVAL_HASH, "eval_n": len(y), "classes": list(CLASSES),
                  "candidate": {"sha256": sha256_file(model_file),
                                **classification(y, pred, CLASSES)},
                  "production": None}
    if production is not None:
        y2, pred2 = predictions(production["accuracy"])
        evaluation["production"] = {"id": production["id"], "sha256": production["sha256"],
                                    **classification(y2, pred2, CLASSES)}
    ev_path = tmp_path / f"{name}-evaluation.json"
    ev_path.write_text(json.dumps(evaluation))
    decision = gate.run(ev_path, tmp_path / name, params=factories.params())
    return tmp_path / name / "decision.json", decision


def promote_run(model_file, decision_path, reg, **kw):
    return promote.run(model_file, decision_path, reg, dataset_version="pulls-000001-abc",
                       params_hash="p" * 64, **kw)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def first(tmp_path):
    """A registry whose production is model A (promoted through a PASS decision)."""
    reg = tmp_path / "registry"
    a_file = tmp_path / "a" / "model.safetensors"
    a_model = make_model(a_file, seed=1)
    decision_path, decision = gate_decision(tmp_path, a_file, 0.95, name="gate-a")
    assert decision["verdict"] == "PASS"
    event = promote_run(a_file, decision_path, reg)
    return {"tmp": tmp_path, "reg": reg, "a_file": a_file, "a_model": a_model, "a_event": event,
            "a_sha": sha256_file(a_file)}


def test_pass_makes_the_candidate_production(first):
    reg, sha, event = first["reg"], first["a_sha"], first["a_event"]
    assert event["event"] == "promoted" and event["verdict"] == "PASS"
    pointer = registry.production(reg)
    assert pointer["id"] == event["id"] and pointer["sha256"] == sha
    assert pointer["via"] == "gate" and pointer["previous"] is None
    assert pointer["eval_hash"] == EVAL_HASH
    blob = registry.blob_path(reg, sha)
    assert blob.exists() and sha256_file(blob) == sha
    assert [e["event"] for e in registry.ledger(reg)] == ["candidate", "promoted"]
    assert all(e["id"] == event["id"] for e in registry.ledger(reg))
    model, classes, size, loaded_pointer = registry.load_production(reg, device=CPU)
    assert classes == CLASSES and size == SIZE and loaded_pointer == pointer
    assert same_weights(model, first["a_model"])


def test_no_production_yet(tmp_path):
    assert registry.production(tmp_path / "registry") is None
    assert registry.load_production(tmp_path / "registry", device=CPU) is None
    assert registry.ledger(tmp_path / "registry") == []


def test_fail_leaves_production_unchanged_and_records_the_candidate(first):
    tmp, reg = first["tmp"], first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    b_file = tmp / "b" / "model.safetensors"
    make_model(b_file, seed=2)
    prod = registry.production(reg)
    decision_path, decision = gate_decision(
        tmp, b_file, 0.80, production={"id": prod["id"], "sha256": prod["sha256"],
                                       "accuracy": 0.95}, name="gate-b")
    assert decision["verdict"] == "FAIL"
    result = promote_run(b_file, decision_path, reg)
    assert result["event"] == "rejected" and result["verdict"] == "FAIL"
    assert (reg / registry.POINTER).read_bytes() == pointer_bytes
    events = registry.ledger(reg)
    assert [e["event"] for e in events] == ["candidate", "promoted", "candidate"]
    assert events[-1]["sha256"] == sha256_file(b_file) and events[-1]["verdict"] == "FAIL"
    assert events[-1]["tests"] == decision["tests"]
    assert events[-1]["previous"] == prod["id"]
    assert not registry.blob_path(reg, sha256_file(b_file)).exists()  # never stored
    # the same failed candidate again: nothing new
    again = promote_run(b_file, decision_path, reg)
    assert again["event"] == "unchanged" and len(registry.ledger(reg)) == len(events)


def test_promoting_production_again_is_a_no_op(first):
    _, decision = gate_decision(first["tmp"], first["a_file"], 0.95, name="gate-a2")
    result = promote_run(first["a_file"], first["tmp"] / "gate-a2" / "decision.json", first["reg"])
    assert result["event"] == "unchanged" and result["id"] == first["a_event"]["id"]
    assert len(registry.ledger(first["reg"])) == 2


def promote_b(first, seed=2):
    tmp, reg = first["tmp"], first["reg"]
    b_file = tmp / f"b{seed}" / "model.safetensors"
    b_model = make_model(b_file, seed=seed)
    prod = registry.production(reg)
    decision_path, decision = gate_decision(
        tmp, b_file, 0.96, production={"id": prod["id"], "sha256": prod["sha256"],
                                       "accuracy": 0.95}, name=f"gate-b{seed}")
    assert decision["verdict"] == "PASS"
    return b_file, b_model, decision_path


@pytest.mark.parametrize("crash_at", ["atomic_write_json", "os.replace"])
def test_crash_during_promotion_keeps_the_previous_production(first, monkeypatch, crash_at):
    reg = first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    b_file, b_model, decision_path = promote_b(first)

    if crash_at == "atomic_write_json":
        def crash(*args, **kwargs):
            raise OSError("simulated crash before the pointer was written")
        monkeypatch.setattr(registry, "atomic_write_json", crash)
    else:
        real_replace = os.replace

        def crash(src, dst, *args, **kwargs):  # the rename that would commit the new pointer
            if os.path.basename(dst) == registry.POINTER:
                raise OSError("simulated crash at the commit rename")
            return real_replace(src, dst, *args, **kwargs)
        monkeypatch.setattr(os, "replace", crash)

    with pytest.raises(OSError, match="simulated crash"):
        promote_run(b_file, decision_path, reg)
    monkeypatch.undo()

    assert (reg / registry.POINTER).read_bytes() == pointer_bytes
    model, _, _, pointer = registry.load_production(reg, device=CPU)
    assert pointer["sha256"] == first["a_sha"]
    assert same_weights(model, first["a_model"])
    assert not [p.name for p in reg.iterdir() if p.name.startswith(f".{registry.POINTER}")]

    # after the crash, running promote again finishes the job
    event = promote_run(b_file, decision_path, reg)
    assert event["event"] == "promoted"
    model, _, _, pointer = registry.load_production(reg, device=CPU)
    assert pointer["sha256"] == sha256_file(b_file) and pointer["previous"] == first["a_event"]["id"]
    assert same_weights(model, b_model)


def test_tampered_blob_is_refused(first):
    reg, sha = first["reg"], first["a_sha"]
    blob = registry.blob_path(reg, sha)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, in the weights
    blob.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        registry.load_production(reg, device=CPU)


def test_missing_blob_is_refused(first):
    registry.blob_path(first["reg"], first["a_sha"]).unlink()
    with pytest.raises(RegistryError, match="missing"):
        registry.load_production(first["reg"], device=CPU)


def test_set_production_refuses_a_pointer_to_a_bad_blob(first):
    reg = first["reg"]
    pointer_bytes = (reg / registry.POINTER).read_bytes()
    with pytest.raises(RegistryError):
        registry.set_production(reg, {"id": "m9999-x", "sha256": "0" * 64})
    assert (reg / registry.POINTER).read_bytes() == pointer_bytes


def test_rollback_restores_the_previous_model(first):
    reg = first["reg"]
    b_file, b_model, decision_path = promote_b(first)
    b_event = promote_run(b_file, decision_path, reg)
    assert registry.production(reg)["id"] == b_event["id"]

    pointer = registry.rollback(reg, reason="bad predictions in review")
    assert pointer["id"] == first["a_event"]["id"] and pointer["sha256"] == first["a_sha"]
    assert pointer["via"] == "rollback" and pointer["rolled_back_from"] == b_event["id"]
    # `previous` is A's own predecessor (none): a second rollback goes further back, it does
    # not toggle back to B
    assert pointer["previous"] is None
    with pytest.raises(RegistryError, match="no previous production model"):
        registry.rollback(reg)
    assert registry.production(reg) == pointer
    model, _, _, _ = registry.load_production(reg, device=CPU)
    assert same_weights(model, first["a_model"])
    last = registry.ledger(reg)[-1]
    assert last["event"] == "rolled_back" and last["id"] == first["a_event"]["id"]
    assert last["reason"] == "bad predictions in review"
    # and forward again, by id
    registry.rollback(reg, to=b_event["id"])
    model, _, _, _ = registry.load_production(reg, device=CPU)
    assert same_weights(model, b_model)


def test_rollback_errors(first, tmp_path):
    with pytest.raises(RegistryError, match="no production model"):
        registry.rollback(tmp_path / "empty")
    with pytest.raises(RegistryError, match="no previous production model"):
        registry.rollback(first["reg"])  # A was the first model
    with pytest.raises(RegistryError, match="never a production model"):
        registry.rollback(first["reg"], to="m0042-0123456789")
    assert registry.production(first["reg"])["sha256"] == first["a_sha"]


def test_model_changed_after_gating_is_refused(first):
    tmp, reg = first["tmp"], first["reg"]
    c_file = tmp / "c" / "model.safetensors"
    make_model(c_file, seed=3)
    decision_path, decision = gate_decision(tmp, c_file, 0.99, name="gate-c")
    assert decision["verdict"] == "PASS"
    ledger_before = (reg / registry.LEDGER).read_bytes()
    make_model(c_file, seed=4)  # retrained in place after the gate ran
    assert sha256_file(c_file) != decision["candidate_sha256"]
    with pytest.raises(RegistryError, match="changed after it was gated"):
        promote_run(c_file, decision_path, reg)
    assert (reg / registry.LEDGER).read_bytes() == ledger_before
    assert registry.production(reg)["sha256"] == first["a_sha"]
    assert not registry.blob_path(reg, sha256_file(c_file)).exists()


def test_ledger_is_append_only_across_promotions(first):
    reg = first["reg"]
    before = (reg / registry.LEDGER).read_bytes()
    b_file, _, decision_path = promote_b(first)
    promote_run(b_file, decision_path, reg)
    after = (reg / registry.LEDGER).read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    ids = [e["id"] for e in registry.ledger(reg) if e["event"] == "candidate"]
    assert len(ids) == len(set(ids)) == 2
    assert read_json(reg / registry.POINTER)["id"] == ids[-1]
