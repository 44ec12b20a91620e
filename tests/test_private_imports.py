"""Tests and benchmarks use the library, not a command's internals: no file under ``tests/`` or
``benchmarks/`` imports a private (underscore) name from a ``staprune.commands`` module or reaches
an underscore attribute of one. What a test needs from a command beyond ``add_arguments`` / ``run``
belongs in a library layer (``staprune.training``, ``staprune.data``, ``staprune.runs``, ...), where
it has a public name; a command's private helpers may then change without breaking any test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = "staprune.commands"
ATTRIBUTE_CALLS = {"getattr", "setattr", "hasattr", "delattr"}  # builtins and monkeypatch.setattr/delattr


def _is_private(name: str) -> bool:
    """``_x`` and ``__x`` but not dunders (``__doc__``, ``__name__``: every module has them)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_commands(module: str | None) -> bool:
    return module is not None and (module == COMMANDS or module.startswith(COMMANDS + "."))


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def private_uses(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: what`` for each private use of a ``staprune.commands`` module in ``source``:

    * ``from staprune.commands.X import _y`` (and ``from staprune.commands import _x``);
    * ``M._y`` where ``M`` names a commands module: bound by any import form (``import
      staprune.commands.X [as M]``, ``from staprune.commands import X [as M]``, ``M =
      importlib.import_module("staprune.commands.X")``) or spelled out (``staprune.commands.X._y``);
    * ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr`` (``monkeypatch``'s too) of ``M, "_y"``,
      and ``monkeypatch.setattr("staprune.commands.X._y", ...)``.

    Names are resolved per file, not per scope: an alias bound to a commands module anywhere in the
    file counts everywhere in it (test files do not reuse such names for other things).
    """
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> the module path it is bound to
    problems: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name  # (a plain `import a.b` binds `a`: resolved below)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _is_commands(node.module) and _is_private(alias.name):
                    problems.append((node.lineno, f"imports private {alias.name} from {node.module}"))
                elif node.module in ("staprune", COMMANDS) and _is_commands(full):  # a commands (sub)module
                    aliases[alias.asname or alias.name] = full
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and _call_name(node.value) == "import_module" and node.value.args
              and isinstance(node.value.args[0], ast.Constant) and isinstance(node.value.args[0].value, str)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    aliases[target.id] = node.value.args[0].value

    def dotted(expr: ast.expr) -> str | None:
        """``a.b.c`` with ``a`` replaced by what it is bound to; None for anything but names and attributes."""
        parts: list[str] = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return None
        return ".".join([aliases.get(expr.id, expr.id), *reversed(parts)])

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = dotted(node.value)
            if _is_commands(owner):
                problems.append((node.lineno, f"uses private {owner}.{node.attr}"))
        elif isinstance(node, ast.Call) and _call_name(node) in ATTRIBUTE_CALLS and node.args:
            first, rest = node.args[0], node.args[1:]
            name = rest[0].value if rest and isinstance(rest[0], ast.Constant) else None
            owner = dotted(first)
            if isinstance(name, str) and _is_private(name) and _is_commands(owner):
                problems.append((node.lineno, f"{_call_name(node)} of private {owner}.{name}"))
            elif isinstance(first, ast.Constant) and isinstance(first.value, str):  # monkeypatch's "a.b.c" form
                module, _, attr = first.value.rpartition(".")
                if _is_commands(module) and _is_private(attr):
                    problems.append((node.lineno, f"{_call_name(node)} of private {first.value}"))
    return [f"{filename}:{line}: {what}" for line, what in sorted(problems)]


def _sources() -> list[Path]:
    return sorted(p for folder in ("tests", "benchmarks") for p in (REPO / folder).rglob("*.py"))


def test_no_test_or_benchmark_uses_a_commands_private_names():
    assert len(_sources()) > 10  # the folders were found
    problems = [p for path in _sources()
                for p in private_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not problems, "private names of staprune.commands used (give them a public home):\n" + "\n".join(problems)


BAD = [
    ("from staprune.commands.finetune import _datasets\n", 1),
    ("from staprune.commands.ablate import placements, _int_list\n", 1),
    ("from staprune.commands import _helpers\n", 1),
    ("import os\nfrom staprune.commands import finetune as ft\n\nft._log(None, 'x')\n", 4),
    ("from staprune.commands import finetune\nx = finetune._check_args\n", 2),
    ("import staprune.commands.ablate as ab\nab._measure_all()\n", 2),
    ("import staprune.commands.finetune\n\nstaprune.commands.finetune._restore(run)\n", 3),
    ("import staprune\nstaprune.commands.analyze._load(1)\n", 2),
    ("from staprune import commands\ncommands.finetune._log(1, 2)\n", 2),
    ("def test(monkeypatch):\n    from staprune.commands import analyze as cli\n"
     "    monkeypatch.setattr(cli, '_gradnorm', None)\n", 3),
    ("def test(monkeypatch):\n    monkeypatch.setattr('staprune.commands.bench._time', None)\n", 2),
    ("import importlib\nmod = importlib.import_module('staprune.commands.export')\ngetattr(mod, '_check')\n", 3),
]


@pytest.mark.parametrize(("source", "line"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_the_check_finds_each_kind_of_private_use(source, line):
    problems = private_uses(source, "bad.py")
    assert len(problems) == 1 and problems[0].startswith(f"bad.py:{line}: "), problems


def test_public_uses_pass():
    source = """
import staprune
import staprune.commands.finetune
from staprune import training
from staprune.commands import finetune as ft
from staprune.commands.ablate import placements, settings_for
from staprune.training import _internal_helper_of_a_library_layer  # not a command: not this test's business

ft.run(ft.add_arguments)
ft.__doc__.splitlines()
staprune.commands.finetune.main([])
training._private_but_not_a_command()
other = object()
other._private
getattr(ft, "run")


def test(monkeypatch):
    monkeypatch.setattr(staprune.commands.finetune, "generate", None)
    monkeypatch.setattr("staprune.commands.bench.load", None)
"""
    assert private_uses(source, "good.py") == []
