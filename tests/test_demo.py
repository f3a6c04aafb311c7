"""The colour demo on the real embedded Label Studio: its project is seeded with the Twemoji
set the way the digits demo is (fixed ground-truth eval set, planted annotator slips, bad
items), and its workspace is made by `labelgate init` with the set's input spec."""
from __future__ import annotations

import collections
import uuid

import pytest
import yaml

from pipelines import datasets, demo
from pipelines.labelstudio import Studio

EMOJI = datasets.get("emoji")


@pytest.fixture(scope="module")
def emoji_project(label_studio):
    st = Studio(label_studio["conn"])
    title = f"labelgate emoji test {uuid.uuid4().hex[:8]}"
    project_id, created = st.ensure_project(title, EMOJI.classes)
    assert created
    counts = demo.seed(st, project_id, label_studio["files"], EMOJI.classes, dataset="emoji")
    return {"id": project_id, "title": title, "studio": st, "counts": counts}


def test_seeding_imports_every_image_with_a_fixed_eval_set_and_planted_errors(emoji_project):
    st, project_id, counts = emoji_project["studio"], emoji_project["id"], emoji_project["counts"]
    assert counts["tasks"] == 1319 + 3 and counts["bad"] == 3
    assert counts["eval_ground_truth"] == 330 and counts["unlabeled"] == 100
    assert counts["single"] + counts["double"] + counts["skipped"] == 1319 - 330 - 100
    assert 5 <= counts["slips"] <= 60  # ~2 % of 889 firsts + ~15 % of ~130 seconds
    assert st.task_count(project_id) == 1322
    assert st.labeling_config(project_id).classes == EMOJI.classes  # "&" and spaces verbatim
    ids = st.annotated_task_ids(project_id)
    assert len(ids) == 1322 - 100  # the unlabeled ones have no annotation
    tasks = [t for start in range(0, len(ids), 500)
             for t in st.export_tasks(project_id, ids[start:start + 500])]
    truth = {i.name: EMOJI.classes[i.label] for i in EMOJI.items()}
    eval_per_class = collections.Counter()
    for task in tasks:
        name = task["data"]["image"].rsplit("/", 1)[1]
        for ann in task["annotations"]:
            if ann.get("ground_truth"):
                label = ann["result"][0]["value"]["choices"][0]
                assert label == truth[name]  # the eval set is never wrong
                eval_per_class[label] += 1
    assert sum(eval_per_class.values()) == 330
    assert min(eval_per_class.values()) >= 20  # gate.min_class_support for every class
    # the images Label Studio serves are the files the package ships, byte for byte
    item = EMOJI.items()[1000]
    url = f"/data/local-files/?d={EMOJI.folder}/{item.name}"
    assert st.fetch_image(url, max_bytes=1_000_000) == item.data


def test_seeding_a_project_with_other_class_count_is_refused(label_studio, tmp_path):
    st = Studio(label_studio["conn"])
    with pytest.raises(datasets.DatasetError, match="6 classes"):
        demo.seed(st, 1, tmp_path, tuple("0123456789"), dataset="emoji")


def test_workspace_is_made_by_init_with_the_colour_spec(emoji_project, label_studio, tmp_path,
                                                        monkeypatch):
    from pipelines.layout import Layout
    from pipelines.lstransport import connection_from_env
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    dest = tmp_path / "demos" / "emoji"
    root = demo.workspace(dest, studio=emoji_project["studio"], project_id=emoji_project["id"],
                          dataset=EMOJI, studio_dir=label_studio["dir"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert tuple(params["base"]["classes"]) == EMOJI.classes
    assert params["studio"]["project_title"] == emoji_project["title"]
    assert params["input"]["channels"] == 3
    assert (params["input"]["height"], params["input"]["width"]) == (32, 32)
    assert params["input"]["background"] == [255, 255, 255]
    assert params["train"]["hflip"] is True and params["train"]["arch"] == "auto"
    assert (root / "dvc.yaml").exists() and (root / ".git").exists()
    # the workspace reaches the checkout's Label Studio through its linked data folder
    assert connection_from_env(Layout(root).studio).url == label_studio["conn"].url
    # a second demo run reuses the workspace as it is
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "# kept\n")
    assert demo.workspace(dest, studio=emoji_project["studio"], project_id=emoji_project["id"],
                          dataset=EMOJI, studio_dir=label_studio["dir"]) == root
    assert (root / "params.yaml").read_text().endswith("# kept\n")


@pytest.mark.slow
def test_labelgate_demo_emoji_end_to_end(label_studio, prefect_api, tmp_path, monkeypatch,
                                         capsys):
    """`labelgate demo --dataset emoji` as a user runs it, on the suite's Label Studio (the
    checkout's `.labelgate/studio` links to it, so `studio up` finds it running): project,
    workspace by init, pull, eval set, the whole flow; the first model beats the baseline."""
    import json
    from pipelines import cli, registry
    from tests.conftest import write_params
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    root = tmp_path / "checkout"
    (root / ".labelgate").mkdir(parents=True)
    (root / ".labelgate" / "studio").symlink_to(label_studio["dir"], target_is_directory=True)
    write_params(root / "params.yaml")
    assert cli.main(["--root", str(root), "demo", "--dataset", "emoji"]) == 0
    ws = root / ".labelgate" / "demos" / "emoji"
    last = json.loads((ws / ".labelgate" / "last_run.json").read_text())
    assert last["status"] == "done"
    reasons = last["validate"]["quarantine_reasons"]
    assert reasons["label"] == 1  # the stale class name
    # the truncated file and the text file
    assert reasons.get("bad image", 0) + reasons.get("image unavailable", 0) == 2
    # France's flag file is also Clipperton's and St. Martin's, Norway's Svalbard's: 3 copies,
    # fewer when a copy is among the unlabeled or skipped tasks
    assert 1 <= reasons["duplicate image"] <= 3
    # 6 classes, largest 97 of 330 eval images: the majority baseline is 0.294
    assert last["candidate_accuracy"] >= 0.5
    decision = json.loads((ws / "reports" / "gate" / "decision.json").read_text())
    tests = {t["name"]: t["result"] for t in decision["tests"]}
    assert tests["better than the majority-class baseline"] == "pass"
    # Measured 04:57 UTC (2 busy cores): 0.7727, PASS. Whether the first model passes is the
    # recipe's and the gate's matter; whatever the verdict, the registry says it.
    prod = registry.production(ws / "models" / "registry")
    assert (prod is not None) == (last["verdict"] == "PASS")
    # a second demo run reuses project and workspace: nothing seeded, no new data version
    capsys.readouterr()
    assert cli.main(["--root", str(root), "demo", "--dataset", "emoji"]) == 0
    assert "reusing Label Studio project" in capsys.readouterr().out
    again = json.loads((ws / ".labelgate" / "last_run.json").read_text())
    assert again["dataset_version"] == last["dataset_version"]
