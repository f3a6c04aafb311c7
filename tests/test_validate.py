"""pipelines.validate on a raw store holding good tasks (real digit scans) and every kind of bad
one: each task ends up in exactly one of manifest.jsonl / quarantine.jsonl, for the right reason."""
from __future__ import annotations

import os

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import io  # noqa: E402
import json  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines import validate  # noqa: E402
from pipelines.files import read_json, read_jsonl, sha256_bytes  # noqa: E402
from pipelines.labelconfig import FROM_NAME, TO_NAME, choice_result, chosen  # noqa: E402
from pipelines.validate import ValidationFailed  # noqa: E402
from tests import factories  # noqa: E402
from tests.factories import image_row, ls_task, task_url  # noqa: E402

PER_CLASS = 3  # good tasks per class


def build_store(raw_dir):
    """Two snapshots. Returns {task_id: expected quarantine kind or None (accepted)} plus the
    good tasks' labels, everything derived from what is written here."""
    expect: dict[int, str | None] = {}
    labels: dict[int, list[str]] = {}
    entries = []
    digits = factories.digits_by_class(PER_CLASS)
    tid = 0
    for i, data, cls in digits:
        tid += 1
        entries.append((ls_task(tid, str(cls), url=task_url(f"digit-{i:04d}.png")), data))
        expect[tid], labels[tid] = None, [str(cls)]
    spare = iter(factories.digits_by_class(4, start=digits[-1][0] + 1))  # unused scans

    def add(task_label, image, kind, *, url=None, **kw):
        nonlocal tid
        tid += 1
        entries.append((ls_task(tid, task_label, url=url or task_url(f"t{tid}.png"), **kw), image))
        expect[tid] = kind
        return tid

    ids = {}
    ids["unknown label"] = add("seven", next(spare)[1], "label")
    ids["relabeled"] = add("seven", next(spare)[1], None)  # fixed in snapshot 2, below
    truncated = factories.digit_png(0)[:60]
    ids["corrupt"] = add("0", truncated, "bad image")
    ids["not an image"] = add("1", b"this is a text file, not a scan\n", "bad image")
    ids["blank"] = add("2", factories.png_bytes(np.zeros((32, 32), np.uint8)), "bad image")
    ids["skipped"] = add(["3", "3"], next(spare)[1], "skipped", cancelled=True)
    dup_i, dup_data, dup_cls = next(spare)
    ids["dup first"] = add(str(dup_cls), dup_data, None, url=task_url("dup-a.png"))
    labels[ids["dup first"]] = [str(dup_cls)]
    ids["dup second"] = add(str(dup_cls), dup_data, "duplicate image", url=task_url("dup-b.png"))
    ids["fetch error"] = add("4", "HTTP 404 from Label Studio", "image unavailable")
    ids["no choice"] = add([None], next(spare)[1], "label")
    ids["too small"] = add("5", factories.png_bytes(np.eye(4, dtype=np.uint8) * 255), "image size")
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    cmyk = io.BytesIO()
    Image.fromarray(ramp).convert("CMYK").save(cmyk, "JPEG")
    ids["cmyk"] = add("6", cmyk.getvalue(), None)  # preprocess handles CMYK: accepted
    labels[ids["cmyk"]] = ["6"]
    floats = io.BytesIO()  # 32-bit float pixels have no agreed scale: not in the default modes
    Image.fromarray(ramp.astype(np.float32)).save(floats, "TIFF")
    ids["float"] = add("6", floats.getvalue(), "image mode")
    # one annotator skipped, the other labeled: accepted, with the skip counted
    mixed_data = next(spare)[1]
    ids["one skip"] = add(["8", "8"], mixed_data, None, cancelled=[True, False])
    labels[ids["one skip"]] = ["8"]
    factories.write_store(raw_dir, entries)

    # Snapshot 2: a relabel (wrong class name fixed), a deletion, and an image row that names
    # bytes the store never got.
    tid += 1
    missing_bytes = tid
    fixed = ls_task(ids["relabeled"], "7", url=task_url(f"t{ids['relabeled']}.png"))
    fixed["annotations"][0]["updated_at"] = "2025-02-01T00:00:00.000000Z"
    gone = tid + 1
    relabel_data = next(e for e in entries if e[0]["id"] == ids["relabeled"])[1]
    ghost = ls_task(missing_bytes, "9", url=task_url("ghost.png"))
    factories.write_snapshot(
        raw_dir, [fixed, ghost], {},
        [image_row(fixed["id"], fixed["data"]["image"], sha256=sha256_bytes(relabel_data)),
         image_row(missing_bytes, ghost["data"]["image"], sha256="f" * 64)],
        removed=[ids["blank"], gone], seq=2)
    labels[ids["relabeled"]] = ["7"]
    expect[missing_bytes] = "image unavailable"
    del expect[ids["blank"]]  # deleted in Label Studio: in neither file
    ids["missing bytes"] = missing_bytes
    return expect, labels, ids, entries


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    expect, labels, ids, entries = build_store(root / "raw")
    params = factories.params({"validate.min_per_class": PER_CLASS})
    summary = validate.run(root / "raw", root / "out", params=params)
    return {"root": root, "expect": expect, "labels": labels, "ids": ids, "entries": entries,
            "summary": summary, "params": params,
            "manifest": read_jsonl(root / "out" / "manifest.jsonl"),
            "quarantine": read_jsonl(root / "out" / "quarantine.jsonl")}


def test_every_bad_task_is_quarantined_with_its_kind(validated):
    got = {q["task_id"]: q["kind"] for q in validated["quarantine"]}
    want = {t: k for t, k in validated["expect"].items() if k is not None}
    assert got == want
    assert len(validated["quarantine"]) == len(got)  # one row per task
    for q in validated["quarantine"]:
        assert q["reason"], q


def test_quarantine_reasons_say_what_is_wrong(validated):
    ids = validated["ids"]
    reason = {q["task_id"]: q["reason"] for q in validated["quarantine"]}
    assert "not in the class set" in reason[ids["unknown label"]]
    assert "'seven'" in reason[ids["unknown label"]]
    assert "corrupt" in reason[ids["corrupt"]]
    assert "not an image" in reason[ids["not an image"]]
    assert "skipped by every annotator (2 skip(s))" in reason[ids["skipped"]]
    assert reason[ids["dup second"]] == f"same image as task {ids['dup first']}"
    assert reason[ids["fetch error"]] == "HTTP 404 from Label Studio"
    assert "no single class" in reason[ids["no choice"]]
    assert "missing from the raw store" in reason[ids["missing bytes"]]
    assert "width outside [8, 4096]" in reason[ids["too small"]] or \
        "height outside [8, 4096]" in reason[ids["too small"]]
    assert "image mode not allowed (validate.allowed_modes): 'F'" in reason[ids["float"]]
    assert ids["cmyk"] not in reason


def test_unknown_label_is_quarantined_naming_the_label(tmp_path):
    (_, data, _), = factories.digits_by_class({5: 1})
    task = ls_task(1, "seven", url=task_url("stale.png"))
    good = [(ls_task(10 + i, str(c), url=task_url(f"{i}.png")), d)
            for i, d, c in factories.digits_by_class(1, start=100)]
    factories.write_store(tmp_path / "raw", [(task, data), *good])
    validate.run(tmp_path / "raw", tmp_path / "out",
                 params=factories.params({"validate.min_per_class": 1}))
    q, = read_jsonl(tmp_path / "out" / "quarantine.jsonl")
    assert q["task_id"] == 1 and q["kind"] == "label"
    assert "not in the class set" in q["reason"] and "'seven'" in q["reason"]
    assert q["annotation_ids"] == [a["id"] for a in task["annotations"]]


def test_replay_uses_the_latest_version_of_each_task(validated):
    rows = {r["task_id"]: r for r in validated["manifest"]}
    assert rows[validated["ids"]["relabeled"]]["labels"] == ["7"]  # snapshot 2 wins
    quarantined = {q["task_id"] for q in validated["quarantine"]}
    assert validated["ids"]["blank"] not in rows and validated["ids"]["blank"] not in quarantined


def test_duplicate_of_a_rejected_task_is_not_lost(tmp_path):
    (_, data, cls), = factories.digits_by_class({7: 1})
    stale = ls_task(1, "seven", url=task_url("a.png"))           # rejected: unknown label
    good = ls_task(2, str(cls), url=task_url("b.png"))           # same picture, right label
    others = [(ls_task(10 + n, str(c), url=task_url(f"{i}.png")), d)
              for n, (i, d, c) in enumerate(factories.digits_by_class(1, start=200))]
    factories.write_store(tmp_path / "raw", [(stale, data), (good, data), *others])
    validate.run(tmp_path / "raw", tmp_path / "out",
                 params=factories.params({"validate.min_per_class": 1}))
    kinds = {q["task_id"]: q["kind"] for q in read_jsonl(tmp_path / "out" / "quarantine.jsonl")}
    assert kinds.get(1) == "label"
    accepted = {r["task_id"] for r in read_jsonl(tmp_path / "out" / "manifest.jsonl")}
    assert 2 in accepted, f"task 2 quarantined as {kinds.get(2)!r}"


def test_good_tasks_are_in_the_manifest_with_their_image(validated):
    rows = {r["task_id"]: r for r in validated["manifest"]}
    want = {t for t, k in validated["expect"].items() if k is None}
    assert set(rows) == want
    blobs = {e[0]["id"]: e[1] for e in validated["entries"]}
    for task_id, row in rows.items():
        assert row["labels"] == validated["labels"][task_id]
        assert row["image_sha256"] == sha256_bytes(blobs[task_id])
        img = Image.open(io.BytesIO(blobs[task_id]))
        assert (row["width"], row["height"], row["mode"]) == (img.width, img.height, img.mode)
        assert row["n_votes"] == len(row["labels"]) == len(row["annotation_ids"])
    assert rows[validated["ids"]["one skip"]]["skipped"] == 1


def test_nothing_is_lost(validated):
    s = validated["summary"]
    manifest_ids = {r["task_id"] for r in validated["manifest"]}
    quarantine_ids = {q["task_id"] for q in validated["quarantine"]}
    assert not manifest_ids & quarantine_ids
    assert manifest_ids | quarantine_ids == set(validated["expect"])
    assert s["tasks"] == len(validated["expect"])
    assert s["accepted"] + s["quarantined"] == s["tasks"]
    assert (s["accepted"], s["quarantined"]) == (len(manifest_ids), len(quarantine_ids))
    assert s["snapshots"] == 2
    assert read_json(validated["root"] / "out" / "summary.json") == s
    assert s["quarantine_reasons"] == dict(Counter(q["kind"] for q in validated["quarantine"]))


def test_class_counts_count_accepted_tasks(validated):
    want = Counter(l for labels in validated["labels"].values() for l in set(labels))
    classes = validated["params"].base.classes
    assert validated["summary"]["class_counts"] == {c: want.get(c, 0) for c in classes}
    assert validated["summary"]["suite_success"] is True
    ge = read_json(validated["root"] / "out" / "ge_result.json")
    assert set(ge) == {"annotations", "manifest", "class_counts"}
    assert ge["class_counts"]["success"] is True


def test_too_few_examples_stops_the_pipeline_naming_the_classes(tmp_path):
    minimum = 3
    per_class = {c: minimum + 1 for c in range(10)}
    per_class[3], per_class[9] = 1, minimum - 1
    per_class[5] = minimum  # exactly at the minimum: enough
    entries = [(ls_task(n, str(c), url=task_url(f"{i}.png")), d)
               for n, (i, d, c) in enumerate(factories.digits_by_class(per_class), start=1)]
    factories.write_store(tmp_path / "raw", entries)
    with pytest.raises(ValidationFailed) as err:
        validate.run(tmp_path / "raw", tmp_path / "out",
                     params=factories.params({"validate.min_per_class": minimum}))
    msg = str(err.value)
    short = {str(c): n for c, n in per_class.items() if n < minimum}
    assert short  # the test is about something
    assert f"validate.min_per_class={minimum}" in msg
    for c, n in short.items():
        assert f"'{c}': {n}" in msg
    for c in {str(c) for c in per_class} - set(short):
        assert f"'{c}':" not in msg
    # the outputs still say what happened (for the report), and nothing was lost
    summary = read_json(tmp_path / "out" / "summary.json")
    assert summary["suite_success"] is False
    assert summary["accepted"] == len(entries)


def test_empty_raw_store_is_a_readable_failure(tmp_path):
    with pytest.raises(ValidationFailed, match="no annotated tasks"):
        validate.run(tmp_path / "raw", tmp_path / "out", params=factories.params())


# -- which label an annotation chose (labelconfig.chosen, what validate reads) --------------------

def chosen_label(annotation: dict) -> str | None:
    return chosen(annotation.get("result"), FROM_NAME)


def ann(result):
    return {"id": 1, "result": result}


def choice(labels, *, from_name=FROM_NAME, type_="choices"):
    return {"from_name": from_name, "to_name": TO_NAME, "type": type_,
            "value": {"choices": labels}}


@pytest.mark.parametrize("label", ["3", "seven", "<b>x</b>"])
def test_chosen_label_of_one_choice(label):
    assert chosen_label(ann(choice_result(label))) == label


@pytest.mark.parametrize("annotation", [
    {"id": 1},                                            # no result key
    ann(None),                                            # result: null
    ann([]),                                              # skipped / nothing chosen
    ann([choice([])]),                                    # empty choice list
    ann([choice(["1", "2"])]),                            # several classes in one result
    ann([choice(["1"]), choice(["2"])]),                  # two results, one class each
    ann([choice(["1"], from_name="other")]),              # another control's choice
    ann([choice(["1"], type_="labels")]),                 # not a choices result
    ann([{"from_name": FROM_NAME, "type": "choices"}]),   # no value
    ann([{"from_name": FROM_NAME, "type": "choices", "value": None}]),
    ann([choice([7])]),                                   # not a string
    ann([choice([None])]),
])
def test_chosen_label_is_none_unless_exactly_one_class(annotation):
    assert chosen_label(annotation) is None


def test_chosen_label_ignores_other_controls_next_to_the_choice():
    result = [choice(["4"]), {"from_name": "comment", "type": "textarea",
                              "value": {"text": ["looks like a 9"]}},
              choice(["9"], from_name="other")]
    assert chosen_label(ann(result)) == "4"


def test_chosen_label_same_class_twice_is_not_one_choice():
    assert chosen_label(ann([choice(["4"]), choice(["4"])])) is None


def test_fixture_task_round_trips_through_json():
    # The factory's tasks are plain JSON, like Label Studio's export.
    t = ls_task(5, ["1", "2"], url=task_url("x.png"), ground_truth=[True, False])
    assert json.loads(json.dumps(t)) == t
    assert [chosen_label(a) for a in t["annotations"]] == ["1", "2"]
    assert [a["ground_truth"] for a in t["annotations"]] == [True, False]


def test_corrupted_raw_store_is_an_error_not_data(tmp_path):
    from pipelines import rawstore
    data = factories.png_bytes((np.arange(64, dtype=np.uint8).reshape(8, 8) * 3))
    sha = sha256_bytes(data)
    url = task_url("one.png")
    factories.write_snapshot(tmp_path, [ls_task(1, "3", url=url)], {sha: data},
                             [image_row(1, url, sha256=sha)])
    state = rawstore.load(tmp_path)
    assert state.image_bytes(sha) == data
    tar, offset, size = state.packs[sha]
    raw = bytearray(tar.read_bytes())
    raw[offset + size // 2] ^= 0xFF  # one flipped byte inside the stored image
    tar.write_bytes(bytes(raw))
    with pytest.raises(rawstore.CorruptStore, match="dvc checkout"):
        rawstore.load(tmp_path).image_bytes(sha)
