"""DDPTrainer: PyTorch DistributedDataParallel with exact gradient accumulation.

Non-boundary micro-steps run forward AND backward inside `model.no_sync()` (DDP decides
in forward whether the coming backward will all-reduce), so an optimizer step costs one
gradient all-reduce round however large K is. With `count_collectives=True` a DDP
communication hook counts the rounds and then calls the default all-reduce, so the claim is
measured, not assumed (`gradaccum verify` and the tests turn it on). It is off by default:
a Python hook per bucket costs about 1% of a small model's step on CPU (benchmarks/).
The step's metrics all-reduce (loss, items, count) runs in the background: see StepMetrics.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.accumulate import AccumulationHooks, StepMetrics
from trainers.base import BaseTrainer, build_from_task
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, Watchdog, init_distributed
from trainers.precision import MixedPrecision
from trainers.task import Task

#: Where DDPTrainer departs from DistributedDataParallel's defaults (`ddp_kwargs` overrides):
#: gradients are views into the all-reduce buckets, so no copy between the two at each sync
#: and one gradient-sized buffer less (PyTorch's own advice; about 6% of the 5M-parameter
#: MLP's step on CPU, benchmarks/). The gradients are exactly the same numbers.
DDP_DEFAULTS: dict[str, Any] = {"gradient_as_bucket_view": True}


class AllReduceRoundCounter:
    """State for `counting_allreduce_hook`: rounds = backward passes that communicated."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.rounds = 0


def counting_allreduce_hook(state: AllReduceRoundCounter, bucket):  # noqa: ANN001
    # No annotations on bucket/return: DDP compares them with the real classes, and
    # `from __future__ import annotations` would turn them into strings it rejects.
    # One backward may send several buckets; exactly one of them is the last.
    if bucket.is_last():
        state.rounds += 1
    return default_hooks.allreduce_hook(state.process_group, bucket)


class DDPTrainer(BaseTrainer):
    """Data-parallel training, K micro-steps per optimizer step, one all-reduce round per step.

    `model` is the plain module (or an existing DDP wrapper); the process group is
    initialised from the environment (torchrun, mpirun, srun, `gradaccum launch`) if it is
    not already, and its size must equal `plan.world_size`.
    `ddp_kwargs` go to DistributedDataParallel on top of `DDP_DEFAULTS`
    (`gradient_as_bucket_view=True`). `sync_every_micro_step=True` disables no_sync (the
    naive loop: K rounds per step) and exists only to demonstrate and benchmark the
    difference. `count_collectives=True` fills `StepMetrics.allreduce_rounds` (gradient
    all-reduce rounds per optimizer step).
    """

    _supports_plan_change = True

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: BatchPlan,
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
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        backend: str | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        precision: str | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
        log: bool = True,
        log_every: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        keep_last: int | None = None,
    ) -> None:
        if plan.model_parallel_size != 1:
            raise UserError(
                f"DDPTrainer is pure data-parallel; the plan has model-parallel size {plan.model_parallel_size}"
            )
        info = init_distributed(plan, backend, collective_timeout=collective_timeout)
        module = model.module if isinstance(model, DDP) else model
        module.to(info.device)
        if isinstance(model, DDP):
            ddp = model
        else:
            device_ids = [info.device] if info.device.type == "cuda" else None
            ddp = DDP(module, device_ids=device_ids, **{**DDP_DEFAULTS, **(ddp_kwargs or {})})
        self.rounds = AllReduceRoundCounter() if count_collectives else None
        if self.rounds is not None:
            ddp.register_comm_hook(self.rounds, counting_allreduce_hook)
        super().__init__(
            ddp,
            module,
            optimizer,
            plan,
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
            device=info.device,
            dp_rank=info.rank,
            precision=precision,
            log_every=log_every,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            keep_last=keep_last,
        )
        self.dist = info
        self.sync_every_micro_step = sync_every_micro_step
        self.amp = MixedPrecision(
            self.precision,
            info.device,
            module.parameters(),
            optimizer,
            scheduler,
            clip_grad_norm,
            all_reduce_sum=self._all_reduce_sum,
            world_size=info.world_size,
            track_grad_norm=track_grad_norm,
        )
        # names the rank(s) the others wait for and exits, instead of hanging (None: one process)
        self.watchdog = Watchdog.for_process_group(collective_timeout)
        if log:
            self.log(
                f"gradaccum: DDP {info.backend} on {info.world_size} process(es) ({info.launcher or 'single'}), plan:\n"
                + plan.describe()
            )

    @classmethod
    def from_task(cls, task: Task, plan: BatchPlan, **kwargs: Any) -> DDPTrainer:
        """Seed torch, build the task's model on this rank's device, wrap it, build the optimizer."""
        timeout = kwargs.get("collective_timeout", DEFAULT_COLLECTIVE_TIMEOUT_S)
        info = init_distributed(plan, kwargs.get("backend"), collective_timeout=timeout)
        model, optimizer, fields = build_from_task(task, info.device)
        scheduler = task.scheduler(optimizer) if task.scheduler is not None else None
        return cls(model, optimizer, plan, task.loss, scheduler=scheduler, **fields, **kwargs)

    def _all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def _all_reduce_sum_async(self, tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
        work = dist.all_reduce(tensor, async_op=True)

        def finish() -> torch.Tensor:
            work.wait()
            return tensor

        return finish

    def _hooks(self) -> AccumulationHooks:
        amp = self.amp
        return AccumulationHooks(
            step=amp.step,
            scale_gradients=amp.scale_gradients,
            no_sync=nullcontext if self.sync_every_micro_step else self.model.no_sync,
            backward=amp.backward,
            all_reduce_sum=self._all_reduce_sum,
            all_reduce_sum_async=self._all_reduce_sum_async,
            autocast=amp.autocast,
            reduce_gradients=self._reduce_gradients if amp.reduce_gradients is not None else None,
        )

    def _reduce_gradients(self) -> None:
        # Low-precision parameters: the fp32 accumulator's all-reduce is this step's gradient
        # round (every backward ran in no_sync, so the comm hook does not count it).
        self._count_gradient_round()
        self.amp.reduce_gradients()

    def _count_gradient_round(self) -> None:
        if self.rounds is not None:
            self.rounds.rounds += 1

    def _before_step(self) -> None:
        if self.rounds is not None:
            self.rounds.rounds = 0

    def _after_step(self, metrics: StepMetrics) -> None:
        if self.rounds is not None:
            metrics.allreduce_rounds = self.rounds.rounds
