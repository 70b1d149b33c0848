"""The layers: the shared core imports no service, and no service imports another.

``src/storyreel`` (package ``storyreel``) is what every service builds on, so it
names none of them in an import, not even lazily inside a function: the CLI's
local commands reach service code through the ``storyreel.local`` entry points
that the services declare (one per extra of the root project). Each service meets
the others only through the contracts. Checked on the source with :mod:`ast`, so
a function-level import counts as much as a module-level one. And the composer's
production modules never load moviepy, which only its test reference uses.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint, EntryPoints, entry_points
from pathlib import Path

import pytest

from storyreel import cli

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "src" / "storyreel"
SERVICES = {
    "storyreel_llm": ROOT / "services" / "llm" / "storyreel_llm",
    "storyreel_diffusion": ROOT / "services" / "diffusion" / "storyreel_diffusion",
    "storyreel_composer": ROOT / "services" / "composer" / "storyreel_composer",
    "storyreel_gateway": ROOT / "gateway" / "storyreel_gateway",
}
#: Calls that import a module named by a string.
DYNAMIC_IMPORTS = {"import_module", "__import__"}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``source``, at any depth.

    ``import a.b``, ``from a.b import c`` and ``importlib.import_module("a.b")`` (or
    ``__import__``) with a literal name all count; relative imports stay in their package.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if name in DYNAMIC_IMPORTS and literal:
                found.append((node.lineno, first.value))
    return found


def forbidden_imports(folder: Path, forbidden: set[str], root: Path = ROOT) -> list[str]:
    """``path:line imports module`` for each import in ``folder`` of a ``forbidden`` package."""
    problems = []
    for path in sorted(folder.rglob("*.py")):
        for line, module in imported_modules(path.read_text(encoding="utf-8")):
            if module.split(".")[0] in forbidden:
                problems.append(f"{path.relative_to(root)}:{line} imports {module}")
    return problems


def test_the_core_imports_no_service_package():
    assert CORE.is_dir() and any(CORE.rglob("cli.py"))
    assert forbidden_imports(CORE, set(SERVICES)) == []


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_imports_no_other_service(package: str):
    folder = SERVICES[package]
    assert (folder / "__init__.py").is_file()
    assert forbidden_imports(folder, set(SERVICES) - {package}) == []


def test_the_check_sees_imports_anywhere_in_a_module():
    source = (
        "import os\n"
        "from storyreel import options\n"
        "def compose():\n"
        "    from storyreel_composer.local import compose_files\n"
        "    import storyreel_llm.writer as writer\n"
        "    return importlib.import_module('storyreel_gateway.jobs')\n"
        "from . import sibling\n"
    )
    modules = [module for _, module in imported_modules(source)]
    assert modules == [
        "os",
        "storyreel",
        "storyreel_composer.local",
        "storyreel_llm.writer",
        "storyreel_gateway.jobs",
    ]


def test_a_service_named_in_a_core_module_is_found(tmp_path):
    core = tmp_path / "storyreel"
    core.mkdir()
    (core / "fine.py").write_text("from storyreel import errors\n")
    (core / "lazy.py").write_text("def f():\n    from storyreel_llm.local import x\n")
    assert forbidden_imports(core, set(SERVICES), root=tmp_path) == [
        "storyreel/lazy.py:2 imports storyreel_llm.local"
    ]


def _requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_each_local_entry_point_has_the_extra_of_its_name():
    """``pip install 'storyreel[NAME]'`` installs the package behind entry point NAME."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    offered = entry_points(group=cli.LOCAL_CODE_GROUP)
    assert {"composer", "llm"} <= set(offered.names), "reinstall the services: make venv"
    for point in offered:
        wanted = {_requirement_name(r) for r in extras.get(point.name, [])}
        assert _requirement_name(point.dist.name) in wanted, point
        assert point.module.split(".")[0] in SERVICES


def test_a_missing_extra_is_refused_naming_it(monkeypatch):
    monkeypatch.setattr(cli, "entry_points", lambda **_: EntryPoints(()))
    with pytest.raises(cli.CliError) as refused:
        cli._local_code("llm", "parse-storyboard")
    assert refused.value.code == cli.EXIT_REFUSED
    assert "pip install 'storyreel[llm]'" in str(refused.value)
    args = cli.build_parser().parse_args(["compose", "--images", "."])
    with pytest.raises(cli.CliError, match=r"pip install 'storyreel\[composer\]'") as refused:
        args.func(args)
    assert refused.value.code == cli.EXIT_REFUSED


def test_an_extra_that_cannot_be_imported_is_refused_naming_it(monkeypatch):
    point = EntryPoint("llm", "storyreel_not_installed_anywhere.local", cli.LOCAL_CODE_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda **_: EntryPoints((point,)))
    with pytest.raises(cli.CliError, match=r"storyreel_not_installed_anywhere.*storyreel\[llm\]"):
        cli._local_code("llm", "storyboard --local")


@pytest.mark.parametrize(
    "module",
    ["storyreel_composer.service", "storyreel_composer.composer", "storyreel_composer.local"],
)
def test_the_composer_runs_without_moviepy(module: str):
    """Only storyreel_composer.reference, the tests' per-frame reference, imports moviepy."""
    check = f"import {module}, sys; assert 'moviepy' not in sys.modules, 'moviepy loaded'"
    result = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
