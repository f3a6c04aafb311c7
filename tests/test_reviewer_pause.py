"""gate.on_inconclusive = ask_reviewer: a real flow run on the suite's Prefect server pauses for
the reviewer's typed answer (pipelines/reviewer.py), resumed here through Prefect's API the way
the UI's Resume form does it. The workspace (tests/reviewworld.py) has production A and a
candidate B the real gate found INCONCLUSIVE; the flow is the retraining flow from promote on."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipelines import registry, reviewer
from pipelines.records import Approved, PendingReview, ProductionChange, Rejected
from tests import reviewworld
from tests.conftest import REPO


def _cli(layout, *args: str) -> subprocess.CompletedProcess:
    """`labelgate --root ROOT ...` as a reviewer types it in a shell."""
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "--root", str(layout.root),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _since_pending(layout, model_id: str) -> list:
    """The ledger events about `model_id` from its pending_review line on."""
    events = [e for e in registry.ledger(layout.registry) if getattr(e, "id", None) == model_id]
    start = max(i for i, e in enumerate(events) if isinstance(e, PendingReview))
    return events[start:]


@pytest.fixture
def world(tmp_path):
    layout = reviewworld.make(tmp_path / "ws")
    return {"layout": layout, "production": registry.production(layout.registry),
            "pointer_bytes": (layout.registry / registry.POINTER).read_bytes()}


@pytest.mark.slow
def test_approve_through_the_api_makes_the_candidate_production(world, prefect_api):
    layout = world["layout"]
    result, run_id, seen = reviewworld.run_flow(
        layout, when_paused=lambda run: reviewworld.resume(
            run, decision="approve", reason="the drop is in class 3 noise", reviewer="ana"))
    assert "error" not in seen, seen
    model_id = result["promotion"]["id"]
    assert result["promotion"]["event"] == "pending_review"
    asked = result["reviewer"]
    assert asked["outcome"] == "approved" and asked["via"] == "prefect"
    assert asked["reviewer"] == "ana" and asked["flow_run_id"] == run_id
    assert asked["waited_s"] < 300
    pointer = registry.production(layout.registry)
    assert pointer.id == model_id != world["production"].id
    assert pointer.via == "approved" and pointer.reviewer == "ana"
    assert pointer.previous == world["production"].id
    assert registry.load_production(layout.registry, device=__import__("torch").device("cpu"))
    events = _since_pending(layout, model_id)
    assert [type(e) for e in events] == [PendingReview, Approved, ProductionChange]
    assert events[1].reviewer == "ana" and events[1].reason == "the drop is in class 3 noise"
    assert reviewworld.final_state(run_id) == "COMPLETED"
    # the other door, afterwards: the CLI finds it decided and writes nothing
    n = len(registry.ledger(layout.registry))
    done = _cli(layout, "approve", model_id, "--reason", "again", "--reviewer", "bo")
    assert done.returncode == 2 and "already the production model" in done.stderr
    assert len(registry.ledger(layout.registry)) == n


@pytest.mark.slow
def test_reject_through_the_api_keeps_production(world, prefect_api):
    """Here an earlier run recorded B and was killed while it waited: B's review is still open,
    so this run (promote: B unchanged) asks again."""
    layout = world["layout"]
    from pipelines import promote
    earlier = promote.run(layout.candidate_model, layout.decision, layout.registry,
                          dataset_version="pulls-000002-b", params_hash="p" * 64)
    assert earlier["event"] == "pending_review"
    result, run_id, seen = reviewworld.run_flow(
        layout, when_paused=lambda run: reviewworld.resume(
            run, decision="reject", reason="class 3 got worse", reviewer="bo"))
    assert "error" not in seen, seen
    model_id = result["promotion"]["id"]
    assert result["promotion"]["event"] == "unchanged" and model_id == earlier["id"]
    assert result["reviewer"]["outcome"] == "rejected"
    assert (layout.registry / registry.POINTER).read_bytes() == world["pointer_bytes"]
    events = _since_pending(layout, model_id)
    assert [type(e) for e in events] == [PendingReview, Rejected]
    assert events[1].by == "reviewer" and events[1].reviewer == "bo"
    assert events[1].reason == "class 3 got worse"
    assert reviewworld.final_state(run_id) == "COMPLETED"


@pytest.mark.slow
def test_no_answer_within_the_wait_keeps_production_and_says_it_timed_out(world, prefect_api):
    layout = world["layout"]
    reviewworld.set_wait(layout, 3)
    result, run_id, _ = reviewworld.run_flow(layout)
    model_id = result["promotion"]["id"]
    asked = result["reviewer"]
    assert asked["outcome"] == "timed_out" and asked["reviewer"] is None
    assert asked["waited_s"] >= 3 and asked["wait_limit_s"] == 3
    assert (layout.registry / registry.POINTER).read_bytes() == world["pointer_bytes"]
    events = _since_pending(layout, model_id)
    assert [type(e) for e in events] == [PendingReview, Rejected]
    assert events[1].by == "gate" and "no reviewer answered within 3 s" in events[1].reason
    assert events[1].extra["timed_out_after_s"] == 3
    assert events[1].extra["flow_run_id"] == run_id
    assert reviewworld.final_state(run_id) == "COMPLETED"   # the run went on after the wait
    # the form is gone: a late answer through the API is refused, not applied
    with pytest.raises(Exception, match="isn't paused|can no longer be resumed"):
        reviewworld.resume(run_id, decision="approve", reason="late", reviewer="ana")
    assert (layout.registry / registry.POINTER).read_bytes() == world["pointer_bytes"]
    # the CLI's review door stays open: an explicit approval after the timeout still works
    done = _cli(layout, "approve", model_id, "--reason", "looked at it later", "--reviewer", "cy")
    assert done.returncode == 0, done.stderr
    assert registry.production(layout.registry).id == model_id


@pytest.mark.slow
def test_a_cli_answer_while_the_run_waits_is_applied_once(world, prefect_api):
    """`labelgate reject` while the run is paused: the run resumes by itself and writes nothing
    more; the Prefect form's answer (here: approve, sent too late) is never applied."""
    layout = world["layout"]

    def reject_in_a_shell(run_id: str):
        model_id = next(e.id for e in reversed(registry.ledger(layout.registry))
                        if isinstance(e, PendingReview))
        return _cli(layout, "reject", model_id, "--reason", "seen enough", "--reviewer", "dee")
    result, run_id, seen = reviewworld.run_flow(layout, when_paused=reject_in_a_shell)
    assert "error" not in seen and seen["value"].returncode == 0, seen
    model_id = result["promotion"]["id"]
    asked = result["reviewer"]
    assert asked["outcome"] == "answered_elsewhere" and asked["via"] == "cli"
    assert asked["reviewer"] == "dee" and asked["waited_s"] < 300
    events = _since_pending(layout, model_id)
    assert [type(e) for e in events] == [PendingReview, Rejected]   # one answer, once
    assert (layout.registry / registry.POINTER).read_bytes() == world["pointer_bytes"]
    assert reviewworld.final_state(run_id) == "COMPLETED"


# -- no Prefect server needed ---------------------------------------------------------------------

def test_a_form_answer_after_a_cli_answer_is_reported_not_applied(world):
    layout = world["layout"]
    from pipelines import promote
    event = promote.run(layout.candidate_model, layout.decision, layout.registry,
                        dataset_version="pulls-000002-b", params_hash="p" * 64)
    model_id = event["id"]
    assert event["event"] == "pending_review" and reviewer.is_open(layout.registry, model_id)
    registry.reject(layout.registry, model_id, reason="no", reviewer="dee")   # the CLI's call
    assert not reviewer.is_open(layout.registry, model_id)
    got = reviewer.ReviewerDecision(decision="approve", reason="yes", reviewer="ana")
    review = reviewer.apply(layout.registry, model_id, got, waited_s=1.0, wait_s=60,
                            flow_run_id="x")
    assert review.outcome == "answered_elsewhere" and review.reviewer == "dee"
    assert (layout.registry / registry.POINTER).read_bytes() == world["pointer_bytes"]
    assert reviewer.time_out(layout.registry, model_id, waited_s=60, wait_s=60,
                             flow_run_id="x") is None
    assert [type(e) for e in _since_pending(layout, model_id)] == [PendingReview, Rejected]


def test_an_answer_the_registry_refuses_changes_nothing_and_leaves_the_review_open(world):
    """An approval that is no longer valid (production re-baselined on another eval set while
    the run waited) is reported as refused; the CLI can still answer."""
    layout = world["layout"]
    from pipelines import promote
    model_id = promote.run(layout.candidate_model, layout.decision, layout.registry,
                           dataset_version="pulls-000002-b", params_hash="p" * 64)["id"]
    registry.rebaseline(layout.registry, eval_hash="f" * 64, accuracy=0.9, reason="new set",
                        reviewer="ana")
    pointer = (layout.registry / registry.POINTER).read_bytes()
    got = reviewer.ReviewerDecision(decision="approve", reason="fine", reviewer="ana")
    review = reviewer.apply(layout.registry, model_id, got, waited_s=1.0, wait_s=60,
                            flow_run_id="x")
    assert review.outcome == "refused" and "gated on eval set" in review.says
    assert (layout.registry / registry.POINTER).read_bytes() == pointer
    assert reviewer.is_open(layout.registry, model_id)


def test_the_form_refuses_an_empty_reason_or_an_unknown_decision():
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        reviewer.ReviewerDecision(decision="approve", reason="", reviewer="ana")
    with pytest.raises(ValidationError):
        reviewer.ReviewerDecision(decision="ship it", reason="x", reviewer="ana")
    schema = reviewer.ReviewerDecision.model_json_schema()
    assert schema["properties"]["decision"]["enum"] == ["approve", "reject"]
    assert set(schema["required"]) == {"decision", "reason", "reviewer"}


def test_the_form_text_keeps_class_names_in_code_spans(world):
    """Test names can hold annotators' class names; above the form they are code spans (shown,
    not rendered as markdown), one line each, with no backtick that could close one early."""
    import dataclasses

    from pipelines.records import Decision
    decision = Decision.read(world["layout"].decision)
    hostile = "recall of class '`[x](http://evil)`\n# big'"
    tests = (dataclasses.replace(decision.tests[0], name=hostile, result="inconclusive"),)
    text = reviewer.describe(dataclasses.replace(decision, tests=tests), "m0002-abc",
                             wait_s=86400)
    assert "INCONCLUSIVE" in text and "m0002-abc" in text and "24 h" in text
    assert "Not passed (1): `recall of class ''[x](http://evil)' # big'`." in text
    ten = tuple(dataclasses.replace(decision.tests[0], name=f"recall of class '{c}'",
                                    result="inconclusive") for c in range(10))
    many = reviewer.describe(dataclasses.replace(decision, tests=ten), "m0002-abc", wait_s=5)
    assert "Not passed (10):" in many and "`recall of class '7'` and 2 more." in many
    assert "`recall of class '8'`" not in many and "within 5 s" in many
