"""gate.on_inconclusive = ask_reviewer: the retraining flow run pauses and asks a reviewer in the
Prefect UI (or through `labelgate approve / reject`, the other door to the same decision).

    promote: INCONCLUSIVE -> ledger `pending_review`      (pipelines/promote.py)
    ask:     the flow run is Paused, waiting for ReviewerDecision (decision, reason, reviewer);
             the Prefect UI's flow run page shows a Resume form built from it
      approve  -> registry.approve  (ledger `approved` + `promoted`, pointer renamed atomically)
      reject   -> registry.reject   (ledger `rejected` by the reviewer; production unchanged)
      no answer within gate.reviewer_wait_s -> ledger `rejected` by the gate, "timed out":
               production kept (the run goes on; a later `labelgate approve` still can)
      `labelgate approve/reject` while the run waits -> the run resumes with that answer and
               applies nothing (the CLI already wrote it)

One decision is applied once: the flow applies the form's answer under the registry lock, and
only while the candidate's review is still open (no approve/reject since its `pending_review`
line), so a CLI answer that came first wins and the form's is reported, not applied. The
ledger events are written by the same registry functions the CLI uses.

Prefect's `pause_flow_run` (not `suspend_flow_run`) keeps the flow process waiting: suspend
needs a deployment and reruns the flow from its start, and the paused run keeps holding the
workspace's run lock, so no second retraining starts while a reviewer decides. Prefect's
open-source server has no user accounts: the reviewer name is what the reviewer types, as with
`labelgate approve --reviewer`.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field

from prefect.input import RunInput

from pipelines import registry
from pipelines.records import (INCONCLUSIVE, Approved, Decision, LedgerEvent, PendingReview,
                               Rejected)

POLL_S = 5.0  # s: how often the paused run looks for an answer (UI or CLI); ~17k reads a day

Outcome = Literal["approved", "rejected", "timed_out", "answered_elsewhere", "refused"]


class ReviewerDecision(RunInput):
    """The Resume form in the Prefect UI (its JSON schema; field descriptions are the labels'
    help text). Also what `resume_flow_run(id, run_input={...})` takes."""
    decision: Literal["approve", "reject"] = Field(
        description="approve: the candidate becomes production; reject: production stays")
    reason: str = Field(min_length=1, max_length=2000, description="recorded in the ledger")
    reviewer: str = Field(min_length=1, max_length=200,
                          description="your name, recorded in the ledger")


@dataclass(frozen=True, kw_only=True)
class Review:
    """What the reviewer step did (the flow summary's `reviewer`)."""
    model_id: str
    outcome: Outcome
    reviewer: str | None       # who decided (None: nobody, the wait timed out)
    reason: str | None
    via: Literal["prefect", "cli", "timeout"] | None  # which door the decision came through
    waited_s: float            # from the pause to the answer (or the timeout)
    wait_limit_s: float        # gate.reviewer_wait_s
    flow_run_id: str
    says: str                  # one line, for the summary and the log

    def as_dict(self) -> dict:
        return asdict(self)


def answer(registry_dir: str | Path, model_id: str) -> LedgerEvent | None:
    """The ledger event that answered `model_id`'s latest review request (approved, or
    rejected by a reviewer or by a timed-out wait), or None while it is open or never asked."""
    found: LedgerEvent | None = None
    for event in registry.ledger(registry_dir):
        if getattr(event, "id", None) != model_id:
            continue
        if isinstance(event, PendingReview):
            found = None  # asked again: only answers after this count
        elif isinstance(event, Approved | Rejected) and found is None:
            found = event
    return found


def is_open(registry_dir: str | Path, model_id: str) -> bool:
    """`model_id` waits for a reviewer: a `pending_review` line with no answer after it, and
    it is not production."""
    asked = any(isinstance(e, PendingReview) and e.id == model_id
                for e in registry.ledger(registry_dir))
    current = registry.production(registry_dir)
    return (asked and answer(registry_dir, model_id) is None
            and not (current and current.id == model_id))


def describe(decision: Decision, model_id: str, *, wait_s: float) -> str:
    """The markdown above the Resume form. Test names can hold annotators' class names
    ("recall of class '3'"): they go in code spans, where markdown is shown, not rendered."""
    prod = (f"production `{decision.production_id}` {decision.production_accuracy:.4f}"
            if decision.production_id else "no production model yet")
    names = [t.name for t in decision.tests if t.result in ("fail", "inconclusive")]
    shown = ", ".join(_code(n) for n in names[:_NAMES_SHOWN])
    more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return (f"### Gate verdict INCONCLUSIVE for candidate `{model_id}`\n\n"
            f"Eval accuracy: candidate {decision.candidate_accuracy:.4f}, {prod} "
            f"(eval set `{decision.eval_hash[:12]}`). Not passed ({len(names)}): "
            f"{shown or 'none'}{more}.\n\n"
            "The review report is this run's `gate-report` artifact (and "
            "`reports/gate/report.html` in the workspace).\n\n"
            "**approve**: the candidate becomes the production model. **reject**: production "
            f"stays. No answer within {_duration(wait_s)} (gate.reviewer_wait_s): production "
            f"stays. The same answer from a shell: `labelgate approve {model_id} --reason ...` "
            f"or `labelgate reject {model_id} --reason ...`.")


_NAMES_SHOWN = 8  # the report lists them all


def _code(text: str) -> str:
    """`text` as a markdown code span: one line, no backtick to close it early, 80 chars."""
    flat = " ".join(text.replace("`", "'").split())
    return f"`{flat[:77] + '...' if len(flat) > 80 else flat}`"


def ask(registry_dir: str | Path, promotion: Mapping, decision: Decision, *, wait_s: float,
        poll_s: float = POLL_S) -> dict | None:
    """Call from a flow, after promote. When the gate asked for a reviewer and `promotion`'s
    candidate is still waiting for one, pause this flow run for ReviewerDecision (at most
    `wait_s` seconds), then apply the answer; returns Review.as_dict(). None when nobody was
    asked (any other verdict or policy, or a candidate already decided)."""
    model_id = promotion.get("id")
    if (decision.verdict != INCONCLUSIVE or decision.on_inconclusive != "ask_reviewer"
            or not model_id):
        return None
    from prefect import get_run_logger
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run
    run = FlowRunContext.get().flow_run
    logger, run_id = get_run_logger(), str(run.id)
    if run.state and run.state.state_details.deployment_concurrency_lease_id:
        # Prefect 3.8 revokes a deployment's concurrency slot when its run pauses, and the
        # engine cancels the run when it next renews that lease (every 225 s): crashed at 263 s
        logger.warning("this run holds a deployment concurrency slot (concurrency_limit): "
                       "Prefect ends a paused run at its next lease renewal, within ~4 minutes. "
                       "Deploy without a concurrency limit (labelgate's run lock keeps one "
                       "retraining at a time)")
    if not is_open(registry_dir, model_id):
        if promotion.get("event") != "pending_review":
            return None  # decided in an earlier run
        return _decided_elsewhere(registry_dir, model_id, run_id, 0.0, wait_s, logger)
    form = ReviewerDecision.with_initial_data(description=describe(decision, model_id,
                                                                    wait_s=wait_s))
    logger.warning("gate INCONCLUSIVE: waiting up to %s for a reviewer to approve or reject %s "
                   "(Resume on this flow run's page, or `labelgate approve/reject %s`)",
                   _duration(wait_s), model_id, model_id)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_cli, name="labelgate-reviewer-cli", daemon=True,
                               args=(registry_dir, model_id, run_id, stop, poll_s, logger))
    started = time.monotonic()
    watcher.start()
    try:
        # timeout in whole seconds (Prefect's); the server refuses a resume after it
        got = pause_flow_run(wait_for_input=form, timeout=math.ceil(wait_s),
                             poll_interval=max(1, min(poll_s, wait_s / 2)))
    except FlowPauseTimeout:
        got = None
    finally:
        stop.set()
        watcher.join()
    waited = round(time.monotonic() - started, 1)
    if got is None:
        _running_again(run_id, "the reviewer wait timed out: production kept")
        review = time_out(registry_dir, model_id, waited_s=waited, wait_s=wait_s,
                          flow_run_id=run_id)
        if review is None:  # answered in the last instant, through the CLI
            return _decided_elsewhere(registry_dir, model_id, run_id, waited, wait_s, logger)
    else:
        review = apply(registry_dir, model_id, got, waited_s=waited, wait_s=wait_s,
                       flow_run_id=run_id)
    (logger.error if review.outcome == "refused" else logger.info)(review.says)
    return review.as_dict()


def apply(registry_dir: str | Path, model_id: str, got: ReviewerDecision, *, waited_s: float,
          wait_s: float, flow_run_id: str) -> Review:
    """The form's answer, applied through registry.approve / reject unless the review was
    answered meanwhile (then nothing is written). Under the registry lock: a CLI command at the
    same moment waits, then finds it decided. No Label Studio sync here (the CLI's `then`): the
    flow's next task pre-annotates from whatever production is then."""
    common = dict(model_id=model_id, waited_s=waited_s, wait_limit_s=wait_s,
                  flow_run_id=flow_run_id)
    with registry.lock(registry_dir):
        registry.reconcile(registry_dir)  # an interrupted CLI command's writes count first
        if not is_open(registry_dir, model_id):
            return _elsewhere(registry_dir, **common)
        try:
            if got.decision == "approve":
                registry.approve(registry_dir, model_id, reason=got.reason,
                                 reviewer=got.reviewer)
            else:
                registry.reject(registry_dir, model_id, reason=got.reason, reviewer=got.reviewer)
        except registry.RegistryError as exc:
            return Review(**common, outcome="refused", reviewer=got.reviewer, reason=got.reason,
                          via="prefect", says=f"{got.reviewer}'s {got.decision} of {model_id} "
                          f"was refused: {exc}. Production unchanged; the review stays open "
                          f"for `labelgate approve/reject {model_id}`")
    outcome: Outcome = "approved" if got.decision == "approve" else "rejected"
    return Review(**common, outcome=outcome, reviewer=got.reviewer, reason=got.reason,
                  via="prefect", says=f"{model_id} {outcome} by {got.reviewer} through the "
                  f"flow run's Resume form after {_duration(waited_s)}: " + (
                      "it is the production model now" if outcome == "approved"
                      else "production unchanged"))


def time_out(registry_dir: str | Path, model_id: str, *, waited_s: float, wait_s: float,
             flow_run_id: str) -> Review | None:
    """No answer in time: production kept, recorded as a `rejected` line by the gate that says
    the wait timed out (`timed_out_after_s`). None (nothing written) when the review was
    answered meanwhile."""
    reason = (f"no reviewer answered within {_duration(wait_s)} (gate.reviewer_wait_s): "
              "production kept")

    def plan(at: str) -> tuple[list[dict], dict]:
        if not is_open(registry_dir, model_id):
            return [], {}
        event = Rejected(at=at, id=model_id, by="gate", reason=reason,
                         extra={"timed_out_after_s": wait_s, "flow_run_id": flow_run_id})
        return [registry.line(event)], event.to_json()
    if not registry.operation(registry_dir, ["review_timeout", model_id], plan):
        return None
    return Review(model_id=model_id, outcome="timed_out", reviewer=None, reason=reason,
                  via="timeout", waited_s=waited_s, wait_limit_s=wait_s,
                  flow_run_id=flow_run_id, says=f"{model_id}: {reason}")


def _elsewhere(registry_dir: str | Path, *, model_id: str, waited_s: float, wait_limit_s: float,
               flow_run_id: str) -> Review:
    event = answer(registry_dir, model_id)
    if isinstance(event, Approved):
        outcome, who, why = "approved", event.reviewer, event.reason
    elif isinstance(event, Rejected):
        outcome, who, why = "rejected", event.reviewer or event.by, event.reason
    else:  # production by another way (a rollback to it cannot happen: it never was)
        outcome, who, why = "approved", None, None
    return Review(model_id=model_id, outcome="answered_elsewhere", reviewer=who, reason=why,
                  via="cli", waited_s=waited_s, wait_limit_s=wait_limit_s,
                  flow_run_id=flow_run_id,
                  says=f"{model_id} was {outcome} by {who or 'someone'} through the labelgate "
                  "command line while the run waited; the run applied nothing more")


def _decided_elsewhere(registry_dir, model_id, run_id, waited, wait_s, logger) -> dict:
    review = _elsewhere(registry_dir, model_id=model_id, waited_s=waited, wait_limit_s=wait_s,
                        flow_run_id=run_id)
    logger.info(review.says)
    return review.as_dict()


def _watch_cli(registry_dir, model_id: str, run_id: str, stop: threading.Event,
               poll_s: float, logger) -> None:
    """While the run is paused: a CLI answer in the ledger resumes it with that answer (which
    `apply` then finds already written), so the form does not linger for a decided review."""
    from prefect.exceptions import FlowPauseTimeout, NotPausedError
    from prefect.flow_runs import resume_flow_run
    while not stop.wait(poll_s):
        try:
            event = answer(registry_dir, model_id)
        except registry.RegistryError:  # a line being appended right now: look again
            continue
        if not isinstance(event, Approved | Rejected):
            continue
        got = {"decision": "approve" if isinstance(event, Approved) else "reject",
               "reason": event.reason or "(none)",
               "reviewer": getattr(event, "reviewer", None) or event.by}
        try:
            resume_flow_run(run_id, run_input=got)
        except NotPausedError:
            continue  # not paused yet, or resumed from the UI just now (then stop is set)
        except FlowPauseTimeout:
            return
        logger.info("%s answered through the labelgate command line: resuming the run", model_id)
        return


def _running_again(run_id: str, message: str) -> None:
    """A pause that timed out leaves the run Paused; the flow goes on (production kept)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Running(message=message), force=True)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"
