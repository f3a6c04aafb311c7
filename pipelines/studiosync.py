"""Label Studio follows the production pointer after a reviewer command moved it: the
follow-up (`then`) that `registry.approve / rollback / rebaseline / reject` run once their
writes are made, and that the registry keeps owing (pending.json) until it ran.

A small module of its own so the reviewer commands stay light: the model and the Label Studio
client are loaded only when a sync actually runs.
"""
from __future__ import annotations

from pathlib import Path

from pipelines.settings import Params


class StudioSync:
    """`preannotate.run` against the configured Label Studio. Unreachable or refusing, the
    pointer change stands and `message` says the sync is pending (the next `labelgate run`, or
    the next approve / rollback / evalset rebaseline, makes it); any other error propagates, and
    the registry keeps the command pending so that its re-run syncs. `message` is None until it
    ran."""

    def __init__(self, studio_dir: str | Path, registry_dir: str | Path, params: Params) -> None:
        self.studio_dir, self.registry_dir, self.params = studio_dir, registry_dir, params
        self.message: str | None = None
        self.result: dict | None = None

    def __call__(self) -> None:
        from pipelines import preannotate, pull  # torch and the client: only when it runs
        from pipelines.labelstudio import LabelStudioError
        try:
            studio = pull.connect(self.studio_dir, self.params)
            try:
                project_id = studio.require_project(self.params.studio.project_title)
                self.result = preannotate.run(studio, project_id, self.registry_dir,
                                              params=self.params)
            finally:
                studio.close()
        except LabelStudioError as exc:
            self.message = (f"Label Studio sync pending: {exc} The production change stands; "
                            "Label Studio gets the production model's suggestions on the next "
                            "`labelgate run` (or approve / rollback / evalset rebaseline).")
            return
        self.message = preannotate.describe(self.result)
