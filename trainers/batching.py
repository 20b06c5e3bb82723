"""Changing the plan between optimizer steps: out-of-memory fallback and batch-size ramps.

Both keep the update exact. The OOM fallback keeps the global batch (the same items, the
same loss normalisation) and only re-cuts it into smaller micro-batches, so the weights
equal a run that never ran out of memory. A batch ramp changes the global batch at
scheduled sample counts (launcher.ramp.BatchRamp) and rescales the learning rate by the
trainer's rule (launcher.lr), as an elastic resume with a new global batch does.

The trainers' public face is BaseTrainer.enable_oom_fallback / set_batch_ramp / set_plan.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launcher.errors import UserError
from launcher.lr import LRRule
from launcher.plan import BatchPlan, _divisors
from launcher.ramp import BatchRamp

if TYPE_CHECKING:
    from trainers.base import BaseTrainer


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


def agree_any(all_reduce_sum: Any, device: torch.device) -> Any:
    """flag -> did any rank raise it (one tiny all-reduce through the trainer's hook)."""

    def agree(flag: bool) -> bool:
        return float(all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device))[0]) > 0

    return agree


def all_reduce_gradient_mean(trainer: BaseTrainer) -> None:
    """Average the accumulated gradients over data-parallel ranks in one flat all-reduce."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in trainer.module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)
    trainer._count_gradient_round()


def enable_oom_fallback(trainer: BaseTrainer) -> None:
    if not trainer._supports_plan_change:
        raise UserError(
            f"{type(trainer).__name__} cannot change its micro-batch during training (the engine fixes "
            "the accumulation steps); plan the micro-batch with `gradaccum plan --micro-batch-size auto`"
        )
    if trainer.amp is not None and getattr(trainer.amp, "accumulator", None) is not None:
        raise UserError("the OOM fallback does not combine with bf16/fp16 parameters (fp32 accumulator); use autocast")
    trainer.oom_fallback = True


def shrink_after_oom(trainer: BaseTrainer) -> None:
    """Every rank: drop this step's partial gradients and re-cut the global batch smaller."""
    if trainer.optimizer is not None:
        trainer.optimizer.zero_grad(set_to_none=True)
    old = trainer.plan
    new = smaller_plan(old)
    trainer.plan = new
    if trainer.sampler is not None:
        trainer.sampler.plan = new  # same global batch: the position does not move
    trainer.oom_events.append((trainer.global_step + 1, old.micro_batch_size, new.micro_batch_size))
    trainer.log(
        f"gradaccum: out of memory in step {trainer.global_step + 1} at micro-batch {old.micro_batch_size}: "
        f"micro {old.micro_batch_size} -> {new.micro_batch_size}, accumulation "
        f"{old.gradient_accumulation_steps} -> {new.gradient_accumulation_steps} "
        f"(global batch {new.global_batch_size} unchanged); retrying the step"
    )


def set_plan(trainer: BaseTrainer, plan: BatchPlan, lr_scaling: str | LRRule | None = None) -> None:
    """Switch to `plan` before the next optimizer step (same world size)."""
    from trainers.resume import describe_change, rescale_learning_rate

    old = trainer.plan
    if plan == old:
        return
    if not trainer._supports_plan_change:
        raise UserError(f"{type(trainer).__name__} cannot change its batch plan during training")
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
    trainer.plan = plan
    notes = [f"gradaccum: plan change before step {trainer.global_step + 1}: {describe_change(old, plan)}"]
    if trainer.sampler is not None:
        state = trainer.sampler.state_dict()
        trainer.sampler.plan = plan
        trainer.sampler.load_state_dict(state, allow_new_global_batch=plan.global_batch_size != old.global_batch_size)
    if plan.global_batch_size != old.global_batch_size and trainer.optimizer is not None:
        rule = trainer.lr_scaling if lr_scaling is None else lr_scaling
        notes.append(
            rescale_learning_rate(
                trainer.optimizer, trainer.scheduler, old.global_batch_size, plan.global_batch_size, rule
            )
        )
    trainer.log("\n  ".join(notes))


def follow_ramp(trainer: BaseTrainer) -> None:
    """Before a step: take the ramp's plan for the samples consumed so far."""
    ramp: BatchRamp = trainer.batch_ramp
    consumed = trainer.sampler.consumed_samples
    if ramp.global_batch_at(consumed) == trainer.plan.global_batch_size:
        return
    # never grow back to a micro-batch that ran out of memory
    cap = trainer.oom_events[-1][2] if trainer.oom_events else None
    set_plan(trainer, ramp.plan_at(consumed, cap))


def set_batch_ramp(trainer: BaseTrainer, ramp: BatchRamp | str, lr_scaling: str | LRRule | None = None) -> None:
    if trainer.sampler is None:
        raise UserError("a batch ramp needs the trainer's dataset (the ramp follows the samples consumed)")
    if isinstance(ramp, str):
        final = BatchPlan.solve(
            trainer.plan.global_batch_size, trainer.plan.micro_batch_size, world_size=trainer.plan.world_size,
            model_parallel_size=trainer.plan.model_parallel_size, precision=trainer.plan.precision,
        )  # fmt: skip
        ramp = BatchRamp.parse(ramp, final)
    if ramp.final.world_size != trainer.plan.world_size:
        ramp = ramp.with_world_size(trainer.plan.world_size)
    if lr_scaling is not None:
        trainer.lr_scaling = lr_scaling
    trainer.batch_ramp = ramp
    follow_ramp(trainer)
