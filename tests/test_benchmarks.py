"""The benchmark scripts run end to end (tiny sizes: the numbers themselves are not asserted;
timing targets live in the scripts, never in tests)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_train_throughput_benchmark_prints_all_four_loops_and_ratios():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--device", "cpu",
         "--sizes", "32", "--images", "48", "--batch", "16", "--seconds", "0.2",
         "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = re.search(r"^\| 32 \| 48 \| 16 \|(.*)\|$", proc.stdout, flags=re.M)
    assert row, proc.stdout
    cells = [c.strip() for c in row.group(1).split("|")]
    assert len(cells) == 7                                      # a, b, b', c, b/c, b'/c, b/a
    assert all(float(c.replace(",", "")) > 0 for c in cells)


def test_train_accuracy_benchmark_compares_both_recipes():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_accuracy.py"), "--device", "cpu",
         "--parts", "recipe", "--epochs", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"^\| labelgate default .*\| 0\.\d{4} \| \d+ \|$", out, flags=re.M), out
    assert re.search(r"^\| torchvision .*\| 0\.\d{4} \| \d+ \|$", out, flags=re.M), out


@pytest.mark.slow
def test_sync_benchmark_runs_a_first_pull_with_the_default_settings():
    """Its own Label Studio, distinct images, the default timeouts: the first pull, a no-change
    pull and an incremental pull all complete and the table is printed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sync.py"), "--tasks", "120", "--changes",
         "20", "--distinct", "--no-naive"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^first pull: pull full: 100 task\(s\) examined", out, flags=re.M), out
    assert re.search(r"^\| full \(first pull, 100 distinct images\) \| 100 \|", out, flags=re.M)
    assert re.search(r"^\| incremental after 20 changes \(18 changed, 2 removed\)", out,
                     flags=re.M), out
