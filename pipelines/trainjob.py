"""A training job as it travels between machines: typed records and the exchange they travel
through (params.yaml `train.exchange`, s3://BUCKET/PREFIX), never a shared disk.

    PREFIX/blobs/<sha256>            every file, content-addressed: an unchanged split is not
                                     uploaded again, and a reader verifies what it got
    PREFIX/jobs/<job_id>/job.json    TrainJob: the files train reads, by sha256
    PREFIX/jobs/<job_id>/beat.json   Beat: the pool job is alive (rewritten every pool_heartbeat_s)
    PREFIX/jobs/<job_id>/result.json TrainResult: the files train wrote, by sha256

Pure data and transfer; Prefect lives in pipelines/trainpool.py.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines import codestamp
from pipelines.files import sha256_file
from pipelines.objectstore import ObjectRef, ObjectStore, StorageError

RECORD_MAX_BYTES = 1 << 20   # job.json / result.json / beat.json: a few KB; 1 MiB cap
_SHA = re.compile(r"[0-9a-f]{64}")
_JOB_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{12}")
_NAME = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")


class JobError(RuntimeError):
    """A job or result that cannot be used: missing, malformed, or a file whose sha256 is not
    the recorded one. The message says which and what to do."""


@dataclass(frozen=True)
class Blob:
    name: str     # where it goes, relative to the job's folder (posix): "prepared/train/x.npy"
    sha256: str   # of its bytes; also its key under PREFIX/blobs/
    size: int     # bytes; the download cap

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not _NAME.fullmatch(self.name) or ".." in parts or "." in parts:
            raise JobError(f"refused a job file name {self.name[:120]!r} (relative posix "
                           "paths of letters, digits, '.', '-', '_' only)")
        if not _SHA.fullmatch(self.sha256) or not 0 <= self.size < 2**50:
            raise JobError(f"{self.name}: malformed sha256 {self.sha256[:70]!r} or size "
                           f"{self.size}")


@dataclass(frozen=True)
class TrainJob:
    job_id: str            # utc time + random: unique per submission
    stage: str             # the dvc.yaml stage it stands in for ("train")
    inputs: tuple[Blob, ...]   # prepared splits, params.yaml, the init model/weights if any
    params_sections: tuple[str, ...]  # what the stage reads of params.yaml (dvc.yaml `params`)
    init_model_sha256: str | None     # train.init: production -> the production model's sha256
    code_stamp: str        # the stage's code stamp (pipelines/codestamp.py); the pool refuses
                           # to train with other code
    created_at: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> "TrainJob":
        try:
            job = cls(**{**raw, "inputs": tuple(Blob(**b) for b in raw["inputs"]),
                         "params_sections": tuple(raw["params_sections"])})
        except (TypeError, KeyError) as exc:
            raise JobError(f"not a training job record ({exc})") from None
        if not _JOB_ID.fullmatch(str(job.job_id)):
            raise JobError(f"malformed job id {str(job.job_id)[:80]!r}")
        return job

    def blob(self, name: str) -> Blob | None:
        return next((b for b in self.inputs if b.name == name), None)


@dataclass(frozen=True)
class TrainResult:
    job_id: str
    outputs: tuple[Blob, ...]   # model.safetensors, metrics.json, history.csv
    host: str                   # the worker's hostname
    device: str                 # what trained: cuda / cpu (from metrics.json)
    seconds: dict               # {"download", "train", "upload"}: wall-clock seconds on the pool
    finished_at: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object) -> "TrainResult":
        try:
            return cls(**{**raw, "outputs": tuple(Blob(**b) for b in raw["outputs"])})
        except (TypeError, KeyError) as exc:
            raise JobError(f"not a training result record ({exc})") from None


@dataclass(frozen=True)
class Beat:
    job_id: str
    count: int        # rises with every beat: the watcher compares counts, not clocks
    phase: str        # download | train | upload | done | failed
    at: str           # the worker's utc time (shown, never compared)


def check_code(job: TrainJob, stage: str, module: str) -> None:
    """JobError unless this interpreter's code of `stage` (`python -m module`) is the code the
    job was stamped with: the pool trains with the code dvc.lock will name, or not at all."""
    mine = codestamp.stamp(stage, module)
    extra = job.code_stamp[len(mine):] if job.code_stamp.startswith(mine) else None
    if extra is not None and all(line.startswith("#") for line in extra.splitlines()):
        return   # what follows the file list is the warm-start note (the init model travels)
    theirs, ours = set(job.code_stamp.splitlines()), set(mine.splitlines())
    differ = sorted({line.split("  ", 1)[-1] for line in theirs ^ ours
                     if not line.startswith("#")})
    header = (job.code_stamp.splitlines() or [""])[0][:120]
    raise JobError(f"this worker's labelgate code is not the code the run stamped: version "
                   f"{codestamp.version()} here; files that differ: "
                   f"{', '.join(differ[:8]) or 'none'} (stamp header: {header!r}); install the "
                   "same labelgate on the worker as where the run starts")


class Exchange:
    """PREFIX of params.yaml `train.exchange` in the object store (listed bucket only)."""

    def __init__(self, store: ObjectStore, uri: str) -> None:
        self.store = store
        self.root = ObjectRef.parse(uri.rstrip("/") + "/-")   # validates bucket and form
        self.prefix = self.root.key[:-1]                        # "" or "some/prefix/"
        store.check(self.root)

    def ref(self, key: str) -> ObjectRef:
        return ObjectRef(self.root.bucket, self.prefix + key)

    def blob_ref(self, sha256: str) -> ObjectRef:
        return self.ref(f"blobs/{sha256}")

    def job_ref(self, job_id: str, name: str) -> ObjectRef:
        return self.ref(f"jobs/{job_id}/{name}")

    def exists(self, ref: ObjectRef) -> bool:
        return ref.key in self.store.etags(ref.bucket, ref.key)

    def put_json(self, ref: ObjectRef, obj: dict) -> None:
        self.store.put_bytes(ref, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def get_json(self, ref: ObjectRef) -> dict:
        data = self.store.get(ref, max_bytes=RECORD_MAX_BYTES)
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JobError(f"{ref.uri} is not JSON ({exc})") from None

    def upload(self, files: dict[str, Path]) -> tuple[tuple[Blob, ...], dict]:
        """Every file to PREFIX/blobs/<sha256> (skipped when that blob is there already).
        Returns (blobs in `files` order, {"bytes", "uploaded_bytes", "seconds"})."""
        t0, blobs, sent = time.monotonic(), [], 0
        for name, path in files.items():
            blob = Blob(name, sha256_file(path), Path(path).stat().st_size)
            if not self.exists(self.blob_ref(blob.sha256)):
                self.store.put_file(self.blob_ref(blob.sha256), Path(path))
                sent += blob.size
            blobs.append(blob)
        return tuple(blobs), {"bytes": sum(b.size for b in blobs), "uploaded_bytes": sent,
                              "seconds": round(time.monotonic() - t0, 3)}

    def download(self, blobs: tuple[Blob, ...], dest: Path) -> dict:
        """Each blob to `dest`/name, capped at its size and verified against its sha256 (a
        file that does not verify is deleted and named). Returns {"bytes", "seconds"}."""
        t0 = time.monotonic()
        for blob in blobs:
            path = dest / blob.name
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.store.get_file(self.blob_ref(blob.sha256), path, max_bytes=blob.size)
            except StorageError as exc:
                raise JobError(f"cannot fetch {blob.name} ({exc})") from None
            got = sha256_file(path)
            if got != blob.sha256 or path.stat().st_size != blob.size:
                path.unlink()
                raise JobError(f"{blob.name} from {self.blob_ref(blob.sha256).uri} has sha256 "
                               f"{got}, not the recorded {blob.sha256}: the exchange was changed "
                               "or corrupted; delete that object and rerun (the run uploads "
                               "what is missing)")
        return {"bytes": sum(b.size for b in blobs),
                "seconds": round(time.monotonic() - t0, 3)}
