"""The package's import graph (read from the source, module-level and function-level imports):
no import circle, no task imports another task, `utils` imports nothing above it, the building
blocks import no model, task or alignment code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "semani"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The `semani` modules a file imports anywhere (a package import counts as its
    `__init__`; `from pkg import module` as that module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "semani"


def test_no_import_circle() -> None:
    def visit(node: str, path: list[str], done: set[str]) -> None:
        for dep in sorted(GRAPH[node]):
            assert dep not in path, " -> ".join([*path[path.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*path, dep], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(GRAPH):
        visit(name, [name], done)


def test_no_task_imports_a_task() -> None:
    tasks = [n for n in GRAPH if _layer(n) == "tasks" and n != "semani.tasks"]
    for name in tasks:
        assert not [d for d in GRAPH[name] if _layer(d) == "tasks"], name


@pytest.mark.parametrize(
    "layer, allowed",
    [
        ("utils", {"utils"}),
        ("modules", {"modules", "utils"}),
        ("data", {"data", "utils"}),
        ("models", {"models", "modules", "data", "metrics", "manipulation", "utils"}),
        ("metrics", {"metrics", "modules", "data", "utils"}),
        ("alignment", {"alignment", "modules", "data", "utils"}),
        ("manipulation", {"manipulation", "modules", "data", "utils", "loading"}),
        # the stage figures load and measure trained models (semani.evaluation.stage_figures)
        (
            "evaluation",
            {
                "evaluation",
                "alignment",
                "manipulation",
                "data",
                "utils",
                "metrics",
                "modules",
                "models",
                "loading",
            },
        ),  # fmt: skip
    ],
)
def test_layers_import_only_below(layer: str, allowed: set[str]) -> None:
    for name, deps in GRAPH.items():
        if _layer(name) == layer:
            above = sorted(d for d in deps if _layer(d) not in allowed)
            assert not above, f"{name} imports {above}"
