"""The gate's regression tests: the candidate on the fixed eval set, against what means something
for this project, declared here with their thresholds in params.yaml `gate`.

Pure functions over the evaluation and its per-image predictions (pipelines.records, written by
pipelines.evaluate): no I/O, no Prefect, no DVC. Each test is a `records.GateTest` {name,
result, value, threshold, p_value, detail} with result one of

    pass          within its margin (or budget)
    fail          beyond its margin, and the paired evidence says so (p < gate.alpha)
    inconclusive  beyond its margin, but resampling noise could explain it
    no evidence   not judged: too few eval examples of the class (gate.min_class_support), or
                  no budget to judge against

Verdict: FAIL if any test fails, else INCONCLUSIVE if any is inconclusive, else PASS.

Every candidate, the first one too: better than the majority-class baseline (a constant
predictor of the eval set's most frequent class; exact one-sided McNemar on the same images),
every class with enough support recalled above chance (binomial test against 1/K) or above
`gate.min_class_recall`, an accuracy floor only when `gate.min_accuracy` is set, and budgets:
relative to production (`max_size_ratio`, `max_compute_ratio`) and absolute when set. A first
model (no production) is judged by these alone: a digit-sized accuracy floor rejected an 85.5 %
first model on a 10-class non-digit set, and a 10 MB / 100 million-MAC budget fails any
ResNet-18 (45 MB, 1.8 G MACs at 224 px).

Comparative tests are non-inferiority tests on the same images (paired): p is the paired
bootstrap's probability that the drop is within the margin. Each margin is the larger of the
configured one and `gate.noise_z` sd of a seed-to-seed difference measured on this project
(pipelines/noise.py): a retrain that only changes the seed moves the same eval images
systematically, so a paired test alone calls seed noise significant.
"""
from __future__ import annotations

import numpy as np

from pipelines import noise, stats
from pipelines.records import FAIL, INCONCLUSIVE, PASS, Evaluation, GateTest, Predictions

# Metrics are ratios of counts; 0.95 - 0.94 is 0.010000000000000009 in floating point. A drop
# exactly at the margin is allowed, so compare with this much slack (far below 1 image in 10^6).
EPS = 1e-9
BASELINE = "better than the majority-class baseline"
CLASS_FLOOR = "per-class recall floor"


def _test(name: str, result: str, value: float, threshold: float, detail: str,
          p_value: float | None = None) -> GateTest:
    return GateTest(name=name, result=result, passed=result != "fail", value=float(value),
                    threshold=float(threshold),
                    p_value=None if p_value is None else float(f"{p_value:.4g}"), detail=detail)


def _paired(name: str, drop: float, margin: float, p_value: float, alpha: float,
            detail: str) -> GateTest:
    if drop <= margin + EPS:
        return _test(name, "pass", drop, margin, detail)
    result = "fail" if p_value < alpha else "inconclusive"
    return _test(name, result, drop, margin, f"{detail}; p(drop <= margin) = {p_value:.3g} "
                 f"({'beyond the margin' if result == 'fail' else 'could be noise'} at "
                 f"alpha {alpha})", p_value)


def _mean_drop_p(diff: np.ndarray, drop: float, margin: float) -> float:
    return stats.bootstrap_mean_beyond_p(diff, margin) if drop > margin + EPS else 1.0


def _precision(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    chosen = pred == k
    return float((truth[chosen] == k).mean()) if chosen.any() else 0.0


def baseline_test(truth: np.ndarray, cand: np.ndarray, k: int, alpha: float) -> GateTest:
    """The candidate vs the constant predictor of the eval set's majority class, on the same
    images: `b` images only the candidate gets right, `c` only the baseline; exact McNemar."""
    counts = np.bincount(truth, minlength=k)
    majority = int(counts.argmax())
    base_ok, cand_ok = truth == majority, cand == truth
    b, c = int((cand_ok & ~base_ok).sum()), int((~cand_ok & base_ok).sum())
    n = max(len(truth), 1)
    gain = (int(cand_ok.sum()) - int(base_ok.sum())) / n
    p_value = stats.mcnemar_worse_p(b, c)   # P(at least b of b + c if equally good)
    result = "pass" if p_value < alpha else ("fail" if gain <= EPS else "inconclusive")
    return _test(BASELINE, result, gain, 0.0,
                 f"accuracy {cand_ok.mean():.4f} vs {base_ok.mean():.4f} for always answering "
                 f"the majority class (chance 1/{k} = {1 / k:.4f}); {b} image(s) only the "
                 f"candidate gets right, {c} only the baseline (McNemar p = {p_value:.3g})",
                 p_value)


def class_floor_test(ev: Evaluation, truth: np.ndarray, cand: np.ndarray, g) -> GateTest:
    """Every class with at least `g.min_class_support` eval images: recall above
    `g.min_class_recall` (point estimate) or, when that is None, significantly above chance
    1/K (one-sided binomial, p < alpha). One test for all classes: 1,000 classes make one line."""
    k = len(ev.classes)
    floor = g.min_class_recall
    below, judged, worst = [], 0, 1.0
    for i, cls in enumerate(ev.classes):
        mine = truth == i
        support = int(mine.sum())
        if support < g.min_class_support:
            continue
        judged += 1
        hits = int((cand[mine] == i).sum())
        recall = hits / support
        worst = min(worst, recall)
        if floor is None:
            p_value = stats.binomial_at_least_p(hits, support, 1 / k)
            if p_value >= g.alpha:
                below.append(f"{cls!r} {recall:.3f} of {support} (p {p_value:.2g})")
        elif recall < floor - EPS:
            below.append(f"{cls!r} {recall:.3f} of {support}")
    threshold = 1 / k if floor is None else floor
    what = (f"recall significantly above chance 1/{k} (binomial, alpha {g.alpha})"
            if floor is None else f"recall at least gate.min_class_recall = {floor:g}")
    if not judged:
        return _test(CLASS_FLOOR, "no evidence", 0.0, threshold,
                     f"no class has gate.min_class_support = {g.min_class_support} eval images")
    skipped = k - judged
    detail = (f"{what} for the {judged} class(es) with at least {g.min_class_support} eval "
              f"images" + (f" ({skipped} with fewer not judged)" if skipped else ""))
    if below:
        shown = "; ".join(below[:8]) + (f"; … ({len(below)} in all)" if len(below) > 8 else "")
        return _test(CLASS_FLOOR, "fail", worst, threshold, f"{detail}: below: {shown}")
    return _test(CLASS_FLOOR, "pass", worst, threshold, f"{detail}: all are (lowest {worst:.3f})")


def _budget(name: str, value: float, unit: str, absolute: float | None, ratio: float | None,
            prod_value: float | None, *, absolute_key: str, ratio_key: str) -> GateTest:
    """`value` within the tighter of the absolute budget and `ratio` x production's value."""
    limits = []
    if absolute is not None:
        limits.append((absolute, f"{absolute:g} {unit} ({absolute_key})"))
    if ratio is not None and prod_value is not None:
        limits.append((ratio * prod_value, f"{ratio:g} x production's {prod_value:.2f} {unit} "
                                           f"({ratio_key})"))
    if not limits:
        why = ("no production model to compare with" if prod_value is None
               else f"{ratio_key} is null")
        return _test(name, "no evidence", value, 0.0,
                     f"{value:.2f} {unit}; no budget: {why} and {absolute_key} is null")
    limit, text = min(limits)
    ok = value <= limit * (1 + EPS) + EPS
    return _test(name, "pass" if ok else "fail", value, limit,
                 f"{value:.2f} {unit} (budget {limit:.2f} {unit} = {text})")


def absolute_tests(ev: Evaluation, pred: Predictions, g) -> list[GateTest]:
    """What every candidate must meet, with or without production."""
    cand, prod = ev.candidate, ev.production
    truth, cp = pred.truth, pred.cand_pred
    tests = [baseline_test(truth, cp, len(ev.classes), g.alpha)]
    if g.min_accuracy is not None:
        acc = cand.accuracy
        tests.append(_test("accuracy floor", "pass" if acc >= g.min_accuracy - EPS else "fail",
                           acc, g.min_accuracy,
                           f"candidate accuracy {acc:.4f} vs floor {g.min_accuracy:.4f} "
                           "(gate.min_accuracy)"))
    tests.append(class_floor_test(ev, truth, cp, g))
    # Compute, not wall-clock latency: a timing depends on the machine and its load, and the
    # verdict must be the same wherever `dvc repro` runs. Multiply-accumulates per image follow
    # from the layer shapes alone (pipelines.evaluate.macs_per_image); the measured latency is
    # shown in the report against gate.max_latency_ms_p95.
    prod_mb = prod.size_bytes / 1e6 if prod and prod.size_bytes is not None else None
    prod_macs = prod.macs_per_image / 1e6 if prod and prod.macs_per_image is not None else None
    tests.append(_budget("model size", cand.size_bytes / 1e6, "MB", g.max_model_mb,
                         g.max_size_ratio, prod_mb, absolute_key="gate.max_model_mb",
                         ratio_key="gate.max_size_ratio"))
    tests.append(_budget("compute per image", cand.macs_per_image / 1e6, "million MACs",
                         g.max_mmacs_per_image, g.max_compute_ratio, prod_macs,
                         absolute_key="gate.max_mmacs_per_image",
                         ratio_key="gate.max_compute_ratio"))
    return tests


def run_tests(ev: Evaluation, pred: Predictions, g) -> list[GateTest]:
    """`ev`: the metrics, `pred`: the per-image predictions they summarise (`prod_pred`,
    `prod_conf` when there is a production model). `g`: params.gate."""
    tests = absolute_tests(ev, pred, g)
    cand, prod = ev.candidate, ev.production
    if prod is None:
        return tests
    m = noise.margins(ev.seed_noise, g, ev.classes, eval_hash=ev.eval_hash)
    truth, cp, pp = pred.truth, pred.cand_pred, pred.prod_pred
    acc = cand.accuracy
    c_ok, p_ok = cp == truth, pp == truth

    diff = p_ok.astype(np.int8) - c_ok.astype(np.int8)   # +1: newly wrong, -1: newly right
    worse, better = int((diff == 1).sum()), int((diff == -1).sum())
    drop = prod.accuracy - acc
    tests.append(_paired("accuracy vs production", drop, m.accuracy,
                         _mean_drop_p(diff, drop, m.accuracy), g.alpha,
                         f"production {prod.accuracy:.4f} -> candidate {acc:.4f}; "
                         f"{worse} image(s) newly wrong, {better} newly right (McNemar "
                         f"p = {stats.mcnemar_worse_p(worse, better):.3g}); "
                         f"{m.origin['accuracy']}"))

    for k, cls in enumerate(ev.classes):
        support = cand.per_class[cls].support
        if support < g.min_class_support:
            for kind in ("recall", "precision"):
                tests.append(_test(f"{kind} of class {cls!r}", "no evidence", 0.0,
                                   getattr(m, kind)[cls], f"{support} eval image(s) of this "
                                   f"class, fewer than gate.min_class_support = "
                                   f"{g.min_class_support}"))
            continue
        mine = diff[truth == k]
        w, b = int((mine == 1).sum()), int((mine == -1).sum())
        pr, cr = prod.per_class[cls].recall, cand.per_class[cls].recall
        margin = m.recall[cls]
        tests.append(_paired(f"recall of class {cls!r}", pr - cr, margin,
                             _mean_drop_p(mine, pr - cr, margin), g.alpha,
                             f"recall {pr:.4f} -> {cr:.4f} on {support} images (McNemar "
                             f"p = {stats.mcnemar_worse_p(w, b):.3g}); "
                             f"{m.origin['recall:' + cls]}"))
        # precision's own support: the images production called `cls`; on a handful of them a
        # single image moves precision by more than any margin
        called = int((pp == k).sum())
        if called < g.min_class_support:
            tests.append(_test(f"precision of class {cls!r}", "no evidence", 0.0,
                               m.precision[cls], f"production called {called} eval image(s) "
                               f"{cls!r}, fewer than gate.min_class_support = "
                               f"{g.min_class_support}"))
            continue
        pprec, cprec = _precision(pp, truth, k), _precision(cp, truth, k)
        margin = m.precision[cls]
        p_value = 1.0
        if pprec - cprec > margin + EPS:
            p_value = stats.bootstrap_beyond_p(
                lambda idx, k=k: (_precision(pp[idx], truth[idx], k)
                                  - _precision(cp[idx], truth[idx], k)), len(truth), margin)
        tests.append(_paired(f"precision of class {cls!r}", pprec - cprec, margin, p_value,
                             g.alpha, f"precision {pprec:.4f} -> {cprec:.4f}; "
                             f"{m.origin['precision:' + cls]}"))

    index = pred.index()
    critical = [t for t in g.critical_task_ids if t in index]
    lost = [t for t in critical if p_ok[index[t]] and not c_ok[index[t]]]
    missing = sorted(set(g.critical_task_ids) - set(critical))
    tests.append(_test("critical cases", "fail" if lost else "pass", float(len(lost)), 0.0,
                       (f"now wrong: tasks {lost}" if lost else
                        f"all {len(critical)} critical eval task(s) production gets right "
                        "still right")
                       + (f"; not in the eval set: {missing}" if missing else "")))

    c_conf, p_conf = pred.cand_conf, pred.prod_conf
    c_ece, p_ece = stats.ece(c_conf, c_ok), stats.ece(p_conf, p_ok)
    p_value = 1.0
    if c_ece - p_ece > m.ece + EPS:
        p_value = stats.bootstrap_beyond_p(
            lambda idx: stats.ece(c_conf[idx], c_ok[idx]) - stats.ece(p_conf[idx], p_ok[idx]),
            len(truth), m.ece, samples=500)
    tests.append(_paired("calibration (ECE)", c_ece - p_ece, m.ece, p_value, g.alpha,
                         f"expected calibration error {p_ece:.4f} -> {c_ece:.4f}; "
                         f"{m.origin['ece']}"))
    return tests


def margins_note(ev: Evaluation, g) -> str | None:
    """Where the comparative margins came from, in words (None without production)."""
    if ev.production is None:
        return None
    return noise.margins(ev.seed_noise, g, ev.classes, eval_hash=ev.eval_hash).note


def verdict(tests: list[GateTest]) -> str:
    results = {t.result for t in tests}
    return FAIL if "fail" in results else INCONCLUSIVE if "inconclusive" in results else PASS
