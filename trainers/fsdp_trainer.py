"""FSDPTrainer: PyTorch FSDP2 (parameters, gradients and optimizer state sharded), exact accumulation.

A front door: the Trainer core (trainers/trainer.py) with an FSDPStrategy
(trainers/strategies/fsdp.py: sharding, sync off between micro-steps, SUM reduction, DCP
checkpoints that reshard; trainers/fsdp.py: the FSDP2 building blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from launcher.plan import BatchPlan
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo
from trainers.fsdp import BlockSpecError, GradientReductionCounter
from trainers.strategies.fsdp import CHECKPOINT_SUBDIR, FSDPStrategy
from trainers.trainer import CommonOptions, Trainer

__all__ = ["CHECKPOINT_SUBDIR", "BlockSpecError", "FSDPTrainer", "GradientReductionCounter"]


class FSDPTrainer(Trainer):
    """Sharded data-parallel training, K micro-steps per optimizer step, one reduce-scatter round per step.

    `model`: the unsharded module (or a factory `model()`); it is sharded in place with
    `fully_shard` per block and at the root, and `trainer.module` is the sharded module.
    `optimizer`: a FACTORY `optimizer(parameters)`, called after sharding (the parameters
    are DTensors then); `scheduler=` may be a factory `scheduler(optimizer)` for the same
    reason. `fsdp_blocks`: which modules form a block, qualified-name globs per dotted
    segment or class names (`"layers.*"`, `"Block"`, a list or a comma-separated string);
    default: every direct child holding parameters, descending into ModuleList/ModuleDict
    (trainers/fsdp.py). `sync_every_micro_step=True` reduces after every micro-step (K
    rounds: only to demonstrate the difference). `count_collectives=True` fills
    `StepMetrics.allreduce_rounds` (backward passes that reduced gradients). `**options` are
    CommonOptions (dataset, count, collate, scheduler, clip_grad_norm, precision: fp32 or bf16,
    checkpoint_dir, ...). `trainer.full_state_dict()` gathers the whole model (collective).
    """

    _optimizer_factory = True  # from_task hands over the task's optimizer factory
    _scheduler_factory = True  # and its scheduler factory: both are built after sharding

    def __init__(
        self,
        model: torch.nn.Module | Callable[[], torch.nn.Module],
        optimizer: Callable[[Any], torch.optim.Optimizer],
        plan: BatchPlan,
        loss: Callable[[Any, Any], Any],
        *,
        fsdp_blocks: Sequence[str] | str | None = None,
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        backend: str | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        log: bool = True,
        **options: Any,
    ) -> None:
        strategy = FSDPStrategy(
            blocks=fsdp_blocks,
            sync_every_micro_step=sync_every_micro_step,
            count_collectives=count_collectives,
            backend=backend,
            collective_timeout=collective_timeout,
        )
        super().__init__(strategy, model, optimizer, plan, loss, CommonOptions(**options), log=log)
        self.strategy: FSDPStrategy = strategy

    @classmethod
    def _task_device(cls, plan: BatchPlan, kwargs: dict[str, Any]) -> torch.device:
        timeout = kwargs.get("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S)
        return FSDPStrategy(backend=kwargs.get("backend"), collective_timeout=timeout).device_for(plan)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state_dict, plain CPU tensors, its own keys (collective: every rank calls it)."""
        return self.strategy.full_state_dict()

    @property
    def counter(self) -> GradientReductionCounter | None:
        """The gradient reduction round counter (count_collectives=True), else None."""
        return self.strategy.counter

    @property
    def dist(self) -> DistInfo:
        return self.strategy.dist

    @property
    def sync_every_micro_step(self) -> bool:
        return self.strategy.sync_every_micro_step
