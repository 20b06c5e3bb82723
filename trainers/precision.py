"""Mixed precision for the trainers: autocast, fp32 gradient accumulation, fp16 loss scaling.

One setting, `precision` ("fp32", "bf16", "fp16"), recorded in the plan and meaning the same
on every trainer:

    precision  forward + loss          gradients across the K micro-steps       optimizer step
    fp32       fp32                    fp32 (p.grad)                             step
    bf16       autocast to bfloat16    fp32: p.grad of fp32 parameters is fp32;  step
                                       bf16 parameters get an fp32 accumulator
    fp16       autocast to float16     fp32 p.grad of the (scaled) loss          unscale once, clip,
                                                                                 step unless inf/nan

Why an accumulator for low-precision parameters: autograd adds each micro-step's gradient
into `p.grad`, which has the parameter's dtype. Summing K bfloat16 gradients rounds K times
(8 significant bits each time), so the error grows with K; summing them in fp32 and rounding
once, just before the optimizer step, keeps it at one rounding whatever K is (measured by
`accumulation_roundoff` and benchmarks/bf16_accumulation.py).

fp16 needs loss scaling (`torch.amp.GradScaler`): each micro-step's loss is scaled before its
backward, the summed gradients are unscaled once at the boundary (before clipping, so that
clipping sees true gradients), and the optimizer steps once. When the gradients hold inf or
nan the scaler skips the optimizer step and halves its scale; the LR scheduler does not step
either (it counts updates), while the global batch counts as consumed (the sampler and the
trainer's step counter move on: a skipped batch is logged, never silently retried). DDP
all-reduces the gradients before the check, so every rank sees the same inf and makes the
same decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from launcher.errors import UserError
from launcher.plan import PRECISIONS
from trainers.accumulate import grad_norm, gradient_scaler, optimizer_stepper

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_precision(plan_precision: str, precision: str | None) -> str:
    """A trainer's precision: its own argument, else the plan's; conflicting settings are an error.

    The plan's default (fp32) gives way to an explicit argument; any other plan precision
    that disagrees with the argument means two places set it, and one of them is wrong.
    """
    if precision is None:
        return check_precision(plan_precision)
    check_precision(precision)
    if plan_precision not in ("fp32", precision):
        raise UserError(
            f"the plan says precision {plan_precision} but the trainer was given precision={precision!r}; "
            "set it in one place (the plan: `gradaccum launch --precision`, or the --precision flag)"
        )
    return precision


def autocast_context(precision: str, device: torch.device | str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the context that forward and loss run in (nullcontext for fp32)."""
    dtype = AUTOCAST_DTYPES.get(check_precision(precision))
    if dtype is None:
        return nullcontext
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=dtype)


class Fp32GradAccumulator:
    """fp32 sums of the parameters' gradients across micro-steps, rounded once at the end.

    `collect()` after every backward moves `p.grad` into the fp32 sum (and frees it);
    `write_back()` before the optimizer step sets `p.grad` to the sum in the parameter's dtype.
    Memory: 4 bytes per parameter instead of the 2 of a bf16 `p.grad`.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.params = [p for p in parameters if p.requires_grad]
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    def collect(self) -> None:
        for p, total in zip(self.params, self.sums, strict=True):
            if p.grad is not None:
                total.add_(p.grad)
                p.grad = None

    def all_reduce_mean(self, all_reduce_sum: Callable[[torch.Tensor], Any], world_size: int) -> None:
        """One all-reduce of all sums, in fp32 (DDP's semantics: the mean over ranks)."""
        if not self.sums:
            return
        flat = torch.cat([t.reshape(-1) for t in self.sums])
        all_reduce_sum(flat)
        flat.div_(world_size)
        offset = 0
        for total in self.sums:
            n = total.numel()
            total.copy_(flat[offset : offset + n].view_as(total))
            offset += n

    def scale(self, factor: float) -> None:
        if self.sums and factor != 1.0:
            torch._foreach_mul_(self.sums, factor)

    def write_back(self) -> None:
        for p, total in zip(self.params, self.sums, strict=True):
            p.grad = total.to(p.dtype)
            total.zero_()


class MixedPrecision:
    """The precision-dependent hooks of one trainer: autocast, backward, scaling, step.

    `all_reduce_sum` (in place, over the data-parallel group) and `world_size` are given by
    distributed trainers: with low-precision parameters they reduce the fp32 accumulator
    themselves (one fp32 round per step), instead of DDP reducing K-rounded bf16 sums.
    """

    def __init__(
        self,
        precision: str,
        device: torch.device | str,
        parameters: Iterable[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        clip_grad_norm: float | None = None,
        *,
        all_reduce_sum: Callable[[torch.Tensor], Any] | None = None,
        world_size: int = 1,
        track_grad_norm: bool = False,
    ) -> None:
        self.precision = check_precision(precision)
        self.device = torch.device(device)
        self.params = [p for p in parameters if p.requires_grad]
        self.optimizer, self.scheduler, self.clip_grad_norm = optimizer, scheduler, clip_grad_norm
        low = sorted({str(p.dtype) for p in self.params if p.dtype in LOW_PRECISION_DTYPES})
        if self.precision == "fp16" and low:
            raise UserError(
                f"precision fp16 needs fp32 parameters (the model has {', '.join(low)} parameters): the loss "
                "scaler unscales fp32 gradients and autocast runs the forward in fp16. Keep the parameters in "
                "fp32, or use precision bf16 for low-precision parameters."
            )
        self.autocast = autocast_context(self.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.accumulator = Fp32GradAccumulator(self.params) if low else None
        self._all_reduce_sum, self._world_size = all_reduce_sum, world_size
        self.track_grad_norm = track_grad_norm
        self._plain_step = optimizer_stepper(optimizer, self.params, scheduler, clip_grad_norm, track_grad_norm)
        self._scale_grads = gradient_scaler(self.params)
        self.last_step_skipped = False
        self.skipped_steps = 0

    # ------------------------------------------------------------------ hooks
    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)  # per micro-step: small fp16 gradients do not flush to zero
        loss.backward()
        if self.accumulator is not None:
            self.accumulator.collect()

    @property
    def reduce_gradients(self) -> Callable[[], None] | None:
        """Set when this trainer reduces the fp32 accumulator itself (see AccumulationHooks)."""
        if self.accumulator is None or self._all_reduce_sum is None:
            return None
        return lambda: self.accumulator.all_reduce_mean(self._all_reduce_sum, self._world_size)

    def scale_gradients(self, factor: float) -> None:
        if self.accumulator is not None:
            self.accumulator.scale(factor)
        else:
            self._scale_grads(factor)

    def step(self) -> torch.Tensor | None:
        """Optimizer step; sets `last_step_skipped` (fp16 overflow) and returns the grad norm (a tensor)."""
        if self.accumulator is not None:
            self.accumulator.write_back()
        if self.scaler is None:
            self.last_step_skipped = False
            return self._plain_step()
        scaler = self.scaler
        scaler.unscale_(self.optimizer)  # once per optimizer step, before clipping
        norm = None
        if self.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
        elif self.track_grad_norm:
            norm = grad_norm(self.params)
        scale = scaler.get_scale()
        scaler.step(self.optimizer)  # skips optimizer.step() when a gradient is inf/nan
        scaler.update()
        # update() lowers the scale exactly when it found inf/nan: the public way to ask.
        self.last_step_skipped = scaler.get_scale() < scale
        if self.last_step_skipped:
            self.skipped_steps += 1
        elif self.scheduler is not None:
            self.scheduler.step()  # the schedule counts applied updates
        self.optimizer.zero_grad(set_to_none=True)
        return None if norm is None else norm.detach()

    def describe_skip(self, step: int) -> str:
        scale = self.scaler.get_scale() if self.scaler is not None else float("nan")
        return (
            f"gradaccum: step {step}: fp16 gradients overflowed (inf/nan), optimizer step skipped on every rank; "
            f"loss scale lowered to {scale:g}. The global batch of step {step} is consumed, not retried; the LR "
            f"schedule did not advance ({self.skipped_steps} skipped step(s) so far)"
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "precision": self.precision,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped_steps = int(state.get("skipped_steps", 0))


# ---------------------------------------------------------------- measurement
def micro_step_gradients(
    model: torch.nn.Module, micro_batches: Sequence[Any], loss_fn: Callable[[Any, Any], Any]
) -> list[list[torch.Tensor]]:
    """Each micro-batch's gradient on its own (in the parameters' dtype), loss divided by K."""
    params = [p for p in model.parameters() if p.requires_grad]
    k, out = len(micro_batches), []
    for batch in micro_batches:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss = loss[0] if isinstance(loss, (tuple, list)) else loss
        (loss / k).backward()
        out.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    return out


def _rel_error(got: list[torch.Tensor], exact: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - e).pow(2).sum()) for g, e in zip(got, exact, strict=True))
    den = sum(float(e.pow(2).sum()) for e in exact)
    return (num / den) ** 0.5 if den > 0 else 0.0


def accumulation_roundoff(grads: list[list[torch.Tensor]]) -> dict[str, float]:
    """Relative error (L2) of summing K micro-step gradients, against their exact (fp64) sum.

    `bf16_sum`: what autograd does with bf16 `p.grad` (a running sum, rounded at each add);
    `fp32_accumulator`: the Fp32GradAccumulator, rounded once to the parameter dtype;
    `fp32_before_cast`: the fp32 sum itself (what an fp32-gradient optimizer would see).
    """
    exact = [torch.zeros_like(g, dtype=torch.float64) for g in grads[0]]
    running = [g.clone() for g in grads[0]]
    fp32 = [torch.zeros_like(g, dtype=torch.float32) for g in grads[0]]
    for i, micro in enumerate(grads):
        for e, r, f, g in zip(exact, running, fp32, micro, strict=True):
            e.add_(g.double())
            f.add_(g)
            if i:
                r.add_(g)  # in the gradient's own dtype, as autograd accumulates
    return {
        "micro_steps": len(grads),
        "bf16_sum": _rel_error(running, exact),
        "fp32_accumulator": _rel_error([f.to(grads[0][j].dtype) for j, f in enumerate(fp32)], exact),
        "fp32_before_cast": _rel_error(fp32, exact),
    }
