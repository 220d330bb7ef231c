"""kumoctl: its parsing helpers, then the real console script against the real controller."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller import kumoctl


def run_kumoctl(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed ``kumoctl`` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("kumoctl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "controller.kumoctl"]
    environment = {k: v for k, v in os.environ.items() if k != kumoctl.CONFIG_ENV}
    environment.update(env or {})
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(  # noqa: S603 - fixed argument list
        [*command, *args], capture_output=True, text=True, timeout=60, env=environment, check=False
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Non-zero exit, one message on stderr naming ``phrases``, nothing on stdout, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("kumoctl: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert result.stdout == ""


# --- helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1W", 604800),
    ],
)
def test_durations(text, seconds):
    assert kumoctl.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "m", "0", "0m", "-5", "1.5h"])
def test_bad_durations_are_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        kumoctl.parse_duration(text)


def test_options_are_json_when_they_parse_else_strings():
    assert kumoctl.option_pair("disk_gib=10") == ("disk_gib", 10)
    assert kumoctl.option_pair("nested=true") == ("nested", True)
    assert kumoctl.option_pair("cpu_model=host-passthrough") == ("cpu_model", "host-passthrough")
    assert kumoctl.option_pair("cmdline=a=b") == ("cmdline", "a=b")
    with pytest.raises(argparse.ArgumentTypeError):
        kumoctl.option_pair("novalue")


def test_ago():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert kumoctl.ago("2026-01-01T11:59:55Z", now) == "5s ago"
    assert kumoctl.ago("2026-01-01T11:58:00+00:00", now) == "2m ago"
    assert kumoctl.ago("2026-01-01T09:00:00", now) == "3h ago"
    assert kumoctl.ago(None, now) == "never"
    assert kumoctl.ago("yesterday", now) == "yesterday"


def test_every_command_and_subcommand_has_help(capsys):
    commands = {
        "token": ["create"],
        "nodes": ["list", "show", "drain", "undrain", "remove"],
        "tasks": ["list", "show"],
        "instances": ["create", "list", "show", "start", "stop", "delete", "console"],
    }
    for group, leaves in commands.items():
        for argv in ([group, "--help"], *([group, leaf, "--help"] for leaf in leaves)):
            with pytest.raises(SystemExit) as exit_info:
                kumoctl.main(argv)
            assert exit_info.value.code == 0, argv
            assert "usage: kumoctl" in capsys.readouterr().out


def test_usage_errors_exit_2_without_traceback():
    result = run_kumoctl("nodes", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr
    result = run_kumoctl("token", "create", "--ttl", "soon")
    assert result.returncode == 2
    assert "not a duration" in result.stderr


# --- configuration errors (no controller needed) ------------------------------------------


def test_missing_config_file(tmp_path):
    result = run_kumoctl("nodes", "list", config=tmp_path / "nope.yaml")
    assert_clean_failure(result, "nope.yaml", "does not exist")


def test_missing_config_from_the_environment(tmp_path):
    result = run_kumoctl("nodes", "list", env={"KUMOCTL_CONFIG": str(tmp_path / "env.yaml")})
    assert_clean_failure(result, "env.yaml", "$KUMOCTL_CONFIG")


def test_no_config_anywhere(tmp_path):
    result = subprocess.run(  # noqa: S603 - fixed argument list
        [sys.executable, "-m", "controller.kumoctl", "nodes", "list"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            "HOME": str(tmp_path),
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(Path(kumoctl.__file__).parents[1]),
        },
        check=False,
    )
    assert_clean_failure(result, "no kumoctl config found", "KUMOCTL_CONFIG")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("controller: [unclosed", "invalid YAML"),
        ("- a list\n", "expected a mapping"),
        ("controller: https://h:1\nca: a\ncert: b\n", "key: expected a non-empty string"),
        ("controller: http://h:1\nca: a\ncert: b\nkey: c\n", "expected an https://HOST:PORT URL"),
        ("controller: https://h:1\nca: a\ncert: b\nkey: c\ncolour: red\n", "unknown key 'colour'"),
        ("controller: https://h:1\nca: a\ncert: b\nkey: c\n", "ca: cannot load"),
    ],
)
def test_bad_config_files(tmp_path, text, phrase):
    config = tmp_path / "kumoctl.yaml"
    config.write_text(text)
    assert_clean_failure(run_kumoctl("nodes", "list", config=config), str(config), phrase)
