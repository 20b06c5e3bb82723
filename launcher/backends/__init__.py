"""The launcher backends, by the name users give (`--launcher`, `--launch`): one line each.

Each module holds one launcher end to end (its flags, argv, worker environment, run-dir
files, and its block of an sbatch script); `launcher.backends.base.Backend` says what a
backend answers. `gradaccum launch` and `gradaccum slurm` look backends up here.
Adding a launcher: one module under launcher/backends/ plus one line in LAUNCHERS.
"""

from __future__ import annotations

from launcher.backends.base import Backend, CommandError, Launch
from launcher.backends.deepspeed import DeepSpeedBackend
from launcher.backends.local import LocalBackend
from launcher.backends.mpirun import MpirunBackend
from launcher.backends.srun import SrunBackend
from launcher.backends.torchrun import TorchrunBackend
from launcher.errors import UserError

LAUNCHERS: dict[str, type[Backend]] = {
    "torchrun": TorchrunBackend,
    "deepspeed": DeepSpeedBackend,
    "mpirun": MpirunBackend,
    "srun": SrunBackend,
    "local": LocalBackend,
}


def backend(name: str) -> Backend:
    """The backend called `name`, or a UserError listing the known ones."""
    try:
        return LAUNCHERS[name]()
    except KeyError:
        raise UserError(f"unknown launcher {name!r}; choose one of: {', '.join(LAUNCHERS)}") from None


def sbatch_launchers() -> dict[str, type[Backend]]:
    """The backends that can start the workers inside an sbatch script (`gradaccum slurm --launch`)."""
    return {name: cls for name, cls in LAUNCHERS.items() if cls.sbatch_description is not None}


__all__ = ["LAUNCHERS", "Backend", "CommandError", "Launch", "backend", "sbatch_launchers"]
