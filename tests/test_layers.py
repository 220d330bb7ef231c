"""The layers, read from the source with ``ast``: who may import whom, and what must be documented.

- a plugin (``plugins/``) imports the standard library, its declared dependencies, the SDK
  (``agent.sdk``) and modules of its own package: never the rest of the agent, another
  plugin or the controller;
- the agent core (``agent/`` outside ``agent/sdk``) never imports a plugin nor looks one up
  by name, so any plugin may be removed or replaced;
- the SDK imports nothing of the agent outside itself, so it is the whole of what plugin
  authors depend on;
- the controller imports no plugin and, of the agent, only the SDK; its services and store
  import nothing of the HTTP handlers (``controller.api``) or aiohttp.web;
- every TaskError code written in the source is one of ``agent.sdk.ErrorCode``;
- every public name of the SDK and every hook is documented.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.sdk
from agent import hookspecs

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Distributions whose import name is not their project name.
IMPORT_NAMES = {"prometheus-client": "prometheus_client", "pyyaml": "yaml", "libvirt-python": "libvirt"}


def _requirement_name(requirement: str) -> str:
    name = re.split(r"[<>=!~; \[]", requirement, maxsplit=1)[0].lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


DECLARED = {
    _requirement_name(r)
    for r in [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["libvirt"]]
}
BUILTIN_PLUGINS = {*PYPROJECT["project"]["entry-points"]["kumo.plugins"], "host"}


@dataclasses.dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute, relative imports resolved

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}: imports {self.module}"


def sources(*parts: str) -> list[Path]:
    return sorted(p for p in REPO.joinpath(*parts).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = REPO) -> Iterator[Import]:
    """Every module ``path`` imports; ``from X import Y`` counts as X.Y too (Y may be a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield Import(path, node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def top(module: str) -> str:
    return module.split(".")[0]


def plugin_package(path: Path, root: Path = REPO) -> str:
    """``plugins.kvm`` for plugins/kvm/domain.py, ``plugins.process`` for plugins/process.py."""
    first = path.relative_to(root / "plugins").with_suffix("").parts[0]
    return "plugins" if first == "__init__" else f"plugins.{first}"


def test_the_rules_read_imports_as_python_does(tmp_path):
    source = tmp_path / "plugins" / "thing" / "part.py"
    source.parent.mkdir(parents=True)
    source.write_text("import os.path\nfrom . import other\nfrom .. import lxc\nfrom agent.sdk import tail\n")
    assert plugin_package(source, tmp_path) == "plugins.thing"
    assert [i.module for i in imports(source, tmp_path)] == [
        "os.path", "plugins.thing.other", "plugins.lxc", "agent.sdk.tail"]


def test_plugins_import_only_the_sdk_their_own_package_and_declared_dependencies():
    allowed_third_party = DECLARED - {"kumo"}
    wrong = []
    for path in sources("plugins"):
        own = plugin_package(path)
        for imp in imports(path):
            name = top(imp.module)
            if name == "agent":
                ok = within(imp.module, "agent.sdk")
            elif name == "plugins":
                ok = within(imp.module, own)
            else:
                ok = name in sys.stdlib_module_names or name in allowed_third_party or name == "__future__"
            if not ok:
                wrong.append(str(imp))
    assert not wrong, "a plugin may import only agent.sdk, its own package, the standard library and " \
        "the dependencies pyproject.toml declares:\n" + "\n".join(wrong)


def test_the_agent_core_names_no_plugin():
    core = [p for p in sources("agent") if not within(module_name(p), "agent.sdk")]
    assert core
    wrong = [str(i) for p in core for i in imports(p) if top(i.module) in ("plugins", "controller")]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            looked_up = _plugin_lookup(node)
            if looked_up:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno}: looks up the {looked_up!r} plugin by name")
    assert not wrong, "the agent core must work with any set of plugins:\n" + "\n".join(wrong)


def _plugin_lookup(node: ast.AST) -> str | None:
    """The built-in plugin name ``node`` looks up: ``x["kvm"]``, ``x.get("host")``, ``name == "lxc"``."""
    candidates: list[ast.AST] = []
    if isinstance(node, ast.Subscript):
        candidates = [node.slice]
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop"):
        candidates = node.args[:1]
    elif isinstance(node, ast.Compare):
        candidates = [node.left, *node.comparators]
    for candidate in candidates:
        if isinstance(candidate, ast.Constant) and candidate.value in BUILTIN_PLUGINS:
            return candidate.value
    return None


def test_the_sdk_imports_nothing_of_the_agent_outside_itself():
    wrong = [
        str(i)
        for p in sources("agent", "sdk")
        for i in imports(p)
        if top(i.module) in ("plugins", "controller") or (top(i.module) == "agent" and not within(i.module, "agent.sdk"))
    ]
    assert not wrong, "agent.sdk must stand alone (plugins depend on it only):\n" + "\n".join(wrong)


def test_the_controller_imports_no_plugin_and_only_the_sdk_of_the_agent():
    wrong = [
        str(i)
        for p in sources("controller")
        for i in imports(p)
        if top(i.module) == "plugins" or (top(i.module) == "agent" and not within(i.module, "agent.sdk"))
    ]
    assert not wrong, "the controller runs without the agent's core and its plugins:\n" + "\n".join(wrong)


def test_controller_services_and_store_know_nothing_of_http_handlers():
    # Handlers parse, authorise and render; services decide; one path to every action for
    # the API and whatever else calls them.
    wrong = [
        str(i)
        for part in ("services", "store")
        for p in sources("controller", part)
        for i in imports(p)
        if within(i.module, "controller.api") or within(i.module, "aiohttp.web")
    ]
    assert not wrong, "services and the store must not depend on the HTTP layer:\n" + "\n".join(wrong)


def _written_codes(path: Path) -> Iterator[tuple[int, object]]:
    """Codes given as literals to TaskError (and the runtime's Outcome): ``code="..."`` or the
    second positional argument."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in ("TaskError", "Outcome"):
            continue
        given = [k.value for k in node.keywords if k.arg == "code"]
        if name == "TaskError" and len(node.args) >= 2:
            given.append(node.args[1])
        for value in given:
            if isinstance(value, ast.Constant) and value.value is not None:
                yield node.lineno, value.value


def test_every_task_error_code_in_the_source_is_a_known_one():
    checked, wrong = 0, []
    for path in [*sources("agent"), *sources("plugins")]:
        for line, code in _written_codes(path):
            checked += 1
            if code not in agent.sdk.ERROR_CODES:
                wrong.append(f"{path.relative_to(REPO)}:{line}: code {code!r}")
    assert checked > 20, "the scan found too few TaskError codes: is it still reading the calls?"
    assert not wrong, "codes not in agent.sdk.ErrorCode (agent/sdk/types.py):\n" + "\n".join(wrong)


def _own_docstring(obj: object) -> str:
    doc = obj.__doc__ if inspect.isclass(obj) or inspect.isfunction(obj) else None
    if not doc or (dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}(")):
        return ""  # none, or the signature dataclasses write when there is none
    return doc.strip()


def _guide_mentions() -> set[str]:
    """Identifiers in the inline code of README.md's "Writing a plugin" (code blocks left out:
    the example plugin's imports do not document anything)."""
    guide = (REPO / "README.md").read_text().partition("## Writing a plugin")[2]
    prose = re.sub(r"^```.*?^```", "", guide, flags=re.M | re.S)
    return {word for span in re.findall(r"`([^`\n]+)`", prose) for word in re.findall(r"\w+", span)}


@pytest.mark.parametrize("name", agent.sdk.__all__)
def test_every_public_name_of_the_sdk_is_documented(name):
    obj = getattr(agent.sdk, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert _own_docstring(obj), f"agent.sdk.{name} needs a docstring: plugin authors read it"
    # Constants cannot carry a docstring: every name is in the README's table of the SDK.
    assert name in _guide_mentions(), f"agent.sdk.{name} is not in README.md's 'Writing a plugin'"


def test_every_hook_is_documented_and_prefixed():
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "kumo_spec")]
    assert hooks, "no hook specifications found"
    for name in hooks:
        assert name.startswith("kumo_"), name
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 40, f"hook {name} needs a docstring for plugin authors"
        assert name in _guide_mentions(), f"hook {name} is not in README.md's 'Writing a plugin'"


def test_every_error_code_has_a_line_in_the_readme():
    guide = (REPO / "README.md").read_text().partition("## Writing a plugin")[2]
    rows = set(re.findall(r"^\| `([a-z-]+)` \| .+ \|$", guide, flags=re.M))
    assert rows == set(agent.sdk.ERROR_CODES), "README.md's table of error codes is not agent.sdk.ErrorCode"


def test_the_readme_shows_the_example_plugin_whole():
    guide = (REPO / "README.md").read_text().partition("## Writing a plugin")[2]
    for name, fence in (("kumo_sleep.py", "python"), ("pyproject.toml", "toml")):
        source = (REPO / "tests" / "example_plugin" / name).read_text()
        assert f"```{fence}\n{source}```\n" in guide, f"README.md must show tests/example_plugin/{name} as it is"
