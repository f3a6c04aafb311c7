"""A JSON record type: a frozen dataclass whose fields are checked when it is made, with
`to_json` / `from_json` / `read` / `write` and a read-only Mapping view. The records themselves
(evaluation, decision, pointer, ledger events) are in pipelines/records.py.

    @record
    class Pointer(Record):
        STRICT = False                     # unknown keys kept in `extra`, written back
        id: str
        sha256: str = digest()             # 64 lowercase hex digits
        previous: str | None               # required key, may be null
        reviewer: str | None = optional()  # may be absent; not written while None
        extra: Mapping[str, Any] = field(default_factory=dict)

    @record
    class ProductionChange(Record):       # {"event": ..., "at": ..., **pointer}
        event: str
        at: str
        pointer: Pointer = flattened()

Field types checked: str, int, float (finite), bool, Literal[...], X | None, tuple[X, ...],
Mapping[str, X], another Record, and Any (opaque JSON, kept as read). Problems are RecordErrors
naming the file (`source`) and the field's path (`candidate.per_class['7'].recall`).
"""
from __future__ import annotations

import functools
import json
import math
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, Union, get_args, get_origin, get_type_hints

import numpy as np

from pipelines.files import atomic_write_json

SHA256 = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A file or value that does not have the shape its record declares."""

    def __init__(self, problem: str, *, field: str = "", source: str = "") -> None:
        self.problem, self.field, self.source = problem, field, source
        where = f"field '{field}': " if field else ""  # keys inside are repr()s: escaped
        super().__init__(f"{source}: {where}{problem}" if source else f"{where}{problem}")

    def under(self, prefix: str = "", *, source: str = "") -> RecordError:
        """The same problem, seen from an enclosing record (`prefix`) or file (`source`)."""
        name = ".".join(p for p in (prefix, self.field) if p).replace(".[", "[")
        return RecordError(self.problem, field=name, source=source or self.source)


def optional(default: Any = None) -> Any:
    """A field only some records have (a rollback's `rolled_back_from`): defaults, and is not
    written while it has its default (absent and null read alike). A plain default is for
    fields older files lack but every record now has: written always."""
    return field(default=default, metadata={"omit": True})


def digest() -> Any:
    """A required field holding a sha256 (64 lowercase hex digits; null where its type allows).
    Checked because sha256s name files (the registry's blobs)."""
    return field(metadata={"sha256": True})


def flattened() -> Any:
    """A record field whose keys are this record's own keys in JSON (a ledger line that is a
    pointer plus the event's keys): keys this record does not declare go to it."""
    return field(metadata={"flatten": True})


def _kind(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


Check = Callable[[Any, str], Any]  # (value, field path) -> the value, as the record holds it


def _fail(expected: str) -> Check:
    def fail(value: Any, where: str) -> Any:
        raise RecordError(f"expected {expected}, got {_kind(value)}", field=where)
    return fail


@functools.cache
def _checker(tp: Any) -> Check:
    """The check of a value against the type `tp` (JSON shapes in, record types out), built
    once per type: a ledger of thousands of lines is read on every registry command."""
    origin = get_origin(tp)
    if tp is Any:
        return lambda value, where: value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        (inner,) = [a for a in args if a is not type(None)]
        check, nullable = _checker(inner), type(None) in args

        def union(value: Any, where: str) -> Any:
            if value is None and nullable:
                return None
            return check(value, where)
        return union
    if origin is Literal:
        allowed, fail = get_args(tp), _fail(f"one of {', '.join(map(repr, get_args(tp)))}")
        return lambda value, where: (value if isinstance(value, str) and value in allowed
                                     else fail(value, where))
    if tp is str:
        fail = _fail("a string")
        return lambda value, where: value if isinstance(value, str) else fail(value, where)
    if tp is bool:
        fail = _fail("true or false")
        return lambda value, where: (bool(value) if isinstance(value, (bool, np.bool_))
                                     else fail(value, where))
    if tp is int:
        fail = _fail("an integer")
        return lambda value, where: (int(value) if isinstance(value, (int, np.integer))
                                     and not isinstance(value, bool) else fail(value, where))
    if tp is float:
        fail = _fail("a finite number")
        return lambda value, where: (
            float(value) if isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool) and math.isfinite(value) else fail(value, where))
    if origin is tuple:
        (inner, _) = get_args(tp)  # tuple[X, ...]
        check, fail = _checker(inner), _fail("a list")

        def sequence(value: Any, where: str) -> Any:
            if not isinstance(value, (list, tuple)):
                fail(value, where)
            return tuple(check(v, f"{where}[{i}]") for i, v in enumerate(value))
        return sequence
    if origin in (Mapping, dict):
        _, inner = get_args(tp)
        check, fail = (None if inner is Any else _checker(inner)), _fail("a JSON object")

        def mapping(value: Any, where: str) -> Any:
            if not isinstance(value, Mapping):
                fail(value, where)
            if not all(isinstance(k, str) for k in value):
                raise RecordError("expected an object with string keys", field=where)
            if check is None:
                return value
            return {k: check(v, f"{where}[{k!r}]") for k, v in value.items()}
        return mapping
    if isinstance(tp, type) and issubclass(tp, Record):
        return lambda value, where: value if isinstance(value, tp) else tp._from(value, where)
    raise TypeError(f"jsonrecord: no check for type {tp!r}")  # a record declared wrongly


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class _Field:
    name: str
    check: Check
    field: Field
    sha256: bool    # a digest(): 64 lowercase hex digits
    flatten: bool   # a flattened(): its keys are the record's own
    omit: bool      # an optional(): not written while it has its default


_SPECS: dict[type, list[_Field]] = {}


class Record(Mapping):
    """Base of the JSON records: validation, `to_json` / `from_json`, `read` / `write`, and a
    read-only Mapping view of the fields. Subclasses are decorated with `@record`."""
    STRICT: ClassVar[bool] = True  # False: unknown keys are kept in a field named `extra`

    # -- the fields ---------------------------------------------------------------------------

    @classmethod
    def _spec(cls) -> list[_Field]:
        """Every field but `extra`, with its check."""
        if cls not in _SPECS:
            hints = get_type_hints(cls)
            _SPECS[cls] = [_Field(f.name, _checker(hints[f.name]), f,
                                  bool(f.metadata.get("sha256")), bool(f.metadata.get("flatten")),
                                  bool(f.metadata.get("omit")))
                           for f in fields(cls) if f.name != "extra"]
        return _SPECS[cls]

    def __post_init__(self) -> None:
        for f in self._spec():
            value = getattr(self, f.name)
            # a flattened record's keys are the line's own keys: no prefix in errors
            new = f.check(value, "" if f.flatten else f.name)
            if f.sha256 and new is not None and not SHA256.fullmatch(new):
                raise RecordError(f"expected a sha256 (64 lowercase hex digits), got "
                                  f"{_kind(new)}", field=f.name)
            if new is not value:
                object.__setattr__(self, f.name, new)
        if not self.STRICT:
            extra = _checker(Mapping[str, Any])(getattr(self, "extra"), "extra")
            clash = sorted(set(extra) & {f.name for f in self._spec()})
            if clash:
                raise RecordError(f"extra keys {clash} are fields", field="extra")
        self._check()

    def _check(self) -> None:
        """Rules between fields (a subclass's); raise RecordError."""

    @classmethod
    def _upgrade(cls, data: dict) -> dict:
        """An older file's JSON in today's shape (a subclass's; no change by default)."""
        return data

    # -- JSON ---------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: Any, *, source: str = "") -> Self:
        """The record in `data` (parsed JSON), checked; `source` (a file) names it in errors."""
        try:
            return cls._from(data, "")
        except RecordError as exc:
            raise exc.under(source=source) from None

    @classmethod
    def _from(cls, data: Any, where: str) -> Self:
        if not isinstance(data, Mapping):
            raise RecordError(f"expected a JSON object, got {_kind(data)}", field=where)
        data = cls._upgrade(dict(data))
        spec = cls._spec()
        flat = next((f for f in spec if f.flatten), None)
        known = {f.name for f in spec if f is not flat}
        kwargs = {k: v for k, v in data.items() if k in known}
        rest = {k: v for k, v in data.items() if k not in known}
        if flat is not None:
            kwargs[flat.name], rest = rest, {}
        for f in spec:
            if (f.name not in kwargs and f.field.default is MISSING
                    and f.field.default_factory is MISSING):
                raise RecordError("missing", field=".".join(p for p in (where, f.name) if p))
        if rest and cls.STRICT:
            raise RecordError(f"unknown field(s) {', '.join(sorted(rest))} (this version of "
                              f"labelgate does not write them)", field=where)
        if rest:
            kwargs["extra"] = rest
        try:
            return cls(**kwargs)
        except RecordError as exc:
            raise exc.under(where) from None

    def to_json(self) -> dict:
        """The JSON object (the on-disk shape)."""
        out: dict = {}
        for f in self._spec():
            value = getattr(self, f.name)
            if f.omit and value == f.field.default:
                continue
            if f.flatten:
                out.update(value.to_json())
            else:
                out[f.name] = _dump(value)
        if not self.STRICT:
            out.update({k: v for k, v in getattr(self, "extra").items() if k not in out})
        return out

    @classmethod
    def read(cls, path: str | Path) -> Self:
        """The record in the JSON file `path`; any problem is a RecordError naming it."""
        try:
            data = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            raise RecordError("no such file", source=str(path)) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"not valid JSON ({exc})", source=str(path)) from None
        return cls.from_json(data, source=str(path))

    def write(self, path: str | Path) -> Path:
        """Atomically (pipelines.files), as sorted, indented JSON."""
        return atomic_write_json(path, self.to_json())

    # -- the read-only Mapping view -----------------------------------------------------------

    def _parts(self) -> Iterator[Mapping]:
        for f in self._spec():
            if f.flatten:
                yield getattr(self, f.name)
        if not self.STRICT:
            yield getattr(self, "extra")

    def __getitem__(self, key: str) -> Any:
        for f in self._spec():
            if f.name == key and not f.flatten:
                return getattr(self, key)
        for part in self._parts():
            if key in part:
                return part[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for f in self._spec():
            if not f.flatten:
                seen.add(f.name)
                yield f.name
        for part in self._parts():
            for key in part:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


def record(cls):
    """The decorator of every Record subclass: frozen, keyword-only fields."""
    return dataclass(frozen=True, kw_only=True)(cls)
