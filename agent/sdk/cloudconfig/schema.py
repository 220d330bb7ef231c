"""A ``#cloud-config`` document checked against cloud-init's own JSON schema.

The schema is the one Debian 12's cloud-init ships (``schemas/``, refreshed by
``scripts/fetch-cloud-init-schema.sh``; see ``schemas/SOURCE`` for its version and licence),
the same cloud-init the Debian image runs, so what passes here is what that guest applies.
It is checked as cloud-init checks it: JSON Schema draft 4 with format checks, a YAML
``!!binary`` value counting as a string.

Schema errors are only warnings in the guest's log (the module then fails or does half its
work); here they fail the create. Two more are errors here, with the closest known key as a
hint: a top-level key no module reads (cloud-init ignores it without a word), and an unknown
key in a section whose schema lists every key it allows. Each error names the document's line, the
path of the value (``users[0].lock_passwd``) and the reason.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

SCHEMA_FILE = Path(__file__).parent / "schemas" / "schema-cloud-config-v1.json"
MODULES_DOC = "https://cloudinit.readthedocs.io/en/latest/reference/modules.html"
# Top-level keys cloud-init's base configuration, datasources and mergers read that its
# 22.4 schema does not describe (newer cloud-init describes some of them).
UNDESCRIBED_KEYS = frozenset(
    """
    apt_get_command apt_get_upgrade_subcommand apt_get_wrapper create_hostname_file datasource
    datasource_list merge_how merge_type output system_info ubuntu_pro
    """.split()
)
TYPE_WORDS = {"array": "a list", "object": "a mapping", "string": "a string", "boolean": "a boolean",
              "integer": "an integer", "number": "a number", "null": "null"}


class SchemaError(ValueError):
    """What is wrong with a cloud-config: its (1-based) line, the value's path and the reason."""

    def __init__(self, line: int, reason: str):
        super().__init__(f"line {line}: {reason}")


def check(node: yaml.MappingNode, data: dict[str, Any]) -> None:
    """Raise SchemaError for the first problem of the cloud-config ``data`` (composed as ``node``)."""
    known = known_keys()
    for key_node, _ in node.value:
        key = str(key_node.value)
        if key not in known:
            raise SchemaError(key_node.start_mark.line + 1,
                              f"unknown cloud-config key {key!r}{_closest(key, known)}; see {MODULES_DOC}")
    problems = sorted({_explain(error) for error in _validator().iter_errors(data)},
                      key=lambda problem: (_line(node, problem[0]), [str(part) for part in problem[0]], problem[1]))
    if problems:
        path, reason = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SchemaError(_line(node, path), f"{_path(path)}: {reason}{more}")


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def known_keys() -> frozenset[str]:
    """Every top-level key the schema describes, and the ones it reads without describing."""
    defs = schema()["$defs"]
    described = {key for part in schema()["allOf"] for key in defs[part["$ref"].rsplit("/", 1)[1]].get("properties", {})}
    return frozenset(described) | UNDESCRIBED_KEYS


@functools.cache
def _validator() -> Any:
    # Imported on the first seed only: jsonschema and the 130 kB schema are not worth keeping
    # in an agent that never seeds an instance.
    import jsonschema

    base = jsonschema.Draft4Validator
    string = base.TYPE_CHECKER.redefine("string", lambda _checker, value: isinstance(value, str | bytes))
    cls = jsonschema.validators.extend(base, type_checker=string)
    return cls(schema(), format_checker=jsonschema.FormatChecker())


def _explain(error: Any) -> tuple[tuple[Any, ...], str]:
    """The path and reason of one error. A value that matches none of a oneOf/anyOf's choices
    is explained by the choice it came closest to (the deepest error, and at equal depth one
    that is not about the value's type: an entry of ``users`` that is a mapping fails as a
    mapping, not as a string); when every choice wanted another type, by the types."""
    if not error.context:
        unknown = _unknown_key(error)
        if unknown is not None:
            allowed = error.schema.get("properties", {})
            return (*error.absolute_path, unknown), f"unknown key{_closest(unknown, allowed)}"
        return tuple(error.absolute_path), _reason(error)
    depth = max(len(sub.absolute_path) for sub in error.context)
    deepest = [sub for sub in error.context if len(sub.absolute_path) == depth]
    closest = next((sub for sub in deepest if sub.validator != "type" and (sub.context or sub.validator not in (
        "oneOf", "anyOf"))), None)
    if closest is not None:
        return _explain(closest)
    if depth == len(error.absolute_path):
        # The value itself has none of the choices' types: name the types the choices declare
        # (which of their errors a jsonschema release reports differs).
        choices = error.validator_value if isinstance(error.validator_value, list) else []
        types = [kind for choice in choices if isinstance(choice, dict) for kind in _listed(choice.get("type", []))]
    else:
        types = [kind for sub in deepest if sub.validator == "type" for kind in _listed(sub.validator_value)]
    if types:
        return tuple(deepest[0].absolute_path), _wrong_type(types, deepest[0].instance)
    return tuple(error.absolute_path), error.message


def _reason(error: Any) -> str:
    value = error.instance
    if error.validator == "type":
        return _wrong_type(_listed(error.validator_value), value)
    if error.validator == "required":
        missing = [key for key in error.validator_value if key not in value]
        return f"missing the required key {missing[0]!r}"
    if error.validator == "enum":
        return f"{_show(value)} is not one of {', '.join(map(repr, error.validator_value))}"
    return error.message


def _unknown_key(error: Any) -> str | None:
    """The first key a section that lists all its keys does not allow, if that is the error."""
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict) \
            or error.schema.get("patternProperties"):
        return None
    allowed = error.schema.get("properties", {})
    return next((str(key) for key in error.instance if key not in allowed), None)


def _wrong_type(wanted: list[str], value: Any) -> str:
    words = list(dict.fromkeys(TYPE_WORDS.get(kind, kind) for kind in wanted))
    return f"must be {' or '.join(words)}, not {_kind(value)} ({_show(value)})"


def _listed(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def _closest(key: str, known: Iterable[str]) -> str:
    import difflib  # only for a bad key's suggestion: not in every idle agent (~0.2 MB)

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _kind(value: Any) -> str:
    for kind, types in (("a boolean", bool), ("a string", str | bytes), ("an integer", int), ("a number", float),
                        ("a list", list), ("a mapping", dict)):
        if isinstance(value, types):
            return kind
    return "null"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "(the document)"


def _line(node: yaml.Node, path: Iterable[Any]) -> int:
    """The 1-based line of the key or list entry at ``path`` in the composed document (or of
    its nearest parent)."""
    line = node.start_mark.line
    for part in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((key, value) for key, value in node.value if key.value == str(part)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1
