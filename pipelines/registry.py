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


def rollback(registry_dir: str | Path, *, to: str | None = None, reason: str = "") -> dict:
    """Point production back at an earlier promoted model (default: the one before it)."""
    with lock(registry_dir):
        promoted = [e for e in ledger(registry_dir) if e.get("event") in ("promoted", "rolled_back")]
        current = production(registry_dir)
        if current is None:
            raise RegistryError("no production model to roll back from")
        if to is None:
            previous = current.get("previous")
            if not previous:
                raise RegistryError(f"{current['id']} has no previous production model")
            to = previous
        target = next((e for e in reversed(promoted) if e["id"] == to), None)
        if target is None:
            raise RegistryError(f"{to} was never a production model; see `labelgate status`")
        pointer = {k: target[k] for k in ("id", "sha256", "dataset_version", "eval_hash",
                                           "metrics")}
        # `previous` is the target's own predecessor, so a second rollback goes further back
        # instead of toggling between two models.
        pointer.update(since=now(), previous=target.get("previous"),
                       rolled_back_from=current["id"], via="rollback")
        append(registry_dir, {"event": "rolled_back", **pointer, "reason": reason})
        set_production(registry_dir, pointer)
        return pointer
