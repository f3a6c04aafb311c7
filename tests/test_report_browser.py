"""The review report as a reviewer sees it: report.html opened in headless Chromium. Every image
loads, no console errors, no request leaves the page, hostile class names stay text, and the
verdict is the first thing on screen. CI installs Chromium (.ci/run) and sets
LABELGATE_REQUIRE_BROWSER=1, so there this test can never be skipped."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipelines import gate, report as report_stage
from pipelines.files import sha256_bytes, tar_bytes
from tests import factories

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE = '<img src=x onerror="console.error(\'pwned\')">'


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM and sync_playwright:
        return sync_playwright
    if os.environ.get("LABELGATE_REQUIRE_BROWSER"):
        pytest.fail("Chromium and playwright are required here (LABELGATE_REQUIRE_BROWSER=1): "
                    "apt-get install chromium; pip install playwright")
    pytest.skip("no Chromium on this machine (apt-get install chromium)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real gate run: 10 classes x 25 real digit scans as the eval set; the candidate loses
    class 3 to class 8 on 12 images and fixes 5 that production got wrong."""
    root = tmp_path_factory.mktemp("report")
    digits = factories.digits_by_class(25)
    classes = [str(c) for c in range(10)]
    classes[8] = HOSTILE  # annotator-supplied class names are untrusted
    truth = np.array([c for _, _, c in digits])
    prod, cand = truth.copy(), truth.copy()
    threes = np.flatnonzero(truth == 3)[:12]
    cand[threes] = 8
    fixed = np.flatnonzero(truth == 5)[:5]
    prod[fixed] = 6
    shas = [sha256_bytes(png) for _, png, _ in digits]
    blobs = dict(zip(shas, (png for _, png, _ in digits)))
    ev, predictions = factories.evaluation(
        truth, cand, prod, classes=tuple(classes), image_sha256=shas,
        cand_conf=np.where(np.isin(np.arange(len(truth)), threes), 0.6, 0.97))
    eval_dir = root / "eval"
    eval_dir.mkdir()
    (eval_dir / "images.tar").write_bytes(tar_bytes(blobs))
    (eval_dir / "meta.json").write_text(json.dumps({"hash": ev.eval_hash}))
    cand_dir = root / "candidate"
    cand_dir.mkdir()
    (cand_dir / "history.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc\n1,1.2,0.6,0.8,0.7\n2,0.5,0.85,0.4,0.88\n"
        "3,0.3,0.92,0.3,0.93\n")
    folder = factories.write_evaluation(root / "evaluation", ev, predictions)
    (root / "review").mkdir()
    (root / "review" / "suspects.jsonl").write_text(json.dumps(
        {"task_id": 77, "label": HOSTILE, "suggested": "3", "label_probability": 0.02,
         "suggested_probability": 0.97}) + "\n")
    decision = gate.run(folder, root / "gate", params=factories.params())
    (root / "latency.json").write_text(json.dumps({"p95_ms": 1.25, "p95_ms_runs": [1.25] * 5,
                                                   "repeats": 5, "device": "cpu", "threads": 1}))
    report_stage.run(root / "gate" / "decision.json", folder, root / "gate",
                     params=factories.params(), latency_file=root / "latency.json",
                     eval_dir=eval_dir, candidate_dir=cand_dir, raw=root / "none",
                     review=root / "review")
    return {"path": root / "gate" / "report.html", "decision": decision, "threes": len(threes),
            "fixed": len(fixed), "root": root}


def test_report_renders_in_chromium_with_every_image_and_no_errors(report):
    sync_playwright = _browser_or_skip()
    assert report["decision"]["verdict"] == "FAIL"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        console, requests = [], []
        page.on("console", lambda m: console.append((m.type, m.text)))
        page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report["path"].as_uri())
        page.wait_for_load_state("load")
        state = page.evaluate("""() => Array.from(document.images).map(
            i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])""")
        first = page.evaluate("() => document.body.innerText.trim().split('\\n')[0]")
        title = page.title()
        shot = report["root"] / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    # the gallery: 12 right->wrong and 5 wrong->right, every thumbnail decoded
    assert len(state) == report["threes"] + report["fixed"], state
    assert all(complete and w > 0 and h > 0 for _, complete, w, h in state), state
    assert console == [], console                      # the hostile name did not run
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing external
    assert first == "Verdict: FAIL" and "FAIL" in title
    assert shot.stat().st_size > 20_000                # a real page, not a blank one


def test_report_html_keeps_hostile_names_as_text(report):
    page = report["path"].read_text()
    assert HOSTILE not in page and "onerror=&quot;" in page
    assert "<script" not in page                        # the report itself carries no scripts
    assert "Suspected label errors: 1</h2>" in page
    assert "p95 1.250 ms per image (median of 5 runs" in page
    assert page.count("<img ") == report["threes"] + report["fixed"]


# -- thumbnails (no browser needed) ----------------------------------------------------------------

def _decoded(img_html: str):
    import base64
    import io
    import re

    from PIL import Image
    uri = re.search(r'src="data:image/png;base64,([^"]+)"', img_html).group(1)
    size = tuple(int(v) for v in re.search(r'width="(\d+)" height="(\d+)"', img_html).groups())
    return Image.open(io.BytesIO(base64.b64decode(uri))), size


def test_thumbnails_keep_colour_and_aspect_ratio():
    from pipelines import reviewpage
    photo = np.zeros((60, 120, 3), dtype=np.uint8)
    photo[..., 0] = 200                                   # a red 2:1 landscape picture
    img, shown = _decoded(reviewpage._thumb(factories.png_bytes(photo), alt="x"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (200, 0, 0)
    assert shown == (84, 42) and img.size == (84, 42)
    # a 32 px scan is not blurred up: its pixels come as they are, the browser enlarges them
    img, shown = _decoded(reviewpage._thumb(factories.digit_png(0), alt="x"))
    assert img.size == (32, 32) and shown == (84, 84)


def test_thumbnails_apply_exif_orientation_and_survive_hostile_files():
    import io

    from PIL import Image

    from pipelines import reviewpage
    pixels = np.zeros((40, 100, 3), dtype=np.uint8)
    pixels[:, :50] = (0, 0, 255)                          # stored: blue left half, 100 x 40
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6                                      # shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif, quality=95)
    img, shown = _decoded(reviewpage._thumb(buf.getvalue(), alt="x"))
    assert shown == (34, 84)                              # upright: portrait
    r, g, b = img.getpixel((img.size[0] // 2, 2))         # top now holds the blue half
    assert b > 200 and r < 40
    html = reviewpage._thumb(factories.png_header_only_bomb(20000, 20000), alt="x")
    assert html.startswith('<div class="noimg">') and "image unreadable" in html
    assert reviewpage._thumb(b"<svg onload=alert(1)>", alt="x").startswith('<div class="noimg">')
