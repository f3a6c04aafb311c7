"""How well each out-of-fold method of the label review finds planted label errors, and what it
costs: the 1,797 demo digit scans (the digits demo's input spec), 5 % of labels flipped at random
plus 40 systematic 3 -> 5 flips, then confident learning on

- cnn_folds:                 k = 3 fits of the project's arch (review.epochs each)
- frozen_features (trained): one model trained on all (noisy) labels, k linear heads on its features
- frozen_features (clean):   the extractor trained on other, correctly labeled images (what a
                             production model trained on earlier data gives)

    .venv/bin/python -m benchmarks.review_methods [--arch smallcnn] [--epochs 6]

Prints recall (planted errors found / planted), precision (planted among flagged), how many of
the 40 systematic ones were found, and seconds, per method.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from pipelines import datasets, inputspec, outoffold, review, settings, train
from pipelines.device import pick_device


def planted(y: np.ndarray, rng: np.random.Generator, *, share: float = 0.05,
            systematic: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy labels, indices of random flips, indices of 3 -> 5 flips)."""
    noisy = y.copy()
    threes = rng.permutation(np.flatnonzero(y == 3))[:systematic]
    noisy[threes] = 5
    others = np.setdiff1d(np.arange(len(y)), threes)
    flips = rng.choice(others, round(share * len(y)), replace=False)
    noisy[flips] = (y[flips] + rng.integers(1, 10, len(flips))) % 10
    return noisy, flips, threes


def score(probs: np.ndarray, noisy: np.ndarray, flips: np.ndarray, threes: np.ndarray,
          limit: int) -> dict:
    found = review.confident_errors(probs, noisy)
    bad = set(flips.tolist()) | set(threes.tolist())
    hits = [int(i) in bad for i in found]
    top = found[:limit]
    return {"flagged": len(found), "recall": sum(hits) / len(bad),
            "precision": sum(hits) / max(len(found), 1),
            "recall_at_limit": len(set(top.tolist()) & bad) / len(bad),
            "systematic_found": len(set(found.tolist()) & set(threes.tolist()))}


def show(name: str, r: dict) -> None:
    print(f"{name:42s} recall {r['recall']:.3f} (at limit {r['recall_at_limit']:.3f}) "
          f"precision {r['precision']:.3f} flagged {r['flagged']:4d} systematic "
          f"{r['systematic_found']:2d} {r['seconds']:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="smallcnn")
    ap.add_argument("--epochs", type=int, default=6, help="review.epochs (cnn_folds)")
    ap.add_argument("--train-epochs", type=int, default=12, help="train.epochs (extractor)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    params = settings.load("params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, device="cpu", arch=args.arch,
                                          epochs=args.train_epochs),
        review=dataclasses.replace(params.review, epochs=args.epochs))
    spec = inputspec.from_params(params)
    items = datasets.get("digits").items()
    blobs = [it.data for it in items]
    y = np.array([it.label for it in items], dtype=np.int64)
    x = inputspec.stack(blobs, spec)
    rng = np.random.default_rng(args.seed)
    noisy, flips, threes = planted(y, rng)
    limit = review.flag_limit(len(y), params.review)
    task_ids = np.arange(len(y))
    device = pick_device("cpu")
    print(f"{len(y)} scans, {len(flips)} random + {len(threes)} systematic 3->5 flips; "
          f"arch {args.arch}; flag limit {limit}")
    rows = {}

    t0 = time.monotonic()
    folds = outoffold.folds_for(task_ids, seed=params.base.seed, folds=params.review.folds)
    probs = outoffold.cnn_folds(x, noisy, folds, params=params, arch=args.arch, spec=spec,
                                device=device)
    rows["cnn_folds"] = {**score(probs, noisy, flips, threes, limit),
                         "seconds": time.monotonic() - t0}
    show("cnn_folds", rows["cnn_folds"])

    t0 = time.monotonic()
    model = outoffold.extractor([x], noisy, params=params, arch=args.arch, spec=spec,
                                device=device)
    f = outoffold.features(model, x, device=device)
    probs = outoffold.linear_heads(f, noisy, folds, len(params.base.classes))
    rows["frozen_features (trained on all)"] = {**score(probs, noisy, flips, threes, limit),
                                                "seconds": time.monotonic() - t0}
    show("frozen_features (trained on all)", rows["frozen_features (trained on all)"])

    # an extractor that never saw these images: trained on half, heads over the other half
    half = rng.permutation(len(y))
    a, b = half[: len(y) // 2], half[len(y) // 2:]
    t0 = time.monotonic()
    model, _ = train.train_model(x[a], y[a], arch=args.arch, spec=spec,
                                 classes=params.base.classes, params=params,
                                 epochs=params.train.epochs, seed=params.base.seed, device=device)
    f = outoffold.features(model, x[b], device=device)
    probs = outoffold.linear_heads(f, noisy[b], folds[b], len(params.base.classes))
    in_b = np.isin(flips, b), np.isin(threes, b)
    remap = {int(v): i for i, v in enumerate(b)}
    rows["frozen_features (clean extractor, half)"] = {
        **score(probs, noisy[b], np.array([remap[int(i)] for i in flips[in_b[0]]]),
                np.array([remap[int(i)] for i in threes[in_b[1]]]),
                review.flag_limit(len(b), params.review)),
        "seconds": time.monotonic() - t0}
    show("frozen_features (clean extractor, half)", rows["frozen_features (clean extractor, half)"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
