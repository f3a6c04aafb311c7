"""pipelines.metrics, validation.regression and pipelines.gate: hand-checkable numbers, the
regression rules at and around their margins, and a report that cannot carry markup."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipelines import gate  # noqa: E402
from pipelines.files import read_json  # noqa: E402
from pipelines.metrics import classification  # noqa: E402
from tests import factories  # noqa: E402
from validation import regression  # noqa: E402

# -- metrics.classification ----------------------------------------------------------------------

# confusion[i][j] = how many images of true class i are predicted as j. Class "c" is never
# predicted (precision must be 0, not a division error); class "d" never occurs (recall 0).
CLASSES = ("a", "b", "c", "d")
CONFUSION = [[3, 1, 0, 0],
             [0, 2, 0, 1],
             [1, 1, 0, 0],
             [0, 0, 0, 0]]


def predictions_from(confusion, seed=0):
    pairs = [(i, j) for i, row in enumerate(confusion) for j, n in enumerate(row) for _ in range(n)]
    order = np.random.default_rng(seed).permutation(len(pairs))  # order must not matter
    y_true = np.array([pairs[k][0] for k in order], dtype=np.int64)
    y_pred = np.array([pairs[k][1] for k in order], dtype=np.int64)
    return y_true, y_pred


def test_classification_on_a_hand_checkable_example():
    y_true, y_pred = predictions_from(CONFUSION)
    m = classification(y_true, y_pred, CLASSES)
    k = len(CLASSES)
    n = sum(map(sum, CONFUSION))
    correct = sum(CONFUSION[i][i] for i in range(k))
    assert m["n"] == n == 9
    assert m["confusion"] == CONFUSION
    assert m["accuracy"] == pytest.approx(correct / n)  # 5 / 9
    for i, c in enumerate(CLASSES):
        row_sum = sum(CONFUSION[i])
        col_sum = sum(CONFUSION[r][i] for r in range(k))
        got = m["per_class"][c]
        assert got["support"] == row_sum
        assert got["recall"] == pytest.approx(CONFUSION[i][i] / row_sum if row_sum else 0.0)
        assert got["precision"] == pytest.approx(CONFUSION[i][i] / col_sum if col_sum else 0.0)
    # spelled out for the two classes a reader checks by eye
    assert m["per_class"]["a"] == {"precision": 3 / 4, "recall": 3 / 4, "support": 4}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "support": 2}


def test_classification_is_plain_json_types():
    y_true, y_pred = predictions_from(CONFUSION, seed=1)
    m = classification(y_true, y_pred, CLASSES)
    assert type(m["accuracy"]) is float and type(m["n"]) is int
    assert all(type(v) is int for row in m["confusion"] for v in row)
    assert all(type(p["precision"]) is float and type(p["support"]) is int
               for p in m["per_class"].values())


def test_classification_of_nothing():
    m = classification(np.array([], dtype=np.int64), np.array([], dtype=np.int64), CLASSES)
    assert m["n"] == 0 and m["accuracy"] == 0.0
    assert m["confusion"] == [[0] * 4 for _ in range(4)]


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 3], dtype=np.int64)
    m = classification(y, y.copy(), CLASSES)
    assert m["accuracy"] == 1.0
    assert all(p["recall"] == 1.0 and p["precision"] == 1.0 for p in m["per_class"].values())


# -- regression.run_tests ------------------------------------------------------------------------

GATE = factories.params().gate
THRESHOLDS = dict(min_accuracy=GATE.min_accuracy, max_accuracy_drop=GATE.max_accuracy_drop,
                  max_class_recall_drop=GATE.max_class_recall_drop)


def metrics_for(recalls: dict[str, float], support: int = 100) -> dict:
    """A metrics dict (the shape classification() returns) from per-class recalls, every class
    with the same support, so accuracy is the mean recall."""
    per_class = {c: {"recall": r, "precision": r, "support": support} for c, r in recalls.items()}
    return {"accuracy": sum(recalls.values()) / len(recalls), "n": support * len(recalls),
            "per_class": per_class}


def failed(tests):
    return [t["name"] for t in tests if not t["passed"]]


def test_first_model_is_judged_on_the_floor_alone():
    cand = metrics_for({"0": GATE.min_accuracy + 0.02, "1": GATE.min_accuracy + 0.02})
    tests = regression.run_tests(cand, None, **THRESHOLDS)
    assert [t["name"] for t in tests] == ["accuracy floor"]
    assert regression.verdict(tests) == regression.PASS
    assert tests[0]["value"] == pytest.approx(cand["accuracy"])
    assert tests[0]["threshold"] == GATE.min_accuracy


def test_first_model_under_the_floor_fails():
    cand = metrics_for({"0": GATE.min_accuracy - 0.05, "1": GATE.min_accuracy - 0.05})
    tests = regression.run_tests(cand, None, **THRESHOLDS)
    assert failed(tests) == ["accuracy floor"]
    assert regression.verdict(tests) == regression.FAIL


def test_accuracy_exactly_at_the_floor_passes():
    cand = {"accuracy": GATE.min_accuracy, "per_class": {}}
    assert regression.verdict(regression.run_tests(cand, None, **THRESHOLDS)) == regression.PASS


def uniform(acc: float, classes=("0", "1", "2")) -> dict:
    return metrics_for({c: acc for c in classes})


def test_accuracy_drop_beyond_the_margin_fails():
    prod = uniform(0.97)
    cand = uniform(0.97 - 2 * GATE.max_accuracy_drop)
    assert cand["accuracy"] >= GATE.min_accuracy  # above the floor: only the drop can fail it
    tests = regression.run_tests(cand, prod, **{**THRESHOLDS, "max_class_recall_drop": 1.0})
    assert failed(tests) == ["accuracy vs production"]
    t = next(t for t in tests if t["name"] == "accuracy vs production")
    assert t["value"] == pytest.approx(2 * GATE.max_accuracy_drop)
    assert regression.verdict(tests) == regression.FAIL


def test_accuracy_drop_within_the_margin_passes():
    prod = uniform(0.97)
    cand = uniform(0.97 - GATE.max_accuracy_drop / 2)
    tests = regression.run_tests(cand, prod, **THRESHOLDS)
    assert failed(tests) == []
    assert regression.verdict(tests) == regression.PASS


def test_improvement_passes():
    tests = regression.run_tests(uniform(0.99), uniform(0.95), **THRESHOLDS)
    assert regression.verdict(tests) == regression.PASS
    assert next(t for t in tests if t["name"] == "accuracy vs production")["value"] < 0


def test_accuracy_drop_exactly_at_the_margin_passes():
    n = 100
    drop_images = round(GATE.max_accuracy_drop * n)
    assert drop_images / n == GATE.max_accuracy_drop  # the margin is a whole number of images
    prod = {"accuracy": 95 / n, "per_class": {}}
    cand = {"accuracy": (95 - drop_images) / n, "per_class": {}}
    assert prod["accuracy"] >= cand["accuracy"] >= GATE.min_accuracy
    tests = regression.run_tests(cand, prod, **THRESHOLDS)
    assert failed(tests) == []


def test_one_class_recall_drop_beyond_the_margin_fails_naming_the_class():
    classes = [str(c) for c in range(10)]
    prod = metrics_for({c: 0.98 for c in classes})
    worse = "7"
    # class 7 loses 3 margins of recall, the others gain enough to keep accuracy level
    recalls = {c: 0.98 for c in classes}
    recalls[worse] -= 3 * GATE.max_class_recall_drop
    cand = metrics_for(recalls)
    tests = regression.run_tests(cand, prod, **{**THRESHOLDS, "max_accuracy_drop": 1.0})
    assert failed(tests) == [f"recall of class {worse!r}"]
    t = next(t for t in tests if not t["passed"])
    assert t["value"] == pytest.approx(3 * GATE.max_class_recall_drop)
    assert regression.verdict(tests) == regression.FAIL


def test_class_recall_drop_within_the_margin_passes():
    prod = metrics_for({"0": 0.98, "1": 0.98})
    cand = metrics_for({"0": 0.98 - GATE.max_class_recall_drop / 2, "1": 0.99})
    tests = regression.run_tests(cand, prod, **THRESHOLDS)
    assert failed(tests) == []
    assert {t["name"] for t in tests} >= {"recall of class '0'", "recall of class '1'"}


def test_classes_production_never_saw_are_not_compared():
    prod = metrics_for({"0": 0.98, "1": 0.98})
    prod["per_class"]["1"]["support"] = 0
    cand = metrics_for({"0": 0.98, "1": 0.0, "2": 0.0})  # "2" is new; "1" had no support
    cand["accuracy"] = 0.98
    tests = regression.run_tests(cand, prod, **THRESHOLDS)
    names = [t["name"] for t in tests]
    assert "recall of class '1'" not in names and "recall of class '2'" not in names
    assert regression.verdict(tests) == regression.PASS


# -- gate ----------------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>|x"


def evaluation(classes, cand_conf, prod_conf=None):
    def side(conf):
        y_true, y_pred = predictions_from(conf)
        return classification(y_true, y_pred, classes)
    prod = None if prod_conf is None else {"id": "m0001-abcdef0123", "sha256": "b" * 64,
                                           **side(prod_conf)}
    return {"eval_hash": "e" * 64, "eval_n": int(np.sum(cand_conf)), "classes": list(classes),
            "candidate": {"sha256": "a" * 64, **side(cand_conf)}, "production": prod}


def table_rows(md: str) -> list[list[str]]:
    return [line.strip("|").split("|") for line in md.splitlines() if line.startswith("|")]


def test_report_escapes_hostile_class_names(tmp_path):
    classes = ("0", HOSTILE, "multi\nline")
    cand = [[9, 1, 0], [2, 8, 0], [0, 0, 10]]
    prod = [[10, 0, 0], [0, 10, 0], [0, 0, 10]]
    ev = evaluation(classes, cand, prod)
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(ev))
    decision = gate.run(path, tmp_path / "gate", params=factories.params())
    md = (tmp_path / "gate" / "report.md").read_text()
    assert md == gate.report(decision, ev)
    assert "<script>" not in md and "</script>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&#124;x" in md
    # The "|" in the name does not add a column: every row of a table has its header's width.
    lines = md.splitlines()
    widths = []
    for line in lines:
        if line.startswith("|"):
            widths.append(len(line.strip().strip("|").split("|")))
        else:
            if widths:
                assert len(set(widths)) == 1, widths
            widths = []
    assert "multi\nline" not in md and "multi line" in md
    # the failing recall test for the hostile class is in the report, escaped
    assert any("recall of class" in r[0] and "&lt;script&gt;" in r[0] and "FAIL" in r[1]
               for r in table_rows(md))


def test_gate_run_writes_decision_like_promote_reads_it(tmp_path):
    classes = ("0", "1")
    ev = evaluation(classes, [[10, 0], [1, 9]])
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(ev))
    decision = gate.run(path, tmp_path / "gate", params=factories.params())
    assert read_json(tmp_path / "gate" / "decision.json") == decision
    assert decision["candidate_sha256"] == ev["candidate"]["sha256"]
    assert decision["candidate_accuracy"] == pytest.approx(19 / 20)
    assert decision["eval_hash"] == ev["eval_hash"]
    assert decision["production_id"] is None
    expected = regression.verdict(regression.run_tests(ev["candidate"], None, **THRESHOLDS))
    assert decision["verdict"] == expected == ("PASS" if 19 / 20 >= GATE.min_accuracy else "FAIL")
    md = (tmp_path / "gate" / "report.md").read_text()
    assert re.search(rf"Gate verdict: \*\*{decision['verdict']}\*\*", md)
    assert "no production model yet" in md
