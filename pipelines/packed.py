"""Prepared splits on disk: one directory per split, a handful of files however many images
(DVC is slow with many small files), pixels memory-mappable so a split larger than RAM trains
by streaming.

    data/prepared/train/
        x.npy         (N, H, W, C) uint8, preprocessed by inputspec (150 KB per 224x224x3 image:
                      20k images = 3 GB, written image by image, never held in memory)
        y.npy         (N,) int64 class indices (base.classes order)
        task_id.npy   (N,) int64 Label Studio task ids, row-aligned with x
        sha256.npy    (N,) <U64 sha256 of each image's bytes, row-aligned with x
        spec.json     the input spec the pixels were made with (InputSpec.to_json)

A split appears whole or not at all: it is written into a temp directory beside the target and
renamed into place. Readers use `read_split`; nothing loads with pickle.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines import inputspec
from pipelines.files import fsync_path
from pipelines.images import BadImage
from pipelines.inputspec import InputSpec

FILES = ("x.npy", "y.npy", "task_id.npy", "sha256.npy", "spec.json")
_TMP_DIR = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|old)$")
STALE_S = 3600.0  # a writer's temp directory this old belongs to a writer that died


class PackedError(ValueError):
    """A split directory that is missing, incomplete or inconsistent; the message says which."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray          # (N, H, W, C) uint8; a read-only np.memmap when read with mmap=True
    y: np.ndarray          # (N,) int64
    task_id: np.ndarray    # (N,) int64
    sha256: np.ndarray     # (N,) <U64
    spec: InputSpec        # what x was preprocessed with

    def __len__(self) -> int:
        return len(self.y)


def _clean_stale(parent: Path) -> None:
    cutoff = time.time() - STALE_S
    for entry in os.scandir(parent):
        if _TMP_DIR.match(entry.name) and entry.is_dir(follow_symlinks=False) \
                and entry.stat(follow_symlinks=False).st_mtime <= cutoff:
            shutil.rmtree(entry.path, ignore_errors=True)


def _write_x(path: Path, blobs: Iterable[bytes], *, n: int, task_id: Sequence[int],
             spec: InputSpec) -> None:
    """x.npy written front to back: the .npy header, then one preprocessed image at a time.
    Not a memory map: a mapped file's dirty pages count as the writer's memory (4,000 images
    at 224 x 224 x 3 took 728 MB RSS that way, 602 MB of pixels); this way only the page
    cache holds them, which the kernel writes back and drops as it needs to."""
    shape = (n, spec.height, spec.width, spec.channels)
    with open(path, "xb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": shape})
        i = -1
        for i, blob in enumerate(blobs):
            if i >= n:
                raise ValueError(f"more images than labels ({n})")
            try:
                f.write(inputspec.preprocess(blob, spec).tobytes())
            except BadImage as exc:
                raise BadImage(f"task {task_id[i]} (image {i + 1} of {n}): {exc}") from None
        if i + 1 != n:
            raise ValueError(f"{i + 1} images for {n} labels")


def write_split(out_dir: str | Path, blobs: Iterable[bytes], *, y: Sequence[int],
                task_id: Sequence[int], sha256: Sequence[str], spec: InputSpec) -> Path:
    """Preprocess `blobs` (an iterable, consumed one image at a time: pass a generator so the
    encoded bytes are not all held either) into `out_dir` as described above; `y`, `task_id`,
    `sha256` are row-aligned with it. Replaces an existing split; a crash leaves the old one
    (or, between the two renames, none — a rerun of the stage writes it again)."""
    out_dir = Path(out_dir)
    n = len(y)
    if not (len(task_id) == len(sha256) == n):
        raise ValueError(f"row-aligned arrays differ in length: y {n}, task_id {len(task_id)}, "
                         f"sha256 {len(sha256)}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir.parent)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _write_x(tmp / "x.npy", blobs, n=n, task_id=task_id, spec=spec)
        np.save(tmp / "y.npy", np.asarray(y, dtype=np.int64))
        np.save(tmp / "task_id.npy", np.asarray(task_id, dtype=np.int64))
        np.save(tmp / "sha256.npy", np.asarray(list(sha256), dtype="<U64"))
        (tmp / "spec.json").write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True)
                                       + "\n")
        for name in FILES:
            fsync_path(tmp / name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.",
                                        suffix=".old"))
            os.rmdir(old)
            os.replace(out_dir, old)  # a symlink at out_dir is moved, never followed
        os.replace(tmp, out_dir)
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    return out_dir


def read_split(split_dir: str | Path, *, mmap: bool = True) -> Split:
    """The split in `split_dir`; x memory-mapped read-only (`mmap=True`: pages load on first
    touch, so a split larger than RAM is fine) or read whole. Checked: every file present,
    shapes row-aligned, x uint8 of the recorded spec's shape."""
    split_dir = Path(split_dir)
    missing = [name for name in FILES if not (split_dir / name).is_file()]
    if missing:
        hint = (" (an old prepare output: rerun `dvc repro prepare`)"
                if split_dir.with_suffix(".npz").exists() else "")
        raise PackedError(f"{split_dir}: not a prepared split, missing {', '.join(missing)}"
                          f"{hint}")
    try:
        spec = InputSpec.from_json(json.loads((split_dir / "spec.json").read_text()),
                                   source=str(split_dir / "spec.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackedError(f"{split_dir}/spec.json is not JSON: {exc}") from None
    except inputspec.SpecError as exc:
        raise PackedError(str(exc)) from None
    try:
        x = np.load(split_dir / "x.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        y, task_id, sha = (np.load(split_dir / name, allow_pickle=False)
                           for name in ("y.npy", "task_id.npy", "sha256.npy"))
    except ValueError as exc:  # a truncated or non-npy file
        raise PackedError(f"{split_dir}: unreadable array: {exc}") from None
    want = (spec.height, spec.width, spec.channels)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != want:
        raise PackedError(f"{split_dir}/x.npy is {x.shape} {x.dtype}, the spec says "
                          f"(N, {', '.join(map(str, want))}) uint8")
    if not (len(x) == len(y) == len(task_id) == len(sha)) or y.ndim != 1:
        raise PackedError(f"{split_dir}: rows not aligned: x {len(x)}, y {len(y)}, "
                          f"task_id {len(task_id)}, sha256 {len(sha)}")
    if y.dtype != np.int64 or task_id.dtype != np.int64 or sha.dtype.kind != "U":
        raise PackedError(f"{split_dir}: wrong dtypes (y {y.dtype}, task_id {task_id.dtype}, "
                          f"sha256 {sha.dtype}); expected int64, int64, unicode")
    return Split(x=x, y=y, task_id=task_id, sha256=sha, spec=spec)
