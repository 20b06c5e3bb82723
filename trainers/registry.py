"""The trainer class behind a `--backend` name, imported from launcher.trainer_backends' string.

launcher/trainer_backends.py stays torch-free (names, ZeRO stages, what a backend needs);
this is the one place that turns its "module:Class" into a class, inside a worker.
"""

from __future__ import annotations

import importlib

from launcher.errors import UserError
from launcher.trainer_backends import trainer_backend


def trainer_class(name: str) -> type:
    """The trainer class of backend `name` (UserError for an unknown name or a missing package)."""
    backend = trainer_backend(name)
    module_name, _, class_name = backend.trainer.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if backend.requires and e.name and e.name.split(".")[0] == backend.requires:
            raise UserError(
                f"--backend {name} needs the {backend.requires} package: pip install {backend.requires}"
            ) from None
        raise
    return getattr(module, class_name)
