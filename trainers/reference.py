"""ReferenceTrainer: one process, the whole global batch in one forward/backward per step.

The yardstick the distributed trainers are compared with. It runs the same loss contract
through the same Trainer core and accumulation step, with one micro-batch and one "rank"
(SingleDeviceStrategy), so there is nothing to synchronise and nothing to accumulate: a
(loss_sum, count) loss is divided by the global batch's count, a scalar-mean loss is the
mean over the global batch. It takes the checkpoint options like the other trainers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from launcher.plan import BatchPlan
from trainers.strategies.single import SingleDeviceStrategy
from trainers.trainer import CommonOptions, Trainer


def reference_plan(plan_or_global_batch: BatchPlan | int) -> BatchPlan:
    if isinstance(plan_or_global_batch, int):
        g, precision = plan_or_global_batch, "fp32"
    else:
        g, precision = plan_or_global_batch.global_batch_size, plan_or_global_batch.precision
    return BatchPlan(g, g, gradient_accumulation_steps=1, world_size=1, precision=precision)


class ReferenceTrainer(Trainer):
    """Single device: `plan` may be the distributed plan (only its global batch size is used).
    `**options` are CommonOptions (dataset, count, collate, scheduler, checkpoint_dir, ...)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: BatchPlan | int,
        loss: Callable[[Any, Any], Any],
        *,
        device: torch.device | str | None = None,
        log: bool = False,
        **options: Any,
    ) -> None:
        strategy = SingleDeviceStrategy(device)
        super().__init__(strategy, model, optimizer, reference_plan(plan), loss, CommonOptions(**options), log=log)

    @classmethod
    def _task_device(cls, plan: BatchPlan | int, kwargs: dict[str, Any]) -> torch.device:
        device = torch.device(kwargs.pop("device", None) or "cpu")
        kwargs["device"] = device
        return device
