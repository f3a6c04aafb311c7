"""What makes the flow retrain is DVC's knowledge of each stage's data, code and params: a real
Label Studio, the suite's Prefect server, a real git + DVC workspace, CPU training.

Every test first brings the workspace to "last run finished" itself (a no-op when it already
is), so none depends on another having run.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from pipelines import cli, dvcrepo, registry
from pipelines.files import read_json
from pipelines.layout import Layout
from tests.conftest import make_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(make_project, label_studio, prefect_api, tmp_path_factory):
    project = make_project(limit=300, eval_tasks=60, unlabeled_tasks=8)
    # small and quick: these tests are about what triggers a run, not about the model; a low
    # floor so the first candidate is promoted and Label Studio gets its suggestions
    root = make_workspace(tmp_path_factory.mktemp("ws"), **{
        "studio.project_title": project["title"], "train.epochs": 3, "review.epochs": 1,
        "review.folds": 2, "validate.min_per_class": 3, "gate.min_accuracy": 0.5})
    env = {"LABEL_STUDIO_URL": label_studio["conn"].url,
           "LABEL_STUDIO_API_KEY": label_studio["conn"].api_key}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    assert cli.main(["--root", str(root), "pull"]) == 0
    assert cli.main(["--root", str(root), "evalset", "freeze"]) == 0
    yield {"root": root, "layout": Layout(root), "project": project}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _retrain(root, **kw) -> dict:
    from pipelines.flows import retrain
    return retrain(root=str(root), **kw)


def _settled(world) -> dict:
    """The workspace with a finished last run (runs the flow once if it has not)."""
    summary = _retrain(world["root"])
    assert summary["status"] in ("done", "no-op"), summary
    assert registry.production(world["layout"].registry) is not None
    return summary


def _set_param(layout: Layout, section: str, key: str, value) -> None:
    raw = yaml.safe_load(layout.params.read_text())
    raw[section][key] = value
    layout.params.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_params_change_retrains_the_stages_that_read_it(world):
    layout = world["layout"]
    _settled(world)
    epochs = read_json(layout.candidate_metrics)["epochs"]
    _set_param(layout, "train", "epochs", epochs + 1)
    summary = _retrain(world["root"])
    assert summary["status"] == "done", summary
    assert summary["pull"]["snapshot"] is None                  # no new annotations
    assert "params.yaml train (modified)" in " ".join(summary["changed"]["train"])
    # the flow ran every dvc.yaml stage, in DVC's order; DVC skipped what the edit left alone
    assert list(summary["stages"]) == list(dvcrepo.stages(world["root"]))
    assert summary["stages"]["train"] == summary["stages"]["review"] == "ran"
    assert summary["stages"]["validate"] == summary["stages"]["prepare"] == "skipped"
    assert read_json(layout.candidate_metrics)["epochs"] == epochs + 1
    assert summary["train"]["epochs"] == epochs + 1
    # and the next run has nothing to do
    assert _retrain(world["root"])["status"] == "no-op"


def test_nothing_changed_is_a_no_op_that_names_force_and_reconciles_label_studio(world, capsys):
    layout, project = world["layout"], world["project"]
    st, pid = project["studio"], project["id"]
    _settled(world)
    prod = registry.production(layout.registry)["id"]
    ours = st.predictions(pid, model_version=prod)
    assert len(ours) == project["counts"]["unlabeled"] > 2
    # Label Studio drifted from production (suggestions deleted there): a no-op run restores it
    st.delete_predictions([p["id"] for p in ours[:2]])
    before = layout.candidate_model.stat().st_mtime_ns
    summary = _retrain(world["root"])
    assert summary["status"] == "no-op", summary
    assert "not retraining" in summary["reason"] and "--force" in summary["reason"]
    assert layout.candidate_model.stat().st_mtime_ns == before
    assert len(st.predictions(pid, model_version=prod)) == project["counts"]["unlabeled"]
    # what the user reads
    capsys.readouterr()
    assert cli.main(["--root", str(world["root"]), "run"]) == 0
    out = capsys.readouterr().out
    assert "not retraining" in out and "labelgate run --force" in out


def test_force_reruns_every_stage(world):
    _settled(world)
    summary = _retrain(world["root"], force=True)
    assert summary["status"] == "done"
    assert set(summary["stages"].values()) == {"ran"}, summary["stages"]


def test_a_code_edit_makes_dvc_rerun_the_stages_importing_it(world):
    root = world["root"]
    _settled(world)
    assert dvcrepo.stale(root) == {}
    device = root / "pipelines" / "device.py"
    original = device.read_bytes()
    try:
        device.write_bytes(original + b"\n# an edit\n")
        stale = dvcrepo.stale(root)
        # device.py is imported by train and review (and evaluate), not by validate/prepare
        assert {"train", "review", "evaluate"} <= set(stale), stale
        assert "validate" not in stale and "prepare" not in stale
        # the code dep is the stage's stamp (pipelines/codestamp.py), whose text changed
        assert all(".labelgate/code/{}.sha256 (modified)".format(s) in " ".join(stale[s])
                   for s in ("train", "review")), stale
    finally:
        device.write_bytes(original)
    assert dvcrepo.stale(root) == {}


def test_dvc_repro_re_evaluates_but_keeps_the_decision(world):
    """evaluate always runs (production moves outside DVC) and re-times the model; the
    decision reads no timing, so DVC finds the gate's input unchanged and keeps its verdict."""
    layout = world["layout"]
    _settled(world)
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    def repro() -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=world["root"],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc
    # Once, so the evaluation holds today's production (a run that just promoted its own
    # candidate evaluated without one: that change is real and does re-decide) ...
    repro()
    decision = layout.decision.read_bytes()
    # ... then again: only the timing can differ, and the decision does not read it
    proc = repro()
    assert "Running stage 'evaluate'" in proc.stdout
    assert "Stage 'gate' didn't change, skipping" in proc.stdout
    assert layout.decision.read_bytes() == decision
    latency = read_json(layout.latency)
    assert latency["repeats"] == len(latency["p95_ms_runs"]) == 5 and latency["p95_ms"] > 0
