"""Command lines for torchrun, the deepspeed launcher, mpirun and srun (pure: argv lists).

The builders live with their launchers in `launcher.backends` (one module each); this
module keeps the short names that callers and tests import (`commands.torchrun(...)`).
Every builder returns a `list[str]` for `launcher.run` and starts nothing.
"""

from __future__ import annotations

from launcher.backends.base import (
    DEEPSPEED_CONFIG_ENV_VAR,
    CommandError,
    parse_endpoint,
    parse_nnodes,
    python_argv,
    safe_path,
    worker_env,
)
from launcher.backends.deepspeed import DEEPSPEED_LAUNCHERS
from launcher.backends.deepspeed import deepspeed_argv as deepspeed
from launcher.backends.mpirun import MPIRUN_EXPORTS
from launcher.backends.mpirun import mpirun_argv as mpirun
from launcher.backends.srun import srun_argv as srun
from launcher.backends.torchrun import torchrun_argv as torchrun

__all__ = [
    "DEEPSPEED_CONFIG_ENV_VAR",
    "DEEPSPEED_LAUNCHERS",
    "MPIRUN_EXPORTS",
    "CommandError",
    "deepspeed",
    "mpirun",
    "parse_endpoint",
    "parse_nnodes",
    "python_argv",
    "safe_path",
    "srun",
    "torchrun",
    "worker_env",
]
