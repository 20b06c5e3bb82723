"""DDPTrainer: PyTorch DistributedDataParallel with exact gradient accumulation.

A front door: the Trainer core (trainers/trainer.py) with a DDPStrategy
(trainers/strategies/ddp.py, which says how no_sync, the round counter and the background
metrics all-reduce work).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from launcher.plan import BatchPlan
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo
from trainers.strategies.ddp import DDP_DEFAULTS, AllReduceRoundCounter, DDPStrategy, counting_allreduce_hook
from trainers.trainer import CommonOptions, Trainer

__all__ = ["DDP_DEFAULTS", "AllReduceRoundCounter", "DDPTrainer", "counting_allreduce_hook"]


class DDPTrainer(Trainer):
    """Data-parallel training, K micro-steps per optimizer step, one all-reduce round per step.

    `model` is the plain module (or an existing DDP wrapper); the process group is
    initialised from the environment (torchrun, mpirun, srun, `gradaccum launch`) if it is
    not already, and its size must equal `plan.world_size`.
    `ddp_kwargs` go to DistributedDataParallel on top of `DDP_DEFAULTS`
    (`gradient_as_bucket_view=True`). `sync_every_micro_step=True` disables no_sync (the
    naive loop: K rounds per step) and exists only to demonstrate and benchmark the
    difference. `count_collectives=True` fills `StepMetrics.allreduce_rounds` (gradient
    all-reduce rounds per optimizer step). `**options` are CommonOptions (dataset, count,
    collate, scheduler, clip_grad_norm, precision, checkpoint_dir, ...).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: BatchPlan,
        loss: Callable[[Any, Any], Any],
        *,
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        backend: str | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        log: bool = True,
        **options: Any,
    ) -> None:
        strategy = DDPStrategy(
            sync_every_micro_step=sync_every_micro_step,
            count_collectives=count_collectives,
            backend=backend,
            ddp_kwargs=ddp_kwargs,
            collective_timeout=collective_timeout,
        )
        super().__init__(strategy, model, optimizer, plan, loss, CommonOptions(**options), log=log)
        self.strategy: DDPStrategy = strategy

    @classmethod
    def _task_device(cls, plan: BatchPlan, kwargs: dict[str, Any]) -> torch.device:
        timeout = kwargs.get("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S)
        return DDPStrategy(backend=kwargs.get("backend"), collective_timeout=timeout).device_for(plan)

    @property
    def rounds(self) -> AllReduceRoundCounter | None:
        """The gradient all-reduce round counter (count_collectives=True), else None."""
        return self.strategy.rounds

    @property
    def dist(self) -> DistInfo:
        return self.strategy.dist

    @property
    def sync_every_micro_step(self) -> bool:
        return self.strategy.sync_every_micro_step
