"""The layers of DESIGN/STYLE, checked on the source: launcher/ (torch-free) <- trainers/ <- launcher/cli.

Every module of launcher/ and trainers/ is parsed with `ast`; every import counts, also one
inside a function (a lazy import still runs), except under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "trainers")
HEAVY = ("torch", "deepspeed", "mpi4py")
#: lazy heavy imports the torch-free layer may make, and why
ALLOWED_HEAVY = {
    # gradaccum env / a worker's detection asks the MPI library only when an MPI runtime is visible
    ("launcher.env", "mpi4py"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: set[str]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file."""
    is_package = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit_one(sub, top)
                continue
            visit_one(child, top)

    def visit_one(child: ast.AST, top: bool) -> None:
        if isinstance(child, ast.Import):
            found.extend((alias.name, top) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: from the package of this module
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (child.level - 1)]
                target = ".".join(base + ([child.module] if child.module else []))
            else:
                target = child.module or ""
            for alias in child.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in modules else target, top))
        else:
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    modules = all_modules()
    names = set(modules)
    raw = {name: imports_of(name, path, names) for name, path in modules.items()}
    edges = {name: {target for target, _ in found if target in names and target != name} for name, found in raw.items()}
    return edges, raw


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path a -> ... -> a, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def is_cli(name: str) -> bool:
    return name in ("launcher.cli", "launcher.__main__") or name.startswith("launcher.cli.")


def _in(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def test_the_checker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    source = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "def f():\n    from trainers import verify\n    import deepspeed\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    found = imports_of("launcher.m", path, {"trainers", "trainers.verify"})
    assert ("trainers.verify", False) in found and ("deepspeed", False) in found
    assert not any(t == "torch" for t, _ in found)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("rule", ["trainers-no-cli", "launcher-no-trainers", "torch-free", "cli-lazy-trainers"])
def test_layers(rule):
    _, raw = graph()
    bad = []
    for name, found in sorted(raw.items()):
        for target, top in found:
            if (
                rule == "trainers-no-cli"
                and _in(name, "trainers")
                and (_in(target, "launcher.cli") or target == "launcher.__main__")
            ):
                bad.append(f"{name} imports {target}")
            if (
                rule == "launcher-no-trainers"
                and _in(name, "launcher")
                and not is_cli(name)
                and _in(target, "trainers")
            ):
                bad.append(f"{name} imports {target}")
            if rule == "torch-free" and _in(name, "launcher") and target.split(".")[0] in HEAVY:
                if (name, target.split(".")[0]) not in ALLOWED_HEAVY:
                    bad.append(f"{name} imports {target}")
            if rule == "cli-lazy-trainers" and is_cli(name) and top and _in(target, "trainers"):
                bad.append(f"{name} imports {target} at import time (import it inside the function)")
    assert not bad, "\n".join(sorted(set(bad)))
