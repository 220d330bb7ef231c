"""Config parsing: every error names the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from agent.sdk import ConfigError, load_yaml_file, parse_section


@dataclasses.dataclass
class Inner:
    port: int = 514


@dataclasses.dataclass
class Example:
    name: str
    mode: Literal["fast", "safe"] = "safe"
    ratio: float = 4.0
    tags: list[str] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)
    path: Path | None = None


def test_parses_and_fills_defaults():
    cfg = parse_section(Example, {"name": "x", "ratio": 2, "inner": {"port": 10}, "path": "/a"}, "f: p")
    assert cfg == Example(name="x", ratio=2.0, inner=Inner(port=10), path=Path("/a"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "nmae": 1}, "f: p.nmae: unknown key (allowed keys: inner, mode, name, path, ratio, tags)"),
        ({}, "f: p.name: required key is missing (a string)"),
        ({"name": "x", "mode": "slow"}, "f: p.mode: expected one of 'fast', 'safe', got 'slow'"),
        ({"name": "x", "ratio": "high"}, "f: p.ratio: expected a number, got 'high'"),
        ({"name": "x", "inner": {"port": True}}, "f: p.inner.port: expected an integer, got True"),
        ({"name": "x", "tags": "a"}, "f: p.tags: expected a list, got 'a'"),
        ({"name": "x", "path": 3}, "f: p.path: expected a path or null, got 3"),
    ],
)
def test_errors_name_the_key_and_the_expectation(data, message):
    with pytest.raises(ConfigError) as err:
        parse_section(Example, data, "f: p")
    assert str(err.value) == message


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("state_dir: /x\nplugins: [\n")
    with pytest.raises(ConfigError, match=rf"{path}: line \d+, column \d+: invalid YAML"):
        load_yaml_file(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping of settings at the top, got a list"):
        load_yaml_file(path)
