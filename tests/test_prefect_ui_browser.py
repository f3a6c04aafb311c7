"""The reviewer's side of gate.on_inconclusive = ask_reviewer, in a browser: a flow run paused for
ReviewerDecision (tests/reviewworld.py: production A, candidate B found INCONCLUSIVE by the real
gate) opened in the Prefect UI of the suite's server in headless Chromium. The Resume form shows
the gate's summary and the decision / reason / reviewer fields; submitting it resumes the run,
which approves B through registry.approve, naming the reviewer in the ledger. CI installs
Chromium (.ci/run) and sets LABELGATE_REQUIRE_BROWSER=1, so there this test is never skipped."""
from __future__ import annotations

import time

import pytest

from pipelines import registry
from pipelines.records import Approved, PendingReview, ProductionChange
from tests import reviewworld
# one copy of the browser check (test_prefect_server uses it too)
from tests.test_report_browser import CHROMIUM, _browser_or_skip


def field(dialog, label: str):
    """The text box of the form's property `label` (Prefect's labels name no control)."""
    return dialog.locator(".schema-form-property").filter(
        has=dialog.page.locator(".schema-form-property__label", has_text=label)
    ).locator("textarea, input").first


@pytest.mark.slow
def test_the_paused_run_asks_in_the_prefect_ui_and_its_form_resumes_it(tmp_path, prefect_api):
    sync_playwright = _browser_or_skip()
    layout = reviewworld.make(tmp_path / "ws")
    production = registry.production(layout.registry)
    shots = {"form": tmp_path / "prefect-resume-form.png",
             "after": tmp_path / "prefect-run-after.png"}
    requests: list[str] = []

    def review_in_the_browser(run_id: str) -> dict:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("request", lambda r: requests.append(r.url))
                page.goto(f"{prefect_api['ui']}/runs/flow-run/{run_id}")
                page.get_by_role("button", name="Resume").first.click()
                dialog = page.get_by_role("dialog")
                dialog.get_by_text("Gate verdict INCONCLUSIVE").wait_for()
                seen = {"text": dialog.inner_text(), "labels": dialog.locator(
                    ".schema-form-property__label").all_inner_texts()}
                # Prefect's select opens from the keyboard (a click on it only focuses it)
                dialog.locator(".p-select-button__control").first.focus()
                page.keyboard.press("Space")
                page.get_by_role("option", name="reject").wait_for()
                seen["options"] = page.get_by_role("option").all_inner_texts()
                page.get_by_role("option", name="approve").click()
                field(dialog, "Reason").fill("checked the class 3 images in the report")
                field(dialog, "Reviewer").fill("eve")
                page.screenshot(path=str(shots["form"]))
                dialog.get_by_role("button", name="Submit").click()
                dialog.wait_for(state="hidden")
                # the run resumed, the rest of the flow ran: the page, loaded again, says so
                # (the UI refreshes a run's page on its own only every ~30 s)
                deadline = time.monotonic() + 60
                while (reviewworld.final_state(run_id) != "COMPLETED"
                       and time.monotonic() < deadline):
                    time.sleep(0.5)
                page.reload()
                page.locator(".state-badge").filter(has_text="Completed").first.wait_for()
                page.screenshot(path=str(shots["after"]))
                return seen
            finally:
                browser.close()

    result, run_id, seen = reviewworld.run_flow(layout, when_paused=review_in_the_browser)
    assert "error" not in seen, seen
    form = seen["value"]
    assert form["labels"] == ["Decision", "Reason", "Reviewer"], form
    assert form["options"] == ["approve", "reject"], form
    model_id = result["promotion"]["id"]
    assert f"Gate verdict INCONCLUSIVE for candidate {model_id}" in form["text"]
    assert f"labelgate approve {model_id}" in form["text"]
    # the form's answer, applied: B is production, approved by the name typed in the browser
    asked = result["reviewer"]
    assert asked["outcome"] == "approved" and asked["reviewer"] == "eve", asked
    pointer = registry.production(layout.registry)
    assert pointer.id == model_id != production.id and pointer.reviewer == "eve"
    events = [e for e in registry.ledger(layout.registry) if getattr(e, "id", None) == model_id]
    assert [type(e) for e in events] == [type(events[0]), PendingReview, Approved,
                                         ProductionChange]
    assert events[2].reviewer == "eve"
    assert events[2].reason == "checked the class 3 images in the report"
    assert reviewworld.final_state(run_id) == "COMPLETED"
    # the UI is served by the suite's own server: nothing left 127.0.0.1
    assert requests and all(u.startswith((prefect_api["ui"], "data:", "blob:"))
                            for u in requests), sorted({u.split("?")[0] for u in requests})
    assert all(shot.stat().st_size > 20_000 for shot in shots.values())  # real pages
