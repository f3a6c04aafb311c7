"""The embedded Prefect server (pipelines/prefect_server.py) as a user meets it: real
`prefect server start` processes on 127.0.0.1, `labelgate prefect up|down|status`, a user's own
PREFECT_API_URL, a port already taken, a start-up deadline, and the Prefect UI in headless
Chromium showing a flow run, its task runs and the `gate-report` artifact after the command that
made them has ended."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import httpx
import pytest

from pipelines import cli, prefect_server
from pipelines.layout import Layout
from tests.conftest import free_port, write_params

pytestmark = pytest.mark.slow  # every test here starts a server or drives a browser


@pytest.fixture
def own_prefect(monkeypatch):
    """No PREFECT_API_URL: labelgate manages its own server (the suite's is set aside)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)


@pytest.fixture
def workspace(tmp_path):
    write_params(tmp_path / "params.yaml")
    return tmp_path


def _listening_addresses(port: int) -> set[str]:
    return {addr for addr, _ in prefect_server._listeners(port)}


def test_up_status_down_and_up_again_at_once(own_prefect, workspace, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_HOME")                 # labelgate's own: the workspace's
    root = str(workspace)
    home = Layout(workspace).state / "prefect"
    # the state folder does not exist yet: a workspace on a user's own Label Studio
    assert not Layout(workspace).state.exists()
    assert cli.main(["--root", root, "prefect", "status"]) == 0
    assert "not running" in capsys.readouterr().out
    assert home.is_dir()                             # created for Prefect, parents included
    port = free_port()
    url = prefect_server.up(home, port=port)
    assert url == f"http://127.0.0.1:{port}/api"
    assert cli.main(["--root", root, "prefect", "status"]) == 0
    out = capsys.readouterr().out
    assert f"running at http://127.0.0.1:{port}" in out
    # 127.0.0.1 only (0100007F), its database and log in the git-ignored state folder
    assert _listening_addresses(port) == {"0100007F"}
    assert (home / "prefect.db").exists() and (home / "server.log").exists()
    first_pid = prefect_server.status(home).pid
    assert cli.main(["--root", root, "prefect", "down"]) == 0
    assert not prefect_server.healthy(url)
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
    # straight back up on the same (recorded) port: TIME-WAIT sockets do not make it "taken"
    assert cli.main(["--root", root, "prefect", "up"]) == 0
    assert f"running at http://127.0.0.1:{port}" in capsys.readouterr().out
    s = prefect_server.status(home)
    assert s.running and s.pid != first_pid and s.api_url == url
    assert cli.main(["--root", root, "prefect", "down"]) == 0
    assert cli.main(["--root", root, "prefect", "down"]) == 0
    assert "was not running" in capsys.readouterr().out


def test_a_taken_port_gives_another_one_which_is_kept(tmp_path):
    home = tmp_path / "prefect"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        try:
            url = prefect_server.up(home, port=taken)
            port = int(url.rsplit(":", 1)[1].removesuffix("/api"))
            assert port != taken and prefect_server.healthy(url)
            assert prefect_server._serves(prefect_server.status(home).pid, port)
            # the next start, even with the default asked for, reuses the recorded port
            prefect_server.down(home)
            assert prefect_server.up(home, port=taken) == url
        finally:
            prefect_server.down(home)


def test_another_workspaces_server_is_never_taken_for_ours(tmp_path, prefect_api):
    """A copied workspace carries the original's pid file and port: the copy starts its own."""
    copy = tmp_path / "copy"
    copy.mkdir()
    suite_home = prefect_api["home"]
    (copy / "server.pid").write_text((suite_home / "server.pid").read_text())
    (copy / "server.json").write_text((suite_home / "server.json").read_text())
    assert prefect_server.status(copy).pid is None
    try:
        url = prefect_server.up(copy)
        assert url != prefect_api["url"] and prefect_server.healthy(url)
    finally:
        prefect_server.down(copy)
    assert prefect_server.healthy(prefect_api["url"])  # the suite's server was left alone


def test_user_prefect_api_url_wins_and_is_checked(workspace, prefect_api, monkeypatch, capsys):
    home = Layout(workspace).state / "prefect"
    # the user's server (here: the suite's) is used; labelgate starts none of its own
    assert prefect_server.ensure(home) == prefect_api["url"]
    assert not (home / "server.pid").exists()
    assert cli.main(["--root", str(workspace), "prefect", "status"]) == 0
    assert f"PREFECT_API_URL is set: labelgate uses the Prefect server at {prefect_api['url']} " \
           "(answers)" in capsys.readouterr().out
    # a URL that does not answer: an error that says what to do, before any work is done
    dead = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", dead)
    assert cli.main(["--root", str(workspace), "run"]) == 2
    err = capsys.readouterr().err
    assert f"PREFECT_API_URL is {dead}, but no Prefect API answers" in err
    assert "unset PREFECT_API_URL" in err
    assert not (home / "server.pid").exists()


def test_startup_deadline_error_says_what_to_do_and_stops_the_server(tmp_path, capsys):
    home = tmp_path / "prefect"
    with pytest.raises(prefect_server.PrefectServerError) as info:
        prefect_server.up(home, port=free_port(), timeout_s=1)
    msg = str(info.value)
    assert "did not answer" in msg and "within 1 s" in msg
    assert str(home / "server.log") in msg and "PREFECT_API_URL" in msg
    assert "starting the Prefect server" in capsys.readouterr().err
    s = prefect_server.status(home)
    assert s.pid is None and not (home / "server.pid").exists()


# -- the UI -----------------------------------------------------------------------------------

TINY_FLOW = textwrap.dedent('''
    import sys
    from prefect import flow, task
    from prefect.artifacts import create_markdown_artifact

    @task(name="stage")
    def stage(name: str) -> str:
        return name

    @flow(name=sys.argv[1])
    def tiny():
        for name in ("validate", "train"):
            stage(name)
        create_markdown_artifact(markdown="# Gate verdict: **PASS**\\n\\n" + sys.argv[2],
                                 key="gate-report", description="gate verdict PASS")

    tiny()
''')


def ui_shows(ui: str, api_url: str, flow_name: str, *, report_text: str, shot=None) -> None:
    """A reviewer's clicks in the Prefect UI: the runs list names the flow and its run; the run
    page lists every task run and the `gate-report` artifact, which opens rendered."""
    from tests.test_report_browser import CHROMIUM, _browser_or_skip
    sync_playwright = _browser_or_skip()
    api = httpx.Client(base_url=api_url, timeout=30)
    runs = api.post("/flow_runs/filter", json={
        "flows": {"name": {"any_": [flow_name]}}}).raise_for_status().json()
    assert runs and runs[0]["state_type"] == "COMPLETED", runs
    run = runs[0]
    tasks = api.post("/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [run["id"]]}}}).raise_for_status().json()
    assert tasks
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(90_000)                   # a busy machine renders slowly
        page.goto(f"{ui}/runs")
        page.get_by_text(flow_name, exact=True).first.wait_for()
        page.get_by_role("link", name=run["name"]).first.click()
        page.wait_for_url(f"**/runs/flow-run/{run['id']}**")
        page.locator("[role=tablist] li", has_text="Task Runs").first.click()
        for t in tasks:
            page.get_by_text(t["name"], exact=True).first.wait_for()
        page.locator("[role=tablist] li", has_text="Artifacts").first.click()
        page.get_by_text("gate-report").first.click()
        page.wait_for_url("**/artifacts/artifact/**")
        page.get_by_text(report_text).first.wait_for()     # the markdown, rendered
        if shot:
            page.screenshot(path=str(shot), full_page=True)
        browser.close()


def test_prefect_ui_shows_the_run_its_tasks_and_the_report_after_the_command_ended(
        prefect_api, tmp_path):
    flow_name, marker = f"ui-check-{uuid.uuid4().hex[:8]}", f"marker-{uuid.uuid4().hex}"
    script = tmp_path / "tiny.py"
    script.write_text(TINY_FLOW)
    # a separate process that has ended before the browser looks (an ephemeral server would
    # have ended with it, and the run with it)
    subprocess.run([sys.executable, str(script), flow_name, marker], check=True,
                   env=dict(os.environ), capture_output=True, timeout=300)
    ui_shows(prefect_api["ui"], prefect_api["url"], flow_name, report_text=marker,
             shot=tmp_path / "artifact.png")
    assert (tmp_path / "artifact.png").stat().st_size > 20_000


def test_serve_starts_the_embedded_server_and_registers_the_schedule(
        own_prefect, make_project, label_studio, tmp_path):
    """`labelgate serve` on a user's own Label Studio, no Prefect configured: it starts the
    workspace's server and the deployment with params.yaml's cron is there to see."""
    project = make_project(limit=20, eval_tasks=5, unlabeled_tasks=5)
    write_params(tmp_path / "params.yaml", **{"studio.project_title": project["title"],
                                              "schedule.cron": "7 5 * * *"})
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(LABEL_STUDIO_URL=label_studio["conn"].url,
               LABEL_STUDIO_API_KEY=label_studio["conn"].api_key, PYTHONUNBUFFERED="1")
    home = Layout(tmp_path).state / "prefect"
    exe = os.path.join(os.path.dirname(sys.executable), "labelgate")
    serve = subprocess.Popen([exe, "--root", str(tmp_path), "serve"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deployment = None
        deadline = time.monotonic() + 300
        while deployment is None and time.monotonic() < deadline:
            assert serve.poll() is None, serve.communicate()[0]
            s = prefect_server.status(home)
            if s.running:
                r = httpx.get(f"{s.api_url}/deployments/name/labelgate-retrain/labelgate-retrain",
                              timeout=30)
                deployment = r.json() if r.status_code == 200 else None
            time.sleep(1)
        assert deployment is not None, "no deployment registered within 300 s"
        assert [x["schedule"]["cron"] for x in deployment["schedules"]] == ["7 5 * * *"]
        assert deployment["parameters"] == {"root": str(Layout(tmp_path).root)}
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            out = serve.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            serve.kill()
            out = serve.communicate()[0]
        prefect_server.down(home)
    assert f"Prefect UI: {prefect_server.ui_url(s.api_url)}" in out
