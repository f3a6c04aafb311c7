"""The gate's regression tests: candidate vs production on the same fixed eval set.

Pure functions over metric dicts (see pipelines.metrics.classification); no I/O, no Prefect,
no DVC. Each test returns {name, passed, value, threshold, detail}.
"""
from __future__ import annotations

PASS, FAIL = "PASS", "FAIL"
# Metrics are ratios of counts; 0.95 - 0.94 is 0.010000000000000009 in floating point. A drop
# exactly at the margin is allowed, so compare with this much slack (far below 1 image in 10^6).
EPS = 1e-9


def _test(name: str, passed: bool, value: float, threshold: float, detail: str) -> dict:
    return {"name": name, "passed": bool(passed), "value": round(value, 6),
            "threshold": round(threshold, 6), "detail": detail}


def run_tests(candidate: dict, production: dict | None, *, min_accuracy: float,
              max_accuracy_drop: float, max_class_recall_drop: float) -> list[dict]:
    """The first model (no production) is judged on the absolute floor alone."""
    acc = candidate["accuracy"]
    tests = [_test("accuracy floor", acc >= min_accuracy - EPS, acc, min_accuracy,
                   f"candidate accuracy {acc:.4f} vs floor {min_accuracy:.4f}")]
    if production is None:
        return tests
    drop = production["accuracy"] - acc
    tests.append(_test("accuracy vs production", drop <= max_accuracy_drop + EPS, drop,
                       max_accuracy_drop,
                       f"production {production['accuracy']:.4f} -> candidate {acc:.4f} "
                       f"(drop {drop:+.4f}, allowed {max_accuracy_drop:.4f})"))
    for cls, cand in candidate["per_class"].items():
        prod = production["per_class"].get(cls)
        if prod is None or prod["support"] == 0:
            continue
        drop = prod["recall"] - cand["recall"]
        tests.append(_test(f"recall of class {cls!r}", drop <= max_class_recall_drop + EPS, drop,
                           max_class_recall_drop,
                           f"recall {prod['recall']:.4f} -> {cand['recall']:.4f} "
                           f"(drop {drop:+.4f}, allowed {max_class_recall_drop:.4f})"))
    return tests


def verdict(tests: list[dict]) -> str:
    return PASS if all(t["passed"] for t in tests) else FAIL
