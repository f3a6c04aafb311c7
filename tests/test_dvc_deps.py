"""dvc.yaml is held to the code: each stage depends on the stamp of the `pipelines`/`validation`
files its command imports (transitively, as Python would load them: pipelines/codestamp.py), so
`dvc repro` reruns a stage whenever its code changes; the flow's stage order is DVC's graph; the
paths agree with Layout; DVC's advice to a command-line user stays out of the flow log."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import codestamp, dvcrepo
from pipelines.layout import Layout

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipelines", "validation")
CMD_MODULE = re.compile(r"^python -m ((?:pipelines|validation)\.\w+)(?:\s|$)")


def stage_module(cmd: str) -> str:
    match = CMD_MODULE.match(cmd)
    assert match, f"stage command {cmd!r} is not `python -m pipelines.<stage> ...`"
    return match.group(1)


GRAPH = dvcrepo.graph(REPO)


def test_package_inits_are_empty():
    """They are imported by every stage but not listed in dvc.yaml: code there would be a
    dependency nobody declared."""
    for package in PACKAGES:
        assert (REPO / package / "__init__.py").read_text().strip() == "", package


@pytest.mark.parametrize("stage", list(GRAPH))
def test_each_stage_depends_on_the_stamp_of_the_code_it_runs(stage):
    spec = GRAPH[stage]
    module = stage_module(spec["cmd"])
    assert module == f"pipelines.{stage}", "one stage = one module = one command, named alike"
    # no code file as a dep: in a workspace (labelgate pip-installed) there is none to name
    assert not [d for d in spec["deps"] if d.split("/")[0] in PACKAGES]
    if stage == codestamp.STAGE:
        assert spec["outs"] == [codestamp.STAMPS.as_posix()] and spec["uncached"] == spec["outs"]
    else:
        assert codestamp.stamp_path(stage) in spec["deps"]
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert doc["stages"][codestamp.STAGE].get("always_changed") is True
    assert set(codestamp.stamped_stages(doc)) == set(GRAPH) - {codestamp.STAGE}
    # a workspace gets this very file
    assert codestamp.workspace_dvc_yaml((REPO / "dvc.yaml").read_text()) == \
        (REPO / "dvc.yaml").read_text()


def test_closure_follows_lazy_and_from_imports():
    """The derivation itself: gate.main's lazy `from pipelines import settings` and
    `from validation import regression` are followed, and regression's stats import too."""
    files = set(codestamp.closure("pipelines.gate"))
    assert {"pipelines/settings.py", "validation/regression.py", "pipelines/stats.py",
            "validation/__init__.py"} <= files
    assert "pipelines/train.py" not in files


def test_warm_start_names_the_production_model_in_the_train_stamp(tmp_path):
    """With train.init: production the train stamp names production's sha256, so a promotion
    reruns train (and only train); with scratch a promotion changes no stamp."""
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "train": {**params["train"], "init": "scratch"}}))
    codestamp.write(tmp_path)
    before = {p.name: p.read_text() for p in (tmp_path / codestamp.STAMPS).iterdir()}
    pointer = tmp_path / codestamp.REGISTRY
    pointer.parent.mkdir(parents=True)
    pointer.write_text('{"sha256": "' + "ab" * 32 + '"}')
    assert codestamp.write(tmp_path) == []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "train": {**params["train"], "init": "production"}}))
    assert codestamp.write(tmp_path) == ["train"]
    assert "ab" * 32 in (tmp_path / codestamp.stamp_path("train")).read_text()
    pointer.write_text('{"sha256": "' + "cd" * 32 + '"}')
    assert codestamp.write(tmp_path) == ["train"]
    after = {p.name: p.read_text() for p in (tmp_path / codestamp.STAMPS).iterdir()}
    assert {k for k in before if before[k] != after[k]} == {"train.sha256"}


def test_the_decision_depends_on_the_evaluation_and_gate_params_alone():
    gate = GRAPH["gate"]
    data = [d for d in gate["deps"] if d != codestamp.stamp_path("gate")]
    assert data == ["reports/evaluation"]
    assert gate["params"] == ["gate"]
    assert "reports/latency.json" not in gate["deps"]
    # the review page is its own stage, after the decision
    assert "reports/gate/decision.json" in GRAPH["report"]["deps"]


def test_flow_order_is_dvcs_graph(tmp_path):
    """dvcrepo.stages (what the flow runs) has every dvc.yaml stage, each after every stage
    DVC says it depends on (`dvc dag --dot`)."""
    order = dvcrepo.stages(REPO)
    assert sorted(order) == sorted(GRAPH)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    dvcrepo.dvc(tmp_path, "init", "--no-scm")
    dot = dvcrepo.dvc(tmp_path, "dag", "--dot")
    edges = re.findall(r'"?(\w+)"?\s*->\s*"?(\w+)"?', dot)
    assert len(edges) >= len(GRAPH) - 1, dot
    for upstream, downstream in edges:
        assert order.index(upstream) < order.index(downstream), (upstream, downstream, order)


def test_a_stage_added_to_dvc_yaml_is_run_in_its_place(tmp_path):
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    doc["stages"] = {"audit": {"cmd": "python -m pipelines.audit", "deps": ["data/prepared"],
                               "outs": ["reports/audit"]}, **doc["stages"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    order = dvcrepo.stages(tmp_path)
    assert order.index("prepare") < order.index("audit") and len(order) == len(GRAPH) + 1


def test_a_cycle_is_refused(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["b.out"], "outs": ["a.out"]},
        "b": {"cmd": "y", "deps": ["a.out"], "outs": ["b.out"]}}}))
    with pytest.raises(dvcrepo.DvcError, match="cycle"):
        dvcrepo.stages(tmp_path)


def test_dvc_yaml_names_the_paths_layout_declares():
    layout = Layout(REPO)
    declared = [p for s in GRAPH.values() for p in s["outs"] + s["deps"]]
    for path in (layout.raw, layout.eval, layout.validated, layout.prepared, layout.review,
                 layout.candidate_model, layout.candidate_metrics, layout.evaluation,
                 layout.decision, layout.report, layout.report_html, layout.latency):
        rel = path.relative_to(layout.root).as_posix()
        assert any(rel == d or rel.startswith(d + "/") for d in declared), rel


def test_latency_is_a_metric_dvc_does_not_cache():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    metrics = doc["stages"]["evaluate"]["metrics"]
    assert metrics == [{"reports/latency.json": {"cache": False}}]


def test_stage_output_keeps_what_ran_and_drops_dvcs_advice(tmp_path):
    """A real `dvc repro` in a git repo prints "To track the changes with git", "To enable auto
    staging" and "Use `dvc push`" (pinned DVC); labelgate's stage log keeps only the rest."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvcrepo.ensure_repo(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"hello": {
        "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('hi'); print('said hi')\"",
        "outs": ["out.txt"]}}}))
    raw = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "hello"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, DVC_NO_ANALYTICS="1")).stdout
    assert "dvc config core.autostage true" in raw and "Use `dvc push`" in raw  # DVC's wording
    out = dvcrepo.repro_stage(tmp_path, "hello", force=True)
    assert "Running stage 'hello'" in out and "said hi" in out
    for advice in ("autostage", "dvc push", "To track the changes", "git add"):
        assert advice not in out, out
    again = dvcrepo.repro_stage(tmp_path, "hello")
    assert "didn't change, skipping" in again and "dvc push" not in again
