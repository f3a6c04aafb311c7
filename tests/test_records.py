"""pipelines.records: the evaluation, decision, pointer and ledger records are checked where
they are read (a missing or wrong-typed field names the file and the field), keep the JSON the
stages wrote before, and load registries written by earlier versions of labelgate."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import cli, gate, records, registry
from pipelines.records import RecordError
from pipelines.registry import RegistryError
from tests import factories

LEGACY = Path(__file__).parent / "legacy_registries"
# registries written by the registry/promote code of these commits (see generate.py there)
FORMATS = ["998239d", "39ce8f9", "c62805e"]
MODELS = {tag: f"model {tag}".encode() * 10 for tag in "abcd"}  # generate.py's stand-ins
TEN = tuple(str(c) for c in range(10))


def legacy_registry(tmp_path: Path, fmt: str) -> Path:
    """A copy of the legacy registry `fmt`, with the blobs its ledger names."""
    reg = tmp_path / "models" / "registry"
    reg.mkdir(parents=True)
    for name in ("ledger.jsonl", "production.json"):
        shutil.copy(LEGACY / fmt / name, reg / name)
    (reg / registry.BLOBS).mkdir()
    for data in MODELS.values():
        registry.blob_path(reg, hashlib.sha256(data).hexdigest()).write_bytes(data)
    return reg


def contains(big, small, where="") -> None:
    """Every key and item of `small` is in `big` with the same value (recursively)."""
    if isinstance(small, dict):
        assert isinstance(big, dict), where
        for k, v in small.items():
            assert k in big, f"{where}.{k} lost"
            contains(big[k], v, f"{where}.{k}")
    elif isinstance(small, list):
        assert isinstance(big, list) and len(big) == len(small), where
        for i, (b, s) in enumerate(zip(big, small)):
            contains(b, s, f"{where}[{i}]")
    else:
        assert big == small and type(big) is type(small), f"{where}: {big!r} != {small!r}"


# -- registries written by earlier versions ------------------------------------------------------

EXPECTED_KINDS = {
    "998239d": ["Candidate", "ProductionChange", "Candidate", "Candidate", "ProductionChange",
                "ProductionChange"],
    "39ce8f9": ["Candidate", "ProductionChange", "Candidate", "Rejected", "Candidate",
                "PendingReview", "Approved", "ProductionChange", "Candidate", "Rejected",
                "Rejected", "ProductionChange", "Rebaselined"],
}
EXPECTED_KINDS["c62805e"] = EXPECTED_KINDS["39ce8f9"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_ledger_of_an_earlier_version_loads_and_keeps_every_key(tmp_path, fmt):
    reg = legacy_registry(tmp_path, fmt)
    events = registry.ledger(reg)
    assert [type(e).__name__ for e in events] == EXPECTED_KINDS[fmt]
    lines = [json.loads(x) for x in (reg / registry.LEDGER).read_text().splitlines()]
    for line, event in zip(lines, events):
        contains(event.to_json(), line)  # nothing the old line said is lost or changed
        assert event.id == line["id"] and event.at == line["at"]
    first = registry.candidates(reg)["m0001-1f95078200"]
    assert first.sha256 == hashlib.sha256(MODELS["a"]).hexdigest() and first.verdict == "PASS"
    assert first.tests[0].name == "accuracy floor" and first.tests[0].result == "pass"
    pointer = registry.production(reg)
    assert pointer.id == "m0001-1f95078200" and pointer.via == "rollback"
    contains(pointer.to_json(), json.loads((reg / registry.POINTER).read_text()))


def test_the_first_format_is_read_in_todays_shape(tmp_path):
    """998239d wrote tests without `result` and promoted lines without `since`/`via` (the
    pointer's `since` was the line's `at`); its promoted lines also carried the candidate's
    keys, kept as they were."""
    events = registry.ledger(legacy_registry(tmp_path, "998239d"))
    failed = registry.candidates(tmp_path / "models" / "registry")["m0002-4945504331"]
    assert [t.result for t in failed.tests] == ["fail", "fail"]
    assert failed.failed() == ["accuracy floor", "accuracy vs production"]
    promoted = events[1]
    assert promoted.event == "promoted" and promoted.pointer.since == promoted.at
    assert promoted.pointer.via == "gate" and promoted.pointer.extra["verdict"] == "PASS"
    assert promoted["params_hash"] == "p" * 64  # the Mapping view reaches the kept keys


@pytest.mark.parametrize("fmt", FORMATS)
def test_commands_run_on_a_registry_of_an_earlier_version(tmp_path, fmt, capsys):
    reg = legacy_registry(tmp_path, fmt)
    n = len(registry.ledger(reg))
    with registry.lock(reg):
        assert registry.reconcile(reg) is None
    assert len(registry.ledger(reg)) == n            # nothing taken for a missing line
    before = registry.production(reg)
    pointer = registry.rollback(reg, to="m0003-4c149407b0", reason="back again", reviewer="cy")
    assert pointer["id"] == "m0003-4c149407b0" and pointer["rolled_back_from"] == before.id
    # the target's own predecessor, read from its old promoted line
    assert pointer["previous"] == "m0001-1f95078200"
    events = registry.ledger(reg)                     # old lines and the new one, together
    assert len(events) == n + 1 and events[-1].pointer == registry.production(reg)
    assert events[-1].op == "rollback@" + str(n)
    root = tmp_path
    (root / "params.yaml").write_text((factories.REPO / "params.yaml").read_text())
    assert cli.main(["--root", str(root), "history"]) == 0
    out = capsys.readouterr().out
    assert "m0002-4945504331" in out and "FAIL" in out and "cy back again *" in out
    assert cli.main(["--root", str(root), "status"]) == 0
    assert "production model  m0003-4c149407b0" in capsys.readouterr().out


# -- a damaged file names the file and the field ---------------------------------------------------

def test_a_decision_missing_a_field_names_the_file_and_the_field(tmp_path):
    good = factories.decision("a" * 64).to_json()
    path = tmp_path / "decision.json"
    for field, value, problem in (("verdict", None, "missing"),
                                  ("candidate_accuracy", "0.9", "expected a finite number"),
                                  ("verdict", "MAYBE", "expected one of 'PASS'"),
                                  ("candidate_sha256", "../../x", "expected a sha256"),
                                  ("production_id", 7, "expected a string")):
        data = dict(good)
        if value is None:
            del data[field]
        else:
            data[field] = value
        path.write_text(json.dumps(data))
        with pytest.raises(RecordError) as info:
            records.Decision.read(path)
        assert str(path) in str(info.value) and f"field {field!r}" in str(info.value)
        assert problem in str(info.value)
    path.write_text(json.dumps({**good, "candidate_id": "m0001"}))  # a key no stage writes
    with pytest.raises(RecordError, match="unknown field.*candidate_id"):
        records.Decision.read(path)
    path.write_text("{not json")
    with pytest.raises(RecordError, match="not valid JSON"):
        records.Decision.read(path)


def test_a_nested_field_is_named_by_its_path(tmp_path):
    ev, pred = factories.evaluation(np.arange(10), np.arange(10))
    data = ev.to_json()
    data["candidate"]["per_class"]["7"]["recall"] = "high"
    (tmp_path / "evaluation.json").write_text(json.dumps(data))
    with pytest.raises(RecordError) as info:
        records.Evaluation.read(tmp_path / "evaluation.json")
    assert "field 'candidate.per_class['7'].recall'" in str(info.value)
    data = ev.to_json()
    data["candidate"]["n"] = 11                       # cross-field rule: n = sum of confusion
    with pytest.raises(RecordError, match="'candidate.confusion'"):
        records.Evaluation.from_json(data)


def test_a_damaged_ledger_line_is_a_registry_error_naming_it(tmp_path):
    reg = legacy_registry(tmp_path, "c62805e")
    lines = (reg / registry.LEDGER).read_text().splitlines()
    bad = json.loads(lines[6])                        # the approved line
    bad["override_fail"] = "no"
    lines[6] = json.dumps(bad)
    (reg / registry.LEDGER).write_text("\n".join(lines) + "\n")
    with pytest.raises(RegistryError) as info:
        registry.ledger(reg)
    assert "ledger.jsonl, entry 7" in str(info.value)
    assert "'override_fail': expected true or false" in str(info.value)
    lines[6] = json.dumps({**bad, "override_fail": False, "event": "promoted_by_magic"})
    (reg / registry.LEDGER).write_text("\n".join(lines) + "\n")
    with pytest.raises(RegistryError, match="unknown event 'promoted_by_magic'"):
        registry.ledger(reg)


def test_a_pointer_sha256_never_reaches_a_path(tmp_path):
    reg = legacy_registry(tmp_path, "c62805e")
    data = json.loads((reg / registry.POINTER).read_text())
    data["sha256"] = "../../../etc/passwd"
    (reg / registry.POINTER).write_text(json.dumps(data))
    with pytest.raises(RegistryError, match="production.json: field 'sha256': expected a sha256"):
        registry.production(reg)


def test_keys_this_version_does_not_know_are_kept_in_registry_files():
    line = {"at": "2027-01-01T00:00:00Z", "event": "rejected", "id": "m0009-x", "by": "gate",
            "reason": "failed: x", "signed_by": {"key": "k1"}}
    event = records.LedgerEvent.from_json(line)
    assert isinstance(event, records.Rejected) and event.extra == {"signed_by": {"key": "k1"}}
    assert event.to_json() == line


# -- producers are checked as well -----------------------------------------------------------------

def test_a_record_is_checked_when_it_is_made():
    with pytest.raises(RecordError, match="'verdict': expected one of"):
        dataclasses.replace(factories.decision("a" * 64), verdict="pass")
    with pytest.raises(RecordError, match="'tests\\[0\\].passed'"):
        records.Decision.from_json({**factories.decision("a" * 64).to_json(), "tests": [
            {"name": "x", "result": "fail", "passed": True, "value": 1.0, "threshold": 0.0,
             "p_value": None, "detail": ""}]})
    decision = factories.decision("a" * 64, verdict="FAIL", failed=["model size"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.verdict = "PASS"
    assert records.Decision.from_json(json.loads(json.dumps(decision.to_json()))) == decision


def test_the_mapping_view_reads_the_fields():
    decision = factories.decision("a" * 64, verdict="FAIL", failed=["model size"])
    assert decision["verdict"] == decision.verdict == "FAIL"
    assert decision["tests"][0]["name"] == "model size"
    assert set(decision) == {f.name for f in dataclasses.fields(records.Decision)}
    with pytest.raises(KeyError):
        decision["candidate_id"]


# -- predictions.npz -------------------------------------------------------------------------------

def test_the_evaluation_folder_round_trips_and_is_the_same_bytes(tmp_path):
    truth = np.repeat(np.arange(10), 3)
    ev, pred = factories.evaluation(truth, (truth + 1) % 10, truth, cand_conf=0.25)
    records.write_evaluation(tmp_path / "a", ev, pred)
    records.write_evaluation(tmp_path / "b", ev, pred)
    for name in (records.EVALUATION_JSON, records.PREDICTIONS_NPZ):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / records.PREDICTIONS_NPZ) as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    ev2, pred2 = records.read_evaluation(tmp_path / "a")
    assert ev2 == ev and ev2.candidate.per_class["3"].recall == 0.0
    for name in ("task_id", "image_sha256", "truth", "cand_pred", "cand_conf", "prod_pred",
                 "prod_conf"):
        assert np.array_equal(getattr(pred2, name), getattr(pred, name)), name
    assert not pred2.truth.flags.writeable


def test_predictions_that_do_not_match_the_evaluation_are_refused(tmp_path):
    truth = np.repeat(np.arange(10), 3)
    ev, pred = factories.evaluation(truth, truth)
    folder = records.write_evaluation(tmp_path / "ev", ev, pred)
    shorter, _ = factories.evaluation(truth[:-1], truth[:-1])
    shorter.write(folder / records.EVALUATION_JSON)
    with pytest.raises(RecordError, match="predictions.npz: field 'task_id': 30 images, the "
                                          "evaluation has 29"):
        records.read_evaluation(folder)
    # the gate says so and stops, without a decision
    assert gate.main(["--evaluation", str(folder), "--out", str(tmp_path / "gate")]) == 1
    assert not (tmp_path / "gate").exists()
    with_prod, _ = factories.evaluation(truth, truth, truth)
    with_prod.write(folder / records.EVALUATION_JSON)
    with pytest.raises(RecordError, match="production predictions missing"):
        records.read_evaluation(folder)
    other, _ = factories.evaluation(truth, (truth + 1) % 10)  # another model's summary
    other.write(folder / records.EVALUATION_JSON)
    with pytest.raises(RecordError, match="'cand_pred': accuracy 1.000000, the evaluation "
                                          "says 0.000000"):
        records.read_evaluation(folder)


def test_an_npz_is_read_without_unpickling_and_checked(tmp_path):
    truth = np.arange(10)
    _, pred = factories.evaluation(truth, truth)
    good = dict(np.load(io.BytesIO(pred.to_npz())))
    cases = {"pickled": {**good, "task_id": np.array([object()] * 10, dtype=object)},
             "missing": {k: v for k, v in good.items() if k != "cand_conf"},
             "unknown": {**good, "extra_scores": np.zeros(10)},
             "float classes": {**good, "cand_pred": good["cand_pred"] + 0.5},
             "not a probability": {**good, "cand_conf": good["cand_conf"] * 2},
             "a longer name": {**good, "image_sha256": np.array(
                 [s + "/../x" for s in good["image_sha256"]])}}
    problems = {"pickled": "not a readable .npz", "missing": "field 'cand_conf': missing",
                "unknown": "unknown array(s) extra_scores", "float classes": "expected int64",
                "not a probability": "expected probabilities in [0, 1]",
                "a longer name": "field 'image_sha256': row 0: expected a sha256"}
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(RecordError) as info:
            records.Predictions.read(path)
        assert str(path) in str(info.value) and problems[name] in str(info.value), name
    assert records.Predictions.read(_write(tmp_path / "ok.npz", good)).n == 10


def _write(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def test_stages_stop_with_the_file_and_field_when_a_record_is_wrong(tmp_path, capsys):
    from pipelines import promote, report
    truth = np.repeat(np.arange(10), 3)
    folder = records.write_evaluation(tmp_path / "ev", *factories.evaluation(truth, truth))
    decision = gate.run(folder, tmp_path / "gate", params=factories.params())
    # a decision about another candidate: the report refuses to explain it with this evaluation
    factories.decision("c" * 64).write(tmp_path / "other.json")
    with pytest.raises(RecordError, match="other.json: the decision is about candidate "
                                          "cccccccccccc.*run the gate again"):
        report.run(tmp_path / "other.json", folder, tmp_path / "gate",
                   params=factories.params(), raw=tmp_path / "none")
    # promote: a damaged decision.json is an error message and exit code 1, not a KeyError
    data = decision.to_json()
    del data["eval_hash"]
    (tmp_path / "gate" / "decision.json").write_text(json.dumps(data))
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    assert promote.main(["--model", str(model), "--decision",
                         str(tmp_path / "gate" / "decision.json"),
                         "--registry", str(tmp_path / "registry"), "--raw",
                         str(tmp_path / "none"), "--params",
                         str(factories.REPO / "params.yaml")]) == 1
    err = capsys.readouterr().err
    assert "promote failed" in err and "decision.json: field 'eval_hash': missing" in err
    assert not (tmp_path / "registry").exists()


def test_an_evaluation_carries_production_cost_and_seed_noise_and_old_ones_still_read(tmp_path):
    from pipelines import noise
    truth = np.repeat(np.arange(10), 3)
    ev, pred = factories.evaluation(truth, truth, truth)
    classes = ev.classes
    measured = noise.SeedNoise(
        eval_hash=ev.eval_hash, recipe="c" * 64, classes=classes, seeds=(1, 2),
        accuracy=(0.9, 0.8), ece=(0.1, 0.1), recall={c: (1.0, 0.9) for c in classes},
        precision={c: (1.0, 1.0) for c in classes}, measured_at="2026-11-30T00:00:00Z")
    richer = dataclasses.replace(ev, seed_noise=measured, production=dataclasses.replace(
        ev.production, size_bytes=45_000_000, macs_per_image=1_800_000_000))
    folder = records.write_evaluation(tmp_path / "new", richer, pred)
    back, _ = records.read_evaluation(folder)
    assert back == richer and back.seed_noise.recall["3"] == (1.0, 0.9)
    assert back.production.size_bytes == 45_000_000
    # an evaluation.json written before these fields: both read as absent
    old = records.write_evaluation(tmp_path / "old", ev, pred)
    raw = json.loads((old / "evaluation.json").read_text())
    assert "seed_noise" not in raw and "size_bytes" not in raw["production"]
    back, _ = records.read_evaluation(old)
    assert back.seed_noise is None and back.production.macs_per_image is None
    # a damaged noise block names its field
    raw = json.loads((folder / "evaluation.json").read_text())
    raw["seed_noise"]["accuracy"] = [0.9]
    (folder / "evaluation.json").write_text(json.dumps(raw))
    with pytest.raises(RecordError, match="seed_noise"):
        records.read_evaluation(folder)
