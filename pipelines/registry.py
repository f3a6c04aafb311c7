"""The model registry: an append-only ledger, content-addressed model files, one production
pointer. Exactly one production model at any time; it changes only by an atomic rename.

    models/registry/ledger.jsonl        one JSON event per line, never rewritten (LedgerEvent)
    models/registry/production.json     {id, sha256, since, via, ...}: the pointer (Pointer)
    models/registry/pending.json        the plan of a command in progress (absent when none)
    models/registry/blobs/<sha256>.safetensors

Every command that writes (promote, approve, reject, rollback, rebaseline) is one operation.
Under the registry lock it first works out every write it will make — its ledger lines, the new
pointer — and records that plan in pending.json: that one atomic rename is the commit point.
Then it makes the writes in order, skipping any already made (ledger lines carry the plan's
`op` id; the pointer is compared), and removes the plan. A crash before the plan leaves
nothing; a crash after it leaves a plan that the next registry command completes first. A
re-run of the interrupted command itself (same command, same target) recognises its own plan
and only finishes it: it never acts twice (a re-run rollback does not go back two models, a
re-run approve writes one `approved` line, a re-run promote writes the decision it owed).
A plan that changed production may also owe the outside world a follow-up (`then`: Label
Studio's pre-annotations); it stays in pending.json until that ran, so a re-run after a crash
there runs the follow-up, not the command again.

Every load checks the file against the sha256 recorded in the registry first. The pointer and
the ledger lines are typed records (pipelines/records.py), checked when read: a damaged line is
a RegistryError naming it, and ledgers written by earlier versions still load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.files import (append_jsonl, atomic_write_json, atomic_writer, clean_stale_tmp,
                             exclusive, read_json, read_jsonl, sha256_file, utc_now)
from pipelines.records import (FAIL, Approved, Candidate, LedgerEvent, Pointer, ProductionChange,
                               Rebaselined, RecordError, Rejected, stamped)

if TYPE_CHECKING:
    import torch

LEDGER, POINTER, PENDING, BLOBS = "ledger.jsonl", "production.json", "pending.json", "blobs"
_CHUNK = 1 << 20  # 1 MiB copies keep storing a large model flat in memory


class RegistryError(RuntimeError):
    pass


def verify(path: str | Path, sha256: str) -> Path:
    """Refuse a model file whose bytes are not the ones the registry recorded."""
    path = Path(path)
    if not path.exists():
        raise RegistryError(f"model file missing: {path}")
    actual = sha256_file(path)
    if actual != sha256:
        raise RegistryError(f"model file {path} does not match its recorded sha256 "
                            f"({actual[:12]}… != {sha256[:12]}…): refusing to load it")
    return path


def _damaged(exc: RecordError) -> RegistryError:
    return RegistryError(f"{exc}. The registry file is damaged: restore it from a backup, or "
                         "fix that entry by hand (the ledger is append-only: never delete a line)")


def ledger(registry_dir: str | Path) -> list[LedgerEvent]:
    """Every event, oldest first."""
    path = Path(registry_dir) / LEDGER
    if not path.exists():
        return []
    try:
        return [LedgerEvent.from_json(row, source=f"{path}, entry {n}")
                for n, row in enumerate(read_jsonl(path), 1)]
    except RecordError as exc:
        raise _damaged(exc) from None


def model_ids(registry_dir: str | Path) -> set[str]:
    """Every model id the ledger names (the `model_version`s labelgate ever gave out)."""
    return {e.id for e in ledger(registry_dir)}


def production(registry_dir: str | Path) -> Pointer | None:
    path = Path(registry_dir) / POINTER
    if not path.exists():
        return None
    try:
        return Pointer.read(path)
    except RecordError as exc:
        raise _damaged(exc) from None


def pending(registry_dir: str | Path) -> dict | None:
    """The plan of a command that has not finished (crashed, or running now), or None."""
    path = Path(registry_dir) / PENDING
    return read_json(path) if path.exists() else None


def blob_path(registry_dir: str | Path, sha256: str) -> Path:
    return Path(registry_dir) / BLOBS / f"{sha256}.safetensors"


def load_production(registry_dir: str | Path, *, device: torch.device):
    """(net.Loaded, Pointer) of the production model, its file verified against the pointer's
    sha256 (and the bytes parsed checked again, so a file swapped after the check is refused
    too); None while there is none."""
    from pipelines import net  # torch: only for the commands that load a model
    pointer = production(registry_dir)
    if pointer is None:
        return None
    path = verify(blob_path(registry_dir, pointer.sha256), pointer.sha256)
    try:
        loaded = net.load(path, device=device, sha256=pointer.sha256)
    except net.ModelFileError as exc:
        raise RegistryError(f"production model {pointer.id}: {exc}") from None
    return loaded, pointer


def store(registry_dir: str | Path, model_file: str | Path) -> tuple[str, Path]:
    """Copy a model file into the content-addressed blob store; (sha256, stored path). The
    bytes copied are hashed on the way: a file that changed since it was hashed never lands."""
    sha = sha256_file(model_file)
    dest = blob_path(registry_dir, sha)
    if not dest.exists():
        copied = hashlib.sha256()
        with open(model_file, "rb") as src, atomic_writer(dest) as out:
            while chunk := src.read(_CHUNK):
                copied.update(chunk)
                out.write(chunk)
            if copied.hexdigest() != sha:
                raise RegistryError(f"{model_file} changed while it was being stored; "
                                    "run the command again")
    return sha, dest


def set_production(registry_dir: str | Path, pointer: Pointer) -> None:
    """Write the pointer: one atomic rename. Refuses a pointer to a missing or altered blob."""
    verify(blob_path(registry_dir, pointer.sha256), pointer.sha256)
    atomic_write_json(Path(registry_dir) / POINTER, pointer.to_json())


_held = threading.local()


@contextlib.contextmanager
def lock(registry_dir: str | Path) -> Iterator[None]:
    """Serialises writers of the registry; waits for the holder (registry writes take
    milliseconds, a reviewer command's Label Studio sync seconds). Re-entrant within a thread. On entry, temp files a killed writer left in
    the registry are removed: every writer holds this lock, so none of them is in use."""
    registry_dir = Path(registry_dir).resolve()
    held = getattr(_held, "paths", None)
    if held is None:
        held = _held.paths = set()
    if registry_dir in held:
        yield
        return
    with exclusive(registry_dir / ".lock", wait=True):
        held.add(registry_dir)
        try:
            clean_stale_tmp(registry_dir, older_than_s=0)
            clean_stale_tmp(registry_dir / BLOBS, older_than_s=0)
            yield
        finally:
            held.discard(registry_dir)


def next_id(registry_dir: str | Path, sha256: str) -> str:
    n = sum(1 for e in ledger(registry_dir) if isinstance(e, Candidate)) + 1
    return f"m{n:04d}-{sha256[:10]}"


def candidates(registry_dir: str | Path) -> dict[str, Candidate]:
    """id -> the candidate's ledger record (what the gate saw)."""
    return {e.id: e for e in ledger(registry_dir) if isinstance(e, Candidate)}


# -- operations: plan, commit the plan, apply it ----------------------------------------------

def line(event: LedgerEvent) -> dict:
    """A plan step: append `event` to the ledger."""
    return {"ledger": event}


def pointer_step(pointer: Pointer) -> dict:
    """A plan step: make `pointer` the production pointer."""
    return {"pointer": pointer}


def _apply(registry_dir: Path, plan: dict) -> None:
    """Make the plan's writes (JSON, as pending.json holds them) that are not made yet, in
    order. Idempotent."""
    written = sum(1 for e in ledger(registry_dir) if e.op == plan["op"])
    n = 0
    try:
        for step in plan["steps"]:
            if "pointer" in step:
                pointer = Pointer.from_json(step["pointer"], source=str(registry_dir / PENDING))
                if production(registry_dir) != pointer:
                    set_production(registry_dir, pointer)
            else:
                if n >= written:
                    event = LedgerEvent.from_json(step["ledger"],
                                                  source=str(registry_dir / PENDING))
                    append_jsonl(registry_dir / LEDGER, [event.to_json()])
                n += 1
    except RecordError as exc:
        raise _damaged(exc) from None


def _drop(registry_dir: Path, plan: dict) -> None:
    if (pending(registry_dir) or {}).get("op") == plan["op"]:
        os.unlink(registry_dir / PENDING)


def reconcile(registry_dir: str | Path) -> dict | None:
    """Complete what a killed command left (call with the lock held): the writes of its plan
    are made; its plan stays in pending.json only while it still owes its follow-up (`then`),
    so that a re-run of that command runs the follow-up instead of acting again. Returns the
    plan completed, or None. Registries written before plans existed: a pointer renamed
    without its ledger line gets the line, marked `recovered`."""
    registry_dir = Path(registry_dir)
    plan = pending(registry_dir)
    if plan is not None:
        _apply(registry_dir, plan)
        if not plan.get("then"):
            _drop(registry_dir, plan)
        return plan
    pointer = production(registry_dir)
    if pointer is None:
        return None
    last = next((e for e in reversed(ledger(registry_dir))
                 if isinstance(e, ProductionChange)), None)
    if last and last.pointer.id == pointer.id and last.pointer.since == pointer.since:
        return None
    event = "rolled_back" if pointer.via == "rollback" else "promoted"
    append_jsonl(registry_dir / LEDGER, [ProductionChange(
        event=event, at=utc_now(), pointer=pointer, recovered=True).to_json()])
    return None


Planner = Callable[[str], tuple[list[dict], dict]]


def operation(registry_dir: str | Path, key: list, planner: Planner, *,
              then: Callable[[], object] | None = None) -> dict:
    """Run one registry command as a plan (see the module docstring).

    `key`: the command and the arguments that decide what it does (`["rollback", to]`); a
    pending plan with the same key is this command's own interrupted run. `planner(at)`, called
    under the lock after any earlier plan is complete, returns (steps, result): the steps
    (`line(event)`, `pointer_step(pointer)`; none: nothing to do) and what the command returns
    (JSON: the plan keeps it, so a re-run returns the same); it may raise RegistryError. `then`: run after the writes, before the plan is removed, when the
    plan changed production (or took over a follow-up a killed command still owed); a crash in
    it leaves the plan pending, and the re-run runs it again. The lock is held throughout, so
    a pending plan seen under it is always one whose process died. Returns the result, with
    `resumed: True` when it finished an interrupted run instead of acting anew."""
    registry_dir = Path(registry_dir)
    with lock(registry_dir):
        left = reconcile(registry_dir)
        if left is not None and left["key"] == key:
            plan, resumed = left, True
        else:
            at = utc_now()
            steps, result = planner(at)
            if not steps:
                return result
            n = len(ledger(registry_dir))
            op = f"{key[0]}@{n}"  # unique: every plan appends at least one ledger line
            steps = [{"ledger": stamped(s["ledger"], at=at, op=op).to_json()} if "ledger" in s
                     else {"pointer": s["pointer"].to_json()} for s in steps]
            owes = then is not None and (any("pointer" in s for s in steps)
                                         or bool(left and left.get("then")))
            plan = {"op": op, "key": key, "at": at, "steps": steps, "result": result,
                    "then": owes}
            atomic_write_json(registry_dir / PENDING, plan)  # the commit point
            _apply(registry_dir, plan)
            resumed = False
        if plan["then"] and then is not None:
            # still under the lock: a second command waits for it rather than taking this
            # plan for an interrupted one (Label Studio syncs take seconds, rarely minutes)
            then()
        _drop(registry_dir, plan)
    return {**plan["result"], "resumed": True} if resumed else plan["result"]


# -- the commands ---------------------------------------------------------------------------

def production_pointer(record: Mapping, *, at: str, via: str, previous: str | None,
                       **extra: str | None) -> Pointer:
    """The pointer to `record` (a Candidate, the pointer of an earlier ProductionChange, or any
    mapping with id, sha256, dataset_version, eval_hash, metrics) from `at` on. `extra`:
    rolled_back_from, reason, reviewer."""
    return Pointer(id=record["id"], sha256=record["sha256"],
                   dataset_version=record.get("dataset_version"),
                   eval_hash=record.get("eval_hash"), metrics=record.get("metrics") or {},
                   since=at, previous=previous, via=via, **extra)


def make_production(registry_dir: str | Path, record: Mapping, *, event: str = "promoted",
                    via: str, previous: str | None, then: Callable[[], object] | None = None,
                    **extra: str | None) -> dict:
    """Point production at `record` (a stored model: id, sha256, ...) and record it: the
    pointer rename, then its ledger line. For tools and tests; commands use their own plans.
    Returns the pointer's JSON."""
    def plan(at: str) -> tuple[list[dict], dict]:
        pointer = production_pointer(record, at=at, via=via, previous=previous, **extra)
        return ([pointer_step(pointer), line(ProductionChange(event=event, at=at,
                                                              pointer=pointer))],
                pointer.to_json())
    return operation(registry_dir, ["make_production", record["id"], via], plan, then=then)


def rollback(registry_dir: str | Path, *, to: str | None = None, reason: str = "",
             reviewer: str | None = None, then: Callable[[], object] | None = None) -> dict:
    """Point production back at an earlier production model (default: the one before it).
    Returns the new pointer's JSON."""
    def plan(at: str) -> tuple[list[dict], dict]:
        target_id = to
        current = production(registry_dir)
        if current is None:
            raise RegistryError("no production model to roll back from")
        if target_id is None:
            target_id = current.previous
            if not target_id:
                raise RegistryError(f"{current.id} has no previous production model")
        if target_id == current.id:
            raise RegistryError(f"{target_id} is already the production model")
        target = next((e.pointer for e in reversed(ledger(registry_dir))
                       if isinstance(e, ProductionChange) and e.id == target_id), None)
        if target is None:
            raise RegistryError(f"{target_id} was never a production model; see "
                                "`labelgate history`")
        verify(blob_path(registry_dir, target.sha256), target.sha256)
        # `previous` is the target's own predecessor, so a second rollback goes further back
        # instead of toggling between two models.
        pointer = production_pointer(target, at=at, via="rollback", previous=target.previous,
                                     rolled_back_from=current.id, reason=reason,
                                     reviewer=reviewer)
        return ([pointer_step(pointer),
                 line(ProductionChange(event="rolled_back", at=at, pointer=pointer))],
                pointer.to_json())
    return operation(registry_dir, ["rollback", to], plan, then=then)


def approve(registry_dir: str | Path, model_id: str, *, reason: str, reviewer: str,
            override_fail: bool = False, then: Callable[[], object] | None = None) -> dict:
    """A reviewer makes a gated candidate production (INCONCLUSIVE ones, or a FAIL with
    `override_fail`). Refused when production was judged on another eval set since. Returns
    the new pointer's JSON."""
    def plan(at: str) -> tuple[list[dict], dict]:
        record = candidates(registry_dir).get(model_id)
        if record is None:
            raise RegistryError(f"no candidate {model_id!r} in the ledger; see "
                                "`labelgate history`")
        current = production(registry_dir)
        if current and current.id == model_id:
            raise RegistryError(f"{model_id} is already the production model")
        if record.verdict == FAIL and not override_fail:
            raise RegistryError(f"{model_id} FAILED the gate ({', '.join(record.failed())}); "
                                "approving it anyway needs --override-fail (recorded in the "
                                "ledger)")
        if current and current.eval_hash != record.eval_hash:
            raise RegistryError(f"{model_id} was gated on eval set {record.eval_hash[:12]}, "
                                f"production is judged on {str(current.eval_hash)[:12]}"
                                ": run the pipeline again to gate it on the current set")
        verify(blob_path(registry_dir, record.sha256), record.sha256)
        pointer = production_pointer(record, at=at, via="approved",
                                     previous=current.id if current else None,
                                     reviewer=reviewer, reason=reason)
        steps = [line(Approved(at=at, id=model_id, reviewer=reviewer, reason=reason,
                               verdict=record.verdict, override_fail=bool(override_fail))),
                 pointer_step(pointer),
                 line(ProductionChange(event="promoted", at=at, pointer=pointer))]
        return steps, pointer.to_json()
    return operation(registry_dir, ["approve", model_id], plan, then=then)


def reject(registry_dir: str | Path, model_id: str, *, reason: str, reviewer: str,
           then: Callable[[], object] | None = None) -> dict:
    """A reviewer turns a candidate down (it can no longer be approved by mistake). Returns the
    ledger event's JSON."""
    def plan(at: str) -> tuple[list[dict], dict]:
        if model_id not in candidates(registry_dir):
            raise RegistryError(f"no candidate {model_id!r} in the ledger; see "
                                "`labelgate history`")
        current = production(registry_dir)
        if current and current.id == model_id:
            raise RegistryError(f"{model_id} is the production model: use `labelgate rollback`")
        event = Rejected(at=at, id=model_id, by="reviewer", reviewer=reviewer, reason=reason)
        return [line(event)], event.to_json()
    return operation(registry_dir, ["reject", model_id], plan, then=then)


def rebaseline(registry_dir: str | Path, *, eval_hash: str, accuracy: float, reason: str,
               reviewer: str, then: Callable[[], object] | None = None) -> dict:
    """Production judged again on a new fixed eval set: the pointer's eval hash and accuracy
    change (atomically), the ledger says why and who. Returns the ledger event's JSON."""
    def plan(at: str) -> tuple[list[dict], dict]:
        current = production(registry_dir)
        if current is None:
            raise RegistryError("no production model to re-baseline")
        pointer = dataclasses.replace(current, eval_hash=eval_hash,
                                      metrics={**current.metrics, "eval_accuracy": accuracy})
        event = Rebaselined(at=at, id=current.id, old_eval_hash=current.eval_hash,
                            eval_hash=eval_hash, eval_accuracy=accuracy, reason=reason,
                            reviewer=reviewer, since=current.since)
        return [pointer_step(pointer), line(event)], event.to_json()
    return operation(registry_dir, ["rebaseline", eval_hash], plan, then=then)
