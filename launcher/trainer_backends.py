"""The trainer backends, by the name users give (`--backend`): one line each.

Torch-free, so that the CLI can list and check `--backend` without importing torch; the
trainer class is imported from its "module:Class" string by `trainers.registry.trainer_class`
(inside a worker): launcher/ never imports trainers.
Adding a backend: one strategy/trainer module under `trainers/` plus one line here.
"""

from __future__ import annotations

import dataclasses

from launcher.errors import UserError


@dataclasses.dataclass(frozen=True)
class TrainerBackend:
    name: str
    #: "module:ClassName" of the trainer, imported on first use
    trainer: str
    #: what the user reads in --help
    description: str
    #: the package it needs beyond torch (None: torch alone), for the error when it is missing
    requires: str | None = None
    #: ZeRO stages it accepts (empty: --zero-stage does not apply)
    zero_stages: tuple[int, ...] = ()
    #: takes an FSDP block spec (--fsdp-blocks)
    blocks: bool = False


TRAINER_BACKENDS: dict[str, TrainerBackend] = {
    b.name: b
    for b in (
        TrainerBackend("ddp", "trainers.ddp:DDPTrainer", "PyTorch DistributedDataParallel"),
        TrainerBackend("fsdp", "trainers.fsdp_trainer:FSDPTrainer", "PyTorch FSDP2, sharded state", blocks=True),
        TrainerBackend(
            "deepspeed",
            "trainers.deepspeed_trainer:DeepSpeedTrainer",
            "a DeepSpeed engine (ZeRO stages)",
            requires="deepspeed",
            zero_stages=(0, 1, 2, 3),
        ),
    )
}

#: the default `--backend`
DEFAULT_TRAINER_BACKEND = "ddp"


def backend_names() -> tuple[str, ...]:
    return tuple(TRAINER_BACKENDS)


def trainer_backend(name: str) -> TrainerBackend:
    """The backend called `name`, or a UserError listing the known ones."""
    try:
        return TRAINER_BACKENDS[name]
    except KeyError:
        raise UserError(
            f"unknown trainer backend {name!r}; choose one of: {', '.join(TRAINER_BACKENDS)}"
        ) from None


#: what --fsdp-blocks means, for every --help that has it
FSDP_BLOCKS_HELP = (
    "--backend fsdp: the modules sharded as one unit each, comma-separated qualified-name globs or class "
    "names (e.g. 'layers.*' or 'Block'; default: every child holding parameters, inside ModuleList/ModuleDict)"
)


def check_blocks(backend: str, blocks: str | None) -> None:
    """--fsdp-blocks only with a backend that takes it."""
    if blocks is not None and not trainer_backend(backend).blocks:
        takes = [b.name for b in TRAINER_BACKENDS.values() if b.blocks]
        raise UserError(f"--fsdp-blocks is for --backend {' or '.join(takes)}, not --backend {backend}")


def zero_stages() -> tuple[int, ...]:
    """Every ZeRO stage some backend accepts (for `--zero-stage` choices)."""
    return tuple(sorted({s for b in TRAINER_BACKENDS.values() for s in b.zero_stages}))

