"""The commands the README's "Launching" section shows (one per launcher) run for real, as
written, and every launcher trains the built-in example to the same losses."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest

from tests.conftest import REPO, run_cli
from tests.test_launch import slurm_env  # noqa: F401  (fixture: the local Slurm cluster)

DOC = REPO / "README.md"
SECTION = "## Launching"
LAUNCHERS = ("torchrun", "deepspeed", "mpirun", "srun", "local")


def documented(prefix: str) -> list[tuple[list[str], str]]:
    """(argv after `gradaccum`, the output shown below it) for each `$ gradaccum PREFIX` line."""
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    lines = text[start : end if end != -1 else len(text)].splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith(f"$ gradaccum {prefix}"):
            shown = []
            for after in lines[i + 1 :]:
                if after.startswith(("$ ", "```")):
                    break
                if not after.startswith("#"):
                    shown.append(after)
            found.append((shlex.split(line[2:], comments=True)[1:], "\n".join(shown)))
    return found


def launch_commands() -> dict[str, list[str]]:
    commands = {}
    for argv, _ in documented("launch"):
        commands[argv[argv.index("--launcher") + 1]] = argv
    return commands


def test_docs_show_one_command_per_launcher():
    assert sorted(launch_commands()) == sorted(LAUNCHERS)


@pytest.fixture(scope="module")
def losses():
    return {}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_documented_launch_runs(launcher, tmp_path, losses, request):
    # Run it as written, from a directory that has the paths the docs use.
    for name in ("examples", "hostfiles"):
        os.symlink(REPO / name, tmp_path / name)
    env = request.getfixturevalue("slurm_env") if launcher == "srun" else None
    r = run_cli(*launch_commands()[launcher], env=env, cwd=tmp_path, timeout=280)
    assert r.returncode == 0, f"{launcher}: exit {r.returncode}\n{r.stdout}\n{r.stderr[-6000:]}"
    steps = re.findall(r"^step \d+ loss \S+", r.stdout, re.M)
    assert len(steps) == 3, r.stdout
    assert (tmp_path / "gradaccum-runs").is_dir()  # the default run directory, in the cwd
    losses[launcher] = steps
    assert len(set(map(tuple, losses.values()))) == 1, f"launchers disagree: {losses}"


def test_documented_hostfile_commands_print_what_the_docs_show():
    cases = documented("hostfile")
    assert cases
    for argv, shown in cases:
        r = run_cli(*argv)
        assert r.returncode == 0, r.stderr
        if "--json" in argv:
            assert json.loads(r.stdout) == json.loads(shown)
        else:
            assert r.stdout.strip() == shown.strip()
