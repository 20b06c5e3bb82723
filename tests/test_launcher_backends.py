"""The launcher registry (launcher.backends): `gradaccum launch` and `gradaccum slurm` take
their launchers, flags and sbatch blocks from it, so that a new launcher is one class and
one line. Pure: nothing is started (the real launches are in test_launch.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from launcher import BatchPlan
from launcher.backends import LAUNCHERS, backend, sbatch_launchers
from launcher.backends.base import Backend, CommandError, Flag, JobValue, sh
from launcher.errors import UserError
from launcher.slurm import SlurmError, SlurmJob, render_sbatch
from tests.conftest import REPO

PLAN = ["--global-batch-size", "8", "--micro-batch-size", "2"]


def test_registry_names_the_five_launchers_and_the_three_that_run_in_sbatch():
    assert list(LAUNCHERS) == ["torchrun", "deepspeed", "mpirun", "srun", "local"]
    assert all(cls.name == name for name, cls in LAUNCHERS.items())
    assert sorted(sbatch_launchers()) == ["deepspeed", "srun", "torchrun"]
    with pytest.raises(UserError, match="unknown launcher 'ssh'; choose one of: torchrun, deepspeed"):
        backend("ssh")


def test_every_launcher_flag_is_refused_by_the_other_launchers(capsys, tmp_path, monkeypatch):
    from launcher.cli import main

    monkeypatch.chdir(REPO)
    for owner, cls in LAUNCHERS.items():
        for flag in cls.flags:
            value = (
                [] if flag.kwargs.get("action") == "store_true" else [str(next(iter(flag.kwargs.get("choices", [1]))))]
            )
            other = "local" if owner != "local" else "torchrun"
            argv = ["launch", "--launcher", other, *PLAN, "--nproc-per-node", "2", flag.name, *value]
            assert main([*argv, "--run-dir", str(tmp_path / "run"), "--dry-run", "--", "t.py"]) == 2
            err = capsys.readouterr().err
            assert f"{flag.name} is a {owner} option: it is for --launcher {owner} only" in err, err


def test_zero_is_a_given_value_not_an_absent_flag(capsys, monkeypatch):
    from launcher.cli import main

    monkeypatch.chdir(REPO)
    assert main(["launch", "--launcher", "mpirun", *PLAN, "--nproc-per-node", "2", "--zero-stage", "0", "--dry-run",
                 "--", "t.py"]) == 2  # fmt: skip
    assert "--zero-stage is a deepspeed option" in capsys.readouterr().err


class EchoBackend(Backend):
    """A launcher as a contributor would add one: a class, registered by one line."""

    name = "echo"
    description = "prints the worker command"
    flags = (Flag("--echo-twice", dict(action="store_true", help="echo: twice")),)
    sbatch_description = "echo from the batch node"

    def argv(self, launch, env):
        return ["echo", *(["twice"] if launch.options["echo_twice"] else []), launch.script, *launch.script_args]

    def sbatch_block(self, job, plan, script, script_args):
        return sh(["echo", JobValue('"$SLURM_NNODES"'), script, *script_args])


def test_a_new_launcher_is_one_class_and_one_registry_line(capsys, monkeypatch):
    from launcher.cli import main

    monkeypatch.setitem(LAUNCHERS, "echo", EchoBackend)
    assert main(["launch", "--launcher", "echo", *PLAN, "--nproc-per-node", "2", "--echo-twice", "--master-port",
                 "29500", "--run-dir", "/RUN", "--dry-run", "--", "t.py", "--x", "a b"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out == "GRADACCUM_PLAN=/RUN/plan.json MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 echo twice t.py --x 'a b'\n"
    assert main(["launch", "--launcher", "torchrun", *PLAN, "--nproc-per-node", "2", "--echo-twice", "--dry-run",
                 "--", "t.py"]) == 2  # fmt: skip
    assert "--echo-twice is a echo option" in capsys.readouterr().err
    job = SlurmJob(nodes=2, nproc_per_node=1, run_dir="/runs/r", workdir="/w", launch="echo")
    text = render_sbatch(BatchPlan.solve(8, 2, world_size=2), job, "t.py", ["$(x)"])
    assert "# Rendered by `gradaccum slurm render` (echo from the batch node)." in text
    assert "\necho \"$SLURM_NNODES\" t.py '$(x)' &\n" in text


def test_launchers_without_an_sbatch_block_are_refused_by_slurm():
    for name in ("mpirun", "local"):
        with pytest.raises(SlurmError, match="--launch must be one of torchrun, deepspeed, srun"):
            SlurmJob(nodes=1, nproc_per_node=2, run_dir="/r", workdir="/w", launch=name)


def test_zero_stage_in_a_slurm_job_belongs_to_deepspeed():
    job = SlurmJob(nodes=1, nproc_per_node=2, run_dir="/r", workdir="/w", launch="srun", zero_stage=2)
    with pytest.raises(SlurmError, match="--zero-stage applies to --launch deepspeed only"):
        render_sbatch(BatchPlan.solve(8, 2, world_size=2), job, "t.py")


def test_job_values_are_written_as_shell_text_and_literals_are_checked():
    from launcher import commands

    argv = commands.torchrun(
        "t.py", nproc_per_node=2, nnodes=JobValue('"$SLURM_NNODES"'), rdzv_endpoint=JobValue('"$A:$P"'),
        rdzv_id=JobValue('"$SLURM_JOB_ID"'),
    )  # fmt: skip
    assert sh(argv) == (
        'torchrun --nnodes "$SLURM_NNODES" --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint "$A:$P" '
        '--rdzv-id "$SLURM_JOB_ID" t.py'
    )
    assert sh(["echo", "$SLURM_NNODES"]) == "echo '$SLURM_NNODES'"  # a plain str is quoted
    with pytest.raises(CommandError, match="needs c10d rendezvous"):
        commands.torchrun("t.py", nproc_per_node=2, nnodes=JobValue('"$SLURM_NNODES"'))


def test_registry_and_launch_cli_import_no_torch():
    code = "import sys, launcher.backends, launcher.cli.launch, launcher.commands; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    assert r.stdout.strip() == "False", r.stderr
