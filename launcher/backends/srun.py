"""srun: one Slurm task per worker; ranks from SLURM_PROCID/SLURM_LOCALID (launcher.env).

`gradaccum launch --launcher srun` runs srun from inside an allocation (salloc, or an
sbatch script of your own); `gradaccum slurm --launch srun` renders an sbatch script
whose srun line starts the workers. The workers derive MASTER_PORT from the job id
(launcher.env) unless it is given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from launcher.backends.base import Backend, CommandError, JobValue, Launch, check_positive, program, python_argv, sh

if TYPE_CHECKING:
    from launcher.plan import BatchPlan
    from launcher.slurm import SlurmJob


def srun_argv(
    worker_argv: Sequence[str],
    *,
    nodes: int,
    ntasks_per_node: int,
    kill_on_bad_exit: bool = True,
    extra: Mapping[str, str] | None = None,
    program: Sequence[str] = ("srun",),
) -> list[str]:
    """srun argv: one task per worker (ranks from SLURM_PROCID, see launcher.env), or,
    with `ntasks_per_node=1` and a torchrun `worker_argv`, one torchrun per node.

    `--kill-on-bad-exit=1`: one failed task ends the step instead of leaving the others
    blocked in a collective. `extra`: more `--name=value` options (e.g. {"mpi": "pmix"}).
    """
    check_positive(nodes, "--nodes")
    check_positive(ntasks_per_node, "--ntasks-per-node")
    argv = [
        *program,
        f"--nodes={nodes}",
        f"--ntasks={nodes * ntasks_per_node}",
        f"--ntasks-per-node={ntasks_per_node}",
    ]
    if kill_on_bad_exit:
        argv.append("--kill-on-bad-exit=1")
    for key, value in (extra or {}).items():
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
            raise CommandError(f"srun option {key!r} is not an option name")
        argv.append(f"--{key}={value}")
    return [*argv, *worker_argv]


def srun_step(job: SlurmJob, tasks_per_node: int) -> list[str]:
    """The srun part of an sbatch script's launch line (the workers' argv follows it)."""
    extra = {}
    if job.cpus_per_task is not None:
        # srun does not inherit --cpus-per-task from sbatch in every Slurm release: say it again.
        extra["cpus-per-task"] = str(job.cpus_per_task * job.nproc_per_node // tasks_per_node)
    return srun_argv([], nodes=job.nodes, ntasks_per_node=tasks_per_node, extra=extra)


_SBATCH_COMMENT = """\
# One srun task per process. Rank, local rank and world size come from SLURM_PROCID,
# SLURM_LOCALID and SLURM_NTASKS (launcher.env); MASTER_ADDR/MASTER_PORT from above."""


class SrunBackend(Backend):
    name = "srun"
    description = "srun inside a Slurm allocation, one task per worker"
    exports_master_addr = False  # the workers take the first host of the job
    sbatch_description = "one srun task per process"

    def picks_free_port(self, launch: Launch) -> bool:
        return False  # the workers derive it from the Slurm job id (launcher.env)

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        worker = python_argv(launch.python, launch.script, launch.script_args)
        return srun_argv(
            worker,
            nodes=launch.nodes[1],
            ntasks_per_node=launch.nproc_per_node,
            program=program("srun", python=launch.python),
        )

    def sbatch_block(self, job: SlurmJob, plan: BatchPlan, script: str, script_args: Sequence[str]) -> str:
        worker = python_argv(JobValue('"$PYTHON"'), script, script_args)
        return f"{_SBATCH_COMMENT}\n{sh(srun_step(job, job.nproc_per_node))} \\\n  {sh(worker)}"
