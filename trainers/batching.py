"""Changing the plan between optimizer steps: out-of-memory fallback and batch-size ramps.

Both keep the update exact. The OOM fallback keeps the global batch (the same items, the
same loss normalisation) and only re-cuts it into smaller micro-batches, so the weights
equal a run that never ran out of memory. A batch ramp changes the global batch at
scheduled sample counts (launcher.ramp.BatchRamp) and rescales the learning rate by the
trainer's rule (launcher.lr), as an elastic resume with a new global batch does.

`PlanChanges` is the component that decides: it owns the OOM fallback switch and its
events, the batch ramp and the LR rule, and answers "which plan next"; the Trainer applies
the answer (trainer.plan, its StepData, the learning rate). The trainers' public face is
Trainer.enable_oom_fallback / set_batch_ramp / set_plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from launcher.errors import UserError
from launcher.lr import LRRule
from launcher.plan import BatchPlan, _divisors
from launcher.ramp import BatchRamp

if TYPE_CHECKING:
    from trainers.strategies.base import Strategy


def smaller_plan(plan: BatchPlan) -> BatchPlan:
    """The same global batch with the micro-batch at most halved (accumulation grows)."""
    per_rank = plan.global_batch_size // plan.data_parallel_size
    candidates = [d for d in _divisors(per_rank) if d <= plan.micro_batch_size // 2]
    if not candidates:
        raise UserError(
            f"out of memory even at micro-batch {plan.micro_batch_size}: nothing smaller divides the "
            f"{per_rank} samples per rank; use a smaller model, model parallelism or more memory"
        )
    micro = max(candidates)
    return BatchPlan.solve(
        plan.global_batch_size,
        micro,
        world_size=plan.world_size,
        model_parallel_size=plan.model_parallel_size,
        precision=plan.precision,
    )


def agree_any(all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Callable[[bool], bool]:
    """flag -> did any rank raise it (one tiny all-reduce through the strategy's sum)."""

    def agree(flag: bool) -> bool:
        return float(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device))[0]) > 0

    return agree


class PlanChanges:
    """OOM fallback, batch ramp and LR rule: what may change the plan between steps."""

    def __init__(self) -> None:
        self.oom_fallback = False
        self.oom_events: list[tuple[int, int, int]] = []  # (step, old micro, new micro)
        self.batch_ramp: BatchRamp | None = None
        self.lr_scaling: str | LRRule = "linear"  # rule for a new global batch: ramp stages, resumes

    def enable_oom_fallback(self, owner: str, strategy: Strategy) -> None:
        if not strategy.supports_plan_change:
            raise UserError(
                f"{owner} cannot change its micro-batch during training (the engine fixes "
                "the accumulation steps); plan the micro-batch with `gradaccum plan --micro-batch-size auto`"
            )
        problem = strategy.check_oom_fallback()
        if problem:
            raise UserError(problem)
        self.oom_fallback = True

    def after_oom(self, plan: BatchPlan, step: int) -> tuple[BatchPlan, str]:
        """The plan to retry step `step` with, and the log line that says so."""
        new = smaller_plan(plan)
        self.oom_events.append((step, plan.micro_batch_size, new.micro_batch_size))
        return new, (
            f"gradaccum: out of memory in step {step} at micro-batch {plan.micro_batch_size}: "
            f"micro {plan.micro_batch_size} -> {new.micro_batch_size}, accumulation "
            f"{plan.gradient_accumulation_steps} -> {new.gradient_accumulation_steps} "
            f"(global batch {new.global_batch_size} unchanged); retrying the step"
        )

    def check_plan(self, owner: str, strategy: Strategy, old: BatchPlan, plan: BatchPlan) -> BatchPlan:
        """`plan` as the trainer will run it (precision kept), or a UserError why it cannot."""
        if not strategy.supports_plan_change:
            raise UserError(f"{owner} cannot change its batch plan during training")
        if (plan.world_size, plan.model_parallel_size) != (old.world_size, old.model_parallel_size):
            raise UserError(
                f"set_plan keeps the world size ({old.world_size}); got a plan for {plan.world_size}: "
                "a new world size is a resume (trainer.resume at the new size)"
            )
        if plan.precision != old.precision:
            plan = BatchPlan.solve(
                plan.global_batch_size, plan.micro_batch_size, world_size=plan.world_size,
                model_parallel_size=plan.model_parallel_size, precision=old.precision,
            )  # fmt: skip
        return plan

    def set_batch_ramp(self, ramp: BatchRamp | str, plan: BatchPlan, lr_scaling: str | LRRule | None) -> None:
        if isinstance(ramp, str):
            final = BatchPlan.solve(
                plan.global_batch_size, plan.micro_batch_size, world_size=plan.world_size,
                model_parallel_size=plan.model_parallel_size, precision=plan.precision,
            )  # fmt: skip
            ramp = BatchRamp.parse(ramp, final)
        if ramp.final.world_size != plan.world_size:
            ramp = ramp.with_world_size(plan.world_size)
        if lr_scaling is not None:
            self.lr_scaling = lr_scaling
        self.batch_ramp = ramp

    def ramp_plan(self, plan: BatchPlan, consumed: int) -> BatchPlan | None:
        """The ramp's plan for `consumed` samples when it differs from `plan` (None: keep it)."""
        ramp = self.batch_ramp
        if ramp is None or ramp.global_batch_at(consumed) == plan.global_batch_size:
            return None
        # never grow back to a micro-batch that ran out of memory
        cap = self.oom_events[-1][2] if self.oom_events else None
        return ramp.plan_at(consumed, cap)

    def state_dict(self) -> dict[str, Any]:
        """Not in checkpoints (a resume sets its own switches); for inspection and tests."""
        return {"oom_fallback": self.oom_fallback, "oom_events": list(self.oom_events)}
