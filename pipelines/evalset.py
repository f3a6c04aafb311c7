"""The fixed evaluation set, `data/eval/`: data, never a stage output.

Built once by `labelgate evalset freeze` from Label Studio ground truth (annotations marked
ground truth), then frozen: the folder is DVC-tracked and its hash is recorded with every
evaluation and decision. Its images never enter training (prepare drops them by sha256).

    manifest.jsonl   {task_id, image_sha256, label}, sorted by task id
    images.tar       image bytes, members named by sha256
    meta.json        {hash, n, classes, frozen_at, source}
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines import images, inputspec, rawstore
from pipelines.files import (atomic_write_bytes, atomic_write_json, jsonl_bytes, read_json,
                             read_jsonl, sha256_bytes, tar_bytes, utc_now)
from pipelines.settings import Params


class EvalSetError(RuntimeError):
    pass


@dataclass(frozen=True)
class EvalSet:
    x: np.ndarray            # (N, H, W, C) uint8, preprocessed by the spec given to `load`
    y: np.ndarray            # (N,) int64 class indices
    task_ids: list[int]
    shas: list[str]
    hash: str                # sha256 of manifest.jsonl, which names every image by sha256


def freeze(state: rawstore.RawState, out_dir: str | Path, *, params: Params,
           force: bool = False) -> dict:
    """Write data/eval/ from the tasks whose annotations are marked ground truth and agree."""
    from pipelines.labelconfig import chosen  # one copy of "what did this annotation choose"

    out_dir = Path(out_dir)
    if (out_dir / "meta.json").exists() and not force:
        raise EvalSetError(f"{out_dir} is already frozen (hash {read_json(out_dir / 'meta.json')['hash'][:12]}); "
                           "changing the fixed eval set needs --force and a re-baseline")
    rows, blobs, skipped = [], {}, []
    spec = inputspec.from_params(params)
    for task_id in sorted(state.tasks):
        gt = [chosen(a.get("result"), state.choices_name)
              for a in state.tasks[task_id].get("annotations") or []
              if a.get("ground_truth") and not a.get("was_cancelled")]
        if not gt:
            continue
        image = state.images.get(task_id) or {}
        sha = image.get("sha256")
        label = gt[0]
        if len(set(gt)) != 1 or label not in params.base.classes:
            skipped.append({"task_id": task_id, "reason": f"ground truth unusable: {gt}"})
            continue
        if not sha or sha not in state.packs:
            skipped.append({"task_id": task_id, "reason": "image not available"})
            continue
        data = state.image_bytes(sha)
        try:
            images.inspect(data, channels=spec.channels, background=spec.background)
        except images.BadImage as exc:
            skipped.append({"task_id": task_id, "reason": f"image: {exc}"})
            continue
        if sha in blobs:
            continue  # the same image twice adds nothing to an evaluation
        blobs[sha] = data
        rows.append({"task_id": task_id, "image_sha256": sha, "label": label})
    if not rows:
        raise EvalSetError("no ground-truth annotations found: mark annotations as ground truth "
                           "in Label Studio, pull, then freeze")
    manifest = jsonl_bytes(rows)
    atomic_write_bytes(out_dir / "images.tar", tar_bytes(blobs))
    atomic_write_bytes(out_dir / "manifest.jsonl", manifest)
    meta = {"hash": sha256_bytes(manifest), "n": len(rows), "classes": list(params.base.classes),
            "frozen_at": utc_now(),
            "skipped": skipped}
    atomic_write_json(out_dir / "meta.json", meta)  # written last: its presence means "frozen"
    return meta


def load(eval_dir: str | Path, *, params: Params,
         spec: inputspec.InputSpec | None = None) -> EvalSet:
    """The frozen eval set, checked against its hash, preprocessed by `spec`: the spec of the
    model being evaluated (each model file carries its own). Without one, params.yaml's
    `input` section (a convenience for callers that have no model yet)."""
    eval_dir = Path(eval_dir)
    spec = spec if spec is not None else inputspec.from_params(params)
    if not (eval_dir / "meta.json").exists():
        raise EvalSetError(f"no fixed eval set in {eval_dir}: run `labelgate evalset freeze`")
    manifest = (eval_dir / "manifest.jsonl").read_bytes()
    digest = sha256_bytes(manifest)
    meta = read_json(eval_dir / "meta.json")
    if digest != meta["hash"]:
        raise EvalSetError(f"{eval_dir}/manifest.jsonl changed since it was frozen "
                           f"(hash {digest[:12]} != {meta['hash'][:12]})")
    rows = read_jsonl(eval_dir / "manifest.jsonl")
    blobs = image_bytes(eval_dir)
    index = {c: i for i, c in enumerate(params.base.classes)}
    return EvalSet(x=inputspec.stack([blobs[r["image_sha256"]] for r in rows], spec),
                   y=np.array([index[r["label"]] for r in rows], dtype=np.int64),
                   task_ids=[r["task_id"] for r in rows],
                   shas=[r["image_sha256"] for r in rows], hash=digest)


def image_bytes(eval_dir: str | Path) -> dict[str, bytes]:
    """sha256 -> bytes of every eval image, each checked against its hash."""
    eval_dir = Path(eval_dir)
    with tarfile.open(eval_dir / "images.tar", "r:") as tar:
        blobs = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for sha, data in blobs.items():
        if sha256_bytes(data) != sha:
            raise EvalSetError(f"{eval_dir}/images.tar: image {sha[:12]} does not match its hash")
    return blobs


def shas(eval_dir: str | Path) -> set[str]:
    """sha256 of every eval image (empty if no eval set yet)."""
    path = Path(eval_dir) / "manifest.jsonl"
    return {r["image_sha256"] for r in read_jsonl(path)} if path.exists() else set()
