"""The registry mirrored on the DVC remote, and that remote's filesystem (DVC's own).

Data, eval set and model travel to the remote with `dvc push` (pipelines/lineage.py). What DVC
does not carry is the registry: its ledger (which MODEL_ID was built from which commit, with
which sha256) and the production pointer live in models/registry/, outside git and DVC,
because approve/reject/rollback append to them between runs. A fresh clone therefore had no way
from MODEL_ID to a commit. So the registry is mirrored beside DVC's objects:

    <remote url>/files/md5/xx/...                  DVC's objects: data, eval set, every model
    <remote url>/labelgate/registry/ledger.jsonl    the ledger, byte for byte
    <remote url>/labelgate/registry/production.json the pointer, byte for byte

One copy of each fact: the workspace's registry is the only one written; the mirror is its
bytes, replaced whole by `publish` and only read elsewhere (`labelgate checkout` in a clone reads
a candidate's line from it and never writes a registry of its own). Model bytes are stored
once, as DVC's object under their md5 — the object `dvc push` of the train stage already put
there; `publish` uploads a registry blob only when that object is missing (a model built before
the remote was added). Order of writes: models, then the ledger, then the pointer, each one PUT
(atomic in S3): a reader who reads the pointer first, then the ledger, never sees a pointer to
a model whose line or bytes are not there. The ledger is append-only, so the mirror must be a
prefix of the local ledger: anything else means a second workspace publishes to the same
remote, and `publish` refuses rather than overwrite its history.

The remote is opened with DVC's own filesystem (its config: url, endpointurl, region,
profile; credentials from the environment or .dvc/config.local), so every remote type DVC
knows works and there is one definition of "the remote".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipelines import dvcrepo, lineage, registry
from pipelines.files import exclusive, sha256_file
from pipelines.layout import Layout
from pipelines.records import Candidate, LedgerEvent, Pointer, RecordError

MIRROR = ("labelgate", "registry")  # under the remote's URL
ATTEMPTS, BACKOFF_S = 3, 2.0        # a transient fault: 3 tries, 2 s then 4 s apart


class RemoteError(lineage.LineageError):
    """The remote refused, lacks something, or did not answer (`transient`: worth retrying)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class RemoteInfo:
    name: str
    url: str
    endpoint: str | None   # endpointurl in DVC's config (None: AWS S3)


@dataclass(frozen=True)
class Published:
    remote: str
    ledger_lines: int        # lines in the mirror now
    appended: int            # of which this call uploaded
    production: str | None   # the pointer's model id in the mirror
    models_uploaded: tuple[str, ...]   # registry blobs DVC had not pushed (md5s)
    seconds: float


def configured(layout: Layout) -> RemoteInfo | None:
    """The remote labelgate pushes to (the default one, or the only one), or None."""
    config, default = dvcrepo.remote_config(layout.root)
    name = lineage.remote_name(layout, seen=(list(config), default))
    if name is None:
        return None
    options = config.get(name, {})
    return RemoteInfo(name, options.get("url", ""), options.get("endpointurl") or None)


# -- the remote's filesystem ------------------------------------------------------------------

class _Mirror:
    def __init__(self, remote, cache) -> None:
        self.remote, self.fs, self.cache = remote, remote.fs, cache  # cache: the local odb

    def path(self, name: str) -> str:
        return self.fs.join(self.remote.path, *MIRROR, name)

    def read(self, name: str) -> bytes | None:
        try:
            return _retry(lambda: self.fs.cat_file(self.path(name)), f"read {name}")
        except FileNotFoundError:
            return None

    def _into(self, path: str) -> str:
        # a local-folder remote needs the folder (S3 has none: a no-op there)
        self.fs.makedirs(self.fs.parent(path), exist_ok=True)
        return path

    def write(self, name: str, data: bytes) -> None:
        _retry(lambda: self.fs.pipe_file(self._into(self.path(name)), data), f"write {name}")

    def has_object(self, md5: str) -> bool:
        return _retry(lambda: self.remote.odb.exists(md5), f"look up object {md5}")

    def put_object(self, md5: str, path: Path) -> None:
        _retry(lambda: self.fs.put_file(str(path), self._into(self.remote.odb.oid_to_path(md5))),
               f"upload object {md5}")


@contextlib.contextmanager
def open_remote(layout: Layout, name: str) -> Iterator[_Mirror]:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    try:
        with Repo(str(layout.root)) as repo:
            yield _Mirror(repo.cloud.get_remote(name), repo.cache.local)
    except DvcException as exc:
        raise RemoteError(f"DVC remote {name!r}: {exc}") from exc


def _retry(call, what: str):
    """`call()` with transient faults retried; any other error -> RemoteError saying what."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except FileNotFoundError:
            raise
        except PermissionError as exc:
            raise RemoteError(f"the remote refused to {what} ({exc}): check the credentials "
                              "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile) and "
                              "the bucket's policy") from None
        except Exception as exc:  # botocore/aiohttp/fsspec errors: classified by their text
            text = f"{type(exc).__name__}: {exc}"
            if not dvcrepo.transient(text):
                raise RemoteError(f"could not {what} on the remote: {text[:300]}") from None
            if attempt == ATTEMPTS:
                raise RemoteError(f"could not {what}: the remote did not answer {ATTEMPTS} "
                                  f"attempts ({text[:300]}); check the endpoint and that the "
                                  "server is up", transient=True) from None
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def _upload_model(mirror: _Mirror, reg: Path, sha: str) -> str | None:
    """Put registry blob `sha` on the remote as DVC's object (its md5) unless it is there;
    returns the md5 uploaded, or None."""
    blob = registry.blob_path(reg, sha)
    if not blob.exists():
        return None  # nothing to send from here; a checkout elsewhere names what is missing
    md5 = _md5(blob)
    if mirror.has_object(md5):
        return None
    if sha256_file(blob) != sha:
        raise RemoteError(f"registry blob {blob} does not match its sha256: not published "
                          "(restore it with `labelgate checkout`)")
    mirror.put_object(md5, blob)
    return md5


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- the registry's mirror --------------------------------------------------------------------

def publish(layout: Layout) -> Published | None:
    """Mirror the registry to the default remote (None when there is none): the models its
    new lines name that the remote lacks, then the ledger, then the pointer. Call after every
    registry change; idempotent, cheap when nothing changed (two reads)."""
    info = configured(layout)
    if info is None:
        return None
    started = time.monotonic()
    reg = layout.registry
    # publishers one at a time (a flow's and a reviewer command's), each sending the registry as
    # it is once it holds this lock; the registry lock is held only to read it (a network fault
    # must not keep reviewers waiting)
    with exclusive(layout.state / "publish.lock", wait=True):
        ledger, pointer, events, prod = b"", None, [], None   # no registry here (a clone)
        if reg.is_dir():
            with registry.lock(reg):
                registry.reconcile(reg)   # a killed command's plan is finished: whole ops
                ledger = _bytes(reg / registry.LEDGER) or b""
                pointer = _bytes(reg / registry.POINTER)
                events = registry.ledger(reg)
                prod = registry.production(reg)
        with open_remote(layout, info.name) as mirror:
            theirs = mirror.read(registry.LEDGER) or b""
            if not ledger.startswith(theirs):
                raise RemoteError(
                    f"the registry on DVC remote {info.name!r} ({info.url}) holds ledger lines "
                    "this workspace does not have: another workspace publishes there. One "
                    "workspace owns a remote's registry: give this one its own remote (or "
                    "prefix)")
            new = ledger[len(theirs):]
            shas = {e.sha256 for e in events[theirs.count(b"\n"):] if isinstance(e, Candidate)}
            if prod is not None:
                shas.add(prod.sha256)
            uploaded = [md5 for sha in sorted(shas) if (md5 := _upload_model(mirror, reg, sha))]
            if new:
                mirror.write(registry.LEDGER, ledger)
            if pointer is not None and mirror.read(registry.POINTER) != pointer:
                mirror.write(registry.POINTER, pointer)
    return Published(remote=info.name, ledger_lines=ledger.count(b"\n"),
                     appended=new.count(b"\n"), production=prod.id if prod else None,
                     models_uploaded=tuple(uploaded),
                     seconds=round(time.monotonic() - started, 3))


@dataclass(frozen=True)
class Mirrored:
    """The registry as the remote holds it (read-only)."""
    remote: str
    events: tuple[LedgerEvent, ...]
    production: Pointer | None

    def candidate(self, model_id: str) -> Candidate | None:
        return next((e for e in self.events if isinstance(e, Candidate) and e.id == model_id),
                    None)


def read(layout: Layout, info: RemoteInfo) -> Mirrored | None:
    """The registry mirrored on remote `info` (`configured(layout)`); None when nothing was
    published there. The pointer is read before the ledger (see the module docstring)."""
    with open_remote(layout, info.name) as mirror:
        pointer_bytes = mirror.read(registry.POINTER)
        ledger_bytes = mirror.read(registry.LEDGER)
        where = mirror.path(registry.LEDGER)
    if ledger_bytes is None:
        return None
    try:
        events = tuple(LedgerEvent.from_json(json.loads(row), source=f"{where}, entry {n}")
                       for n, row in enumerate(ledger_bytes.decode().splitlines(), 1)
                       if row.strip())
        pointer = (Pointer.from_json(json.loads(pointer_bytes), source=where)
                   if pointer_bytes else None)
    except (RecordError, ValueError) as exc:
        raise RemoteError(f"the registry mirrored on DVC remote {info.name!r} is damaged: "
                          f"{str(exc)[:300]} (run `labelgate remote push` in the workspace "
                          "that owns it)") from None
    return Mirrored(remote=info.name, events=events, production=pointer)




def missing_objects(layout: Layout, name: str, outs: dict[str, str]) -> list[tuple[str, str]]:
    """[(path, md5)] of the files `outs` ({out path: md5 as dvc.lock / a .dvc file records it;
    a folder's ends in .dir}) that DVC remote `name` lacks: a folder's listing when that is
    missing, else each of its files that is. What `dvc fetch` does not say: it stops at the
    first missing object ("unexpected error") without naming its file."""
    with open_remote(layout, name) as mirror:
        odb = mirror.remote.odb
        wanted: dict[str, str] = {}
        for path, md5 in outs.items():
            wanted[md5] = path
            if md5.endswith(".dir") and mirror.has_object(md5):
                listing = json.loads(_retry(lambda m=md5: mirror.fs.cat_file(odb.oid_to_path(m)),
                                            f"read folder listing {md5}"))
                wanted.update({e["md5"]: f"{path}/{e['relpath']}" for e in listing})
        there = set(_retry(lambda: list(odb.oids_exist(list(wanted))), "list objects"))
    return [(path, md5) for md5, path in wanted.items() if md5 not in there]


def repair(layout: Layout, name: str, outs: dict[str, str]) -> list[tuple[str, str]]:
    """Upload the objects of `outs` that remote `name` lacks and the local DVC cache has
    (`dvc push` does not: a folder whose listing is there counts as pushed). Returns the
    [(path, md5)] uploaded."""
    missing = missing_objects(layout, name, outs)
    done = []
    with open_remote(layout, name) as mirror:
        for path, md5 in missing:
            local = mirror.cache.oid_to_path(md5)
            if mirror.cache.fs.exists(local):
                mirror.put_object(md5, Path(local))
                done.append((path, md5))
    return done
