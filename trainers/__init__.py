"""gradaccum trainers: exact gradient accumulation for DDP, FSDP2 and DeepSpeed, and a reference.

`from trainers import DDPTrainer, FSDPTrainer, DeepSpeedTrainer, ReferenceTrainer, GlobalBatchSampler, Task`.
DeepSpeedTrainer and FSDPTrainer are imported on first use, so that importing the package
never imports deepspeed or torch.distributed.fsdp.
"""

from __future__ import annotations

from typing import Any

from trainers.accumulate import StepMetrics
from trainers.ddp import DDPTrainer
from trainers.reference import ReferenceTrainer
from trainers.sampler import GlobalBatchSampler
from trainers.task import Task, load_task
from trainers.trainer import CommonOptions, Trainer

__all__ = [
    "CommonOptions",
    "DDPTrainer",
    "DeepSpeedTrainer",
    "FSDPTrainer",
    "GlobalBatchSampler",
    "ReferenceTrainer",
    "StepMetrics",
    "Task",
    "Trainer",
    "load_task",
]


def __getattr__(name: str) -> Any:
    if name == "DeepSpeedTrainer":
        from trainers.deepspeed_trainer import DeepSpeedTrainer

        return DeepSpeedTrainer
    if name == "FSDPTrainer":
        from trainers.fsdp_trainer import FSDPTrainer

        return FSDPTrainer
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
