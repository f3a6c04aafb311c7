"""A workspace whose gate said INCONCLUSIVE with gate.on_inconclusive = ask_reviewer, and the part
of the retraining flow after the gate as a real Prefect flow: pipelines/flows.py `_promote`
(promote_task, then reviewer.ask), as the retraining flow calls it. No Label Studio, no
training: the models are freshly built small nets, the evaluation is made by tests/factories,
the gate is the real one. Shared by tests/test_reviewer_pause.py and tests/test_prefect_ui_browser.py."""
from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from prefect import flow

from pipelines import flows, gate, net, promote, registry
from pipelines.files import atomic_write_json, sha256_file
from pipelines.inputspec import InputSpec
from pipelines.layout import Layout
from pipelines.records import Decision
from tests import factories
from tests.conftest import write_params

CLASSES = tuple(str(i) for i in range(10))
EVAL_HASH = "e" * 64


def _model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    spec = InputSpec.legacy_gray(28)
    net.save(net.build("smallcnn", CLASSES, spec).eval(), path, arch="smallcnn",
             classes=CLASSES, spec=spec)
    return path


def _predictions(accuracy: float, n: int = 200):
    """(truth, predictions) with round(accuracy * n) right; nested errors across accuracies."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), n)
    pred = y.copy()
    wrong = rng.permutation(n)[:n - round(accuracy * n)]
    pred[wrong] = (y[wrong] + 1) % len(CLASSES)
    return y, pred


def make(root: Path, *, wait_s: float = 300) -> Layout:
    """Production A (promoted by a PASS gate); candidate B at models/candidate gated against it:
    2 % lower on 200 images, 4 newly wrong, none newly right (p = 1/16) -> INCONCLUSIVE."""
    layout = Layout(root)
    root.mkdir(parents=True, exist_ok=True)
    overrides = {"gate.on_inconclusive": "ask_reviewer", "gate.reviewer_wait_s": wait_s}
    write_params(layout.params, **overrides)
    params = factories.params(overrides)
    a_file = _model(root / "a" / "model.safetensors", seed=1)
    y, pred = _predictions(0.95)
    ev, rows = factories.evaluation(y, pred, cand_sha=sha256_file(a_file), cand_conf=0.95,
                                    eval_hash=EVAL_HASH)
    gate.run(factories.write_evaluation(root / "ev-a", ev, rows), root / "gate-a", params=params)
    promote.run(a_file, root / "gate-a" / "decision.json", layout.registry,
                dataset_version="pulls-000001-a", params_hash="p" * 64)
    prod = registry.production(layout.registry)
    b_file = _model(layout.candidate_model, seed=2)
    ev, rows = factories.evaluation(
        y, _predictions(0.93)[1], pred, cand_sha=sha256_file(b_file), cand_conf=0.93,
        prod_conf=0.95, eval_hash=EVAL_HASH, prod_id=prod.id, prod_sha=prod.sha256)
    decision = gate.run(factories.write_evaluation(root / "ev-b", ev, rows),
                        layout.decision.parent, params=params)
    assert decision.verdict == "INCONCLUSIVE", decision.verdict
    atomic_write_json(layout.candidate_metrics, {"val_acc": 0.93, "epochs": 1})
    atomic_write_json(layout.prepared / "summary.json", {"train_class_counts": None})
    return layout


def set_wait(layout: Layout, seconds: float) -> None:
    """params.yaml gate.reviewer_wait_s (what the flow reads when it pauses)."""
    write_params(layout.params, **{"gate.on_inconclusive": "ask_reviewer",
                                   "gate.reviewer_wait_s": seconds})


@flow(name="labelgate-after-gate")
def after_gate(root: str) -> dict:
    """The retraining flow from promote on (flows._promote: promote_task, then the reviewer's
    pause), with the gate's decision as the flow has it."""
    layout = Layout(root)
    event, asked = flows._promote(layout, "pulls-000002-b", {}, Decision.read(layout.decision))
    return {"promotion": event, "reviewer": asked}


def run_flow(layout: Layout, *, when_paused: Callable[[str], object] | None = None,
             pause_timeout_s: float = 120) -> tuple[dict, str, dict]:
    """Run `after_gate` in this thread; `when_paused(flow_run_id)` runs in another thread once
    the run is Paused with its form saved. Returns (flow result, flow run id, what
    when_paused returned or raised: {"value"} / {"error"})."""
    name = f"review-{uuid.uuid4().hex[:12]}"
    seen: dict = {}

    def watch() -> None:
        try:
            run_id = wait_paused(name, timeout_s=pause_timeout_s)
        except Exception as exc:  # reported to the test, which asserts on it
            seen["error"] = exc
            return
        try:
            seen["value"] = when_paused(run_id)
        except Exception as exc:
            seen["error"] = exc
            with contextlib.suppress(Exception):  # end the run now, not after the wait
                resume(run_id, decision="reject", reason=f"test step failed: {exc}"[:2000],
                       reviewer="tests")
    thread = threading.Thread(target=watch, daemon=True)
    if when_paused is not None:
        thread.start()
    result = after_gate.with_options(flow_run_name=name)(str(layout.root))
    if when_paused is not None:
        thread.join(timeout=60)
    return result, flow_run_id(name), seen


def flow_run_id(name: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[name])))
    assert len(runs) == 1, runs
    return str(runs[0].id)


def wait_paused(name: str, *, timeout_s: float) -> str:
    """The id of flow run `name` once it is Paused and its form's schema is stored."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[name])))
            state = runs[0].state if runs else None
            keyset = state.state_details.run_input_keyset if state and state.is_paused() else None
            if keyset:
                try:
                    client.read_flow_run_input(runs[0].id, keyset["schema"])
                    return str(runs[0].id)
                except Exception:  # not stored yet (the pause stores it after the state)
                    pass
            time.sleep(0.25)
    raise TimeoutError(f"flow run {name} was not paused with a form within {timeout_s} s")


def resume(run_id: str, **answer: str) -> None:
    from prefect.flow_runs import resume_flow_run
    resume_flow_run(run_id, run_input=answer)


def final_state(run_id: str) -> str:
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state.type.value
