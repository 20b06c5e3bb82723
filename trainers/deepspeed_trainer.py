"""DeepSpeedTrainer: the same step and loss contract as DDPTrainer, driven through a DeepSpeed engine.

A front door: the Trainer core (trainers/trainer.py) with a DeepSpeedStrategy
(trainers/strategies/deepspeed.py: the config from the plan, loss scaling without
double division, gradient scaling where the engine keeps them, collective counting,
the engine's own checkpoint files). Importing this module does not import deepspeed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from launcher.plan import BatchPlan
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo
from trainers.strategies.deepspeed import (
    CHECKPOINT_SUBDIR,
    CHECKPOINT_TAG,
    GRADIENT_COLLECTIVES,
    INSTALL_HINT,
    LAYOUT_FILE,
    CollectiveCounter,
    DeepSpeedNotInstalled,
    DeepSpeedStrategy,
    EngineMismatch,
    engine_mismatches,
    import_deepspeed,
    needs_universal,
    resume_problem,
)
from trainers.trainer import CommonOptions, Trainer

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CHECKPOINT_TAG",
    "GRADIENT_COLLECTIVES",
    "INSTALL_HINT",
    "LAYOUT_FILE",
    "CollectiveCounter",
    "DeepSpeedNotInstalled",
    "DeepSpeedTrainer",
    "EngineMismatch",
    "engine_mismatches",
    "import_deepspeed",
    "needs_universal",
    "resume_problem",
]


class DeepSpeedTrainer(Trainer):
    """Data-parallel training through a DeepSpeed engine (ZeRO 0, 1, 2 or 3), exact accumulation.

    `optimizer` is a torch optimizer over `model`'s parameters, a factory
    `optimizer(parameters)`, or None when `ds_config` defines one (a config-defined Adam
    compiles DeepSpeed's fused_adam on first use). `scheduler` is an LR scheduler or a
    factory `scheduler(optimizer)` (or None, or defined in `ds_config`); the engine steps it
    once per optimizer step.
    `ds_config` is a user's DeepSpeed JSON (dict or path) merged under the plan: its batch
    keys must agree with the plan, and its ZeRO stage with `zero_stage`.
    `clip_grad_norm` is written into the config as `gradient_clipping` (0.0, i.e. off, when
    neither gives one: DeepSpeed's own default would clip at 1.0). `**options` are
    CommonOptions (dataset, count, collate, scheduler, precision, checkpoint_dir, ...).
    """

    _scheduler_factory = True  # DeepSpeed calls the task's factory with the optimizer it steps

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Callable[[Any], torch.optim.Optimizer] | None,
        plan: BatchPlan,
        loss: Callable[[Any, Any], Any],
        *,
        zero_stage: int | None = None,
        ds_config: Mapping[str, Any] | str | Path | None = None,
        backend: str | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        count_collectives: bool = False,
        log: bool = True,
        **options: Any,
    ) -> None:
        strategy = DeepSpeedStrategy(
            zero_stage=zero_stage,
            ds_config=ds_config,
            backend=backend,
            collective_timeout=collective_timeout,
            count_collectives=count_collectives,
        )
        super().__init__(strategy, model, optimizer, plan, loss, CommonOptions(**options), log=log)
        self.strategy: DeepSpeedStrategy = strategy
        # the engine's clipping (config "gradient_clipping"), as the trainer reports it
        self.clip_grad_norm = strategy.config["gradient_clipping"] or None

    @classmethod
    def _task_device(cls, plan: BatchPlan, kwargs: dict[str, Any]) -> torch.device:
        timeout = kwargs.get("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S)
        return DeepSpeedStrategy(backend=kwargs.get("backend"), collective_timeout=timeout).device_for(plan)

    @property
    def engine(self) -> Any:
        return self.strategy.engine

    @property
    def config(self) -> dict[str, Any]:
        return self.strategy.config

    @property
    def zero_stage(self) -> int:
        return self.strategy.zero_stage

    @property
    def dist(self) -> DistInfo:
        return self.strategy.dist

    @property
    def collectives(self) -> CollectiveCounter | None:
        return self.strategy.collectives

    @property
    def last_collective_calls(self) -> dict[str, int]:
        """Calls per reducing collective in the last step's backward passes (count_collectives=True)."""
        return self.strategy.last_collective_calls

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the model's state_dict with every parameter's fp32 master copy (collective:
        call it on every rank).

        In fp32 at ZeRO 0-2 this is a copy of `module.state_dict()`. With bf16/fp16, DeepSpeed holds
        the module in 16 bits and updates fp32 master copies (partitioned at ZeRO 1/2); those are
        what a comparison with an fp32 run, or an fp32 export, wants. At ZeRO 3 the module's
        parameters are empty partitions: every one is gathered in full from the fp32 masters.
        """
        return self.strategy.fp32_state_dict()
