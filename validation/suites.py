"""Data contracts as code: Great Expectations suites, built by functions, run in an ephemeral
context. No Prefect, no DVC here.

Row-level expectations carry `meta.reason`: rows they flag are quarantined with that reason.
Dataset-level expectations (`meta.blocking`) stop the pipeline before training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

import great_expectations as gx  # noqa: E402  (after the analytics switch)
import great_expectations.expectations as gxe  # noqa: E402
import pandas as pd  # noqa: E402

KEY = "task_id"  # rows are identified by task id in every frame below


def annotation_suite(classes: tuple[str, ...]) -> gx.ExpectationSuite:
    """One row per non-skipped annotation: task_id, annotation_id, label."""
    exps = []
    exps.append(gxe.ExpectColumnValuesToNotBeNull(
        column="label", meta={"kind": "label", "reason": "annotation has no single class chosen"}))
    exps.append(gxe.ExpectColumnValuesToBeInSet(
        column="label", value_set=list(classes),
        meta={"kind": "label", "reason": "label not in the class set (base.classes)"}))
    exps.append(gxe.ExpectColumnValuesToBeUnique(
        column="annotation_id", meta={"kind": "label", "reason": "annotation id seen twice"}))
    return gx.ExpectationSuite(name="annotations", expectations=exps)


def manifest_suite(*, allowed_modes: tuple[str, ...], min_side: int,
                   max_side: int) -> gx.ExpectationSuite:
    """One row per accepted image: task_id, image_sha256, width, height, mode, n_votes."""
    exps = []
    exps.append(gxe.ExpectColumnValuesToBeUnique(
        column="task_id", meta={"kind": "duplicate task", "reason": "task appears twice in the manifest"}))
    exps.append(gxe.ExpectColumnValuesToBeUnique(
        column="image_sha256", meta={"kind": "duplicate image", "reason": "same image as another task"}))
    exps.append(gxe.ExpectColumnValuesToNotBeNull(
        column="image_sha256", meta={"kind": "image unavailable", "reason": "no image"}))
    for col in ("width", "height"):
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=col, min_value=min_side, max_value=max_side,
            meta={"kind": "image size", "reason": f"image {col} outside [{min_side}, {max_side}] px "
                            "(validate.min_side / max_side)"}))
    exps.append(gxe.ExpectColumnValuesToBeInSet(
        column="mode", value_set=list(allowed_modes),
        meta={"kind": "image mode", "reason": "image mode not allowed (validate.allowed_modes)"}))
    exps.append(gxe.ExpectColumnValuesToBeBetween(
        column="n_votes", min_value=1, meta={"kind": "label", "reason": "no usable annotation"}))
    return gx.ExpectationSuite(name="manifest", expectations=exps)


def class_count_suite(classes: tuple[str, ...], min_per_class: int) -> gx.ExpectationSuite:
    """One row per class: label, count. Blocking: too few examples of a class stops the run."""
    exps = []
    exps.append(gxe.ExpectColumnValuesToBeBetween(
        column="count", min_value=min_per_class,
        meta={"blocking": f"a class has fewer than {min_per_class} accepted images "
                          "(validate.min_per_class)"}))
    exps.append(gxe.ExpectColumnDistinctValuesToEqualSet(
        column="label", value_set=list(classes),
        meta={"blocking": "class-count table does not list every class"}))
    return gx.ExpectationSuite(name="class_counts", expectations=exps)


@dataclass(frozen=True)
class SuiteOutcome:
    success: bool
    flagged: dict[int, tuple[str, str]]  # row id (task id) -> (kind, reason), first one wins
    blocking: list[str]       # dataset-level failures, readable
    result: dict              # the GE validation result, JSON-serialisable


def run_suite(suite: gx.ExpectationSuite, df: pd.DataFrame, *, key: str = KEY) -> SuiteOutcome:
    """Validate `df` in an ephemeral context; rows are named by their `key` column."""
    context = gx.get_context(mode="ephemeral")
    batch = (context.data_sources.add_pandas(f"{suite.name}_source")
             .add_dataframe_asset(name=suite.name)
             .add_batch_definition_whole_dataframe(f"{suite.name}_batch"))
    suite = context.suites.add(suite)
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_check", data=batch, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df},
                    result_format={"result_format": "COMPLETE",
                                   "unexpected_index_column_names": [key]})
    flagged: dict[int, str] = {}
    blocking: list[str] = []
    for res in result.results:
        if res.success:
            continue
        meta = res.expectation_config.meta or {}
        if "reason" in meta:
            for idx in res.result.get("unexpected_index_list") or []:
                row_id = idx[key] if isinstance(idx, dict) else df.iloc[idx][key]
                value = next((v for c, v in idx.items() if c != key), None) \
                    if isinstance(idx, dict) else None
                value = value.item() if hasattr(value, "item") else value  # numpy -> plain
                shown = value is not None and value == value  # NaN (a missing value) != itself
                reason = meta["reason"] + (f": {value!r}" if shown else "")
                flagged.setdefault(int(row_id), (meta.get("kind", suite.name), reason))
        else:
            observed = res.result.get("partial_unexpected_list") or res.result.get("observed_value")
            blocking.append(f"{meta.get('blocking', res.expectation_config.type)} "
                            f"(observed: {observed})")
    return SuiteOutcome(success=bool(result.success), flagged=flagged, blocking=blocking,
                        result=result.to_json_dict())
