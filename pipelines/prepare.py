"""prepare: manifest -> resolved labels, a deterministic train/val split with eval-set images
excluded, and each split packed as one uint8 array file.

    python -m pipelines.prepare --manifest data/validated/manifest.jsonl --raw data/raw \
        --eval data/eval --out data/prepared

Outputs: train.npz / val.npz (`x` (N, S, S) uint8, `y` (N,) int64, `task_id`, `sha256`),
resolved.jsonl (every manifest row: label, votes, the rule that decided it, where it went),
disputed.jsonl (ties, for review), summary.json.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines import evalset, images, rawstore
from pipelines.files import (atomic_write_json, atomic_write_jsonl, atomic_writer,
                             read_jsonl)
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


def _exclude_near_duplicates(rows: list[dict], state: rawstore.RawState, eval_fps: np.ndarray,
                             eval_tasks: list[int], threshold: float) -> None:
    """Leakage is blocking: a training or validation image that is a near-duplicate of an eval
    image (perceptual fingerprint similarity >= threshold) is excluded, naming the eval task."""
    if not rows or len(eval_fps) == 0:
        return
    fps = np.stack([images.fingerprint(state.image_bytes(r["image_sha256"])) for r in rows])
    best, where = images.nearest_similarity(fps, eval_fps)
    for row, sim, j in zip(rows, best, where):
        if sim >= threshold:
            row["split"] = f"{EXCLUDED_NEAR} {eval_tasks[j]} (similarity {sim:.4f})"


def _pack(path: Path, rows: list[dict], state: rawstore.RawState, params: Params) -> None:
    index = {c: i for i, c in enumerate(params.base.classes)}
    x = images.stack([state.image_bytes(r["image_sha256"]) for r in rows], params.base.image_size)
    with atomic_writer(path) as f:  # a random, O_EXCL temp name: nothing planted is followed
        np.savez(f, x=x, y=np.array([index[r["label"]] for r in rows], dtype=np.int64),
                 task_id=np.array([r["task_id"] for r in rows], dtype=np.int64),
                 sha256=np.array([r["image_sha256"] for r in rows]))


def run(manifest: str | Path, raw_dir: str | Path, eval_dir: str | Path, out_dir: str | Path,
        *, params: Params) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_shas = evalset.shas(eval_dir)
    eval_fps, eval_tasks = evalset.fingerprints(eval_dir)
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
                             eval_fps, eval_tasks, params.prepare.near_duplicate_similarity)
    train = [r for r in resolved if r["split"] == "train"]
    val = [r for r in resolved if r["split"] == "val"]
    if not train or not val:
        raise ValueError(f"prepare: need images in both splits, got train={len(train)} "
                         f"val={len(val)}; label more tasks or change prepare.val_fraction")
    _pack(out_dir / "train.npz", train, state, params)
    _pack(out_dir / "val.npz", val, state, params)
    atomic_write_jsonl(out_dir / "resolved.jsonl", resolved)
    atomic_write_jsonl(out_dir / "disputed.jsonl", disputed)
    summary = {"resolved": len(resolved), "train": len(train), "val": len(val),
               "disputed": len(disputed),
               "excluded_eval_overlap": sum(r["split"].startswith(EXCLUDED_SAME)
                                            for r in resolved),
               "excluded_near_duplicates": sum(r["split"].startswith(EXCLUDED_NEAR)
                                               for r in resolved),
               "rules": dict(Counter(r["rule"].split(":")[0] for r in resolved)),
               "train_class_counts": dict(sorted(Counter(r["label"] for r in train).items()))}
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
