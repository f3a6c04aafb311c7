"""A pull in progress, kept on disk so a killed pull resumes where it stopped.

A first pull of a big project is minutes of exports and image downloads; starting it over after
a kill, a reboot or a Label Studio restart would make a 100,000-task project hard to ever finish.
What a pull has listed, exported and fetched is staged beside the raw store (not in it:
`data/raw` is DVC-tracked and only ever holds whole snapshots):

    data/.raw.partial/
        plan.json          what this pull set out to read: mode, watermark, task count, the
                           task ids to export (+ the incremental listing); written once
        chunks/NNNNNN.jsonl  exported tasks, one file per export call, each written atomically
        images/<sha256>    fetched image bytes, content-addressed, each written atomically
        images.jsonl       url -> sha256 of every image staged so far (append-only)

A staging folder belongs to one (project, previous snapshot) pair; a pull that finds one for
another pair, or one it cannot read, starts afresh. The snapshot is still committed by one
atomic rename (`pull.py`), after which the staging folder is removed: exactly-once holds
because the plan's watermark, taken before the listing, is what the snapshot records.
"""
from __future__ import annotations

import io
import os
import shutil
import tarfile
import threading
import uuid
from pathlib import Path

from pipelines.files import (append_jsonl, atomic_write_bytes, atomic_write_json,
                             atomic_write_jsonl, read_json, read_jsonl, sha256_bytes)

PLAN_VERSION = 1


def _delete_in_background(folders: list[Path]) -> None:
    if folders:
        threading.Thread(target=lambda: [shutil.rmtree(f, ignore_errors=True) for f in folders],
                         name="labelgate-staging-cleanup", daemon=True).start()


def staging_dir(raw_dir: str | Path) -> Path:
    raw_dir = Path(raw_dir)
    return raw_dir.parent / f".{raw_dir.name}.partial"


class Staging:
    """The on-disk state of one pull in progress (see the module docstring)."""

    def __init__(self, root: Path, owner: dict) -> None:
        self.root = root
        self.owner = owner  # {"project_id", "prev_seq"}: whose pull this is
        self._urls: dict[str, str] | None = None

    @classmethod
    def open(cls, raw_dir: str | Path, *, project_id: int, prev_seq: int | None) -> "Staging":
        """The staging folder of this pull; a leftover of another pull (other project, or
        made before the latest snapshot) is dropped."""
        stage = cls(staging_dir(raw_dir), {"project_id": project_id, "prev_seq": prev_seq})
        _delete_in_background(sorted(stage.root.parent.glob(f"{stage.root.name}-old-*")))
        plan = stage.plan()
        if plan is not None and plan.get("owner") != stage.owner:
            stage.discard()
        return stage

    # -- the plan ----------------------------------------------------------------------------
    def plan(self) -> dict | None:
        path = self.root / "plan.json"
        if not path.exists():
            return None
        try:
            plan = read_json(path)
        except (OSError, ValueError):
            return None  # unreadable (a disk fault): the pull starts afresh, nothing is lost
        if not isinstance(plan, dict) or plan.get("version") != PLAN_VERSION:
            return None
        return plan

    def save_plan(self, plan: dict) -> dict:
        plan = {**plan, "owner": self.owner, "version": PLAN_VERSION}
        atomic_write_json(self.root / "plan.json", plan)
        return plan

    # -- exported tasks ----------------------------------------------------------------------
    def _chunk_path(self, index: int) -> Path:
        return self.root / "chunks" / f"{index:06d}.jsonl"

    def chunk(self, index: int) -> list[dict] | None:
        """The tasks of export call `index`, if a previous attempt got them."""
        path = self._chunk_path(index)
        return read_jsonl(path) if path.exists() else None

    def save_chunk(self, index: int, tasks: list[dict]) -> None:
        atomic_write_jsonl(self._chunk_path(index), tasks)

    # -- fetched images ----------------------------------------------------------------------
    def images(self) -> dict[str, str]:
        """url -> sha256 of every image staged so far (whose bytes are on disk)."""
        if self._urls is None:
            path = self.root / "images.jsonl"
            rows = read_jsonl(path) if path.exists() else []  # a torn last line is no row
            self._urls = {row["url"]: row["sha256"] for row in rows
                          if (self.root / "images" / row["sha256"]).exists()}
        return self._urls

    def save_image(self, url: str, data: bytes) -> str:
        sha = sha256_bytes(data)
        blob = self.root / "images" / sha
        if not blob.exists():
            atomic_write_bytes(blob, data)
        # the blob is durable before the line that names it (one pull at a time: the pull lock)
        append_jsonl(self.root / "images.jsonl", [{"url": url, "sha256": sha}])
        self.images()[url] = sha
        return sha

    def write_tar(self, shas: set[str], path: Path) -> None:
        """An uncompressed tar of the staged blobs `shas`, members sorted by name (the same
        bytes as `files.tar_bytes` would make), streamed from disk: a first pull of 100,000
        images never holds them all in memory."""
        with open(path, "wb") as out:
            with tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for sha in sorted(shas):
                    blob = self.root / "images" / sha
                    data = blob.read_bytes()
                    if sha256_bytes(data) != sha:  # a staged blob damaged on disk
                        raise OSError(f"{blob} does not match its sha256")
                    info = tarfile.TarInfo(sha)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))  # shares, no copy
            out.flush()
            os.fsync(out.fileno())

    def discard(self) -> None:
        """Drop the staging folder. Renamed aside at once (so nothing can mistake it for a
        pull in progress), deleted by a background thread: unlinking one staged file per image
        cost ~3 ms each here, ~60 s of a 20,000-image first pull's 170 s, on its critical
        path. A process that exits first leaves the renamed folder; the next pull deletes it."""
        self._urls = None
        trash = self.root.with_name(f"{self.root.name}-old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.root, trash)
        except FileNotFoundError:
            return
        except OSError:  # e.g. a read-only parent: delete in place, as before
            shutil.rmtree(self.root, ignore_errors=True)
            return
        _delete_in_background([trash])

