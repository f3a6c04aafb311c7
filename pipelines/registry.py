"""The model registry: an append-only ledger, content-addressed model files, one production
pointer. Exactly one production model at any time; it changes only by an atomic rename.

    models/registry/ledger.jsonl        one JSON event per line, never rewritten
    models/registry/production.json     {id, sha256, file, ...}: the pointer
    models/registry/blobs/<sha256>.safetensors

Every load checks the file against the sha256 recorded in the registry first.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from pipelines import net
from pipelines.files import atomic_write_json, exclusive, read_json, read_jsonl, sha256_file

LEDGER, POINTER, BLOBS = "ledger.jsonl", "production.json", "blobs"


class RegistryError(RuntimeError):
    pass


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def verify(path: str | Path, sha256: str) -> Path:
    """Refuse a model file whose bytes are not the ones the registry recorded."""
    path = Path(path)
    if not path.exists():
        raise RegistryError(f"model file missing: {path}")
    actual = sha256_file(path)
    if actual != sha256:
        raise RegistryError(f"model file {path} does not match its recorded sha256 "
                            f"({actual[:12]}… != {sha256[:12]}…): refusing to load it")
    return path


def ledger(registry_dir: str | Path) -> list[dict]:
    path = Path(registry_dir) / LEDGER
    return read_jsonl(path) if path.exists() else []


def append(registry_dir: str | Path, event: dict) -> dict:
    """Append one event (fsynced) to the ledger; returns it with its timestamp."""
    registry_dir = Path(registry_dir)
    registry_dir.mkdir(parents=True, exist_ok=True)
    event = {"at": now(), **event}
    with open(registry_dir / LEDGER, "a") as f:
        f.write(json.dumps(event, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return event


def production(registry_dir: str | Path) -> dict | None:
    path = Path(registry_dir) / POINTER
    return read_json(path) if path.exists() else None


def blob_path(registry_dir: str | Path, sha256: str) -> Path:
    return Path(registry_dir) / BLOBS / f"{sha256}.safetensors"


def load_production(registry_dir: str | Path, *, device: torch.device):
    """(model, classes, image_size, pointer) of the production model, verified; None if none."""
    pointer = production(registry_dir)
    if pointer is None:
        return None
    path = verify(blob_path(registry_dir, pointer["sha256"]), pointer["sha256"])
    model, classes, image_size = net.load(path, device=device)
    return model, classes, image_size, pointer


def store(registry_dir: str | Path, model_file: str | Path) -> tuple[str, Path]:
    """Copy a model file into the content-addressed blob store; (sha256, stored path)."""
    sha = sha256_file(model_file)
    dest = blob_path(registry_dir, sha)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        shutil.copyfile(model_file, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        verify(tmp, sha)  # the copy itself, before it becomes visible
        tmp.replace(dest)
    return sha, dest


def set_production(registry_dir: str | Path, pointer: dict) -> None:
    """The single commit point of a promotion or rollback: one atomic rename."""
    verify(blob_path(registry_dir, pointer["sha256"]), pointer["sha256"])
    atomic_write_json(Path(registry_dir) / POINTER, pointer)


def lock(registry_dir: str | Path):
    """Serialises writers of the registry (promote, approve, rollback)."""
    return exclusive(Path(registry_dir) / ".lock")


def next_id(registry_dir: str | Path, sha256: str) -> str:
    n = sum(1 for e in ledger(registry_dir) if e.get("event") == "candidate") + 1
    return f"m{n:04d}-{sha256[:10]}"


POINTER_KEYS = ("id", "sha256", "dataset_version", "eval_hash", "metrics")
CHANGES_PRODUCTION = ("promoted", "rolled_back")


def make_production(registry_dir: str | Path, record: dict, *, event: str, via: str,
                    previous: str | None, **extra) -> dict:
    """Point production at `record` (a candidate), then record it in the ledger. Call with the
    lock held. The rename is the commit point: a crash before it leaves the old production in
    place and no ledger line claims otherwise; a crash after it is completed by `reconcile`."""
    pointer = {**{k: record.get(k) for k in POINTER_KEYS}, "since": now(), "previous": previous,
               "via": via, **extra}
    set_production(registry_dir, pointer)
    append(registry_dir, {"event": event, **pointer})
    return pointer


def reconcile(registry_dir: str | Path) -> dict | None:
    """Complete the ledger after a crash between a production rename and its ledger line:
    the pointer is the truth; a missing event is appended, marked `recovered`."""
    pointer = production(registry_dir)
    if pointer is None:
        return None
    last = next((e for e in reversed(ledger(registry_dir))
                 if e.get("event") in CHANGES_PRODUCTION), None)
    if last and last.get("id") == pointer["id"] and last.get("since") == pointer.get("since"):
        return None
    event = "rolled_back" if pointer.get("via") == "rollback" else "promoted"
    return append(registry_dir, {"event": event, **pointer, "recovered": True})


def candidates(registry_dir: str | Path) -> dict[str, dict]:
    """id -> the candidate's ledger record (what the gate saw)."""
    return {e["id"]: e for e in ledger(registry_dir) if e.get("event") == "candidate"}


def rollback(registry_dir: str | Path, *, to: str | None = None, reason: str = "",
             reviewer: str | None = None) -> dict:
    """Point production back at an earlier production model (default: the one before it)."""
    with lock(registry_dir):
        reconcile(registry_dir)
        promoted = [e for e in ledger(registry_dir) if e.get("event") in CHANGES_PRODUCTION]
        current = production(registry_dir)
        if current is None:
            raise RegistryError("no production model to roll back from")
        if to is None:
            previous = current.get("previous")
            if not previous:
                raise RegistryError(f"{current['id']} has no previous production model")
            to = previous
        if to == current["id"]:
            raise RegistryError(f"{to} is already the production model")
        target = next((e for e in reversed(promoted) if e["id"] == to), None)
        if target is None:
            raise RegistryError(f"{to} was never a production model; see `labelgate history`")
        # `previous` is the target's own predecessor, so a second rollback goes further back
        # instead of toggling between two models.
        return make_production(registry_dir, target, event="rolled_back", via="rollback",
                               previous=target.get("previous"), rolled_back_from=current["id"],
                               reason=reason, reviewer=reviewer)


def approve(registry_dir: str | Path, model_id: str, *, reason: str, reviewer: str,
            override_fail: bool = False) -> dict:
    """A reviewer makes a gated candidate production (INCONCLUSIVE ones, or a FAIL with
    `override_fail`). Refused when production was judged on another eval set since."""
    with lock(registry_dir):
        reconcile(registry_dir)
        record = candidates(registry_dir).get(model_id)
        if record is None:
            raise RegistryError(f"no candidate {model_id!r} in the ledger; see `labelgate history`")
        current = production(registry_dir)
        if current and current["id"] == model_id:
            raise RegistryError(f"{model_id} is already the production model")
        if record["verdict"] == "FAIL" and not override_fail:
            failed = [t["name"] for t in record.get("tests", []) if t.get("result") == "fail"]
            raise RegistryError(f"{model_id} FAILED the gate ({', '.join(failed)}); approving it "
                                "anyway needs --override-fail (recorded in the ledger)")
        if current and current.get("eval_hash") != record["eval_hash"]:
            raise RegistryError(f"{model_id} was gated on eval set {record['eval_hash'][:12]}, "
                                f"production is judged on {str(current.get('eval_hash'))[:12]}: "
                                "run the pipeline again to gate it on the current set")
        verify(blob_path(registry_dir, record["sha256"]), record["sha256"])
        append(registry_dir, {"event": "approved", "id": model_id, "reviewer": reviewer,
                              "reason": reason, "verdict": record["verdict"],
                              "override_fail": bool(override_fail)})
        return make_production(registry_dir, record, event="promoted", via="approved",
                               previous=current["id"] if current else None,
                               reviewer=reviewer, reason=reason)


def reject(registry_dir: str | Path, model_id: str, *, reason: str, reviewer: str) -> dict:
    """A reviewer turns a candidate down (it can no longer be approved by mistake)."""
    with lock(registry_dir):
        if model_id not in candidates(registry_dir):
            raise RegistryError(f"no candidate {model_id!r} in the ledger; see `labelgate history`")
        current = production(registry_dir)
        if current and current["id"] == model_id:
            raise RegistryError(f"{model_id} is the production model: use `labelgate rollback`")
        return append(registry_dir, {"event": "rejected", "id": model_id, "by": "reviewer",
                                     "reviewer": reviewer, "reason": reason})


def rebaseline(registry_dir: str | Path, *, eval_hash: str, accuracy: float, reason: str,
               reviewer: str) -> dict:
    """Production judged again on a new fixed eval set: the pointer's eval hash and accuracy
    change (atomically), the ledger says why and who."""
    with lock(registry_dir):
        reconcile(registry_dir)
        current = production(registry_dir)
        if current is None:
            raise RegistryError("no production model to re-baseline")
        metrics = {**(current.get("metrics") or {}), "eval_accuracy": accuracy}
        pointer = {**current, "eval_hash": eval_hash, "metrics": metrics}
        set_production(registry_dir, pointer)
        return append(registry_dir, {"event": "rebaselined", "id": current["id"],
                                     "old_eval_hash": current.get("eval_hash"),
                                     "eval_hash": eval_hash, "eval_accuracy": accuracy,
                                     "reason": reason, "reviewer": reviewer,
                                     "since": current.get("since")})
