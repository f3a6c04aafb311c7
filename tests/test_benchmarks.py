"""The benchmark scripts run end to end (tiny sizes: the numbers themselves are not asserted;
timing targets live in the scripts, never in tests)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_train_throughput_benchmark_prints_all_three_loops_and_ratios():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--device", "cpu",
         "--images", "512", "--seconds", "0.5", "--workers", "0"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    rates = re.findall(r"^\| \((a|b|c)\) .*\| ([\d,]+) \|$", out, flags=re.M)
    assert [r[0] for r in rates] == ["a", "b", "c"]
    assert all(int(r[1].replace(",", "")) > 0 for r in rates)
    assert re.search(r"b/a = [\d.]+\s+b/c = [\d.]+\s+c/a = [\d.]+", out)


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
