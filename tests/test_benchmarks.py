"""The benchmark scripts run end to end (tiny sizes: the numbers themselves are not asserted;
timing targets live in the scripts, never in tests)."""
from __future__ import annotations

import re
import subprocess
import sys

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
