"""What the pipeline reads from and writes to Label Studio: projects, the labeling config, task
listings and exports, predictions, Data Manager tabs, the labeling queue. The connection, its
security checks and the retrying transport are in `pipelines/lstransport.py` (that module
is the only one that imports `label_studio_sdk`). The few administration calls the demo, the
tests and the benchmarks need (creating projects, users, storages; importing tasks) are
grouped at the end of `Studio`.
"""
from __future__ import annotations

import datetime
import json

from pipelines import labelconfig
from pipelines.labelconfig import LabelingConfig, label_config
# the names callers use with a Studio, re-exported so they import one module
from pipelines.lstransport import (AuthError, Connection, ImageFetchError,  # noqa: F401
                                   LabelStudioError, Transport, connection_from_env,
                                   credentials_file)

EXPORT_IDS_PER_CALL = 500  # tasks per export call (Django refuses 1,000+ fields); see pull.py
LIST_PAGE_SIZE = 5000     # rows per data-manager listing call


def _iso(value) -> str:
    """Label Studio's own timestamp format (microseconds, Z): what its filters parse."""
    if isinstance(value, str):  # raw JSON: one spelling everywhere (watermarks are compared)
        value = datetime.datetime.fromisoformat(value)
    return value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Studio(Transport):
    """The pipeline's reads and writes on a connected Label Studio (see `Transport` for the
    connection, checks and retries): projects, the labeling config, task listings and
    exports, predictions, Data Manager tabs and the labeling queue."""

    # -- projects -----------------------------------------------------------------------------
    def find_project(self, title: str) -> int | None:
        with self._call("listing projects"):
            for project in self._client.projects.list(page_size=100):
                if project.title == title:
                    return project.id
        return None

    def require_project(self, title: str) -> int:
        found = self.find_project(title)
        if found is None:
            raise LabelStudioError(f"No project titled {title!r} in Label Studio at {self.conn.url}. "
                                   "Check studio.project_title in params.yaml, or run `labelgate demo`.")
        return found

    def labeling_config(self, project_id: int) -> LabelingConfig:
        """The project's labeling config as labelgate reads it (control names, image key,
        classes, sha256 of the whole text: it goes into every snapshot, so any change is
        visible). UnsupportedConfig when it is not an image-classification config."""
        with self._call("reading the labeling config"):
            project = self._client.projects.get(project_id)
        return labelconfig.parse(project.label_config or "")

    # -- reading ------------------------------------------------------------------------------
    def annotated_task_ids(self, project_id: int) -> list[int]:
        """Ids of every task with at least one annotation, skipped ones included, ascending:
        what a full pull exports, in pages (`LIST_PAGE_SIZE` rows a call)."""
        rows = self._dm_tasks(project_id, {"ordering": ["tasks:id"]},
                              "id,total_annotations,cancelled_annotations")
        return [int(r["id"]) for r in rows
                if (r.get("total_annotations") or 0) + (r.get("cancelled_annotations") or 0) > 0]

    # -- incremental sync ---------------------------------------------------------------------
    # Label Studio Community has no change feed that survives a missed event (webhooks are
    # fire-and-forget, SSRF-blocked for 127.0.0.1 by default). What it does have: every
    # annotation create/edit/delete/skip bumps task.updated_at, the data manager can filter on
    # it cheaply (~0.1 s for 500 rows of 20k), and the export endpoint accepts `ids[]`.

    def task_count(self, project_id: int) -> int:
        with self._call("reading the project"):
            return int(self._client.projects.get(project_id).task_number or 0)

    def _dm_tasks(self, project_id: int, query: dict, include: str, *,
                  page_size: int = 0, fields: str = "task_only") -> list[dict]:
        """Rows `{field: value}` (fields in `include`) from the data manager's task list, all
        pages (`LIST_PAGE_SIZE` rows each), or just the first when page_size == 1. Task data
        is returned as stored (resolve_uri=false): the same URLs the export gives."""
        page_size = page_size or LIST_PAGE_SIZE
        rows: list[dict] = []
        for page in range(1, 1_000_000):
            body = self._get_json("/api/tasks/", {
                "project": project_id, "fields": fields, "include": include,
                "resolve_uri": "false", "query": json.dumps(query), "page": page,
                "page_size": page_size}, "listing tasks")
            got = body.get("tasks") if isinstance(body, dict) else None
            total = body.get("total") if isinstance(body, dict) else None
            if not isinstance(got, list) or not isinstance(total, int):
                raise LabelStudioError(f"Label Studio at {self.conn.url} answered a task list "
                                       "without `tasks` and `total`.")
            rows.extend(got)
            # `total`, not a short page, ends the listing: a server may cap page_size
            # (TASK_API_PAGE_SIZE_MAX) below what was asked for
            if page_size == 1 or not got or len(rows) >= total:
                return rows
        raise AssertionError("unreachable")

    def newest_update(self, project_id: int) -> str | None:
        """The latest task.updated_at in the project (the sync watermark), or None if empty."""
        rows = self._dm_tasks(project_id, {"ordering": ["-tasks:updated_at"]},
                              "id,updated_at", page_size=1)
        return _iso(rows[0]["updated_at"]) if rows else None

    def tasks_updated_since(self, project_id: int, since: str) -> list[dict]:
        """`[{"id", "created_at", "updated_at"}]` of tasks with updated_at > `since`."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
             "value": since}]}, "ordering": ["tasks:id"]}
        return [{"id": t["id"], "created_at": _iso(t["created_at"]),
                 "updated_at": _iso(t["updated_at"])}
                for t in self._dm_tasks(project_id, query, "id,created_at,updated_at")]

    def all_task_ids(self, project_id: int) -> set[int]:
        """Every task id: only to find deleted tasks when counts disagree."""
        return {t["id"] for t in self._dm_tasks(project_id, {"ordering": ["tasks:id"]}, "id")}

    def export_tasks(self, project_id: int, ids: list[int]) -> list[dict]:
        """Label Studio's JSON export of just these tasks (annotations, skipped ones included),
        at most `EXPORT_IDS_PER_CALL` ids: one bounded call, retried on transient failures.
        Community's whole-project export is synchronous and timed out at 10,000 tasks; a
        call per few hundred ids stays seconds long at any project size. The SDK's own `ids=`
        is not read by the server (it wants `ids[]`), so it goes in as a query parameter."""
        if len(ids) > EXPORT_IDS_PER_CALL:
            raise ValueError(f"at most {EXPORT_IDS_PER_CALL} ids per export call")
        chunk = [str(int(i)) for i in ids]
        def once() -> object:
            with self._call(f"exporting {len(chunk)} tasks"):
                raw = b"".join(self._client.projects.exports.download_sync(
                    project_id, export_type="JSON", download_all_tasks=True,
                    request_options={"additional_query_parameters": {"ids[]": chunk}}))
                return json.loads(raw)
        tasks = self._retrying(once)
        if not isinstance(tasks, list) or not all(isinstance(t, dict) and "id" in t
                                                  for t in tasks):
            raise LabelStudioError(f"Label Studio at {self.conn.url} returned an export that is "
                                   "not a list of tasks.")
        return tasks

    def unlabeled_tasks(self, project_id: int) -> list[dict]:
        """`[{"id", "data", "predictions": [{"id", "model_version"}]}]` of tasks nobody has
        annotated or skipped yet -- asked of Label Studio with a filter, not found by listing
        every task of the project (2+ minutes at 10,000 tasks)."""
        query = {"filters": {"conjunction": "and", "items": [
            {"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number",
             "value": 0},
            {"filter": "filter:tasks:cancelled_annotations", "operator": "equal",
             "type": "Number", "value": 0}]}, "ordering": ["tasks:id"]}
        rows = self._dm_tasks(project_id, query, "id,data,predictions,total_annotations,"
                              "cancelled_annotations", fields="all")
        return [{"id": r["id"], "data": dict(r.get("data") or {}),
                 "predictions": [{"id": p.get("id"), "model_version": p.get("model_version")}
                                 for p in r.get("predictions") or [] if isinstance(p, dict)]}
                for r in rows
                # the filter is the server's; the counts are checked here again, so a server
                # that ignored it could never make labelgate treat labeled tasks as unlabeled
                if not r.get("total_annotations") and not r.get("cancelled_annotations")]

    def delete_predictions(self, ids: list[int]) -> int:
        """Delete predictions by id (retiring an old model's pre-annotations)."""
        with self._call(f"deleting {len(ids)} predictions"):
            for pid in ids:
                self._client.predictions.delete(pid)
        return len(ids)

    def ensure_view(self, project_id: int, title: str, data: dict) -> int:
        """A saved Data Manager tab (filters, ordering) annotators can open; created once."""
        with self._call("listing data manager views"):
            for view in self._client.views.list(project=project_id):
                if (view.data or {}).get("title") == title:
                    return view.id
        with self._call("creating a data manager view"):
            return self._client.views.create(project=project_id,
                                             data={"title": title, **data}).id

    def set_uncertainty_queue(self, project_id: int, model_version: str) -> None:
        """Annotators get the lowest-scored prediction of `model_version` first: Label Studio
        Community's "Uncertainty sampling" orders tasks with predictions of the project's
        model_version by prediction score, ascending."""
        with self._call("setting the project's model version and sampling"):
            self._client.projects.update(project_id, model_version=model_version,
                                         sampling="Uncertainty sampling")

    def queue_settings(self, project_id: int) -> dict:
        with self._call("reading the project"):
            project = self._client.projects.get(project_id)
        return {"sampling": getattr(project, "sampling", None),
                "model_version": getattr(project, "model_version", None)}

    def next_task_id(self, project_id: int) -> int | None:
        """The task Label Studio's labeling stream would give this user next."""
        body = self._get_json(f"/api/projects/{int(project_id)}/next", {}, "asking for the "
                              "next task")
        return body.get("id") if isinstance(body, dict) else None

    def predictions(self, project_id: int, *, model_version: str | None = None,
                    ids: set[int] | None = None) -> list[dict]:
        """`[{"id", "task", "model_version", "score", "result"}]` of the project's predictions,
        only those of `model_version` and/or with these `ids` when given."""
        with self._call("listing predictions"):
            return [{"id": p.id, "task": p.task, "model_version": p.model_version,
                     "score": p.score, "result": p.result}
                    for p in self._client.predictions.list(project=project_id)
                    if (model_version is None or p.model_version == model_version)
                    and (ids is None or p.id in ids)]

    def create_predictions(self, project_id: int, predictions: list[dict]) -> int:
        """Bulk-import `[{"task", "result", "score", "model_version"}]`; returns the count."""
        if not predictions:
            return 0
        with self._call(f"importing {len(predictions)} predictions"):
            resp = self._client.projects.import_predictions(project_id, request=predictions)
        return int(getattr(resp, "created", None) or len(predictions))

    # -- administration: the demo, the tests and the benchmarks -------------------------------
    def ensure_project(self, title: str, classes: tuple[str, ...]) -> tuple[int, bool]:
        """(project id, created?) — the project titled `title`, created with our config if new."""
        found = self.find_project(title)
        if found is not None:
            return found, False
        with self._call("creating the project"):
            project = self._client.projects.create(
                title=title, label_config=label_config(classes),
                description="Managed by labelgate: pick the class the image shows.")
        return project.id, True

    def add_local_storage(self, project_id: int, path: str) -> None:
        """Connect a folder under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (no sync: tasks name files)."""
        with self._call("connecting local file storage"):
            self._client.import_storage.local.create(project=project_id, path=path,
                                                     use_blob_urls=True, title="labelgate images")

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import tasks, optionally with their annotations, in one call; returns task ids."""
        with self._call(f"importing {len(tasks)} tasks"):
            resp = self._client.projects.import_tasks(project_id, request=tasks,
                                                      return_task_ids=True)
        return list(resp.task_ids or [])

    def ensure_user(self, username: str) -> int:
        """Id of an annotator account (created if missing). Demo/testing helper."""
        email = f"{username}@labelgate.local"
        with self._call("listing users"):
            for user in self._client.users.list():
                if user.email == email:
                    return user.id
        with self._call("creating a user"):
            return self._client.users.create(username=username, email=email,
                                             first_name=username).id
