"""pipelines.packed: a prepared split round-trips (memory-mapped or not), is written image by image
from a generator, appears whole or not at all, and a damaged split is refused by name."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from pipelines import inputspec, packed
from pipelines.images import BadImage
from pipelines.inputspec import InputSpec
from tests import factories

SPEC = InputSpec(channels=3, height=12, width=16, resize="pad", background=(9, 8, 7))


def rows(n: int, start: int = 0):
    blobs = [factories.digit_png(i) for i in range(start, start + n)]
    return blobs, {"y": [i % 10 for i in range(n)], "task_id": [100 + i for i in range(n)],
                   "sha256": [f"{i:064x}" for i in range(n)]}


def test_round_trip_memory_mapped_and_in_memory(tmp_path):
    blobs, meta = rows(7)
    consumed = []

    def lazily():  # the writer takes one image at a time
        for b in blobs:
            consumed.append(len(consumed))
            yield b
    out = packed.write_split(tmp_path / "train", lazily(), spec=SPEC, **meta)
    assert out == tmp_path / "train" and consumed == list(range(7))
    assert sorted(p.name for p in out.iterdir()) == sorted(packed.FILES)
    split = packed.read_split(out)
    assert isinstance(split.x, np.memmap) and not split.x.flags.writeable
    assert split.x.shape == (7, 12, 16, 3) and split.x.dtype == np.uint8 and len(split) == 7
    assert np.array_equal(split.x, inputspec.stack(blobs, SPEC))
    assert split.y.tolist() == meta["y"] and split.y.dtype == np.int64
    assert split.task_id.tolist() == meta["task_id"] and split.sha256.tolist() == meta["sha256"]
    assert split.spec == SPEC
    whole = packed.read_split(out, mmap=False)
    assert not isinstance(whole.x, np.memmap) and np.array_equal(whole.x, split.x)
    assert json.loads((out / "spec.json").read_text()) == SPEC.to_json()


def test_same_input_same_bytes_and_an_empty_split(tmp_path):
    blobs, meta = rows(3)
    a = packed.write_split(tmp_path / "a", iter(blobs), spec=SPEC, **meta)
    b = packed.write_split(tmp_path / "b", iter(blobs), spec=SPEC, **meta)
    for name in packed.FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    empty = packed.read_split(packed.write_split(tmp_path / "e", iter([]), y=[], task_id=[],
                                                 sha256=[], spec=SPEC))
    assert empty.x.shape == (0, 12, 16, 3) and len(empty) == 0


def test_rewrite_replaces_and_a_failed_write_keeps_the_old_split(tmp_path):
    blobs, meta = rows(4)
    packed.write_split(tmp_path / "val", iter(blobs), spec=SPEC, **meta)
    newer, meta2 = rows(2, start=10)
    packed.write_split(tmp_path / "val", iter(newer), spec=SPEC, **meta2)
    assert len(packed.read_split(tmp_path / "val")) == 2
    broken = [newer[0], newer[1][:60]]
    with pytest.raises(BadImage, match=r"^task 101 \(image 2 of 2\): corrupt image"):
        packed.write_split(tmp_path / "val", iter(broken), spec=SPEC, **meta2)
    kept = packed.read_split(tmp_path / "val")
    assert len(kept) == 2 and np.array_equal(kept.x, inputspec.stack(newer, SPEC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val"]  # no temp directory left


def test_counts_must_agree(tmp_path):
    blobs, meta = rows(3)
    with pytest.raises(ValueError, match="2 images for 3 labels"):
        packed.write_split(tmp_path / "s", iter(blobs[:2]), spec=SPEC, **meta)
    with pytest.raises(ValueError, match="more images than labels"):
        packed.write_split(tmp_path / "s", iter(blobs + blobs), spec=SPEC, **meta)
    with pytest.raises(ValueError, match="row-aligned arrays differ"):
        packed.write_split(tmp_path / "s", iter(blobs), spec=SPEC,
                           **{**meta, "task_id": [1, 2]})
    assert not (tmp_path / "s").exists() and list(tmp_path.iterdir()) == []


def test_stale_temp_directories_of_dead_writers_are_removed(tmp_path):
    stale = tmp_path / ".train.abcd1234.tmp"
    stale.mkdir()
    (stale / "x.npy").write_bytes(b"half")
    old = time.time() - 2 * packed.STALE_S
    os.utime(stale, (old, old))
    fresh = tmp_path / ".val.zyxw9876.tmp"  # maybe a live writer: left alone
    fresh.mkdir()
    blobs, meta = rows(1)
    packed.write_split(tmp_path / "train", iter(blobs), spec=SPEC, **meta)
    assert not stale.exists() and fresh.exists()


def test_damaged_splits_are_refused_by_name(tmp_path):
    blobs, meta = rows(3)
    split = packed.write_split(tmp_path / "train", iter(blobs), spec=SPEC, **meta)
    (split / "y.npy").unlink()
    with pytest.raises(packed.PackedError, match="not a prepared split, missing y.npy"):
        packed.read_split(split)
    (tmp_path / "old.npz").write_bytes(b"")
    with pytest.raises(packed.PackedError, match="old prepare output"):
        packed.read_split(tmp_path / "old")

    split = packed.write_split(tmp_path / "t2", iter(blobs), spec=SPEC, **meta)
    np.save(split / "y.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(packed.PackedError, match="rows not aligned: x 3, y 2"):
        packed.read_split(split)

    split = packed.write_split(tmp_path / "t3", iter(blobs), spec=SPEC, **meta)
    other = InputSpec(channels=1, height=12, width=16, resize="pad", background=(0, 0, 0))
    (split / "spec.json").write_text(json.dumps(other.to_json()))
    with pytest.raises(packed.PackedError, match=r"x.npy is \(3, 12, 16, 3\) uint8, the spec "
                                                 r"says \(N, 12, 16, 1\)"):
        packed.read_split(split)
    (split / "spec.json").write_text("{not json")
    with pytest.raises(packed.PackedError, match="spec.json is not JSON"):
        packed.read_split(split)
    (split / "spec.json").write_text(json.dumps({**SPEC.to_json(), "channels": 4}))
    with pytest.raises(packed.PackedError, match="input.channels must be 1"):
        packed.read_split(split)


def test_the_writer_does_not_hold_the_pixels(tmp_path):
    """Peak memory does not grow with the split: 50 vs 1,000 images of 128 x 128 x 3 (2.5 vs
    49 MB of pixels), each in a fresh interpreter (VmHWM: that process's own peak)."""
    import subprocess
    import sys
    code = (
        "import sys\n"
        "from pipelines import packed\n"
        "from pipelines.inputspec import InputSpec\n"
        "from tests import factories\n"
        "n = int(sys.argv[2])\n"
        "spec = InputSpec(channels=3, height=128, width=128, resize='crop', background=(0, 0, 0))\n"
        "blobs = [factories.digit_png(i) for i in range(10)]\n"
        "packed.write_split(sys.argv[1], (blobs[i % 10] for i in range(n)), y=[0] * n,\n"
        "                   task_id=list(range(n)), sha256=['0' * 64] * n, spec=spec)\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n")
    peaks = []
    for n in (50, 1000):
        run = subprocess.run([sys.executable, "-c", code, str(tmp_path / f"s{n}"), str(n)],
                             capture_output=True, text=True, timeout=300, check=True,
                             cwd=factories.REPO)
        peaks.append(int(run.stdout.split()[-1]))
    assert packed.read_split(tmp_path / "s1000").x.nbytes == 1000 * 128 * 128 * 3
    assert peaks[1] - peaks[0] < 20, f"peak RSS {peaks[0]} MB -> {peaks[1]} MB"
