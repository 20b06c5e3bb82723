"""mpirun (OpenMPI): one MPI rank per worker; ranks from OMPI_COMM_WORLD_* (launcher.env).

The plan and the rendezvous reach ranks on other nodes through `-x NAME` (mpirun
forwards NAME's value from its own environment); with a hostfile, an OpenMPI hostfile
of the filtered hosts is written into the run directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from launcher.backends.base import (
    Backend,
    CommandError,
    Flag,
    Launch,
    RunFile,
    check_positive,
    program,
    python_argv,
    safe_path,
)
from launcher.plan import PLAN_ENV_VAR

if TYPE_CHECKING:
    from launcher.plan import BatchPlan

#: Variables mpirun must forward (`-x NAME`) for workers on other nodes to find the plan
#: and the rendezvous; on the local node they are inherited anyway.
MPIRUN_EXPORTS = (PLAN_ENV_VAR, "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH", "PATH")
HOSTFILE = "hostfile.openmpi"


def mpirun_argv(
    worker_argv: Sequence[str],
    *,
    np: int,
    hostfile: str | None = None,
    procs_per_node: int | None = None,
    export: Sequence[str] = MPIRUN_EXPORTS,
    allow_run_as_root: bool = False,
    oversubscribe: bool = False,
    program: Sequence[str] = ("mpirun",),
) -> list[str]:
    """OpenMPI mpirun argv. Ranks find rank/world in OMPI_COMM_WORLD_* (launcher.env).

    `--bind-to none`: torch runs its own thread pools; OpenMPI's default binding pins
    each rank to one core. `-x NAME` forwards NAME's value from mpirun's environment.
    """
    check_positive(np, "-np")
    check_positive(procs_per_node, "processes per node")
    argv = [*program]
    if allow_run_as_root:
        argv.append("--allow-run-as-root")
    argv += ["-np", str(np)]
    if hostfile:
        argv += ["--hostfile", safe_path(hostfile)]
    if procs_per_node:
        argv += ["--map-by", f"ppr:{procs_per_node}:node"]
    argv += ["--bind-to", "none"]
    if oversubscribe:
        argv.append("--oversubscribe")
    for name in export:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise CommandError(f"cannot export {name!r} with mpirun -x: not a variable name")
        argv += ["-x", name]
    return [*argv, *worker_argv]


class MpirunBackend(Backend):
    name = "mpirun"
    description = "OpenMPI's mpirun, one rank per worker (a hostfile for several nodes)"
    flags = (Flag("--oversubscribe", dict(action="store_true", help="mpirun: allow more ranks than cores")),)
    takes_hostfile = True

    def run_files(self, plan: BatchPlan, launch: Launch) -> list[RunFile]:
        if not launch.hosts:
            return []
        from launcher.hostfile import render_hostfile

        return [RunFile(HOSTFILE, render_hostfile({h: len(s) for h, s in launch.hosts.items()}, "openmpi"))]

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        multi_node = not launch.hosts and launch.nodes[1] > 1
        return mpirun_argv(
            python_argv(launch.python, launch.script, launch.script_args),
            np=launch.world_size,
            hostfile=str(launch.run_dir / HOSTFILE) if launch.hosts else None,
            procs_per_node=launch.nproc_per_node if multi_node else None,
            # -x of an unset variable only warns; forward what the workers will have.
            export=[v for v in MPIRUN_EXPORTS if v in env or v in os.environ],
            allow_run_as_root=os.geteuid() == 0,
            oversubscribe=bool(launch.options.get("oversubscribe")),
            program=program("mpirun", python=launch.python),
        )
