"""prepare: manifest -> resolved labels, a deterministic train/val split with eval-set images
(and near-duplicates of them) excluded, and each split packed by pipelines/packed.py.

    python -m pipelines.prepare --manifest data/validated/manifest.jsonl --raw data/raw \
        --eval data/eval --out data/prepared

Outputs: train/ and val/ (packed splits: x.npy (N, H, W, C) uint8 preprocessed by params.yaml's
input spec, memory-mappable, written image by image; y.npy, task_id.npy, sha256.npy; spec.json),
resolved.jsonl (every manifest row: label, votes, the rule that decided it, where it went),
disputed.jsonl (ties, for review), summary.json (counts, the input spec, the near-duplicate
threshold used).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines import evalset, inputspec, neardup, packed, rawstore
from pipelines.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from pipelines.settings import Params


def resolve(labels: list[str], ground_truth: list[bool], *, min_annotations: int = 1,
            min_agreement: float = 0.0, ground_truth_wins: bool = True) -> tuple[str | None, str]:
    """(label, rule) for one task's non-skipped votes (skips never count as labels).

    Ground truth wins (when `ground_truth_wins`); else the most common label, if it has at
    least `min_agreement` of the votes and there are at least `min_annotations` votes. Anything
    else — a tie, too few votes, too little agreement — is disputed: label None, and the rule
    says why, so the task is listed for review instead of silently dropped."""
    gt = sorted({l for l, g in zip(labels, ground_truth) if g})
    if ground_truth_wins and len(gt) == 1:
        return gt[0], "ground_truth"
    if ground_truth_wins and len(gt) > 1:
        return None, f"disputed: ground-truth annotations disagree {gt}"
    if len(labels) < min_annotations:
        return None, (f"disputed: {len(labels)} annotation(s), prepare.min_annotations is "
                      f"{min_annotations}")
    ranked = Counter(labels).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        tied = sorted(l for l, n in ranked if n == ranked[0][1])
        return None, f"disputed: tie between {tied} ({ranked[0][1]} vote(s) each)"
    share = ranked[0][1] / len(labels)
    if share < min_agreement:
        return None, (f"disputed: {ranked[0][0]!r} has {share:.0%} of the votes, "
                      f"prepare.min_agreement is {min_agreement:.0%}")
    return ranked[0][0], "unanimous" if len(ranked) == 1 else "majority"


def task_label(labels: list[str | None], ground_truth: list[bool],
               params: Params) -> tuple[str | None, str]:
    """(label, rule) that validate + prepare give a task from its non-skipped votes: none when
    a vote chose no known class (validate's contract quarantines such a task), else the
    consensus under the `prepare` policy. The one rule: the label trigger counts with it too."""
    unknown = sorted({repr(label) for label in labels if label not in params.base.classes})
    if unknown:
        return None, f"quarantined: vote(s) for no known class ({', '.join(unknown)})"
    return resolve(labels, ground_truth, min_annotations=params.prepare.min_annotations,
                   min_agreement=params.prepare.min_agreement,
                   ground_truth_wins=params.prepare.ground_truth_wins)


def in_val(sha256: str, *, seed: int, fraction: float) -> bool:
    """Split by content hash: an image keeps its split as the dataset grows."""
    h = int(hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


EXCLUDED_SAME = "excluded: image is in the fixed eval set"
EXCLUDED_NEAR = "excluded: near-duplicate of eval task"


FINGERPRINT_CHUNK = 256  # images fingerprinted at a time (19 x 384 floats = 29 KB each)


def _exclude_near_duplicates(rows: list[dict], state: rawstore.RawState, eval_fps: np.ndarray,
                             eval_tasks: list[int], threshold: float, *,
                             background: tuple[int, int, int]) -> None:
    """Leakage is blocking: a training or validation image that is a near-duplicate of an eval
    image (neardup.nearest_similarity >= threshold: re-encoded, resized, cropped by up to
    ~10 %, brightened or mirrored) is excluded, naming the eval task."""
    if not rows or len(eval_fps) == 0:
        return
    for i in range(0, len(rows), FINGERPRINT_CHUNK):  # bounded memory, however many rows
        chunk = rows[i:i + FINGERPRINT_CHUNK]
        fps = np.stack([neardup.fingerprint(state.image_bytes(r["image_sha256"]),
                                           background=background) for r in chunk])
        best, where = neardup.nearest_similarity(fps, eval_fps)
        for row, sim, j in zip(chunk, best, where):
            if sim >= threshold:
                row["split"] = f"{EXCLUDED_NEAR} {eval_tasks[j]} (similarity {sim:.4f})"


def _eval_fingerprints(eval_dir: Path, *,
                       background: tuple[int, int, int]) -> tuple[np.ndarray, list[int]]:
    """(fingerprints `(M, K, D)`, task ids) of the eval images (bytes checked against their
    sha256 first); none if no eval set yet. Here, not in evalset: evaluate and report read the
    eval set too, and need not rerun when the fingerprint changes."""
    if not (eval_dir / "meta.json").exists():
        return neardup.no_fingerprints(), []
    rows = read_jsonl(eval_dir / "manifest.jsonl")
    blobs = evalset.image_bytes(eval_dir)
    return (np.stack([neardup.fingerprint(blobs[r["image_sha256"]], background=background)
                      for r in rows]), [r["task_id"] for r in rows])


def _pack(split_dir: Path, rows: list[dict], state: rawstore.RawState, params: Params,
          spec: inputspec.InputSpec) -> None:
    index = {c: i for i, c in enumerate(params.base.classes)}
    packed.write_split(split_dir, (state.image_bytes(r["image_sha256"]) for r in rows),
                       y=[index[r["label"]] for r in rows], task_id=[r["task_id"] for r in rows],
                       sha256=[r["image_sha256"] for r in rows], spec=spec)


def run(manifest: str | Path, raw_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
        *, params: Params) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = inputspec.from_params(params)
    eval_shas = evalset.shas(eval_dir)
    eval_fps, eval_tasks = _eval_fingerprints(Path(eval_dir), background=spec.background)
    threshold = params.prepare.near_duplicate_similarity
    if threshold is None:  # from how alike this project's distinct eval images are
        threshold = neardup.auto_threshold(eval_fps)
    state = rawstore.load(raw_dir)
    resolved, disputed = [], []
    for row in read_jsonl(manifest):
        label, rule = task_label(row["labels"], row["ground_truth"], params)
        out = {"task_id": row["task_id"], "image_sha256": row["image_sha256"], "label": label,
               "rule": rule, "votes": dict(Counter(row["labels"])),
               "annotators": row["annotators"]}
        if label is None:
            out["split"] = "disputed"
            disputed.append(out)
        elif row["image_sha256"] in eval_shas:
            out["split"] = EXCLUDED_SAME
        else:
            out["split"] = "val" if in_val(row["image_sha256"], seed=params.base.seed,
                                           fraction=params.prepare.val_fraction) else "train"
        resolved.append(out)
    _exclude_near_duplicates([r for r in resolved if r["split"] in ("train", "val")], state,
                             eval_fps, eval_tasks, threshold, background=spec.background)
    train = [r for r in resolved if r["split"] == "train"]
    val = [r for r in resolved if r["split"] == "val"]
    if not train or not val:
        raise ValueError(f"prepare: need images in both splits, got train={len(train)} "
                         f"val={len(val)}; label more tasks or change prepare.val_fraction")
    _pack(out_dir / "train", train, state, params, spec)
    _pack(out_dir / "val", val, state, params, spec)
    atomic_write_jsonl(out_dir / "resolved.jsonl", resolved)
    atomic_write_jsonl(out_dir / "disputed.jsonl", disputed)
    summary = {"resolved": len(resolved), "train": len(train), "val": len(val),
               "disputed": len(disputed),
               "excluded_eval_overlap": sum(r["split"].startswith(EXCLUDED_SAME)
                                            for r in resolved),
               "excluded_near_duplicates": sum(r["split"].startswith(EXCLUDED_NEAR)
                                               for r in resolved),
               "rules": dict(Counter(r["rule"].split(":")[0] for r in resolved)),
               "train_class_counts": dict(sorted(Counter(r["label"] for r in train).items())),
               "input_spec": spec.to_json(),
               "near_duplicate_threshold": threshold,
               "near_duplicate_threshold_from": ("params" if params.prepare.near_duplicate_similarity
                                                 is not None else "eval set")}
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    from pipelines import settings
    ap = argparse.ArgumentParser(prog="python -m pipelines.prepare", description=__doc__)
    ap.add_argument("--manifest", default="data/validated/manifest.jsonl")
    ap.add_argument("--raw", default="data/raw")
    ap.add_argument("--eval", default="data/eval")
    ap.add_argument("--out", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        summary = run(args.manifest, args.raw, args.eval, args.out,
                      params=settings.load(args.params))
    except (ValueError, settings.ParamsError) as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 1
    print(f"prepare: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
