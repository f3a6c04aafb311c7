"""benchmarks/bucket_pull.py runs end to end at a tiny size and prints every figure (the numbers
themselves are not asserted: timing targets live in the script, never in tests)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _rate(out: str, row: str) -> float:
    """images/s (the last cell) of the table row starting with `row`."""
    found = re.search(rf"^\| {re.escape(row)}.*\| ([\d,]+) \|$", out, flags=re.M)
    assert found, f"no row {row!r} in:\n{out}"
    return float(found.group(1).replace(",", ""))


@pytest.mark.slow
def test_bucket_benchmark_prints_bucket_studio_and_ceiling_rates():
    """Its own S3 server and Label Studio: 40 tasks from the bucket, 20 through Label Studio."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bucket_pull.py"), "--tasks", "40",
         "--baseline", "20"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    # both pulls ran to the end: every image fetched, none failed
    assert re.search(r"snapshot 000001: 40 task\(s\) new/changed.*; 40 image\(s\) fetched, "
                     r"0 failed", out), out
    assert re.search(r"snapshot 000001: 20 task\(s\) new/changed.*; 20 image\(s\) fetched, "
                     r"0 failed", out), out
    for row in ("S3 server ceiling", "labelgate reader alone",
                "first pull from the bucket (40 annotated tasks) | 40 |",
                "today: through Label Studio's server (20 tasks, local files) | 20 |"):
        assert _rate(out, row) > 0
    assert re.search(r"^\| Label Studio task export alone, no images \(40 tasks\) \| \| [\d.]+ \| "
                     r"\([\d,]+ tasks/s\) \|$", out, flags=re.M), out
    assert re.search(r"^bucket pull / Label Studio path = [\d.]+x$", out, flags=re.M), out
    assert re.search(r"^bucket pull / server ceiling = [\d.]+; reader / ceiling = [\d.]+; "
                     r"load average", out, flags=re.M), out
