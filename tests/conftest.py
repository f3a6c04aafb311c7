"""Shared fixtures: a real Label Studio server started by the suite, seeded demo projects, and
labelgate workspaces (a real git + DVC repo in a temp dir)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

# As `labelgate` sets it for every stage (pipelines/cli.py): idle OpenMP threads sleep, so the
# suite's trainings do not spin against each other and the servers on a 2-core machine. Before
# any test module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Flows report to the suite's one Prefect server (the `prefect_api` fixture), never to a
# temporary per-process one: that one misses its start-up window on a busy machine. A flow run
# without the fixture fails at once instead. Prefect's client home is a throwaway folder.
os.environ["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="labelgate-test-prefect-"))

REPO = Path(__file__).resolve().parent.parent

# Prefect binds its console log handler to the sys.stderr of the moment it sets up logging,
# which `prefect.main` does (a bare `import prefect` no longer does: Prefect 3 imports lazily).
# Do it while pytest's session-wide capture is in place, not inside a test's capsys (closed
# after that test: every later flow run's log line would then raise).
import prefect  # noqa: E402
import prefect.main  # noqa: E402,F401


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
def prefect_api(tmp_path_factory):
    """A real Prefect server for the session, started the way `labelgate run` starts the
    embedded one (pipelines.prefect_server); PREFECT_API_URL names it for this process and the
    commands it starts. A user's own PREFECT_API_URL is set aside: tests never write there."""
    from pipelines import prefect_server
    home = tmp_path_factory.mktemp("prefect")
    user = os.environ.pop("PREFECT_API_URL", None)
    url = prefect_server.ensure(home, port=free_port())
    yield {"url": url, "ui": prefect_server.ui_url(url), "home": home}
    _drain_prefect_workers()  # logs and events still queued go out before the server stops
    prefect_server.down(home)
    if user is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = user
    prefect.context.refresh_global_settings_context()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 API (moto's S3 service, tests/s3server.py) on 127.0.0.1 for the session. Its
    `env()` holds the AWS variables clients read; tests create their own buckets (uuid names)."""
    from tests import s3server
    server = s3server.start(log=tmp_path_factory.mktemp("s3") / "s3server.log")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This test's process sees the S3 server's credentials (as a user's AWS_* variables)."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    APILogWorker.drain_all()
    EventsWorker.drain_all()


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
    """A labelgate workspace as a user has it: the code, dvc.yaml, params.yaml, git + DVC.
    Seed-noise calibration (k extra trainings after the first promotion) is off unless a test
    asks for it: test_flows' gate-against-production test runs it through the flow."""
    param_overrides.setdefault("gate.calibration_seeds", 0)
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
