"""Small file helpers every stage shares: hashing, atomic writes, JSON Lines, a run lock, and the
one timestamp format their records carry."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20  # 1 MiB reads keep hashing of large files flat in memory


def utc_now() -> str:
    """Now in UTC to the second, ISO 8601 with a Z (`2026-11-03T14:05:09Z`): the one spelling
    of every time labelgate writes into a ledger, pointer, snapshot or summary, so they sort
    and compare as strings."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder: so a rename into it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temp files of `atomic_writer`: `.<name>.<8 mkstemp characters>.tmp`, beside their target.
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# A writer's temp file is older than this only if its writer died: one write call, one fsync
# and one rename never take an hour.
STALE_TMP_S = 3600.0


def clean_stale_tmp(folder: str | Path, *, older_than_s: float = STALE_TMP_S) -> list[Path]:
    """Remove the temp files an interrupted `atomic_writer` left in `folder`: only regular
    files named like ours, only those untouched for `older_than_s` (0 when the caller holds
    the lock every writer of the folder takes). Returns what was removed."""
    removed: list[Path] = []
    cutoff = time.time() - older_than_s
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not _TMP_NAME.match(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime <= cutoff:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only when the block ends without an error: a temp
    file with a random name in the same folder (created O_EXCL | O_NOFOLLOW, so a planted
    file or symlink is never written through), fsynced, renamed over `path` (the rename
    replaces a symlink at `path` rather than following it), folder fsynced. Readers see the
    old file or the new one, never half. Stale temp files of earlier crashed writers in the
    folder are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write via a temp file in the same folder + fsync + rename: readers see old or new, never half."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: object) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """JSON Lines with sorted keys: the same rows always give the same bytes (and hash)."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_bytes(path, jsonl_bytes(rows))


def tar_bytes(blobs: dict[str, bytes]) -> bytes:
    """An uncompressed tar of `{name: bytes}`, members sorted by name: deterministic bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(blobs):
            info = tarfile.TarInfo(name)
            info.size = len(blobs[name])
            tar.addfile(info, io.BytesIO(blobs[name]))
    return buf.getvalue()


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON Lines file. A last line without its newline that is not valid JSON is an
    append cut short by a crash (`append_jsonl` writes the newline with the row): never
    acknowledged, so it is not a row. Any other bad line is an error."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the unterminated tail
                break
            raise
    return rows


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append rows to an append-only JSON Lines ledger, durably: one write, fsynced (and the
    folder fsynced when the file is new) before this returns. A tail torn by an earlier crash
    (no final newline) is cut off first, so the new rows start on a line of their own.
    Callers serialise appends to one file (a lock)."""
    data = jsonl_bytes(rows)
    if not data:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "ab+") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                keep = f.read().rfind(b"\n") + 1
                f.truncate(keep)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_path(path.parent)


class Busy(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive(lock_path: str | Path, *, wait: bool = False) -> Iterator[None]:
    """Exclusive lock on a file: Busy at once if held, or (`wait`) until it is free. The kernel
    drops it when the holder dies, so a crashed run never leaves a stale lock behind (unlike a
    pid file)."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"another labelgate run holds {lock_path}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
