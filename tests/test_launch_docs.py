"""The commands the README and the pages in docs/ show stay true: the one command per launcher
(docs/launching-and-hostfiles.md) runs for real, as written, and every launcher trains the
built-in example to the same losses; every other `$ gradaccum launch` line is accepted as
written (`--dry-run`); every `$ gradaccum hostfile` line prints what is shown below it.
Also: the README stays short, and its links into docs/ lead to pages that exist."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.markers import by_tool
from tests.test_launch import slurm_env  # noqa: F401  (fixture: the local Slurm cluster)

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
LAUNCHING = REPO / "docs" / "launching-and-hostfiles.md"
SECTION = "## One command per launcher"
LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun", "local")
README_MAX_LINES = 300


def documented(prefix: str, docs: list[Path] = DOCS, section: str | None = None) -> list[tuple[list[str], str, str]]:
    """(argv after `gradaccum`, the output shown below it, "file:line") for each `$ gradaccum
    PREFIX` line (a trailing backslash continues it on the next line)."""
    found = []
    for doc in docs:
        text = doc.read_text()
        offset = 0
        if section is not None:
            start = text.index(section)
            end = text.find("\n## ", start + len(section))
            offset = text[:start].count("\n")
            text = text[start : end if end != -1 else len(text)]
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith(f"$ gradaccum {prefix}"):
                continue
            command, j = line, i
            while command.endswith("\\"):
                j += 1
                command = command[:-1] + " " + lines[j].strip()
            shown = []
            for after in lines[j + 1 :]:
                if after.startswith(("$ ", "```")):
                    break
                if not after.startswith("#"):
                    shown.append(after)
            argv = shlex.split(command[2:], comments=True)[1:]
            found.append((argv, "\n".join(shown), f"{doc.relative_to(REPO)}:{offset + i + 1}"))
    return found


def launch_commands() -> dict[str, list[str]]:
    commands = {}
    for argv, _, _ in documented("launch", [LAUNCHING], SECTION):
        commands[argv[argv.index("--launcher") + 1]] = argv
    return commands


def in_a_run_directory(tmp_path: Path) -> Path:
    """A directory with the paths the docs use (examples/, hostfiles/), as in the repository."""
    for name in ("examples", "hostfiles"):
        os.symlink(REPO / name, tmp_path / name)
    return tmp_path


def test_docs_show_one_command_per_launcher():
    assert sorted(launch_commands()) == sorted(LAUNCHERS)


def test_the_readmes_launch_commands_are_among_those_that_run():
    shown = [argv for argv, _, _ in documented("launch", [README])]
    assert shown, "the README shows no `$ gradaccum launch` example"
    for argv in shown:
        assert argv in launch_commands().values(), f"{shlex.join(argv)} is not run by test_documented_launch_runs"


@pytest.fixture(scope="module")
def losses():
    return {}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", by_tool(launcher for launcher in LAUNCHERS if launcher != "srun"))
def test_documented_launch_runs(launcher, tmp_path, losses):
    run_documented(launcher, tmp_path, losses)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_documented_srun_launch_runs(tmp_path, losses, slurm_env):  # noqa: F811  (the fixture)
    run_documented("srun", tmp_path, losses, env=slurm_env)


def run_documented(launcher: str, tmp_path: Path, losses: dict, env: dict | None = None) -> None:
    # Run it as written, from a directory that has the paths the docs use.
    r = run_cli(*launch_commands()[launcher], env=env, cwd=in_a_run_directory(tmp_path), timeout=280)
    assert r.returncode == 0, f"{launcher}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    steps = re.findall(r"^step \d+ loss \S+", r.stdout, re.M)
    assert len(steps) == 3, r.stdout
    assert (tmp_path / "gradaccum-runs").is_dir()  # the default run directory, in the cwd
    losses[launcher] = steps
    assert len(set(map(tuple, losses.values()))) == 1, f"launchers disagree: {losses}"


def _dry_runs() -> list:
    cases = []
    for argv, _, where in documented("launch"):
        launcher = argv[argv.index("--launcher") + 1]
        marks = by_tool([launcher])[0].marks
        cases.append(pytest.param(argv, id=where, marks=marks))
    return cases


@pytest.mark.parametrize("argv", _dry_runs())
def test_every_documented_launch_command_is_accepted(argv, tmp_path):
    split = argv.index("--")
    r = run_cli(*argv[:split], "--dry-run", *argv[split:], cwd=in_a_run_directory(tmp_path))
    assert r.returncode == 0, f"{shlex.join(argv)}: exit {r.returncode}\n{r.stderr[-3000:]}"


def test_documented_hostfile_commands_print_what_the_docs_show():
    cases = documented("hostfile")
    assert cases
    for argv, shown, where in cases:
        r = run_cli(*argv)
        assert r.returncode == 0, f"{where}: {r.stderr}"
        if "--json" in argv:
            assert json.loads(r.stdout) == json.loads(shown), where
        else:
            assert r.stdout.strip() == shown.strip(), where


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/"


def test_every_docs_link_leads_to_a_page_that_exists():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path = (doc.parent / target).resolve()
            assert path.exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README.read_text()))
    pages = {f"docs/{p.name}" for p in DOCS[1:]}
    assert linked and pages <= linked, f"pages the README does not link to: {sorted(pages - linked)}"
