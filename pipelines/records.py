"""The records that cross stage boundaries, defined once: producers build them, consumers read
them and tests/factories.py makes them, all through these types.

    reports/evaluation/evaluation.json   Evaluation    evaluate -> gate, report
    reports/evaluation/predictions.npz   Predictions   evaluate -> gate, report (per image)
    reports/gate/decision.json           Decision      gate -> promote, report, flow
    models/registry/production.json      Pointer       registry -> evaluate, backend, CLI
    models/registry/ledger.jsonl         LedgerEvent   registry, promote -> history, checkout

Frozen dataclasses, not TypedDicts. A TypedDict is a plain dict at run time: nothing checks it
when a file is read, anyone holding it can change it, and `d.get("field_nobody_writes")`
quietly answers None (how the report once read a `candidate_id` no stage wrote). A record here
is checked once, when it is made: `read` / `from_json` for a file, the constructor for a
producer. A missing field, a wrong type or a malformed sha256 is a RecordError naming the file
and the field; attribute access (`decision.verdict`) then cannot ask for a field that does not
exist without failing at once. Nested JSON owned by another module (train's metrics, lineage's
record) stays a plain JSON object typed `Mapping`: not ours to type, and read-only by contract.

The JSON on disk is the one the stages wrote before these types: existing registries load
(tests/test_records.py reads ledgers written by three earlier versions of the registry). Two
kinds of strictness. Stage outputs (evaluation, decision) are rebuilt by `dvc repro` when their
code changes, so a key this module does not know is a producer's mistake: refused. Registry
files outlive the code that wrote them: fields added since default, keys this version does not
know are kept in `extra` and written back unchanged. Per-image arrays are not
JSON: they go to predictions.npz, written with fixed zip timestamps so that the same predictions
are the same bytes (DVC then keeps the decision).

Every record is also a read-only Mapping of its fields (`pointer["id"]`) for code that still
reads the JSON shape; new code reads attributes. How a record is checked, read and written:
pipelines/jsonrecord.py.
"""
from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from pipelines.files import atomic_write_bytes
from pipelines.jsonrecord import (SHA256, Record, RecordError, digest, flattened, optional,
                                  record)
from pipelines.noise import SeedNoise

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"
Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]
TestResult = Literal["pass", "fail", "inconclusive", "no evidence"]
EVALUATION_JSON, PREDICTIONS_NPZ = "evaluation.json", "predictions.npz"


def _number(value: object) -> float | None:
    """A number from an opaque JSON object (metrics), or None."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


# -- the evaluation (evaluate -> gate, report) ----------------------------------------------------

@record
class ClassMetrics(Record):
    precision: float
    recall: float
    support: int


@record
class Metrics(Record):
    """One model on the eval set (pipelines.metrics.classification): `confusion[i][j]` = eval
    images of class i predicted as j."""
    accuracy: float
    n: int
    per_class: Mapping[str, ClassMetrics]
    confusion: tuple[tuple[int, ...], ...]

    def _check(self) -> None:
        k = len(self.per_class)
        if len(self.confusion) != k or any(len(row) != k for row in self.confusion):
            raise RecordError(f"expected a {k} x {k} matrix (one row and column per class)",
                              field="confusion")
        if sum(map(sum, self.confusion)) != self.n:
            raise RecordError(f"counts {sum(map(sum, self.confusion))} images, n is {self.n}",
                              field="confusion")


@record
class CandidateEval(Metrics):
    sha256: str = digest()
    size_bytes: int
    macs_per_image: int  # multiply-accumulates of one forward pass on one image


@record
class ProductionEval(Metrics):
    """Production re-evaluated on the same eval set, with what the report needs of its
    pointer."""
    id: str
    sha256: str = digest()
    judged_on_eval_hash: str | None = digest()
    dataset_version: str | None
    train_class_counts: Mapping[str, int] | None
    # what the relative budgets compare with (gate.max_size_ratio, max_compute_ratio); absent
    # in evaluations written before them: those budgets are then not judged
    size_bytes: int | None = optional()
    macs_per_image: int | None = optional()


@record
class Evaluation(Record):
    """reports/evaluation/evaluation.json: the candidate and, when there is a comparable one,
    production, on the fixed eval set. The per-image predictions: `Predictions`."""
    eval_hash: str = digest()
    eval_n: int
    classes: tuple[str, ...]
    candidate: CandidateEval
    production: ProductionEval | None
    production_note: str | None = optional()  # why production was not evaluated
    # the project's measured seed noise (models/registry/noise.json), carried here so that the
    # gate still reads the evaluation and params alone; the gate's margins follow from it
    seed_noise: SeedNoise | None = optional()

    def _check(self) -> None:
        for name in ("candidate", "production"):
            m = getattr(self, name)
            if m is None:
                continue
            if len(m.per_class) != len(self.classes) or set(m.per_class) != set(self.classes):
                raise RecordError(f"classes {list(m.per_class)}, the evaluation has "
                                  f"{list(self.classes)}", field=f"{name}.per_class")
            if m.n != self.eval_n:
                raise RecordError(f"{m.n} images, the eval set has {self.eval_n}",
                                  field=f"{name}.n")


_ARRAYS = {"task_id": np.int64, "image_sha256": np.dtype("<U64"), "truth": np.int64,
           "cand_pred": np.int64, "cand_conf": np.float64, "prod_pred": np.int64,
           "prod_conf": np.float64}
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same arrays are the same bytes


@dataclass(frozen=True, kw_only=True, eq=False)
class Predictions:
    """reports/evaluation/predictions.npz: one row per eval image, in eval-set order, all
    `(N,)`: `task_id` int64, `image_sha256` str, `truth`/`cand_pred`/`prod_pred` int64 class
    indices into `Evaluation.classes`, `cand_conf`/`prod_conf` float64 in [0, 1] (the top
    class's probability). `prod_*` are None when no comparable production model was evaluated.
    Arrays are read-only."""
    task_id: np.ndarray
    image_sha256: np.ndarray
    truth: np.ndarray
    cand_pred: np.ndarray
    cand_conf: np.ndarray
    prod_pred: np.ndarray | None = None
    prod_conf: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = None
        for name, dtype in _ARRAYS.items():
            value = getattr(self, name)
            if value is None:
                if name.startswith("prod_"):
                    continue
                raise RecordError("missing", field=name)
            arr = np.asarray(value)
            if arr.ndim != 1:
                raise RecordError(f"expected one value per image, got shape {arr.shape}",
                                  field=name)
            if arr.size and not np.can_cast(arr.dtype, dtype, "same_kind"):
                raise RecordError(f"expected {np.dtype(dtype)}, got {arr.dtype}", field=name)
            if name == "image_sha256":  # before the cast, which would cut a longer string
                bad = next((i for i, v in enumerate(arr.tolist())
                            if not (isinstance(v, str) and SHA256.fullmatch(v))), None)
                if bad is not None:
                    raise RecordError(f"row {bad}: expected a sha256, got "
                                      f"{str(arr[bad])[:80]!r}", field=name)
            arr = arr.astype(dtype)  # a copy: the caller's array stays the caller's
            arr.flags.writeable = False
            object.__setattr__(self, name, arr)
            if n is not None and len(arr) != n:
                raise RecordError(f"{len(arr)} values, task_id has {n}", field=name)
            n = len(arr) if n is None else n
        if (self.prod_pred is None) != (self.prod_conf is None):
            raise RecordError("prod_pred and prod_conf come together", field="prod_pred")
        for name in ("cand_conf", "prod_conf"):
            conf = getattr(self, name)
            if conf is not None and not ((conf >= 0) & (conf <= 1)).all():
                raise RecordError("expected probabilities in [0, 1]", field=name)
        for name in ("truth", "cand_pred", "prod_pred"):
            idx = getattr(self, name)
            if idx is not None and (idx < 0).any():
                raise RecordError("expected class indices >= 0", field=name)

    @property
    def n(self) -> int:
        return len(self.task_id)

    def index(self) -> dict[int, int]:
        """task id -> row."""
        return {int(t): i for i, t in enumerate(self.task_id)}

    def check_against(self, evaluation: Evaluation, *, source: str = "") -> None:
        """Refuse predictions that are not the ones `evaluation` summarises (another run's,
        another model's): same images, classes, and the accuracies it states."""
        def refuse(problem: str, name: str) -> None:
            raise RecordError(problem, field=name, source=source)
        if self.n != evaluation.eval_n:
            refuse(f"{self.n} images, the evaluation has {evaluation.eval_n}", "task_id")
        if (self.prod_pred is None) != (evaluation.production is None):
            refuse("production predictions " + ("missing" if self.prod_pred is None
                   else "present") + " but the evaluation says otherwise", "prod_pred")
        k = len(evaluation.classes)
        for name in ("truth", "cand_pred", "prod_pred"):
            idx = getattr(self, name)
            if idx is not None and idx.size and idx.max() >= k:
                refuse(f"class index {int(idx.max())}, the evaluation has {k} classes", name)
        for name, metrics in (("cand_pred", evaluation.candidate),
                              ("prod_pred", evaluation.production)):
            pred = getattr(self, name)
            if metrics is not None and self.n:
                acc = float((pred == self.truth).mean())
                if abs(acc - metrics.accuracy) > 1e-9:
                    refuse(f"accuracy {acc:.6f}, the evaluation says {metrics.accuracy:.6f}: "
                           "not the predictions it summarises", name)

    def to_npz(self) -> bytes:
        """The .npz bytes: arrays sorted by name, stored uncompressed, fixed timestamps."""
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name in sorted(_ARRAYS):
                arr = getattr(self, name)
                if arr is None:
                    continue
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
                info.external_attr = 0o644 << 16
                with z.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        return buf.getvalue()

    def write(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.to_npz())

    @classmethod
    def read(cls, path: str | Path) -> Predictions:
        """From an .npz file; never unpickles. Any problem is a RecordError naming the file."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name[:-4] if name.endswith(".npy") else name: z[name]
                          for name in z.files}
        except FileNotFoundError:
            raise RecordError("no such file", source=str(path)) from None
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise RecordError(f"not a readable .npz of plain arrays ({exc})",
                              source=str(path)) from None
        unknown = sorted(set(arrays) - set(_ARRAYS))
        if unknown:
            raise RecordError(f"unknown array(s) {', '.join(unknown)}", source=str(path))
        try:
            return cls(**arrays)
        except TypeError:  # a required array is absent
            missing = sorted(n for n in _ARRAYS if n not in arrays and not n.startswith("prod_"))
            raise RecordError("missing", field=missing[0], source=str(path)) from None
        except RecordError as exc:
            raise exc.under(source=str(path)) from None


def write_evaluation(folder: str | Path, evaluation: Evaluation,
                     predictions: Predictions) -> Path:
    """`folder`/evaluation.json and predictions.npz (what evaluate writes); returns `folder`."""
    predictions.check_against(evaluation)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    evaluation.write(folder / EVALUATION_JSON)
    predictions.write(folder / PREDICTIONS_NPZ)
    return folder


def read_evaluation(folder: str | Path) -> tuple[Evaluation, Predictions]:
    """evaluate's output folder, checked: the two files agree with each other."""
    folder = Path(folder)
    evaluation = Evaluation.read(folder / EVALUATION_JSON)
    predictions = Predictions.read(folder / PREDICTIONS_NPZ)
    predictions.check_against(evaluation, source=str(folder / PREDICTIONS_NPZ))
    return evaluation, predictions


# -- the decision (gate -> promote, report, flow) -------------------------------------------------

@record
class GateTest(Record):
    """One regression test (validation/regression.py). `passed` is `result != "fail"`."""
    STRICT = False
    name: str
    result: TestResult
    passed: bool
    value: float
    threshold: float
    p_value: float | None
    detail: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        # the first registries (before PASS/FAIL/INCONCLUSIVE) wrote {name, passed, value,
        # threshold, detail}
        if "result" not in data and isinstance(data.get("passed"), bool):
            data = {**data, "result": "pass" if data["passed"] else "fail"}
        return {"p_value": None, **data}

    def _check(self) -> None:
        if self.passed != (self.result != "fail"):
            raise RecordError(f"passed is {self.passed} for result {self.result!r}",
                              field="passed")


@record
class Decision(Record):
    """reports/gate/decision.json: the verdict on the candidate, and what happens next."""
    verdict: Verdict
    action: str  # what happens next, in words
    tests: tuple[GateTest, ...]
    candidate_sha256: str = digest()
    candidate_accuracy: float
    production_id: str | None
    production_accuracy: float | None
    eval_hash: str = digest()
    on_inconclusive: Literal["keep_production", "ask_reviewer"]
    margins_note: str | None = optional()  # where the comparative margins came from (noise)

    def _check(self) -> None:
        if (self.production_id is None) != (self.production_accuracy is None):
            raise RecordError("production_id and production_accuracy come together",
                              field="production_accuracy")

    def failed(self) -> list[str]:
        """Names of the tests that failed."""
        return [t.name for t in self.tests if t.result == "fail"]


# -- the registry: production pointer and ledger ---------------------------------------------

@record
class Pointer(Record):
    """models/registry/production.json: the production model. `metrics` is what train measured
    plus `eval_accuracy` (on the eval set `eval_hash`) and `train_class_counts`."""
    STRICT = False
    id: str
    sha256: str = digest()
    dataset_version: str | None
    eval_hash: str | None = digest()
    metrics: Mapping[str, Any]
    since: str
    previous: str | None  # production before this one (after a rollback: the target's own)
    via: str  # gate, approved, rollback
    rolled_back_from: str | None = optional()
    reason: str | None = optional()
    reviewer: str | None = optional()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def eval_accuracy(self) -> float | None:
        return _number(self.metrics.get("eval_accuracy"))


@record
class LedgerEvent(Record):
    """One line of models/registry/ledger.jsonl. `LedgerEvent.from_json` answers the subclass
    its `event` names; `op` is the registry operation that wrote it (absent before plans)."""
    STRICT = False
    KINDS: ClassVar[tuple[str, ...]] = ()
    event: str
    at: str
    op: str | None = optional()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def _from(cls, data: Any, where: str) -> Any:
        if cls is LedgerEvent and isinstance(data, Mapping):
            kind = data.get("event")
            sub = EVENTS.get(kind) if isinstance(kind, str) else None
            if sub is None:
                raise RecordError(f"unknown event {kind!r} (known: {', '.join(EVENTS)})",
                                  field=".".join(p for p in (where, "event") if p))
            return sub._from(data, where)
        return super()._from(data, where)

    def _check(self) -> None:
        if self.event not in self.KINDS:
            raise RecordError(f"expected one of {', '.join(map(repr, self.KINDS))}, got "
                              f"{self.event!r}", field="event")


@record
class Candidate(LedgerEvent):
    """A gated candidate: what the gate saw and said (written once per model and eval set)."""
    KINDS = ("candidate",)
    event: str = "candidate"
    id: str
    sha256: str = digest()
    dataset_version: str | None
    eval_hash: str = digest()
    params_hash: str | None
    code_version: str | None = None  # git commit (+dirty); lines before 39ce8f9 lack it
    metrics: Mapping[str, Any]
    verdict: Verdict
    tests: tuple[GateTest, ...]
    decision: str | None = None  # the decision's action, in words (since 39ce8f9)
    production_at_gate: str | None = None  # (since 39ce8f9)
    lineage: Mapping[str, Any] | None = optional()  # pipelines/lineage.py's record

    def failed(self) -> list[str]:
        return [t.name for t in self.tests if t.result == "fail"]

    @property
    def eval_accuracy(self) -> float | None:
        """On the eval set it was gated on (`eval_hash`)."""
        return _number(self.metrics.get("eval_accuracy"))


@record
class ProductionChange(LedgerEvent):
    """Production became `pointer` (promoted: by the gate or an approval; rolled_back). The
    line is the pointer's JSON plus the event's keys. `recovered`: written by `reconcile` for
    a pointer renamed without its line (registries from before plans)."""
    KINDS = ("promoted", "rolled_back")
    pointer: Pointer = flattened()
    recovered: bool = optional(False)

    @property
    def id(self) -> str:
        return self.pointer.id

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        # the first registry wrote promoted lines without since/via: the pointer's since was
        # the line's `at`
        data = dict(data)
        data.setdefault("since", data.get("at"))
        data.setdefault("via", "rollback" if data.get("event") == "rolled_back" else "gate")
        return data


@record
class Approved(LedgerEvent):
    KINDS = ("approved",)
    event: str = "approved"
    id: str
    reviewer: str
    reason: str
    verdict: Verdict
    override_fail: bool


@record
class Rejected(LedgerEvent):
    """by the gate (a FAIL, or INCONCLUSIVE kept) or by a reviewer."""
    KINDS = ("rejected",)
    event: str = "rejected"
    id: str
    by: Literal["gate", "reviewer"]
    reason: str
    reviewer: str | None = optional()


@record
class PendingReview(LedgerEvent):
    KINDS = ("pending_review",)
    event: str = "pending_review"
    id: str


@record
class Rebaselined(LedgerEvent):
    """Production judged again on a new eval set."""
    KINDS = ("rebaselined",)
    event: str = "rebaselined"
    id: str
    old_eval_hash: str | None = digest()
    eval_hash: str = digest()
    eval_accuracy: float
    reason: str
    reviewer: str
    since: str | None  # the pointer's since: a re-baseline does not change production


EVENTS: dict[str, type[LedgerEvent]] = {
    kind: cls for cls in (Candidate, ProductionChange, Approved, Rejected, PendingReview,
                          Rebaselined) for kind in cls.KINDS}


def stamped(event: LedgerEvent, *, at: str, op: str | None) -> LedgerEvent:
    """`event` as the registry writes it: at a time, by an operation."""
    return replace(event, at=at, op=op)
