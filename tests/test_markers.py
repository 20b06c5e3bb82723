"""The markers tell the truth: a test that runs mpirun carries `mpi`, one that needs Slurm
(srun, sbatch, scontrol, ..., the local cluster) carries `slurm`, one that runs DeepSpeed
carries `deepspeed`. `make test-quick` deselects them, so it passes on a machine without
them; `make test` runs them all, and they fail there (never skip) when a component is missing.

The check reads source, it runs nothing. A test *uses* a tool when what it reaches names
the tool: its own body, the module-level helpers, fixtures and constants it names (and what
those name, recursively, also across `from tests.x import y`), the test scripts they name,
and, per parametrized case, that case's values (a parametrize table that is a dict counts
through the entry the case selects, e.g. `DRY_RUNS[name]`). Names in strings count: the
tools are run as programs, so their names appear as text (`"mpirun"`, `"--backend",
"deepspeed"`). Imports of deepspeed and `DeepSpeedTrainer` count for `deepspeed`.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
from functools import cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS / "scripts"

#: marker -> what in a string names its tool (never part of a longer word, path or file name)
TOOL_PATTERNS = {
    "mpi": re.compile(r"(?<![\w.-])(mpirun|mpiexec|orterun)(?![\w.-])"),
    "slurm": re.compile(r"(?<![\w.-])(srun|sbatch|salloc|scontrol|squeue|scancel|sinfo)(?![\w.-])|local-cluster\.sh"),
    "deepspeed": re.compile(r"(?<![\w./-])deepspeed(?![\w.-])"),
}
#: names in code that mean "runs DeepSpeed" (imports of the package count too)
DEEPSPEED_NAMES = {"DeepSpeedTrainer", "deepspeed_runs"}
#: names in code that start a program or look one up: without them a tool's name is only text
STARTS = {"subprocess", "Popen", "run_cli", "gradaccum_argv", "which"}

#: "file::test" -> (marker, why): a test whose source names a tool it neither runs nor needs
NOT_USED: dict[str, tuple[str, str]] = {
    "test_cli_plan.py::test_config_deepspeed_writes_atomically_and_merges_base": ("deepspeed", "renders JSON only"),
    "test_cli_plan.py::test_config_conflict_writes_nothing": ("deepspeed", "renders JSON only"),
    "test_cli_plan.py::test_config_bad_base_file": ("deepspeed", "renders JSON only"),
    "test_cli_plan.py::test_config_base_with_a_duplicate_key_exits_2_naming_key_and_file": ("deepspeed", "reads JSON only"),
    "test_atomic.py::test_cli_config_base_binary_file_exits_2": ("deepspeed", "reads JSON only"),
    "test_commands.py::test_dry_run_prints_the_command_and_writes_nothing": ("mpi", "_normalise edits text"),
    "test_deepspeed.py::test_verify_rejects_a_deepspeed_json_that_disagrees_with_the_plan_before_starting": (
        "deepspeed",
        "refused before DeepSpeed is needed",
    ),
    "test_deepspeed.py::test_launch_rejects_a_deepspeed_json_that_disagrees_with_the_plan_before_starting": (
        "deepspeed",
        "refused before DeepSpeed is needed",
    ),
    "test_deepspeed.py::test_verify_flag_combinations_that_cannot_work_exit_2": ("deepspeed", "refused by the CLI"),
    "test_deepspeed.py::test_constructor_refuses_conflicting_settings_before_any_process_group": (
        "deepspeed",
        "refused before `import deepspeed`",
    ),
    "test_hostfile.py::test_cli_convert_writes_atomically_and_round_trips": ("deepspeed", "a hostfile format's name"),
    "test_slurm.py::test_rendered_script_is_valid_bash": ("deepspeed", "`bash -n` on rendered text"),
    "test_slurm.py::test_cli_render_errors_exit_2": ("deepspeed", "refused by the CLI"),
    "test_trainers_ddp.py::test_live_world_size_mismatch_is_a_clear_error_without_hang": ("mpi", "a message names it"),
    "test_launch_docs.py::test_every_documented_launch_command_is_accepted": (
        "deepspeed",
        "--dry-run; the launcher's own program is marked by by_tool",
    ),
    "test_verify.py::test_bad_input_exits_2_with_a_message_and_no_traceback": ("deepspeed", "refused by the CLI"),
}
PARAM = type(pytest.param(None))


# ------------------------------------------------------------------ what source reaches
@cache
def _module_tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


@cache
def _top_level(path: Path) -> dict[str, list[ast.AST]]:
    """name -> the module-level statements that define it (defs, assignments, `from tests.x import`)."""
    found: dict[str, list[ast.AST]] = {}
    for node in _module_tree(path).body:
        names: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests"):
            names = [a.asname or a.name for a in node.names]
        for name in names:
            found.setdefault(name, []).append(node)
    return found


def _imported_from(node: ast.ImportFrom, name: str) -> tuple[Path, str] | None:
    for alias in node.names:
        if (alias.asname or alias.name) == name:
            path = TESTS.parent.joinpath(*node.module.split(".")).with_suffix(".py")
            return (path, alias.name) if path.exists() else None
    return None


def _reached(path: Path, roots: list[ast.AST], skip: frozenset[str]) -> list[ast.AST]:
    """The nodes `roots` reach through module-level names (and conftest's): the helpers and
    constants they name and the fixtures they take, recursively."""
    seen: set[tuple[Path, str]] = set()
    out: list[ast.AST] = []
    todo = [(path, node) for node in roots]
    while todo:
        where, node = todo.pop()
        out.append(node)
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments) for a in n.args + n.kwonlyargs}
        names |= {  # request.getfixturevalue("name")
            a.value
            for n in ast.walk(node)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "getfixturevalue"
            for a in n.args
            if isinstance(a, ast.Constant)
        }
        for name in names - skip:
            for module in (where, TESTS / "conftest.py"):
                todo += _definitions(module, name, seen)
    return out


def _definitions(module: Path, name: str, seen: set) -> list[tuple[Path, ast.AST]]:
    found = []
    for definition in _top_level(module).get(name, []):
        if isinstance(definition, ast.ImportFrom):
            target = _imported_from(definition, name)
            if target:
                found += _definitions(target[0], target[1], seen)
        elif (module, name) not in seen:
            seen.add((module, name))
            found.append((module, definition))
    return found


def _strings(nodes: list[ast.AST]) -> list[str]:
    """The strings in `nodes`, less enumerations: a tuple, list or set literal that names two or
    more tools (`for name in ("torchrun", "mpirun", "srun")`) lists them, it runs none."""
    listed = set()
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
                items = [e for e in n.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
                if len({m for e in items for m in _tool_names([e.value])} | _launchers(items)) >= 2:
                    listed |= {id(e) for e in items}
    return [
        n.value
        for node in nodes
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in listed
    ]


def _launchers(items: list[ast.Constant]) -> set[str]:
    return {e.value for e in items if e.value in ("torchrun", "local")}


@cache
def _script_uses(name: str) -> frozenset[str]:
    """What a test script run by a test uses by itself: its module-level imports and its strings."""
    tree = _module_tree(SCRIPTS / name)
    used = set(_tool_names(_strings([tree])))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            if any(n.split(".")[0] == "deepspeed" or n in DEEPSPEED_NAMES for n in names):
                used.add("deepspeed")
    return frozenset(used)


def _tool_names(strings: list[str]) -> set[str]:
    return {marker for marker, pattern in TOOL_PATTERNS.items() if any(pattern.search(s) for s in strings)}


def _uses_in_text(strings: list[str]) -> set[str]:
    used = _tool_names(strings)
    for s in strings:
        script = re.search(r"([\w-]+\.py)\b", s)
        if script and (SCRIPTS / script[1]).exists():
            used |= _script_uses(script[1])
    return used


def _uses_in_code(nodes: list[ast.AST]) -> set[str]:
    for node in nodes:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id in DEEPSPEED_NAMES:
                return {"deepspeed"}
            if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in n.names):
                return {"deepspeed"}
            if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "deepspeed":
                return {"deepspeed"}
    return set()


# ------------------------------------------------------------------ the tests and their marks
def _marks(obj) -> list[pytest.Mark]:
    marks = getattr(obj, "pytestmark", [])
    return list(marks) if isinstance(marks, list) else [marks]


def _leaves(value) -> list[str]:
    """The strings inside a parameter value (through tuples, lists, dicts)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _leaves(k) + _leaves(v)]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [s for v in value for s in _leaves(v)]
    return []


def cases() -> list[tuple[str, set[str], set[str]]]:
    """(test id, markers it carries, tools its source uses) for every test case in tests/."""
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        tree = _top_level(path)
        for name, definitions in tree.items():
            func = getattr(module, name, None)
            if not name.startswith("test") or not callable(func) or isinstance(func, type):
                continue
            node = definitions[-1]
            marks = _marks(module) + _marks(func)
            common = {m.name for m in marks if m.name != "parametrize"}
            # Names used only to list the parameters are tables: they count per case, below.
            tables = {
                n.id for d in node.decorator_list for n in ast.walk(d) if isinstance(n, ast.Name) and n.id != "pytest"
            }
            body = ast.Module(body=node.body, type_ignores=[])
            signature = node.args
            everything = _reached(path, [body, signature], frozenset(tables))
            starts = any(
                (isinstance(n, ast.Name) and n.id in STARTS) or (isinstance(n, ast.Attribute) and n.attr in STARTS)
                for r in everything
                for n in ast.walk(r)
            )
            uses = (_uses_in_text(_strings(everything)) if starts else set()) | _uses_in_code(everything)
            per_table = []
            for mark in (m for m in marks if m.name == "parametrize"):
                options = []
                for value in mark.args[1]:
                    values, extra = (
                        (value.values, {m.name for m in value.marks}) if isinstance(value, PARAM) else ((value,), set())
                    )
                    strings = _leaves(values)
                    for table in tables:
                        entries = getattr(module, table, None)
                        if isinstance(entries, dict):
                            strings += [
                                s for v in values if isinstance(v, str) and v in entries for s in _leaves(entries[v])
                            ]
                    used = _uses_in_text(strings) if starts else set()
                    options.append((str(values[0] if len(values) == 1 else values), extra, used))
                per_table.append(options)
            for combination in itertools.product(*per_table) if per_table else [()]:
                test_id = f"{path.name}::{name}" + (f"[{'-'.join(c[0] for c in combination)}]" if combination else "")
                carried = common.union(*(c[1] for c in combination))
                used = uses.union(*(c[2] for c in combination))
                found.append((test_id, carried, used))
    return found


def missing(test_id: str, carried: set[str], used: set[str]) -> set[str]:
    return used - carried - {NOT_USED.get(test_id.split("[")[0], ("", ""))[0]}


def test_every_test_that_runs_a_tool_carries_its_marker():
    wrong = []
    for test_id, carried, used in cases():
        if missing(test_id, carried, used):
            wrong.append(
                f"{test_id}: add @pytest.mark.{', @pytest.mark.'.join(sorted(missing(test_id, carried, used)))}"
            )
    assert not wrong, "tests that run a tool without its marker (make test-quick would run them):\n" + "\n".join(wrong)


if __name__ == "__main__":  # a report: python -m tests.test_markers
    for test_id, carried, used in cases():
        flag = "MISSING " + ",".join(sorted(missing(test_id, carried, used))) if missing(test_id, carried, used) else ""
        print(f"{test_id:110} carries {sorted(carried & set(TOOL_PATTERNS))} uses {sorted(used)} {flag}")
