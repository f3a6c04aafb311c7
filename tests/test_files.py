"""pipelines.files: atomic writes that never follow a planted name, stale temp files of killed
writers cleaned (only ours, only old ones), one durable append for the append-only ledgers."""
from __future__ import annotations

import calendar
import os
import time

import numpy as np
import pytest

from pipelines import files
from pipelines.files import append_jsonl, atomic_write_bytes, clean_stale_tmp, read_jsonl
from tests.test_prepare import build as build_prepare_inputs
from tests.test_prepare import run as run_prepare


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not yours")
    folder = tmp_path / "ws"
    folder.mkdir()
    (folder / "out.json").symlink_to(outside)
    atomic_write_bytes(folder / "out.json", b"new")
    assert outside.read_bytes() == b"not yours"
    assert not (folder / "out.json").is_symlink() and (folder / "out.json").read_bytes() == b"new"
    assert sorted(p.name for p in folder.iterdir()) == ["out.json"]   # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_writer(path) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_prepare_never_writes_through_a_symlink_planted_at_a_split(tmp_path):
    """A split is a folder written beside its target under a random temp name and renamed into
    place (pipelines/packed.py): a link planted at data/prepared/train (once, at the fixed
    temp name train.tmp.npz) is moved aside, never followed, and what it points at stays."""
    build_prepare_inputs(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.npy").write_bytes(b"precious")
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "train").symlink_to(outside, target_is_directory=True)
    (out / "val").symlink_to(outside / "x.npy")
    run_prepare(tmp_path)
    assert (outside / "x.npy").read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["x.npy"]
    for split in ("train", "val"):
        assert not (out / split).is_symlink() and (out / split).is_dir()
    assert len(np.load(out / "train" / "y.npy")) > 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_stale_temp_files_only_ours_and_only_old(tmp_path):
    ours_old = tmp_path / ".model.json.a1b2c3d4.tmp"
    ours_new = tmp_path / ".model.json.zzzz9999.tmp"
    not_ours = [tmp_path / "model.json.a1b2c3d4.tmp", tmp_path / ".model.json.tmp",
                tmp_path / ".model.json.A1B2C3D4.tmp", tmp_path / "notes.tmp"]
    for p in [ours_old, ours_new, *not_ours]:
        p.write_bytes(b"x")
    hour_ago = time.time() - files.STALE_TMP_S - 60
    for p in [ours_old, *not_ours]:
        os.utime(p, (hour_ago, hour_ago))
    link = tmp_path / ".other.q1w2e3r4.tmp"      # our pattern, but a symlink: left alone
    link.symlink_to(tmp_path / "notes.tmp")
    assert clean_stale_tmp(tmp_path) == [ours_old]
    assert ours_new.exists() and all(p.exists() for p in not_ours) and link.is_symlink()
    # the next atomic write into the folder cleans up the same way
    ours_old.write_bytes(b"x")
    os.utime(ours_old, (hour_ago, hour_ago))
    atomic_write_bytes(tmp_path / "model.json", b"{}")
    assert not ours_old.exists() and ours_new.exists()


def test_append_jsonl_appends_and_cuts_a_torn_tail(tmp_path):
    path = tmp_path / "ledger" / "flags.jsonl"
    append_jsonl(path, [{"a": 1}])
    append_jsonl(path, [{"b": 2}, {"c": 3}])
    append_jsonl(path, [])
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]
    # a crash cut the next append short: the half line is no row, and the next append starts
    # on a line of its own
    with open(path, "ab") as f:
        f.write(b'{"d": 4, "ha')
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}]
    append_jsonl(path, [{"e": 5}])
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}, {"c": 3}, {"e": 5}]
    assert path.read_bytes().endswith(b'{"e": 5}\n')


def test_a_bad_line_inside_a_ledger_is_an_error(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": \n{"c": 3}\n')
    with pytest.raises(ValueError):
        read_jsonl(path)


def test_utc_now_is_the_one_sortable_utc_spelling():
    before = time.time()
    stamp = files.utc_now()
    after = time.time()
    parsed = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    assert stamp.endswith("Z") and len(stamp) == 20
    assert int(before) - 1 <= parsed <= after + 1  # UTC, not local time
