"""pipelines.prepare: label resolution, the content-hash split, eval-set exclusion, and packed
uint8 splits (pipelines/packed.py) that are byte-identical for identical inputs."""
from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import inputspec, neardup, packed, prepare
from pipelines.files import read_json, read_jsonl, sha256_bytes, tar_bytes
from pipelines.prepare import in_val, resolve
from tests import factories
from tests.factories import ls_task, task_url

# -- resolve -------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", [["3"], ["3", "3"], ["3", "3", "3"]])
def test_unanimous(labels):
    assert resolve(labels, [False] * len(labels)) == ("3", "unanimous")


@pytest.mark.parametrize("labels, winner", [
    (["3", "3", "5"], "3"), (["5", "3", "5"], "5"), (["1", "2", "2", "2", "1"], "2"),
])
def test_majority(labels, winner):
    assert Counter(labels).most_common(1)[0][0] == winner  # the case is what it says
    assert resolve(labels, [False] * len(labels)) == (winner, "majority")


@pytest.mark.parametrize("labels", [["3", "5"], ["5", "3"], ["1", "1", "2", "2"],
                                    ["1", "2", "3"]])
def test_tie_is_disputed(labels):
    label, rule = resolve(labels, [False] * len(labels))
    assert label is None
    assert rule.startswith("disputed")
    top = max(Counter(labels).values())
    for tied in {l for l, n in Counter(labels).items() if n == top}:
        assert repr(tied) in rule  # names the tied classes


def test_ground_truth_wins_over_a_majority():
    labels, gt = ["3", "3", "3", "8"], [False, False, False, True]
    assert resolve(labels, gt) == ("8", "ground_truth")


def test_agreeing_ground_truths_win():
    assert resolve(["8", "8", "3"], [True, True, False]) == ("8", "ground_truth")


def test_ground_truth_breaks_a_tie():
    assert resolve(["3", "5"], [False, True]) == ("5", "ground_truth")


def test_disagreeing_ground_truths_are_disputed_even_with_a_majority():
    label, rule = resolve(["3", "5", "3", "3"], [True, True, False, False])
    assert label is None
    assert rule.startswith("disputed") and "ground-truth" in rule
    assert "'3'" in rule and "'5'" in rule


# -- in_val --------------------------------------------------------------------------------------

def fake_shas(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [hashlib.sha256(rng.randbytes(16)).hexdigest() for _ in range(n)]


def test_in_val_is_deterministic():
    shas = fake_shas(200)
    first = [in_val(s, seed=42, fraction=0.3) for s in shas]
    assert first == [in_val(s, seed=42, fraction=0.3) for s in reversed(shas)][::-1]
    assert any(first) and not all(first)


def test_in_val_fraction_over_many_hashes():
    shas = fake_shas(20_000)
    for fraction in (0.15, 0.5):
        share = sum(in_val(s, seed=42, fraction=fraction) for s in shas) / len(shas)
        sigma = (fraction * (1 - fraction) / len(shas)) ** 0.5
        assert abs(share - fraction) < 5 * sigma, (fraction, share)


def test_in_val_grows_monotonically_with_the_fraction():
    # An image in val at 10 % stays in val at 20 %: raising the fraction never moves val to train.
    for s in fake_shas(2_000):
        if in_val(s, seed=1, fraction=0.1):
            assert in_val(s, seed=1, fraction=0.2)


def test_in_val_depends_on_the_seed():
    shas = fake_shas(2_000)
    a = [in_val(s, seed=1, fraction=0.5) for s in shas]
    b = [in_val(s, seed=2, fraction=0.5) for s in shas]
    assert a != b


# -- run -----------------------------------------------------------------------------------------

def build(root, *, per_class: int = 4):
    """A raw store + a manifest (as validate writes it) + a tiny frozen eval set containing one
    of the store's images. Returns what the test needs to derive expectations."""
    digits = factories.digits_by_class(per_class)
    entries, manifest, truth = [], [], {}
    for n, (i, data, cls) in enumerate(digits, start=1):
        task = ls_task(n, str(cls), url=task_url(f"digit-{i:04d}.png"))
        entries.append((task, data))
        sha = sha256_bytes(data)
        manifest.append({"task_id": n, "labels": [str(cls)], "ground_truth": [False],
                         "annotators": ["1"], "annotation_ids": [n * 100 + 1],
                         "image_sha256": sha, "n_votes": 1, "skipped": 0})
        truth[n] = (sha, str(cls), data)
    # one task with a tie: disputed, never packed
    tie_task = len(digits) + 1
    (_, tie_data, _), = factories.digits_by_class({0: 1}, start=digits[-1][0] + 1)
    entries.append((ls_task(tie_task, ["1", "7"], url=task_url("tie.png")), tie_data))
    manifest.append({"task_id": tie_task, "labels": ["1", "7"], "ground_truth": [False, False],
                     "annotators": ["1", "2"], "image_sha256": sha256_bytes(tie_data),
                     "n_votes": 2, "skipped": 0})
    factories.write_store(root / "raw", entries)
    (root / "validated").mkdir()
    (root / "validated" / "manifest.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest))
    eval_task = 3
    (root / "eval").mkdir()
    (root / "eval" / "manifest.jsonl").write_text(json.dumps(
        {"task_id": 9000, "image_sha256": truth[eval_task][0], "label": truth[eval_task][1]}) + "\n")
    return {"truth": truth, "eval_task": eval_task, "tie_task": tie_task,
            "tie_sha": sha256_bytes(tie_data)}


def run(root, out="prepared", **overrides):
    params = factories.params({"prepare.val_fraction": 0.3, **overrides})
    summary = prepare.run(root / "validated" / "manifest.jsonl", root / "raw", root / "eval",
                          root / out, params=params)
    return summary, params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    info = build(root)
    summary, params = run(root)
    out = root / "prepared"
    train, val = (vars(packed.read_split(out / name)) for name in ("train", "val"))
    return {"root": root, "out": out, "summary": summary, "params": params, "train": train,
            "val": val, "resolved": read_jsonl(out / "resolved.jsonl"), **info}


def test_eval_image_is_excluded_from_training(prepared):
    eval_sha = prepared["truth"][prepared["eval_task"]][0]
    for split in ("train", "val"):
        assert eval_sha not in set(prepared[split]["sha256"].tolist())
        assert prepared["eval_task"] not in set(prepared[split]["task_id"].tolist())
    row = next(r for r in prepared["resolved"] if r["task_id"] == prepared["eval_task"])
    assert row["split"].startswith("excluded")
    assert prepared["summary"]["excluded_eval_overlap"] == 1


def test_disputed_task_is_reported_not_packed(prepared):
    disputed = read_jsonl(prepared["out"] / "disputed.jsonl")
    assert [d["task_id"] for d in disputed] == [prepared["tie_task"]]
    assert disputed[0]["label"] is None and disputed[0]["split"] == "disputed"
    for split in ("train", "val"):
        assert prepared["tie_sha"] not in set(prepared[split]["sha256"].tolist())


def test_split_follows_in_val_and_covers_every_usable_task(prepared):
    p = prepared["params"]
    want = {"train": set(), "val": set()}
    for task_id, (sha, _, _) in prepared["truth"].items():
        if task_id == prepared["eval_task"]:
            continue
        split = "val" if in_val(sha, seed=p.base.seed, fraction=p.prepare.val_fraction) else "train"
        want[split].add(task_id)
    for split in ("train", "val"):
        got = prepared[split]["task_id"].tolist()
        assert len(got) == len(set(got))
        assert set(got) == want[split]
        assert prepared["summary"][split] == len(got)


def test_packed_arrays_are_uint8_images_with_their_labels(prepared):
    p = prepared["params"]
    spec = inputspec.from_params(p)
    index = {c: i for i, c in enumerate(p.base.classes)}
    assert prepared["summary"]["input_spec"] == spec.to_json()
    for split in ("train", "val"):
        z = prepared[split]
        n = len(z["task_id"])
        assert z["spec"] == spec
        assert z["x"].dtype == np.uint8
        assert z["x"].shape == (n, p.input.height, p.input.width, p.input.channels)
        assert z["y"].dtype == np.int64 and z["y"].shape == (n,)
        assert len(z["sha256"]) == n
        for k in range(n):
            sha, label, data = prepared["truth"][int(z["task_id"][k])]
            assert z["sha256"][k] == sha
            assert z["y"][k] == index[label]
            assert np.array_equal(z["x"][k], inputspec.preprocess(data, spec))  # same function


def test_resolved_has_every_manifest_row(prepared):
    manifest = read_jsonl(prepared["root"] / "validated" / "manifest.jsonl")
    assert [r["task_id"] for r in prepared["resolved"]] == [r["task_id"] for r in manifest]
    s = prepared["summary"]
    assert s["resolved"] == len(manifest) == s["train"] + s["val"] + s["disputed"] + \
        s["excluded_eval_overlap"] + s["excluded_near_duplicates"]
    assert read_json(prepared["out"] / "summary.json") == s
    labels = [str(c) for c in prepared["train"]["y"].tolist()]
    assert s["train_class_counts"] == dict(sorted(Counter(labels).items()))


def test_same_inputs_give_byte_identical_outputs(prepared):
    run(prepared["root"], out="again")
    first = sorted(str(p.relative_to(prepared["out"])) for p in prepared["out"].rglob("*"))
    second = sorted(str(p.relative_to(prepared["root"] / "again"))
                    for p in (prepared["root"] / "again").rglob("*"))
    assert first == second
    assert {"train", "val", "resolved.jsonl", "disputed.jsonl", "summary.json",
            *(f"{split}/{f}" for split in ("train", "val") for f in packed.FILES)} == set(first)
    for name in first:
        if (prepared["out"] / name).is_dir():
            continue
        a = (prepared["out"] / name).read_bytes()
        b = (prepared["root"] / "again" / name).read_bytes()
        assert a == b, name


def test_no_temp_files_are_left(prepared):
    assert not [p for p in prepared["out"].rglob("*") if ".tmp" in p.name or ".old" in p.name]


def test_an_empty_split_is_a_readable_error(tmp_path):
    build(tmp_path, per_class=1)  # 10 images, of which 9 usable
    with pytest.raises(ValueError, match="need images in both splits"):
        run(tmp_path, **{"prepare.val_fraction": 1e-9})


def test_no_eval_set_yet_means_nothing_is_excluded(tmp_path):
    info = build(tmp_path)
    (tmp_path / "eval" / "manifest.jsonl").unlink()
    summary, _ = run(tmp_path)
    assert summary["excluded_eval_overlap"] == 0
    assert summary["train"] + summary["val"] == len(info["truth"])


def test_near_duplicate_of_an_eval_image_is_excluded_and_named(tmp_path):
    """Leakage through a re-encoded copy: the eval set holds task 5's picture resized, brightened
    and saved as JPEG (another sha256). Task 5 must leave training; distinct digits must stay."""
    info = build(tmp_path)
    _, label, data = info["truth"][5]
    img = Image.open(io.BytesIO(data)).convert("L")
    buf = io.BytesIO()
    img.resize((40, 40)).point(lambda v: min(255, int(v * 1.1))).save(buf, "JPEG", quality=70)
    copy = buf.getvalue()
    eval_dir = tmp_path / "eval"
    manifest = json.dumps({"task_id": 9001, "image_sha256": sha256_bytes(copy),
                           "label": label}) + "\n"
    (eval_dir / "manifest.jsonl").write_text(manifest)
    (eval_dir / "images.tar").write_bytes(tar_bytes({sha256_bytes(copy): copy}))
    (eval_dir / "meta.json").write_text(json.dumps({"hash": sha256_bytes(manifest.encode())}))
    summary, _ = run(tmp_path)
    assert summary["excluded_near_duplicates"] == 1 and summary["excluded_eval_overlap"] == 0
    row = next(r for r in read_jsonl(tmp_path / "prepared" / "resolved.jsonl")
               if r["task_id"] == 5)
    assert row["split"].startswith("excluded: near-duplicate of eval task 9001 (similarity 0.99")
    assert summary["train"] + summary["val"] == len(info["truth"]) - 1
    # and a stricter threshold than any copy reaches lets it back in: the check can fail
    summary, _ = run(tmp_path, out="strict", **{"prepare.near_duplicate_similarity": 1.0})
    assert summary["excluded_near_duplicates"] == 0


def test_consensus_policy_from_params():
    # two of three agree: 67 % — enough for a 0.6 minimum, not for 0.7
    assert resolve(["4", "4", "9"], [False] * 3, min_agreement=0.6) == ("4", "majority")
    label, rule = resolve(["4", "4", "9"], [False] * 3, min_agreement=0.7)
    assert label is None and "min_agreement" in rule and "67%" in rule
    # a single vote is not enough when two are required
    label, rule = resolve(["4"], [False], min_annotations=2)
    assert label is None and "min_annotations" in rule
    # ground truth can be switched off: then it is one vote among others
    assert resolve(["3", "5", "5"], [True, False, False], ground_truth_wins=False) == ("5", "majority")
    assert resolve(["3", "5", "5"], [True, False, False]) == ("3", "ground_truth")


def test_colour_project_packs_its_spec_and_excludes_a_cropped_copy(tmp_path):
    """A colour project (3 channels, 24 x 32, centre crop): tiles of scikit-learn's real sample
    photos; the eval set holds one of them cut by 8 % at a corner, halved and re-encoded.
    That task leaves training, every other tile stays, and the threshold came from the eval
    set (params: null)."""
    import sklearn
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    tiles = []
    for name in ("china.jpg", "flower.jpg"):
        img = Image.open(folder / name).convert("RGB")
        w, h = img.width // 4, img.height // 3
        tiles += [img.crop((j * w, i * h, (j + 1) * w, (i + 1) * h))
                  for i in range(3) for j in range(4)]
    entries, manifest, truth = [], [], {}
    for n, tile in enumerate(tiles, start=1):
        buf = io.BytesIO()
        tile.save(buf, "JPEG", quality=90)
        data = buf.getvalue()
        label = str(n % 2)
        entries.append((ls_task(n, label, url=task_url(f"tile-{n}.jpg")), data))
        manifest.append({"task_id": n, "labels": [label], "ground_truth": [False],
                         "annotators": ["1"], "annotation_ids": [n], "n_votes": 1, "skipped": 0,
                         "image_sha256": sha256_bytes(data)})
        truth[n] = data
    factories.write_store(tmp_path / "raw", entries)
    (tmp_path / "validated").mkdir()
    (tmp_path / "validated" / "manifest.jsonl").write_text(
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest))
    leaked = tiles[6]
    w, h = leaked.size
    buf = io.BytesIO()
    leaked.crop((round(0.08 * w), round(0.08 * h), w, h)).resize((w // 2, h // 2)).save(
        buf, "JPEG", quality=75)
    copy = buf.getvalue()
    other = tiles[0].transpose(Image.Transpose.FLIP_TOP_BOTTOM)  # a distinct second eval image
    buf = io.BytesIO()
    other.save(buf, "PNG")
    eval_rows = [{"task_id": 9001, "image_sha256": sha256_bytes(copy), "label": "1"},
                 {"task_id": 9002, "image_sha256": sha256_bytes(buf.getvalue()), "label": "0"}]
    manifest_text = "".join(json.dumps(r) + "\n" for r in eval_rows)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "manifest.jsonl").write_text(manifest_text)
    (tmp_path / "eval" / "images.tar").write_bytes(tar_bytes(
        {sha256_bytes(copy): copy, sha256_bytes(buf.getvalue()): buf.getvalue()}))
    (tmp_path / "eval" / "meta.json").write_text(
        json.dumps({"hash": sha256_bytes(manifest_text.encode())}))
    summary, params = run(tmp_path, **{"input.channels": 3, "input.height": 24,
                                       "input.width": 32, "input.resize": "crop",
                                       "base.classes": ["0", "1"], "validate.min_per_class": 1})
    assert summary["near_duplicate_threshold_from"] == "eval set"
    assert summary["near_duplicate_threshold"] == neardup.AUTO_FLOOR  # two distinct eval images
    resolved = {r["task_id"]: r for r in read_jsonl(tmp_path / "prepared" / "resolved.jsonl")}
    assert resolved[7]["split"].startswith("excluded: near-duplicate of eval task 9001")
    assert [t for t, r in resolved.items() if r["split"].startswith("excluded")] == [7]
    spec = inputspec.from_params(params)
    for name in ("train", "val"):
        split = packed.read_split(tmp_path / "prepared" / name)
        assert split.x.shape[1:] == (24, 32, 3) and split.spec == spec
        for k, task in enumerate(split.task_id.tolist()):
            assert np.array_equal(split.x[k], inputspec.preprocess(truth[task], spec))
    assert summary["train"] + summary["val"] == len(tiles) - 1
