"""DDPStrategy: PyTorch DistributedDataParallel, one gradient all-reduce round per step.

Non-boundary micro-steps run forward AND backward inside `model.no_sync()` (DDP decides
in forward whether the coming backward will all-reduce), so an optimizer step costs one
gradient all-reduce round however large K is. With `count_collectives=True` a DDP
communication hook counts the rounds and then calls the default all-reduce, so the claim is
measured, not assumed (`gradaccum verify` and the tests turn it on). It is off by default:
a Python hook per bucket costs a little of a small model's step (docs/performance.md).
The step's metrics all-reduce (loss, items, count) runs in the background: see StepMetrics.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.distributed import DEFAULT_COLLECTIVE_TIMEOUT_S, DistInfo, init_distributed
from trainers.precision import MixedPrecision
from trainers.strategies.base import Strategy, process_group_sum, process_group_sum_async
from trainers.strategies.single import bind_precision

if TYPE_CHECKING:
    from trainers.accumulate import StepMetrics
    from trainers.trainer import CommonOptions

#: Where DDPTrainer departs from DistributedDataParallel's defaults (`ddp_kwargs` overrides):
#: gradients are views into the all-reduce buckets, so no copy between the two at each sync
#: and one gradient-sized buffer less (PyTorch's own advice; measured in benchmarks/). The
#: gradients are exactly the same numbers.
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


class DDPStrategy(Strategy):
    """See the module docstring; the options are DDPTrainer's (its docstring explains them)."""

    name = "ddp"

    def __init__(
        self,
        *,
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        backend: str | None = None,
        ddp_kwargs: dict[str, Any] | None = None,
        collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        self.sync_every_micro_step = sync_every_micro_step
        self.count_collectives = count_collectives
        self.backend = backend
        self.ddp_kwargs = ddp_kwargs
        self.collective_timeout = collective_timeout
        self.rounds: AllReduceRoundCounter | None = None
        self.dist: DistInfo | None = None
        self.all_reduce_sum_async = process_group_sum_async

    def device_for(self, plan: BatchPlan) -> torch.device:
        return init_distributed(plan, self.backend, collective_timeout=self.collective_timeout).device

    def setup(self, model: Any, optimizer: Any, plan: BatchPlan, options: CommonOptions) -> BatchPlan:
        if plan.model_parallel_size != 1:
            raise UserError(
                f"DDPTrainer is pure data-parallel; the plan has model-parallel size {plan.model_parallel_size}"
            )
        info = init_distributed(plan, self.backend, collective_timeout=self.collective_timeout)
        module = model.module if isinstance(model, DDP) else model
        module.to(info.device)
        if isinstance(model, DDP):
            ddp = model
        else:
            device_ids = [info.device] if info.device.type == "cuda" else None
            ddp = DDP(module, device_ids=device_ids, **{**DDP_DEFAULTS, **(self.ddp_kwargs or {})})
        if self.count_collectives:
            self.rounds = AllReduceRoundCounter()
            ddp.register_comm_hook(self.rounds, counting_allreduce_hook)
        self.model, self.module, self.optimizer, self.scheduler = ddp, module, optimizer, options.scheduler
        self.dist, self.device, self.dp_rank, self.dp_size = info, info.device, info.rank, info.world_size
        self.precision = options.precision
        self.amp = MixedPrecision(
            self.precision,
            info.device,
            module.parameters(),
            optimizer,
            options.scheduler,
            options.clip_grad_norm,
            all_reduce_sum=self.all_reduce_sum,
            world_size=info.world_size,
            track_grad_norm=options.track_grad_norm,
        )
        bind_precision(self, self.amp)
        self.no_sync = nullcontext if self.sync_every_micro_step else ddp.no_sync  # type: ignore[method-assign]
        return plan

    def describe(self, plan: BatchPlan) -> str:
        info = self.dist
        return (
            f"gradaccum: DDP {info.backend} on {info.world_size} process(es) ({info.launcher or 'single'}), plan:\n"
            + plan.describe()
        )

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return process_group_sum(tensor)

    @property
    def reduce_gradients(self) -> Callable[[], None] | None:
        return self._reduce_gradients if self.amp.reduce_gradients is not None else None

    def _reduce_gradients(self) -> None:
        # Low-precision parameters: the fp32 accumulator's all-reduce is this step's gradient
        # round (every backward ran in no_sync, so the comm hook does not count it).
        self.count_gradient_round()
        self.amp.reduce_gradients()

    def count_gradient_round(self) -> None:
        if self.rounds is not None:
            self.rounds.rounds += 1

    def begin_step(self) -> None:
        if self.rounds is not None:
            self.rounds.rounds = 0

    def end_step(self, metrics: StepMetrics) -> None:
        if self.rounds is not None:
            metrics.allreduce_rounds = self.rounds.rounds
