"""Trainer classes by backend name: `trainer_class("ddp")` -> DDPTrainer.

The names and "module:Class" strings live in launcher/trainer_backends.py (torch-free, so
the CLI can list them); this imports the class on first use, so deepspeed is imported only
when its backend is chosen.
"""

from __future__ import annotations

import importlib

from launcher.trainer_backends import trainer_backend


def trainer_class(name: str) -> type:
    """The trainer class registered as `name` (UserError for an unknown name)."""
    module_name, _, class_name = trainer_backend(name).trainer.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
