"""The gate on real training runs over the 1,797 demo digit scans (CPU, ~1 min):

- production: a model trained with the demo settings;
- a retrain on the same data with another seed must not FAIL (seed noise is not a regression);
- a retrain with 60 % of class 3's training labels corrupted to 8 must FAIL, naming class 3;
- `calibrate` measures the seed spread and proposes margins that the seed retrain passes.
"""
from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from pipelines import calibrate, evaluate, gate, images, promote, registry, report  # noqa: E402
from pipelines import train  # noqa: E402
from pipelines.files import jsonl_bytes, read_json, sha256_bytes, tar_bytes  # noqa: E402
from tests import factories  # noqa: E402

EVAL_PER_CLASS = 30
CORRUPT_CLASS, INTO = 3, 8


def _params(seed: int = 42):
    p = factories.params({"train.device": "cpu", "train.epochs": 8})
    return dataclasses.replace(p, base=dataclasses.replace(p.base, seed=seed))


def _write_prepared(folder, x, y, val_mask):
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.arange(len(y), dtype=np.int64)
    for name, mask in (("train", ~val_mask), ("val", val_mask)):
        np.savez(folder / f"{name}.npz", x=x[mask], y=y[mask], task_id=ids[mask],
                 sha256=np.array([f"{i:064x}" for i in ids[mask]]))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    params = _params()
    n = factories.digit_count()
    labels = np.array([factories.digit_label(i) for i in range(n)])
    pngs = [factories.digit_png(i) for i in range(n)]
    # fixed eval set: the first 30 scans of each class, in the format evalset.freeze writes
    eval_idx = np.concatenate([np.flatnonzero(labels == c)[:EVAL_PER_CLASS] for c in range(10)])
    rows, blobs = [], {}
    for i in sorted(eval_idx):
        sha = sha256_bytes(pngs[i])
        rows.append({"task_id": int(i), "image_sha256": sha, "label": str(labels[i])})
        blobs[sha] = pngs[i]
    eval_dir = root / "eval"
    eval_dir.mkdir()
    manifest = jsonl_bytes(rows)
    (eval_dir / "manifest.jsonl").write_bytes(manifest)
    (eval_dir / "images.tar").write_bytes(tar_bytes(blobs))
    (eval_dir / "meta.json").write_text(f'{{"hash": "{sha256_bytes(manifest)}"}}')
    rest = np.setdiff1d(np.arange(n), eval_idx)
    x = images.stack([pngs[i] for i in rest], params.base.image_size)
    y = labels[rest]
    val = np.random.default_rng(0).random(len(rest)) < 0.15
    _write_prepared(root / "clean", x, y, val)
    bad = y.copy()
    victims = np.flatnonzero((y == CORRUPT_CLASS) & ~val)
    victims = np.random.default_rng(1).permutation(victims)[:round(0.6 * len(victims))]
    bad[victims] = INTO
    _write_prepared(root / "corrupt", x, bad, val)

    reg = root / "registry"

    def candidate(name: str, prepared: str, seed: int) -> dict:
        out = root / name
        train.run(root / prepared, out, params=_params(seed))
        evaluate.run(out / "model.safetensors", eval_dir, reg, root / f"ev-{name}", params=params)
        decision = gate.run(root / f"ev-{name}", root / f"gate-{name}", params=params)
        report.run(root / f"gate-{name}" / "decision.json", root / f"ev-{name}",
                   root / f"gate-{name}", params=params, eval_dir=eval_dir, candidate_dir=out,
                   raw=root / "none")
        return {"dir": out, "decision": decision}

    base = candidate("base", "clean", 42)
    assert base["decision"]["verdict"] == "PASS", base["decision"]["tests"]
    event = promote.run(base["dir"] / "model.safetensors", root / "gate-base" / "decision.json",
                        reg, dataset_version="pulls-000001-x", params_hash="p" * 64)
    assert event["event"] == "promoted"
    return {"root": root, "params": params, "eval_dir": eval_dir, "reg": reg,
            "candidate": candidate, "base": base}


def test_a_retrain_with_another_seed_does_not_fail(world):
    other = world["candidate"]("seed", "clean", 7)
    decision = other["decision"]
    print(f"\nseed retrain: verdict {decision['verdict']}, accuracy "
          f"{decision['production_accuracy']:.4f} -> {decision['candidate_accuracy']:.4f}; "
          + "; ".join(f"{t['name']} {t['result']} ({t['value']:+.4f})" for t in decision["tests"]
                      if t["result"] != "pass"))
    assert decision["production_id"] == registry.production(world["reg"])["id"]
    assert decision["verdict"] != "FAIL", [t for t in decision["tests"] if t["result"] == "fail"]


def test_a_planted_label_corruption_fails_naming_the_class(world):
    bad = world["candidate"]("corrupt", "corrupt", 42)
    decision = bad["decision"]
    assert decision["verdict"] == "FAIL"
    failed = {t["name"]: t for t in decision["tests"] if t["result"] == "fail"}
    recall = failed[f"recall of class '{CORRUPT_CLASS}'"]
    print(f"\ncorrupted retrain: verdict {decision['verdict']}, accuracy "
          f"{decision['production_accuracy']:.4f} -> {decision['candidate_accuracy']:.4f}; "
          f"failed: " + "; ".join(f"{n} {t['value']:+.4f} (p {t['p_value']})"
                                  for n, t in failed.items()))
    assert recall["value"] >= 0.03 and recall["p_value"] < world["params"].gate.alpha
    report = (world["root"] / "gate-corrupt" / "report.html").read_text()
    assert "Verdict: FAIL" in report and "Right → wrong" in report
    # promote keeps production and records why
    event = promote.run(bad["dir"] / "model.safetensors",
                        world["root"] / "gate-corrupt" / "decision.json", world["reg"],
                        dataset_version="pulls-000002-x", params_hash="p" * 64)
    assert event["event"] == "rejected"
    assert registry.production(world["reg"])["sha256"] != read_json(
        world["root"] / "gate-corrupt" / "decision.json")["candidate_sha256"]


def test_calibrate_proposes_margins_from_seed_noise(world):
    out = world["root"] / "calibration"
    result = calibrate.run(world["root"] / "clean", world["eval_dir"], out,
                           params=world["params"], seeds=2)
    assert read_json(out / "calibration.json") == result
    proposed = result["proposed"]
    print(f"\ncalibrate (2 seeds): accuracy {result['accuracy']}, proposed {proposed}")
    acc = result["accuracy"]
    # the accuracy margin covers the spread it measured (and at least one of the 300 eval
    # images), rounded up to 0.005
    spread = max(acc["max"] - acc["min"], 1 / 300)
    assert spread - 1e-9 <= proposed["max_accuracy_drop"] < spread + calibrate.STEP
    assert proposed["max_class_recall_drop"] >= 1 / EVAL_PER_CLASS
    assert all(0 <= v <= 1 and round(v / calibrate.STEP, 6).is_integer()
               for v in proposed.values())
