"""The package's structure (docs/development/layers.md): layers point one way and commands never
import each other (import-linter's contracts in pyproject.toml), no module imports another that
imports it back, counting imports inside functions, and no command line is faked in code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:  # the test extra installs it; a run without it must not pass silently
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    proc = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_counting_imports_inside_functions():
    """grimp reads every import statement of a module, those inside functions included, and the
    package root counts as a module: a lower layer doing ``import staprune`` would close a cycle."""
    graph = grimp.build_graph("staprune", include_external_packages=False)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _cycles(edges) == []


def test_namespace_objects_only_come_from_argument_parsing():
    """Commands share functions with real parameters; none builds a fake command line."""
    offenders = []
    for path in sorted((REPO / "staprune").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\bNamespace\(", line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []


def test_commands_are_one_module_each_and_dispatched_by_the_cli():
    from staprune.cli import COMMANDS

    modules = {module for module, _ in COMMANDS.values()}
    assert all(m.startswith("staprune.commands.") for m in modules)
    on_disk = {f"staprune.commands.{p.stem}" for p in (REPO / "staprune" / "commands").glob("*.py")
               if p.stem != "__init__"}
    assert modules == on_disk


def test_package_imports_without_side_effects():
    proc = subprocess.run([sys.executable, "-c", "import staprune, staprune.cli; print(len(staprune.__all__))"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and int(proc.stdout) > 5, proc.stderr


def _contract(name: str) -> dict:
    import tomllib

    document = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [c for c in document["tool"]["importlinter"]["contracts"] if c["name"] == name]
    return contract


def test_every_family_and_every_video_method_is_under_its_contract():
    """The independence contracts name their modules: a family or method added without its line
    there would go unchecked (docs/families/add-a-video-llm.md says to add it)."""
    from staprune.core.video_methods import METHOD_MODULES
    from staprune.families import FAMILY_MODULES

    siblings = set(_contract("sibling families never import each other")["modules"])
    assert set(FAMILY_MODULES) == siblings
    assert set(_contract("the family kinds and their shared code import no family")["forbidden_modules"]) == siblings
    assert set(METHOD_MODULES) == set(_contract("video-token methods never import each other")["modules"])
