"""`labelgate init`: a user's own Label Studio project (their control names, their class names,
their images) becomes a workspace where `labelgate pull` and `run` work with labelgate
installed, not copied; dvc.yaml's code deps are stamps of the installed code; a class list
changed in Label Studio stops the pull with the change in words and one command forward."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines import codestamp, dvcrepo, paramsfile, settings, workspace
from pipelines.labelconfig import choice_result, parse

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("leaf spot/blight", "healthy leaf", "rust")


def config(classes: tuple[str, ...] = CLASSES) -> str:
    """A user's own labeling config: other control names and data key than labelgate's."""
    return ('<View><Header value="What does the leaf have?"/>'
            '<Image name="photo" value="$picture" zoom="true"/>'
            '<Choices name="disease" toName="photo" choice="single-radio" showInLine="true">'
            + "".join(f'<Choice value="{c}"/>' for c in classes)
            + '</Choices><TextArea name="notes" toName="photo"/></View>')


CONFIG = config()
HOSTILE = ["leaf spot/blight", "healthy leaf", 'say "ahh" # not a comment', "ünïcode: ✓",
           "../../etc/passwd", "- [x]", "null", "1e3"]


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def leaf(label: int, rng: np.random.Generator, side: int = 40) -> np.ndarray:
    """A small colour image whose class is its dominant hue (learnable in a few epochs)."""
    base = np.array([[200, 60, 40], [40, 190, 60], [150, 110, 30]][label], dtype=np.float64)
    x = base + rng.normal(0, 25, size=(side, side, 3))
    x[rng.integers(0, side // 2):, : rng.integers(side // 4, side)] *= 0.7  # a shadow somewhere
    return np.clip(x, 0, 255)


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `labelgate` console script, run in `cwd` (the workspace, not the repo)."""
    exe = Path(sys.executable).parent / "labelgate"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=""))


# -- without Label Studio ----------------------------------------------------------------------

def test_untrusted_class_names_go_into_params_yaml_as_data_and_comments_stay():
    text = (REPO / "params.yaml").read_text()
    out = paramsfile.set_values(text, {"base.classes": HOSTILE, "studio.project_title": "a: #b"},
                                notes={"input": "sampled: colour"})
    p = settings.parse(yaml.safe_load(out))
    assert p.base.classes == tuple(HOSTILE) and p.studio.project_title == "a: #b"
    kept = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert all(line in out.splitlines() for line in kept)   # every comment line survives
    assert "  # sampled: colour" in out.splitlines()
    with pytest.raises(paramsfile.ParamsEditError, match="no key"):
        paramsfile.set_values(text, {"base.nope": 1})


def _spec(blobs):
    s = workspace.suggest_input(blobs)
    return (s.channels, s.height, s.resize) if s else None


def test_the_input_spec_suggestion_follows_the_sampled_images():
    rng = np.random.default_rng(0)
    gray = [png(np.repeat(rng.integers(0, 255, (28, 28, 1)), 3, axis=2)) for _ in range(4)]
    colour_small = [png(leaf(i % 3, rng, 32)) for i in range(4)]
    photos = [png(leaf(i % 3, rng, 300)[:, :260]) for i in range(3)]
    wide = [png(np.concatenate([leaf(0, rng, 250)] * 3, axis=1)) for _ in range(3)]
    assert _spec(gray) == (1, 28, "stretch")
    assert _spec(colour_small) == (3, 32, "stretch")
    assert _spec(photos) == (3, 224, "crop")
    assert _spec(wide) == (3, 224, "pad")
    assert _spec([b"not an image"]) is None


def test_the_workspace_dvc_yaml_depends_on_code_stamps_not_on_files_it_lacks():
    repo = yaml.safe_load((REPO / "dvc.yaml").read_text())
    ws = yaml.safe_load(codestamp.workspace_dvc_yaml((REPO / "dvc.yaml").read_text()))
    assert list(ws["stages"])[0] == codestamp.STAGE
    assert ws["stages"][codestamp.STAGE]["always_changed"] is True
    for name, body in repo["stages"].items():
        if name == codestamp.STAGE:   # the checkout's dvc.yaml has it too: the very same stage
            assert ws["stages"][name] == body
            continue
        got = ws["stages"][name]
        deps = got.get("deps") or []
        assert not [d for d in deps if isinstance(d, str) and codestamp.is_code_path(d)], name
        assert codestamp.stamp_path(name) in deps, name
        # everything else is labelgate's own dvc.yaml, unchanged
        assert [d for d in deps if d != codestamp.stamp_path(name)] == [
            d for d in body.get("deps") or []
            if not codestamp.is_code_path(d) and d != codestamp.stamp_path(name)]
        for key in ("cmd", "outs", "params", "metrics", "plots", "always_changed"):
            assert got.get(key) == body.get(key), (name, key)
    # a dvc.yaml that already uses stamps is written as it is, comments included
    text = codestamp.workspace_dvc_yaml((REPO / "dvc.yaml").read_text())
    assert codestamp.workspace_dvc_yaml(text) == text


def test_a_stamp_covers_the_stages_import_closure_and_changes_with_its_code():
    gate = codestamp.closure("pipelines.gate")
    assert {"pipelines/gate.py", "pipelines/settings.py", "validation/regression.py"} <= set(gate)
    assert "pipelines/train.py" not in gate
    text = codestamp.stamp("gate", "pipelines.gate")
    assert text.startswith(f"# labelgate {codestamp.version()}")
    assert len(text.splitlines()) == len(gate) + 1


def test_dvc_reruns_exactly_the_stage_whose_code_changed(tmp_path):
    """A real DVC repo with two stamped stages and a copy of the code (as an upgrade would
    bring): editing a file only one stage imports makes `dvcrepo.stale` name that stage alone,
    and `dvc repro` reruns it and skips the other."""
    for package in codestamp.PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "templates"))
    only_gate = sorted(set(codestamp.closure("pipelines.gate"))
                       - set(codestamp.closure("pipelines.promote")))
    assert only_gate, "gate imports something promote does not"
    doc = {"stages": {
        "gate": {"cmd": "python -m pipelines.gate --help > gate.txt",
                 "deps": [codestamp.stamp_path("gate")], "outs": ["gate.txt"]},
        "promote": {"cmd": "python -m pipelines.promote --help > promote.txt",
                    "deps": [codestamp.stamp_path("promote")], "outs": ["promote.txt"]}}}
    (tmp_path / "dvc.yaml").write_text(
        codestamp.workspace_dvc_yaml(yaml.safe_dump(doc, sort_keys=False)))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text(".labelgate/\n")
    dvcrepo.ensure_repo(tmp_path)
    for stage in dvcrepo.stages(tmp_path):
        dvcrepo.repro_stage(tmp_path, stage)
    assert dvcrepo.stale(tmp_path) == {}
    edited = tmp_path / only_gate[0]
    edited.write_text(edited.read_text() + "\n# an upgrade\n")
    stale = dvcrepo.stale(tmp_path)
    assert "gate" in stale and "promote" not in stale
    assert any(codestamp.stamp_path("gate") in why for why in stale["gate"])
    out = {stage: dvcrepo.repro_stage(tmp_path, stage) for stage in dvcrepo.stages(tmp_path)}
    assert "Running stage 'gate'" in out["gate"]
    assert "didn't change, skipping" in out["promote"]


def test_a_non_empty_folder_is_refused_before_label_studio_is_asked(tmp_path):
    from pipelines.lstransport import Connection
    (tmp_path / "notes.txt").write_text("mine")
    nowhere = Connection("http://127.0.0.1:9", "key")   # never contacted
    with pytest.raises(workspace.InitError, match="not empty.*--force"):
        workspace.init(tmp_path, connection=nowhere, project=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# -- a real Label Studio project ---------------------------------------------------------------

@pytest.fixture(scope="module")
def leaf_project(label_studio):
    """A user's own project: control names `photo`/`disease`, data key `picture`, class names
    with spaces and a slash; 3 classes x 24 annotated tasks + 6 ground truth each."""
    return make_leaf_project(label_studio, tasks=90, unlabeled=10)


def make_leaf_project(label_studio, *, tasks: int, classes: tuple[str, ...] = CLASSES,
                      unlabeled: int = 0) -> dict:
    """A project with `config(classes)`; `tasks` annotated tasks cycling over the first three
    classes, the last fifth of them ground truth; `unlabeled` tasks nobody annotated yet."""
    from pipelines.labelstudio import Studio
    st = Studio(label_studio["conn"])
    title = f"Leaves {uuid.uuid4().hex[:6]}"
    with st._call("creating the project"):
        pid = st._client.projects.create(title=title, label_config=config(classes)).id
    folder = label_studio["files"] / f"leaves-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    st.add_local_storage(pid, str(folder))
    cfg = parse(config(classes))
    me = st.check()
    rng = np.random.default_rng(1)

    def add(n: int, *, annotated: bool = True) -> None:
        rows = []
        for i in range(n):
            label = i % 3
            name = f"leaf-{uuid.uuid4().hex[:8]}.png"
            (folder / name).write_bytes(png(leaf(label, rng)))
            rows.append({"data": {"picture": f"/data/local-files/?d={folder.name}/{name}"}})
            if annotated:
                rows[-1]["annotations"] = [{"result": choice_result(classes[label], cfg),
                                            "completed_by": me, "ground_truth": i >= n * 4 // 5}]
        st.import_tasks(pid, rows)
    if tasks:
        add(tasks)
    if unlabeled:
        add(unlabeled, annotated=False)
    return {"id": pid, "title": title, "studio": st, "add": add}


def test_init_reads_the_users_project_and_pull_works_inside_the_workspace(
        leaf_project, studio_env, tmp_path):
    ws = tmp_path / "leaf workspace"
    r = cli("init", str(ws), "--project", leaf_project["title"], "--set",
            "train.epochs=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "labelgate pull" in r.stdout and "leaf spot/blight" in r.stdout
    p = settings.load(ws / "params.yaml")
    assert p.base.classes == CLASSES and p.studio.project_title == leaf_project["title"]
    # colour 40 px leaves: 3 channels, their own size, stretched
    assert (p.input.channels, p.input.height, p.input.width, p.input.resize) == (3, 40, 40,
                                                                                "stretch")
    assert p.train.epochs == 2
    text = (ws / "params.yaml").read_text()
    assert "labelgate init sampled 8 task image(s): colour" in text
    assert not list(ws.rglob("*blight*"))  # class names never become paths
    dvc_doc = yaml.safe_load((ws / "dvc.yaml").read_text())
    assert not [d for s in dvc_doc["stages"].values() for d in s.get("deps") or []
                if isinstance(d, str) and codestamp.is_code_path(d)]
    assert not (ws / "pipelines").exists()
    assert subprocess.run(["git", "log", "--oneline"], cwd=ws, capture_output=True,
                          text=True).stdout.count("\n") == 1
    assert ".labelgate/" in (ws / ".gitignore").read_text() and (ws / ".dvc").is_dir()

    r = cli("pull", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "90 task(s) new/changed" in r.stdout
    assert (ws / "data" / "raw.dvc").exists()
    # the stages see the installed code: the first stage runs in the workspace
    assert "Running stage 'codestamp'" in dvcrepo.repro_stage(ws, "codestamp")
    assert "Running stage 'validate'" in dvcrepo.repro_stage(ws, "validate")
    # up to date, but for code edits landing meanwhile (an editable install under active work)
    assert all(codestamp.stamp_path("validate") in why
               for why in dvcrepo.stale(ws).get("validate", [])), dvcrepo.stale(ws)

    again = cli("init", str(ws), "--project", str(leaf_project["id"]), cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr


@pytest.mark.parametrize("config,words", [
    (CONFIG.replace('choice="single-radio"', 'choice="multiple"'), "multi-label"),
    (CONFIG.replace('<TextArea', '<Image name="detail" value="$zoom"/><TextArea'),
     "2 <Image> controls"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label value="x"/>'
     '</RectangleLabels></View>', "object detection"),
])
def test_a_project_labelgate_cannot_train_on_is_refused_with_what_is_supported(
        label_studio, studio_env, tmp_path, config, words):
    from pipelines.labelstudio import Studio
    st = Studio(label_studio["conn"])
    title = f"unsupported {uuid.uuid4().hex[:6]}"
    with st._call("creating the project"):
        st._client.projects.create(title=title, label_config=config)
    r = cli("init", str(tmp_path / "ws"), "--project", title, cwd=tmp_path)
    assert r.returncode == 2
    assert words in r.stderr and "labelgate supports image classification" in r.stderr
    assert not (tmp_path / "ws").exists()


def test_a_class_list_changed_in_label_studio_stops_the_pull_and_accept_goes_forward(
        label_studio, studio_env, tmp_path):
    project = make_leaf_project(label_studio, tasks=0, classes=CLASSES + ("powdery mildew",))
    st, pid = project["studio"], project["id"]
    ws = workspace.init(tmp_path / "ws", connection=label_studio["conn"], project=pid)
    r = cli("pull", cwd=ws)   # nothing annotated yet: a pull that finds nothing, not an error
    assert r.returncode == 0 and "nothing new" in r.stdout, r.stderr
    assert "sampled no task image (no tasks yet)" in (ws / "params.yaml").read_text()
    project["add"](6)
    # in Label Studio: the unused class renamed, one added (used classes cannot be renamed there)
    new = config(CLASSES + ("mildew (powdery)", "mosaic virus"))
    with st._call("changing the labeling config"):
        st._client.projects.update(pid, label_config=new)
    r = cli("pull", cwd=ws)
    assert r.returncode == 2
    assert "renamed 'powdery mildew' -> 'mildew (powdery)'" in r.stderr
    assert "added ['mosaic virus']" in r.stderr and "labelgate classes --accept" in r.stderr
    shown = cli("classes", cwd=ws)
    assert shown.returncode == 1 and "mosaic virus" in shown.stdout
    r = cli("classes", "--accept", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "judges it as a first model" in r.stdout and "no warm start" in r.stdout
    assert settings.load(ws / "params.yaml").base.classes == parse(new).classes
    log = subprocess.run(["git", "log", "-1", "--format=%B"], cwd=ws, capture_output=True,
                         text=True).stdout
    assert "labelgate classes --accept" in log and "mosaic virus" in log
    assert subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=ws,
                          capture_output=True, text=True).stdout == ""
    r = cli("pull", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert cli("classes", cwd=ws).returncode == 0


@pytest.mark.slow
def test_a_full_run_in_the_workspace(leaf_project, studio_env, prefect_api, tmp_path):
    """pull, evalset freeze and run, all in the workspace with the installed labelgate. (Needs
    dvc.yaml's deps on the packed splits, data/prepared/train and val: the lead's integration.)"""
    ws = workspace.init(tmp_path / "ws", connection=studio_env, project=leaf_project["id"],
                        overrides={"train.epochs": 3, "review.epochs": 1, "review.folds": 2,
                                   "validate.min_per_class": 5})
    assert cli("pull", cwd=ws).returncode == 0
    r = cli("evalset", "freeze", cwd=ws)
    assert r.returncode == 0, r.stderr
    r = cli("run", cwd=ws)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gate verdict" in r.stdout
    assert (ws / ".labelgate" / "code" / "train.sha256").exists()
    log = subprocess.run(["git", "log", "--format=%s"], cwd=ws, capture_output=True,
                         text=True).stdout
    assert "labelgate run" in log   # lineage committed the candidate's DVC metadata
    # nothing changed: a no-op run (the stamps did not move)
    r = cli("run", cwd=ws)
    assert r.returncode == 0 and "nothing changed" in r.stdout, r.stdout + r.stderr


def test_a_title_two_projects_share_is_refused(label_studio, tmp_path):
    """The pipeline finds its project by studio.project_title: a shared one would be a guess."""
    from pipelines.labelstudio import Studio
    st = Studio(label_studio["conn"])
    title = f"twin {uuid.uuid4().hex[:6]}"
    with st._call("creating the projects"):
        first = st._client.projects.create(title=title, label_config=CONFIG).id
        st._client.projects.create(title=title, label_config=CONFIG)
    with pytest.raises(workspace.InitError, match="2 Label Studio projects are titled"):
        workspace.init(tmp_path / "a", connection=label_studio["conn"], project=title)
    with pytest.raises(workspace.InitError, match="shared with another project"):
        workspace.init(tmp_path / "b", connection=label_studio["conn"], project=first)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
