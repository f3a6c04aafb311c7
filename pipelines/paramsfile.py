"""Edits of a params.yaml that keep its comments: one value replaced where it stands.

`labelgate init` fills a workspace's params.yaml in from labelgate's own (every key present,
every comment kept) and `labelgate classes --accept` rewrites base.classes. Values are
untrusted (class names from Label Studio: spaces, slashes, quotes, `#`, unicode), so they are
written by the YAML emitter (strings always double-quoted), placed at the exact position the
YAML parser reports for the old value, and the result is read back and compared before anyone
gets it.
"""
from __future__ import annotations

from collections.abc import Mapping

import yaml


class ParamsEditError(ValueError):
    pass


class _Dumper(yaml.SafeDumper):
    """Flow style on one line; every string double-quoted (never read back as a number, a
    bool or a comment)."""


_Dumper.add_representer(
    str, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"'))


def value_text(value: object) -> str:
    """`value` as YAML flow text on one line: `["leaf spot/blight", "rust"]`, `3`, `true`."""
    # dumped inside a one-item list and unwrapped: a bare scalar document would end in `...`
    text = yaml.dump([value], Dumper=_Dumper, default_flow_style=True, allow_unicode=True,
                     width=1 << 30).strip()
    return text[1:-1]


def _value_node(root: yaml.Node, dotted: str) -> tuple[yaml.Node, yaml.Node]:
    """(key node, value node) of `section.key` in the composed document."""
    node, key_node = root, None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            raise ParamsEditError(f"{dotted}: {part!r} is not inside a mapping")
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == part:
                key_node, node = k, v
                break
        else:
            raise ParamsEditError(f"params.yaml has no key {dotted}")
    return key_node, node


def set_values(text: str, values: Mapping[str, object], *,
               notes: Mapping[str, str] | None = None) -> str:
    """`text` with each dotted key's value replaced (comments and layout kept) and, for each
    section in `notes`, a comment line put under its header. Raises ParamsEditError when a key
    is missing or the result does not read back as asked."""
    edits: list[tuple[int, int, str]] = []
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        raise ParamsEditError("params.yaml is empty")
    for dotted, value in values.items():
        _, node = _value_node(root, dotted)
        edits.append((node.start_mark.index, node.end_mark.index, value_text(value)))
    lines_after: dict[int, str] = {}
    for section, note in (notes or {}).items():
        key_node, _ = _value_node(root, section)
        lines_after[key_node.start_mark.line] = "".join(
            f"  # {line}\n" for line in note.splitlines())
    out = text
    for start, end, new in sorted(edits, reverse=True):   # from the end: indices stay valid
        out = out[:start] + new + out[end:]
    if lines_after:
        lines = out.splitlines(keepends=True)
        for line in sorted(lines_after, reverse=True):   # header lines did not move
            lines.insert(line + 1, lines_after[line])
        out = "".join(lines)
    check(out, values)
    return out


def check(text: str, values: Mapping[str, object]) -> None:
    """The edited text reads back with exactly these values."""
    doc = yaml.safe_load(text)
    for dotted, value in values.items():
        node = doc
        for part in dotted.split("."):
            node = node[part]
        want = list(value) if isinstance(value, tuple) else value
        if node != want:
            raise ParamsEditError(f"{dotted} reads back as {node!r}, not {want!r}")
