"""The raw store: immutable pull snapshots under `data/raw/pulls/NNNNNN/`.

Each snapshot holds what one pull saw change, in a handful of files (DVC is slow with many small
files, so images are packed):

    tasks.jsonl    Label Studio's JSON export of each new or changed task, one task per line
    images.jsonl   one line per fetched task image: {task_id, url, sha256 | null, error | null}
    removed.json   task ids that had annotations before and have none now
    images.tar     image bytes, members named by sha256 (content-addressed; only new images)
    predictions.jsonl  the pre-annotations annotators started from (`parent_prediction` of an
                   annotation in this snapshot): {id, task, model_version, score, result}
    changes.json   the change set: annotation ids added / changed / removed by this pull
    meta.json      pull metadata and the cursor: fingerprint of every task seen so far

A snapshot directory appears by one atomic rename, so a pull killed at any point leaves either
no snapshot or a whole one. The current dataset is the replay of all snapshots in order.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines import labelconfig
from pipelines.files import read_json, read_jsonl

PULLS = "pulls"


class CorruptStore(RuntimeError):
    pass


def fingerprint(task: dict) -> dict[str, str]:
    """`{annotation id: hash, "_data": hash}` — any annotation added, edited, skipped or deleted,
    or the task's data changed, changes it; comparing two tells which annotations changed."""
    def h(obj: object) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    fp = {str(a.get("id")): h({k: a.get(k) for k in ("result", "was_cancelled", "ground_truth",
                                                     "completed_by", "updated_at")})
          for a in task.get("annotations") or []}
    fp["_data"] = h(task.get("data"))
    return fp


def change_set(old: dict[str, dict], new: dict[str, dict], task_ids: list[str]) -> dict:
    """Annotation ids added / changed / removed between two cursors, over `task_ids`."""
    out: dict[str, list[int]] = {"added": [], "changed": [], "removed": []}
    for tid in task_ids:
        before = old.get(tid) or {}
        after = new.get(tid) or {}
        for ann in set(before) | set(after):
            if ann == "_data":
                continue
            if ann not in before:
                out["added"].append(int(ann))
            elif ann not in after:
                out["removed"].append(int(ann))
            elif before[ann] != after[ann]:
                out["changed"].append(int(ann))
    return {k: sorted(v) for k, v in out.items()}


def snapshot_dirs(raw_dir: str | Path) -> list[Path]:
    root = Path(raw_dir) / PULLS
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def clean_partial(raw_dir: str | Path) -> None:
    """Remove leftovers of a pull that was killed before its atomic rename."""
    root = Path(raw_dir) / PULLS
    if root.exists():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p)


def latest_meta(raw_dir: str | Path) -> dict | None:
    dirs = snapshot_dirs(raw_dir)
    return read_json(dirs[-1] / "meta.json") if dirs else None


@dataclass
class RawState:
    """The replay of every snapshot: the current tasks and where each image's bytes live."""
    tasks: dict[int, dict] = field(default_factory=dict)         # task id -> exported task
    images: dict[int, dict] = field(default_factory=dict)        # task id -> images.jsonl row
    packs: dict[str, tuple[Path, int, int]] = field(default_factory=dict)  # sha -> (tar, off, len)
    predictions: dict[int, dict] = field(default_factory=dict)   # prediction id -> row
    snapshots: int = 0
    # the labeling config's control names the annotations were made with (pull refuses a
    # change between snapshots); snapshots from before they were recorded used labelgate's
    controls: dict = field(default_factory=lambda: dict(labelconfig.DEFAULT.as_meta()))

    @property
    def choices_name(self) -> str:
        return self.controls["choices_name"]

    def image_bytes(self, sha256: str) -> bytes:
        """The stored bytes, re-verified against their address on every read: a corrupted
        store is an error, never silently different data."""
        tar, offset, size = self.packs[sha256]
        with open(tar, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptStore(f"{tar}: image {sha256[:12]}… does not match its sha256; "
                               "restore data/raw from DVC (`dvc checkout data/raw`)")
        return data


def load(raw_dir: str | Path, *, upto: int | None = None) -> RawState:
    """Replay the snapshots in order (only up to snapshot `upto`, when given)."""
    state = RawState()
    for snap in snapshot_dirs(raw_dir):
        if upto is not None and int(snap.name) > upto:
            break
        state.snapshots += 1
        last_snap = snap
        for task in read_jsonl(snap / "tasks.jsonl"):
            state.tasks[int(task["id"])] = task
        for row in read_jsonl(snap / "images.jsonl"):
            state.images[int(row["task_id"])] = row
        for task_id in read_json(snap / "removed.json"):
            state.tasks.pop(int(task_id), None)
            state.images.pop(int(task_id), None)
        if (snap / "predictions.jsonl").exists():
            for row in read_jsonl(snap / "predictions.jsonl"):
                state.predictions[int(row["id"])] = row
        tar_path = snap / "images.tar"
        if tar_path.exists():
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar.getmembers():
                    state.packs[member.name] = (tar_path, member.offset_data, member.size)
    if state.snapshots:
        state.controls = read_json(last_snap / "meta.json").get("controls") or state.controls
    return state


def dataset_version(raw_dir: str | Path) -> str:
    """`pulls-NNNNNN-<hash>`: names the snapshot sequence a dataset was built from."""
    dirs = snapshot_dirs(raw_dir)
    if not dirs:
        return "empty"
    h = hashlib.sha256()
    for d in dirs:
        h.update((d / "meta.json").read_bytes())
    return f"pulls-{dirs[-1].name}-{h.hexdigest()[:12]}"
