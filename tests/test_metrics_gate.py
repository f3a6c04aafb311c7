"""pipelines.metrics, validation.regression, pipelines.gate and pipelines.report: hand-checkable
numbers, the regression rules at and around their margins, a decision that reads nothing but the
evaluation, the compute and latency measures, and a report that cannot carry markup."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipelines import evaluate, gate, noise, records, report, stats  # noqa: E402
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
TEN = tuple(str(c) for c in range(10))


def gate_params(**overrides):
    return factories.params({f"gate.{k}": v for k, v in overrides.items()}).gate


def scenario(truth, cand, prod=None, **kw):
    return factories.evaluation(truth, cand, prod, **kw)


def judged(ev_predictions, g=GATE):
    tests = regression.run_tests(*ev_predictions, g)
    return tests, regression.verdict(tests)


def by_name(tests, name):
    return next(t for t in tests if t.name == name)


def results(tests, result):
    return [t.name for t in tests if t.result == result]


def balanced(per_class=30):
    """truth: `per_class` images of each of the ten classes."""
    return np.repeat(np.arange(10), per_class)


def wrong(truth, idx):
    """Predictions equal to truth except at `idx`, where they are the next class."""
    pred = truth.copy()
    pred[idx] = (truth[idx] + 1) % 10
    return pred


ABSOLUTE = [regression.BASELINE, regression.CLASS_FLOOR, "model size", "compute per image"]


def with_production_cost(ev_predictions, *, size_bytes, macs):
    """The evaluation with production's file size and compute (what evaluate records)."""
    ev, predictions = ev_predictions
    return (dataclasses.replace(ev, production=dataclasses.replace(
        ev.production, size_bytes=size_bytes, macs_per_image=macs)), predictions)


def test_first_model_is_judged_on_the_absolute_tests_alone():
    truth = balanced()
    tests, verdict = judged(scenario(truth, truth))
    assert [t.name for t in tests] == ABSOLUTE
    assert verdict == regression.PASS
    assert by_name(tests, regression.BASELINE).value == pytest.approx(0.9)  # 1.0 vs 0.1
    # no production and no absolute budget: cost is shown, not judged
    assert by_name(tests, "model size").result == "no evidence"
    assert "gate.max_model_mb is null" in by_name(tests, "model size").detail


def issue_first_model(per_class=1000):
    """The issue's first model on a 10-class non-digit set: 85.5 % on the fixed eval set, its
    weakest class recalled 47.4 % (what the digit-tuned 0.90 floor rejected)."""
    truth = np.repeat(np.arange(10), per_class)
    recalls = [0.474, 0.80, 0.85, 0.90, 0.90, 0.90, 0.92, 0.92, 0.93, 0.956]
    assert sum(recalls) / 10 == pytest.approx(0.855)
    cand = truth.copy()
    for c, r in enumerate(recalls):
        idx = np.flatnonzero(truth == c)
        cand[idx[round(r * per_class):]] = (c + 1) % 10
    return truth, cand


def test_an_85_percent_first_model_on_a_non_digit_set_passes_the_defaults():
    truth, cand = issue_first_model()
    ev = scenario(truth, cand, size_bytes=44_800_000, macs=1_820_000_000)  # a ResNet-18, 224 px
    tests, verdict = judged(ev)
    assert ev[0].candidate.accuracy == pytest.approx(0.855)
    assert verdict == regression.PASS, [(t.name, t.detail) for t in tests if t.result != "pass"]
    # ... and a floor the user sets still rejects it
    tests, verdict = judged(ev, gate_params(min_accuracy=0.90))
    assert results(tests, "fail") == ["accuracy floor"] and verdict == regression.FAIL


def test_accuracy_exactly_at_a_set_floor_passes():
    truth = np.repeat(np.arange(2), 50)
    g = gate_params(min_accuracy=0.9)
    cand = truth.copy()
    cand[::10] = 1 - truth[::10]                           # 90 right of 100
    tests, _ = judged(scenario(truth, cand, classes=("0", "1")), g)
    assert by_name(tests, "accuracy floor").result == "pass"


def test_the_majority_class_predictor_fails_the_baseline_test():
    """Imbalanced: 80 % of the eval set is class 0. Always answering 0 is 80 % accurate and
    must not become production; a model no better than that on the same images fails too."""
    truth = np.array([0] * 240 + [1] * 30 + [2] * 30)
    tests, verdict = judged(scenario(truth, np.zeros_like(truth), classes=("0", "1", "2")))
    t = by_name(tests, regression.BASELINE)
    assert t.result == "fail" and t.value == 0.0 and verdict == regression.FAIL
    assert "0 image(s) only the candidate gets right" in t.detail
    # better by 4 images of 300: could be luck (inconclusive), not yet a pass
    cand = np.zeros_like(truth)
    cand[240:244] = 1
    t = by_name(judged(scenario(truth, cand, classes=("0", "1", "2")))[0], regression.BASELINE)
    assert t.result == "inconclusive" and t.p_value == pytest.approx(1 / 16)


def test_a_class_at_chance_fails_the_class_floor_naming_it():
    truth = balanced()
    cand = truth.copy()
    cand[np.flatnonzero(truth == 4)[3:]] = 5               # class 4: 3 of 30 = chance (1/10)
    tests, verdict = judged(scenario(truth, cand))
    t = by_name(tests, regression.CLASS_FLOOR)
    assert t.result == "fail" and "'4' 0.100 of 30" in t.detail and verdict == regression.FAIL
    assert t.value == pytest.approx(0.1) and t.threshold == pytest.approx(0.1)
    # 9 of 30 is clearly above chance (binomial p = 0.02)
    cand[np.flatnonzero(truth == 4)[:9]] = 4
    assert by_name(judged(scenario(truth, cand))[0], regression.CLASS_FLOOR).result == "pass"
    # a floor the user sets is a plain minimum
    t = by_name(judged(scenario(truth, cand), gate_params(min_class_recall=0.5))[0],
                regression.CLASS_FLOOR)
    assert t.result == "fail" and t.threshold == 0.5


def test_classes_below_min_class_support_are_not_judged_by_the_floor():
    truth = np.array([0] * 50 + [1] * 50 + [2] * 5)
    cand = truth.copy()
    cand[100:] = 0                                         # the 5 images of class 2 all wrong
    t = by_name(judged(scenario(truth, cand, classes=("0", "1", "2")))[0], regression.CLASS_FLOOR)
    assert t.result == "pass" and "1 with fewer not judged" in t.detail


def test_absolute_budgets_judge_when_set():
    truth = balanced()
    g = gate_params(max_model_mb=10.0, max_mmacs_per_image=100.0)
    tests, verdict = judged(scenario(truth, truth, size_bytes=10_000_001, macs=100_000_001), g)
    assert results(tests, "fail") == ["model size", "compute per image"]
    assert verdict == regression.FAIL
    tests, _ = judged(scenario(truth, truth, macs=100_000_000), g)
    assert by_name(tests, "compute per image").result == "pass"


def test_budgets_are_relative_to_production_by_default():
    truth = balanced()
    prod_size, prod_macs = 44_800_000, 1_820_000_000       # production: a ResNet-18
    ok = with_production_cost(scenario(truth, truth, truth, size_bytes=int(1.2 * prod_size),
                                       macs=int(1.25 * prod_macs)),
                              size_bytes=prod_size, macs=prod_macs)
    tests, verdict = judged(ok)
    assert by_name(tests, "model size").result == "pass" and verdict == regression.PASS
    assert "1.25 x production's 44.80 MB" in by_name(tests, "model size").detail
    assert by_name(tests, "compute per image").result == "pass"   # exactly at 1.25x
    big = with_production_cost(scenario(truth, truth, truth, size_bytes=int(1.3 * prod_size),
                                        macs=int(1.3 * prod_macs)),
                               size_bytes=prod_size, macs=prod_macs)
    tests, verdict = judged(big)
    assert results(tests, "fail") == ["model size", "compute per image"]
    # the tighter of the two when an absolute budget is set too
    tests, _ = judged(ok, gate_params(max_model_mb=50.0))
    t = by_name(tests, "model size")
    assert t.result == "fail" and t.threshold == pytest.approx(50.0)
    # production's cost unknown (an evaluation from before it was recorded): not judged
    tests, _ = judged(scenario(truth, truth, truth))
    assert by_name(tests, "model size").result == "no evidence"


LOOSE_CLASSES = dict(max_class_recall_drop=1.0, max_class_precision_drop=1.0)


def test_a_significant_accuracy_drop_beyond_the_margin_fails():
    truth = balanced()
    cand = wrong(truth, np.arange(0, 300, 20))  # 15 images newly wrong, none newly right
    tests, verdict = judged(scenario(truth, cand, truth), gate_params(**LOOSE_CLASSES))
    t = by_name(tests, "accuracy vs production")
    assert t.result == "fail" and t.value == pytest.approx(15 / 300)
    # no resample of 300 images brings a 5 % drop within a 1 % margin: p is its floor, 1/2001
    assert t.p_value == pytest.approx(1 / (stats.BOOTSTRAP_SAMPLES + 1), rel=1e-3)
    assert "McNemar p = 3.05e-05" in t.detail                # 0.5 ** 15, for reference
    assert verdict == regression.FAIL


def test_a_drop_beyond_the_margin_that_noise_explains_is_inconclusive():
    """9 images newly wrong, 5 newly right: drop 4/300 > 1 %, but resampling brings it within
    the margin about 43 % of the time (McNemar: P(>= 9 of 14) = 0.21)."""
    truth = balanced()
    prod = wrong(truth, np.arange(1, 300, 60))           # production misses 5
    cand = wrong(truth, np.arange(0, 300, 34)[:9])       # candidate misses 9 others
    tests, verdict = judged(scenario(truth, cand, prod), gate_params(**LOOSE_CLASSES))
    t = by_name(tests, "accuracy vs production")
    assert t.value == pytest.approx(4 / 300)
    assert t.result == "inconclusive" and 0.3 < t.p_value < 0.6
    assert "McNemar p = 0.212" in t.detail
    assert verdict == regression.INCONCLUSIVE


def test_accuracy_drop_exactly_at_the_margin_passes():
    truth = np.zeros(100, dtype=int)
    drop = round(GATE.max_accuracy_drop * 100)
    assert drop / 100 == GATE.max_accuracy_drop  # the margin is a whole number of images
    tests, _ = judged(scenario(truth, wrong(truth, np.arange(drop)), truth,
                               classes=("0", "1")), gate_params(**LOOSE_CLASSES))
    assert by_name(tests, "accuracy vs production").result == "pass"


def test_improvement_passes():
    truth = balanced()
    tests, verdict = judged(scenario(truth, truth, wrong(truth, np.arange(0, 300, 30)),
                                     cand_conf=1.0))
    assert verdict == regression.PASS
    assert by_name(tests, "accuracy vs production").value < 0


def test_one_class_recall_collapse_fails_naming_the_class():
    truth = balanced()
    seven = np.flatnonzero(truth == 7)[:10]               # a third of class 7 newly wrong
    others = np.flatnonzero(truth != 7)[::27][:10]        # ten elsewhere newly right
    prod = wrong(truth, others)
    cand = wrong(truth, seven)
    tests, verdict = judged(scenario(truth, cand, prod))
    assert by_name(tests, "accuracy vs production").result == "pass"  # accuracy is level
    # the lost 7s are now called 8: class 8's precision drops with them
    assert results(tests, "fail") == ["recall of class '7'", "precision of class '8'"]
    assert by_name(tests, "recall of class '7'").value == pytest.approx(10 / 30)
    assert verdict == regression.FAIL


def test_small_classes_are_not_enough_evidence():
    truth = balanced(per_class=GATE.min_class_support - 1)
    cand = wrong(truth, np.flatnonzero(truth == 3))       # class 3 entirely wrong
    tests, _ = judged(scenario(truth, cand, truth), gate_params(max_accuracy_drop=1.0))
    t = by_name(tests, "recall of class '3'")
    assert t.result == "no evidence" and "min_class_support" in t.detail


def test_precision_drop_fails_when_the_bootstrap_says_it_is_real():
    truth = balanced()
    cand = truth.copy()
    cand[np.flatnonzero(truth == 5)[:12]] = 3             # twelve 5s now called 3
    tests, _ = judged(scenario(truth, cand, truth), gate_params(max_accuracy_drop=1.0))
    t = by_name(tests, "precision of class '3'")
    assert t.result == "fail" and t.value == pytest.approx(1 - 30 / 42)
    assert t.p_value < GATE.alpha


def test_a_lost_critical_case_fails_naming_the_task():
    truth = balanced()
    cand = wrong(truth, np.array([17]))                   # task 1017, production gets it right
    g = gate_params(critical_task_ids=[1017, 1018, 99])
    tests, verdict = judged(scenario(truth, cand, truth), g)
    t = by_name(tests, "critical cases")
    assert t.result == "fail" and "1017" in t.detail and "99" in t.detail
    assert verdict == regression.FAIL
    tests, _ = judged(scenario(truth, truth, truth), g)
    assert by_name(tests, "critical cases").result == "pass"


def test_worse_calibration_fails():
    truth = balanced()
    miss = np.arange(0, 300, 10)                           # both 90 % right
    pred = wrong(truth, miss)
    tests, _ = judged(scenario(truth, pred, pred, cand_conf=1.0, prod_conf=0.9))  # 90 % sure, 90 % right
    t = by_name(tests, "calibration (ECE)")
    assert t.result == "fail" and t.value > GATE.max_ece_increase


def test_ece_of_a_perfectly_calibrated_model_is_zero():
    conf = np.array([0.8] * 10)
    correct = np.array([1] * 8 + [0] * 2, dtype=bool)
    assert stats.ece(conf, correct) == pytest.approx(0.0)
    assert stats.ece(np.ones(10), correct) == pytest.approx(0.2)


def test_mcnemar_exact_matches_the_binomial_tail():
    assert stats.mcnemar_worse_p(0, 5) == 1.0
    assert stats.mcnemar_worse_p(3, 0) == pytest.approx(0.125)
    assert stats.mcnemar_worse_p(9, 5) == pytest.approx(sum(
        __import__("math").comb(14, k) for k in range(9, 15)) / 2 ** 14)


# -- gate ----------------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>|x"


write_evaluation = factories.write_evaluation


def table_rows(md: str) -> list[list[str]]:
    return [line.strip("|").split("|") for line in md.splitlines() if line.startswith("|")]


def test_reports_escape_hostile_class_names(tmp_path):
    classes = ("0", HOSTILE, "multi\nline")
    truth = np.repeat(np.arange(3), 30)
    cand = truth.copy()
    cand[30:45] = 0                                        # the hostile class loses half
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, cand, truth, classes=classes))
    gate.run(folder, tmp_path / "gate", params=factories.params())
    report.run(tmp_path / "gate" / "decision.json", folder, tmp_path / "gate",
               params=factories.params(), raw=tmp_path / "none")
    md = (tmp_path / "gate" / "report.md").read_text()
    page = (tmp_path / "gate" / "report.html").read_text()
    for text in (md, page):
        assert "<script>" not in text and "</script>" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    # The "|" in the name does not add a column: every row of a table has its header's width.
    widths = []
    for line in md.splitlines():
        if line.startswith("|"):
            widths.append(len(line.strip().strip("|").split("|")))
        else:
            if widths:
                assert len(set(widths)) == 1, widths
            widths = []
    assert "multi\nline" not in md and "multi line" in md
    assert any("recall of class" in r[0] and "&lt;script&gt;" in r[0] and "FAIL" in r[1]
               for r in table_rows(md))


def test_gate_run_writes_decision_like_promote_reads_it(tmp_path):
    truth = balanced()
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, truth))
    decision = gate.run(folder, tmp_path / "gate", params=factories.params())
    # promote reads it through the same type, and the file is that record's JSON
    assert records.Decision.read(tmp_path / "gate" / "decision.json") == decision
    assert read_json(tmp_path / "gate" / "decision.json") == decision.to_json()
    assert decision.candidate_sha256 == "a" * 64 and decision.eval_hash == "e" * 64
    assert decision.production_id is None and decision.verdict == "PASS"
    assert decision.action.startswith("Promote")
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == ["decision.json"]
    report.run(tmp_path / "gate" / "decision.json", folder, tmp_path / "gate",
               params=factories.params(), raw=tmp_path / "x")
    md = (tmp_path / "gate" / "report.md").read_text()
    assert re.search(r"Gate verdict: \*\*PASS\*\*", md) and "no production model yet" in md
    assert "latency not measured" in md


def test_the_decision_is_the_same_bytes_however_often_it_is_made(tmp_path):
    truth = balanced()
    prod = wrong(truth, np.arange(1, 300, 60))
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, wrong(truth, [3, 7]), prod))
    gate.run(folder, tmp_path / "a", params=factories.params())
    gate.run(folder, tmp_path / "b", params=factories.params())
    assert ((tmp_path / "a" / "decision.json").read_bytes()
            == (tmp_path / "b" / "decision.json").read_bytes())


def test_report_shows_latency_against_its_budget(tmp_path):
    truth = balanced()
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, truth))
    budget = 50.0
    params = factories.params({"gate.max_latency_ms_p95": budget})
    gate.run(folder, tmp_path / "gate", params=params)
    for name, p95 in (("fast", budget / 25), ("slow", budget * 2)):
        latency = tmp_path / f"{name}.json"
        latency.write_text(json.dumps({"p95_ms": p95, "p95_ms_runs": [p95] * 5, "repeats": 5,
                                       "device": "cpu", "threads": 1}))
        report.run(tmp_path / "gate" / "decision.json", folder, tmp_path / name,
                   params=params, latency_file=latency, raw=tmp_path / "none")
        md = (tmp_path / name / "report.md").read_text()
        page = (tmp_path / name / "report.html").read_text()
        line = next(x for x in md.splitlines() if x.startswith("Latency"))
        assert f"p95 {p95:.3f} ms" in line and "median of 5 runs" in line and line in md
        assert f"budget {budget:g} ms" in page
        if name == "fast":
            assert "25x headroom" in line and "OVER BUDGET" not in line
        else:
            assert "OVER BUDGET" in line and "headroom" not in line
    # the decision did not move: it never read the latency
    assert records.Decision.read(tmp_path / "gate" / "decision.json").verdict == "PASS"


def test_macs_per_image_counts_convolutions_and_linear_layers():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)           # 5x5 -> 2 x 3x3 outputs, 9 MACs each
            self.fc = nn.Linear(18, 4)               # 4 outputs, 18 MACs each

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))
    x = np.zeros((7, 5, 5), dtype=np.uint8)
    assert evaluate.macs_per_image(Tiny(), x, device=torch.device("cpu")) == 2 * 9 * 9 + 4 * 18
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2))
    # 4x3x3 outputs x 9 + 4x1x1 outputs x (2 channels x 9)
    assert evaluate.macs_per_image(grouped, x, device=torch.device("cpu")) == 36 * 9 + 4 * 18


def test_latency_is_the_median_of_repeated_runs_on_one_thread():
    import torch
    from torch import nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    x = np.zeros((20, 28, 28), dtype=np.uint8)
    threads = torch.get_num_threads()
    measured = evaluate.measure_latency(model, x, device=torch.device("cpu"), repeats=3)
    assert measured["repeats"] == 3 and len(measured["p95_ms_runs"]) == 3
    assert measured["p95_ms"] == sorted(measured["p95_ms_runs"])[1] > 0
    assert measured["threads"] == 1 and torch.get_num_threads() == threads


def test_inconclusive_action_follows_the_configured_rule(tmp_path):
    truth = balanced()
    prod = wrong(truth, np.arange(1, 300, 60))
    cand = wrong(truth, np.arange(0, 300, 34)[:9])
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, cand, prod))
    keep = gate.run(folder, tmp_path / "a", params=factories.params(LOOSE))
    ask = gate.run(folder, tmp_path / "b", params=factories.params(
        {**LOOSE, "gate.on_inconclusive": "ask_reviewer"}))
    assert keep.verdict == ask.verdict == "INCONCLUSIVE"
    assert keep.action.startswith("Keep production")
    assert "labelgate approve" in ask.action


LOOSE = {"gate.max_class_recall_drop": 1.0, "gate.max_class_precision_drop": 1.0}


def test_gate_refuses_an_eval_set_production_was_not_judged_on(tmp_path):
    truth = balanced()
    folder = write_evaluation(tmp_path / "ev", *scenario(truth, truth, truth,
                                                         judged_on="f" * 64))
    with pytest.raises(gate.GateError, match="rebaseline"):
        gate.run(folder, tmp_path / "gate", params=factories.params())
    assert not (tmp_path / "gate").exists()


# -- margins from the seed noise measured on this project (pipelines/noise.py) -------------------

def seed_noise(classes=TEN, *, eval_hash="e" * 64, accuracy=(0.855, 0.840, 0.850),
               recall=None, precision=None, spread=0.01):
    """A calibration as `labelgate calibrate` stores it: per-seed metrics of 3 seeds. Classes
    not given in `recall`/`precision` wobble by +-`spread`."""
    quiet = (0.80, 0.80 + spread, 0.80 - spread)
    return noise.SeedNoise(
        eval_hash=eval_hash, recipe="c" * 64, classes=classes, seeds=(1042, 2042, 3042),
        accuracy=accuracy, ece=(0.02, 0.03, 0.025),
        recall={c: (recall or {}).get(c, quiet) for c in classes},
        precision={c: (precision or {}).get(c, quiet) for c in classes},
        measured_at="2026-11-30T03:00:00Z")


def with_noise(ev_predictions, measured):
    ev, predictions = ev_predictions
    return dataclasses.replace(ev, seed_noise=measured), predictions


def issue_seed_retrain(per_class=100):
    """The issue's seed-only retrain, in counts: accuracy 0.855 -> 0.840; class 3's recall
    0.474 -> 0.268 (its lost images now called 5), class 5's precision drops with them."""
    truth, prod = issue_first_model(per_class)
    prod = prod.copy()
    three = np.flatnonzero(truth == 3)
    prod[three] = 3
    prod[three[47:]] = 5                     # production: 47 of 100 threes right (0.47)
    cand = prod.copy()
    cand[three[27:47]] = 5                   # the retrain: 20 more threes called 5 (0.27)
    fives = np.flatnonzero((truth == 5) & (prod == 5))
    cand[fives[:3]] = 4                      # and a few others move both ways
    fixed = np.flatnonzero((truth != prod) & (truth != 3))[:8]
    cand[fixed] = truth[fixed]
    return truth, cand, prod


def test_an_unstable_class_measured_as_such_does_not_fail_a_seed_retrain():
    truth, cand, prod = issue_seed_retrain()
    ev = scenario(truth, cand, prod)
    tests, verdict = judged(ev)                              # digit-sized margins: FAIL
    assert "recall of class '3'" in results(tests, "fail") and verdict == regression.FAIL
    # calibrate measured class 3 swinging 0.47 / 0.27 / 0.40 and class 5's precision too
    measured = seed_noise(recall={"3": (0.47, 0.27, 0.40)},
                          precision={"5": (0.84, 0.735, 0.80)})
    tests, verdict = judged(with_noise(ev, measured))
    assert verdict != regression.FAIL, [(t.name, t.detail) for t in tests if t.result == "fail"]
    t = by_name(tests, "recall of class '3'")
    spread = float(np.std([0.47, 0.27, 0.40], ddof=1))
    assert t.threshold == pytest.approx(3 * np.sqrt(2) * spread) and "seed spread" in t.detail


def test_a_real_regression_still_fails_with_measured_noise():
    """Class 7 loses most of its recall: far beyond what the seeds did to it."""
    truth, cand, prod = issue_seed_retrain()
    cand = cand.copy()
    cand[np.flatnonzero(truth == 7)[:60]] = 8
    measured = seed_noise(recall={"3": (0.47, 0.27, 0.40)},
                          precision={"5": (0.84, 0.735, 0.80)})
    tests, verdict = judged(with_noise(scenario(truth, cand, prod), measured))
    assert "recall of class '7'" in results(tests, "fail") and verdict == regression.FAIL
    assert "recall of class '3'" not in results(tests, "fail")


def test_a_quiet_class_gets_the_pooled_spread_not_zero():
    measured = seed_noise(recall={"3": (0.47, 0.27, 0.40), "1": (0.9, 0.9, 0.9)})
    m = noise.margins(measured, GATE, TEN, eval_hash="e" * 64)
    pooled = np.sqrt(np.mean([np.var(v, ddof=1) for v in measured.recall.values()]))
    assert m.recall["1"] == pytest.approx(max(GATE.max_class_recall_drop,
                                              3 * np.sqrt(2) * pooled))
    assert m.recall["1"] > GATE.max_class_recall_drop   # class 3's swing widens everyone's
    assert m.recall["3"] > m.recall["1"]


def test_noise_from_another_eval_set_is_not_used():
    measured = seed_noise(eval_hash="f" * 64, recall={"3": (0.47, 0.27, 0.40)})
    m = noise.margins(measured, GATE, TEN, eval_hash="e" * 64)
    assert m.recall["3"] == GATE.max_class_recall_drop and "another eval set" in m.note
    assert noise.margins(None, GATE, TEN, eval_hash="e" * 64).accuracy == GATE.max_accuracy_drop


def test_the_margins_note_reaches_the_decision_and_the_report(tmp_path):
    truth, cand, prod = issue_seed_retrain()
    folder = write_evaluation(tmp_path / "ev", *with_noise(scenario(truth, cand, prod),
                                                           seed_noise()))
    decision = gate.run(folder, tmp_path / "gate", params=factories.params())
    assert "measured on this eval set with 3 seeds" in decision.margins_note
    assert records.Decision.read(tmp_path / "gate" / "decision.json") == decision
    report.run(tmp_path / "gate" / "decision.json", folder, tmp_path / "gate",
               params=factories.params(), raw=tmp_path / "none")
    assert "measured on this eval set with 3 seeds" in (tmp_path / "gate" / "report.md").read_text()


def test_precision_on_few_production_calls_is_not_enough_evidence():
    truth = balanced()
    prod = truth.copy()
    prod[np.flatnonzero(truth == 6)[5:]] = 0                 # production calls only 5 images '6'
    cand = prod.copy()
    cand[np.flatnonzero(truth == 0)[:3]] = 6                 # 3 wrong '6' calls: precision 5/8
    tests, _ = judged(scenario(truth, cand, prod), gate_params(**{"max_accuracy_drop": 1.0}))
    t = by_name(tests, "precision of class '6'")
    assert t.result == "no evidence" and "called 5" in t.detail
