"""ReferenceTrainer: one process, the whole global batch in one forward/backward per step.

The yardstick the distributed trainers are compared with. It runs the same loss contract
through the same `accumulation_step`, with one micro-batch and one "rank", so there is
nothing to synchronise and nothing to accumulate: a (loss_sum, count) loss is divided by
the global batch's count, a scalar-mean loss is the mean over the global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from launcher.plan import BatchPlan
from trainers.accumulate import AccumulationHooks
from trainers.base import BaseTrainer, build_from_task
from trainers.precision import MixedPrecision
from trainers.task import Task


def reference_plan(plan_or_global_batch: BatchPlan | int) -> BatchPlan:
    if isinstance(plan_or_global_batch, int):
        g, precision = plan_or_global_batch, "fp32"
    else:
        g, precision = plan_or_global_batch.global_batch_size, plan_or_global_batch.precision
    return BatchPlan(g, g, gradient_accumulation_steps=1, world_size=1, precision=precision)


class ReferenceTrainer(BaseTrainer):
    """Single device: `plan` may be the distributed plan (only its global batch size is used)."""

    _supports_plan_change = True

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: BatchPlan | int,
        loss: Callable[[Any, Any], Any],
        *,
        dataset: Sequence[Any] | None = None,
        count: Callable[[Any], Any] | None = None,
        collate: Callable[[list], Any] | None = None,
        scheduler: Any = None,
        clip_grad_norm: float | None = None,
        track_grad_norm: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        device: torch.device | str | None = None,
        log_every: int = 0,
        precision: str | None = None,
    ) -> None:
        device = torch.device(device) if device is not None else torch.device("cpu")
        model.to(device)
        super().__init__(
            model,
            model,
            optimizer,
            reference_plan(plan),
            loss,
            dataset=dataset,
            count=count,
            collate=collate,
            scheduler=scheduler,
            clip_grad_norm=clip_grad_norm,
            track_grad_norm=track_grad_norm,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
            device=device,
            log_every=log_every,
            precision=precision,
        )
        self.amp = MixedPrecision(
            self.precision,
            device,
            model.parameters(),
            optimizer,
            scheduler,
            clip_grad_norm,
            track_grad_norm=track_grad_norm,
        )

    @classmethod
    def from_task(cls, task: Task, plan: BatchPlan | int, **kwargs: Any) -> ReferenceTrainer:
        """Seed torch exactly as the distributed trainers do, then build model and optimizer."""
        device = torch.device(kwargs.pop("device", None) or "cpu")
        model, optimizer, fields = build_from_task(task, device)
        scheduler = task.scheduler(optimizer) if task.scheduler is not None else None
        return cls(model, optimizer, plan, task.loss, scheduler=scheduler, device=device, **fields, **kwargs)

    def _hooks(self) -> AccumulationHooks:
        amp = self.amp
        return AccumulationHooks(
            step=amp.step, scale_gradients=amp.scale_gradients, backward=amp.backward, autocast=amp.autocast
        )
