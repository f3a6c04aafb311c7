"""Shared fixtures: a real Label Studio server started by the suite, seeded demo projects, and
labelgate workspaces (a real git + DVC repo in a temp dir)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parent.parent

# Prefect binds its console log handler to sys.stdout when first imported: import it while
# pytest's session-wide capture is in place, not inside a test's capsys (closed afterwards).
import prefect  # noqa: E402,F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio 1.23 on 127.0.0.1 (its own venv), started once for the session."""
    from pipelines import studio
    data_dir = tmp_path_factory.mktemp("studio")
    conn = studio.up(data_dir, port=free_port())
    yield {"conn": conn, "dir": data_dir, "files": data_dir / "files"}
    studio.down(data_dir)


@pytest.fixture(scope="session")
def make_project(label_studio):
    """Factory: a new Label Studio project seeded with the first `limit` demo digit scans."""
    from pipelines import demo
    from pipelines.labelstudio import Studio

    def make(limit: int = 200, eval_tasks: int = 40, unlabeled_tasks: int = 10) -> dict:
        st = Studio(label_studio["conn"])
        title = f"labelgate test {uuid.uuid4().hex[:8]}"
        classes = tuple(str(i) for i in range(10))
        project_id, created = st.ensure_project(title, classes)
        assert created
        counts = demo.seed(st, project_id, label_studio["files"], classes, limit=limit,
                           eval_tasks=eval_tasks, unlabeled_tasks=unlabeled_tasks)
        return {"id": project_id, "title": title, "studio": st, "counts": counts}
    return make


def write_params(path: Path, **overrides) -> None:
    """Copy the repo's params.yaml with dotted-key overrides ({"train.epochs": 3})."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def make_workspace(root: Path, **param_overrides) -> Path:
    """A labelgate workspace as a user has it: the code, dvc.yaml, params.yaml, git + DVC."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("pipelines", "validation"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    write_params(root / "params.yaml", **param_overrides)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


@pytest.fixture
def studio_env(label_studio, monkeypatch):
    """LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY pointing at the test server."""
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio["conn"].url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", label_studio["conn"].api_key)
    return label_studio["conn"]
