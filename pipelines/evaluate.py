"""evaluate: candidate (and production, if any) on the fixed eval set `data/eval/`.

    python -m pipelines.evaluate --model models/candidate/model.safetensors --eval data/eval \
        --registry models/registry --out reports/evaluation

Writes evaluation.json (eval-set hash, metrics of both models) and predictions.jsonl (one line
per eval image: truth, candidate and production predictions). Production is re-evaluated on the
current eval set, so both numbers come from the same images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipelines import evalset, net, registry
from pipelines.device import pick_device
from pipelines.files import atomic_write_json, atomic_write_jsonl, sha256_file
from pipelines.metrics import classification
from pipelines.settings import Params


def run(model_file: str | Path, eval_dir: str | Path, registry_dir: str | Path,
        out_dir: str | Path, *, params: Params) -> dict:
    out_dir = Path(out_dir)
    device = pick_device(params.train.device)
    ev = evalset.load(eval_dir, params=params)
    classes = params.base.classes
    model, model_classes, _ = net.load(model_file, device=device)
    if model_classes != classes:
        raise ValueError(f"candidate was trained for classes {list(model_classes)}, "
                         f"params.yaml has {list(classes)}")
    cand_probs = net.predict_proba(model, ev.x, device=device,
                                   batch_size=params.evaluate.batch_size)
    cand_pred = cand_probs.argmax(1)
    result = {"eval_hash": ev.hash, "eval_n": len(ev.y), "classes": list(classes),
              "candidate": {"sha256": sha256_file(model_file),
                            "size_bytes": Path(model_file).stat().st_size,
                            "latency_ms_p95": round(net.latency_ms_p95(model, ev.x,
                                                                       device=device), 4),
                            "latency_device": device.type,
                            **classification(ev.y, cand_pred, classes)},
              "production": None}
    prod_probs = None
    loaded = registry.load_production(registry_dir, device=device)
    if loaded is not None:
        prod_model, prod_classes, _, pointer = loaded
        if prod_classes == classes:
            prod_probs = net.predict_proba(prod_model, ev.x, device=device,
                                           batch_size=params.evaluate.batch_size)
            result["production"] = {
                "id": pointer["id"], "sha256": pointer["sha256"],
                "judged_on_eval_hash": pointer.get("eval_hash"),
                "dataset_version": pointer.get("dataset_version"),
                "train_class_counts": (pointer.get("metrics") or {}).get("train_class_counts"),
                **classification(ev.y, prod_probs.argmax(1), classes)}
        else:
            result["production_note"] = (f"production {pointer['id']} predicts other classes "
                                         f"{list(prod_classes)}; not comparable")
    rows = []
    for i in range(len(ev.y)):
        row = {"task_id": ev.task_ids[i], "image_sha256": ev.shas[i], "label": classes[ev.y[i]],
               "candidate": classes[cand_pred[i]],
               "candidate_confidence": round(float(cand_probs[i].max()), 5)}
        if prod_probs is not None:
            row["production"] = classes[int(prod_probs[i].argmax())]
            row["production_confidence"] = round(float(prod_probs[i].max()), 5)
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "evaluation.json", result)
    atomic_write_jsonl(out_dir / "predictions.jsonl", rows)
    return result


def arrays(result: dict, rows: list[dict]) -> dict:
    """The evaluation with per-image arrays the paired tests need (truth, predictions,
    confidences, task id -> row index), rebuilt from predictions.jsonl."""
    index = {c: i for i, c in enumerate(result["classes"])}
    out = {**result, "truth": np.array([index[r["label"]] for r in rows], dtype=np.int64),
           "cand_pred": np.array([index[r["candidate"]] for r in rows], dtype=np.int64),
           "cand_conf": np.array([r["candidate_confidence"] for r in rows], dtype=np.float64),
           "index": {r["task_id"]: i for i, r in enumerate(rows)}}
    if result["production"] is not None:
        out["prod_pred"] = np.array([index[r["production"]] for r in rows], dtype=np.int64)
        out["prod_conf"] = np.array([r["production_confidence"] for r in rows], dtype=np.float64)
    return out


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__)
    ap.add_argument("--model", default="models/candidate/model.safetensors")
    ap.add_argument("--eval", default="data/eval")
    ap.add_argument("--registry", default="models/registry")
    ap.add_argument("--out", default="reports/evaluation")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        result = run(args.model, args.eval, args.registry, args.out,
                     params=settings.load(args.params))
    except (evalset.EvalSetError, registry.RegistryError, ValueError) as exc:
        print(f"evaluate failed: {exc}", file=sys.stderr)
        return 1
    prod = result["production"]
    print(f"evaluate: candidate accuracy {result['candidate']['accuracy']:.4f} on "
          f"{result['eval_n']} eval images"
          + (f"; production {prod['id']} {prod['accuracy']:.4f}" if prod else "; no production yet"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
