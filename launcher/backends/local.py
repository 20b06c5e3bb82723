"""local: gradaccum itself starts the workers on this machine, with torchrun's variables.

No launcher program is needed: `launcher.run.run_local_workers` starts one process per
worker with RANK, LOCAL_RANK, WORLD_SIZE, ... and GRADACCUM_LAUNCHER=local, names the
first rank that fails and stops the others.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from launcher.backends.base import Backend, Launch, format_env, python_argv


class LocalBackend(Backend):
    name = "local"
    description = "worker processes started by gradaccum on this machine (torchrun's variables)"
    multi_node = False

    def argv(self, launch: Launch, env: Mapping[str, str]) -> list[str]:
        return python_argv(launch.python, launch.script, launch.script_args)

    def describe(self, launch: Launch, env: Mapping[str, str], argv: Sequence[str]) -> str:
        """One shell line that starts every worker as `start` does (it can be pasted)."""
        from launcher.run import local_worker_env

        n = launch.nproc_per_node
        workers = [
            f"{format_env({**env, **local_worker_env(rank, n, launch.master_addr, launch.master_port)})} "
            f"{shlex.join(argv)} &"
            for rank in range(n)
        ]
        return "( " + " ".join(workers) + " wait )"

    def start(self, launch: Launch, argv: Sequence[str], env: Mapping[str, str]) -> int:
        from launcher.run import run_local_workers

        return run_local_workers(argv, launch.nproc_per_node, launch.master_addr, launch.master_port, env=env)
