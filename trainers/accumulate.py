"""The accumulation step: K micro-steps, gradient sync only on the last, one optimizer step.

`accumulation_step` owns the micro-step loop for every trainer. Backends differ only in the
hooks passed (`AccumulationHooks`, wired once by the Trainer core from its Strategy, see
trainers/strategies/): how to enter "don't sync" (DDP: `model.no_sync()`),
how to backward (plain `loss.backward()`, DeepSpeed's `engine.backward`, a GradScaler's
scaled backward), how to scale gradients, how to step, and how to sum a small tensor over
the data-parallel ranks (identity for the single-device reference).

Loss normalisation (the "loss contract"): `loss(model, batch)` returns
  - a scalar mean over the micro-batch: each micro-step's loss is scaled by 1/K and DDP's
    average over ranks gives the global mean. Exact only when every micro-batch holds the
    same number of items/tokens; steps where this rank sees unequal sizes are flagged.
  - a pair `(loss_sum, count)`: the update is the gradient of the summed loss of all
    micro-batches on all ranks divided by their total count. With `count_fn` the global
    count is summed with one all-reduce before the first forward and each micro-step's
    loss is scaled by dp/count (DDP averages, so dp cancels); without it, backward runs on
    the raw sums and the gradients are multiplied by dp/count at the boundary, after one
    all-reduce of the counts. Gradients are linear in the loss, so both are exact.
A backend that reduces gradients by SUM over the ranks instead of averaging
(`AccumulationHooks.sums_gradients`, FSDP) gets the 1/dp folded into the same single
scale: 1/(K·dp) for means, 1/count for pairs, so no factor is rounded twice.
Each micro-step's graph is freed by its own backward: activation memory is flat in K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from launcher.errors import UserError

MEAN, SUM = "mean", "sum"


@dataclasses.dataclass
class MicroBatch:
    """A collated micro-batch and how many dataset items it holds.

    `items == 0` marks a filler: this rank has no data for this micro-step (last, partial
    global batch), so `batch` is any real batch, run with weight zero. It still goes
    through forward and backward so that the rank joins the gradient all-reduce.
    """

    batch: Any
    items: int


#: StepMetrics fields that may arrive after the step returns (see StepMetrics)
_DEFERRED = ("loss", "items", "count", "grad_norm")


@dataclasses.dataclass
class StepMetrics:
    """What one optimizer step did, identical on every rank (except `unequal_micro_batches`).

    `loss`, `items` and `count` are sums over all ranks. A trainer with an asynchronous
    all-reduce (DDPTrainer) starts that sum when the last backward is done and does not wait
    for it, and keeps the gradient norm as a tensor: the first read of one of the four waits
    (the sum was started on every rank, so reading on one rank only is safe). A loop that
    never reads them never waits, and on a GPU the step needs no host synchronisation.
    """

    loss: float  # true global mean over the step's items/tokens (not divided by K)
    items: int  # dataset items in the step, all ranks
    count: float  # the loss denominator, all ranks: tokens for (sum, count) losses, items for means
    grad_norm: float | None  # total gradient norm before clipping; None unless clipping or track_grad_norm
    loss_mode: str  # "mean" or "sum"
    micro_steps: int
    unequal_micro_batches: bool = False  # this rank saw micro-batches of different sizes
    allreduce_rounds: int | None = None  # filled by trainers that count them (count_collectives=True)
    lr: float | None = None
    step: int = 0
    skipped: bool = False  # fp16: the gradients overflowed and the optimizer step was skipped

    @classmethod
    def pending(cls, resolve: Callable[[], tuple[float, int, float, float | None]], **fields: Any) -> StepMetrics:
        """Metrics whose (loss, items, count, grad_norm) come from `resolve()` on first read."""
        metrics = cls(loss=0.0, items=0, count=0.0, grad_norm=0.0, **fields)
        for name in _DEFERRED:
            delattr(metrics, name)
        metrics.__dict__["_resolve"] = resolve
        return metrics

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a deferred field not read yet.
        resolve = self.__dict__.pop("_resolve", None)
        if resolve is None or name not in _DEFERRED:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.loss, self.items, self.count, self.grad_norm = resolve()
        return self.__dict__[name]

    def __getstate__(self) -> dict[str, Any]:
        for name in _DEFERRED:
            getattr(self, name)
        return dict(self.__dict__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def _no_progress(micro_step: int | None, phase: str) -> None:
    pass


@dataclasses.dataclass
class AccumulationHooks:
    """The seams between the shared micro-step loop and one trainer (built once, see Trainer._wire).

    step:            clip, optimizer step, scheduler step, zero_grad; returns the grad norm or None
    no_sync:         context entered around forward AND backward of non-boundary micro-steps
    backward:        runs backward on the (already normalised) micro-step loss
    scale_gradients: multiplies the accumulated gradients (pair losses without count_fn)
    all_reduce_sum:  sums a small float64 tensor over data-parallel ranks (may be in place)
    all_reduce_sum_async: when set, starts that sum and returns a function that waits for it
                     and returns the result; the step's metrics sum then runs while the
                     optimizer steps (it is off the critical path unless the gradients need it)
    autocast:        context around the forward (mixed precision hooks in here)
    reduce_gradients: when set, the boundary backward runs in no_sync too and this reduces
                     the accumulated gradients once after the last micro-step (the fp32
                     accumulator of low-precision parameters: see trainers/precision.py)
    progress:        progress(micro_step or None, phase), for the hang watchdog; cheap
    agree_oom:       when set (the trainer's OOM fallback), an out-of-memory error in a
                     micro-step is caught, every rank learns of it through agree_oom(flag) ->
                     any rank ran out (one tiny all-reduce before each micro-step and one
                     after the last, so all ranks stop at the same point), and the step
                     raises MicroBatchOutOfMemory before any gradient is reduced or applied.
                     Needs reduce_gradients, so that no backward syncs by itself.
    sums_gradients:  the backend's gradient reduction SUMS over the data-parallel ranks
                     (instead of averaging): every loss/gradient scale carries the 1/dp
    """

    step: Callable[[], float | torch.Tensor | None]
    scale_gradients: Callable[[float], None]
    no_sync: Callable[[], AbstractContextManager[Any]] = nullcontext
    backward: Callable[[torch.Tensor], None] = _backward
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _identity
    all_reduce_sum_async: Callable[[torch.Tensor], Callable[[], torch.Tensor]] | None = None
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext
    reduce_gradients: Callable[[], None] | None = None
    progress: Callable[[int | None, str], None] = _no_progress
    agree_oom: Callable[[bool], bool] | None = None
    sums_gradients: bool = False


class ZeroCountError(UserError):
    """The loss's counts sum to zero (or less) over a whole optimizer step on all ranks: the
    update would be divided by zero, so no parameter would move while the run looks fine."""


def check_global_count(global_count: float) -> None:
    """Every rank holds the same all-reduced count, so every rank raises together (no hang)."""
    if not global_count > 0:
        raise ZeroCountError(
            f"the optimizer step's global count is {global_count:g} (the loss's counts summed over every "
            "micro-batch and rank): there is nothing to average over, so the step would not update the "
            "model. Check Task.count and the count the loss returns (e.g. all targets padding or ignored)"
        )


class MicroBatchOutOfMemory(RuntimeError):
    """Some rank ran out of memory in a micro-step; no rank reduced or applied gradients."""


def gradient_scaler(parameters: Iterable[torch.nn.Parameter]) -> Callable[[float], None]:
    params = list(parameters)

    def scale(factor: float) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads and factor != 1.0:
            torch._foreach_mul_(grads, factor)

    return scale


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def optimizer_stepper(
    optimizer: torch.optim.Optimizer,
    parameters: Iterable[torch.nn.Parameter],
    scheduler: Any = None,
    clip_grad_norm: float | None = None,
    track_grad_norm: bool = False,
) -> Callable[[], torch.Tensor | None]:
    """The default `step` hook: clip the full gradient, step, schedule, zero (set_to_none).

    Returns the gradient norm as a tensor (reading it is the caller's choice: a GPU sync)
    when clipping measured it anyway or `track_grad_norm` asks for it; otherwise None: a
    pass over every gradient is not free (docs/performance.md)."""
    params = [p for p in parameters if p.requires_grad]

    def step() -> torch.Tensor | None:
        norm = None
        if clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
        elif track_grad_norm:
            norm = grad_norm(params)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return None if norm is None else norm.detach()

    return step


def split_loss(out: Any) -> tuple[torch.Tensor, Any, str]:
    """(loss, count, mode) from what a loss callable returned; count is None for means."""
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"a loss returning a sequence must return (loss_sum, count), got {len(out)} values")
        loss_sum, count = out
        if not (isinstance(loss_sum, torch.Tensor) and loss_sum.dim() == 0):
            raise TypeError(f"loss_sum must be a scalar tensor, got {type(loss_sum).__name__}")
        return loss_sum, count, SUM
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        return out, None, MEAN
    raise TypeError(
        "the loss must return a scalar tensor (mean over the micro-batch) or a pair (loss_sum, count); "
        f"got {type(out).__name__}" + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
    )


def accumulation_step(
    model: Any,
    micro_batches: Sequence[MicroBatch],
    loss_fn: Callable[[Any, Any], Any],
    hooks: AccumulationHooks,
    *,
    dp_size: int = 1,
    count_fn: Callable[[Any], Any] | None = None,
    expected_micro_batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> StepMetrics:
    """One optimizer step over this rank's micro-batches (see the module docstring)."""
    k = len(micro_batches)
    if k == 0:
        raise ValueError("an accumulation step needs at least one micro-batch")
    real = [mb for mb in micro_batches if mb.items > 0]
    # the data-parallel factor the reduction leaves in the gradients: averaging divides by
    # dp (so the scales multiply by it), summing does not
    dp_factor = 1 if hooks.sums_gradients else dp_size
    mean_weight = 1.0 / (k * dp_size) if hooks.sums_gradients else 1.0 / k
    expected_local = pre_scale = None
    if count_fn is not None:
        # The one all-reduce of counts, before the first forward: every micro-step's loss
        # can then be scaled by the final global denominator as it goes.
        expected_local = float(sum(float(count_fn(mb.batch)) for mb in real))
        hooks.progress(None, "counts")
        total = hooks.all_reduce_sum(torch.tensor([expected_local], dtype=torch.float64, device=device))
        global_count = float(total[0])
        check_global_count(global_count)
        pre_scale = dp_factor / global_count

    # this rank's loss numerators and counts, detached, never synced per micro-step
    numerators: list[torch.Tensor] = []
    counts: list[Any] = []
    mode = None
    if hooks.agree_oom is not None and hooks.reduce_gradients is None:
        raise ValueError("agree_oom needs reduce_gradients: no backward may sync gradients by itself")
    out_of_memory = False
    for i, mb in enumerate(micro_batches):
        if hooks.agree_oom is not None and hooks.agree_oom(out_of_memory):
            raise MicroBatchOutOfMemory(f"out of memory before micro-step {i + 1} of {k}")
        sync = i == k - 1 and hooks.reduce_gradients is None
        try:
            with hooks.no_sync() if not sync else nullcontext():
                hooks.progress(i, "forward")
                with hooks.autocast():
                    loss, count, this_mode = split_loss(loss_fn(model, mb.batch))
                if mode is None:
                    mode = this_mode
                elif this_mode != mode:
                    raise TypeError("the loss returned a scalar on one micro-batch and a (sum, count) pair on another")
                if mb.items == 0:
                    weight = 0.0  # filler: joins the collectives, contributes nothing
                elif mode == MEAN:
                    weight = mean_weight
                elif pre_scale is not None:
                    weight = pre_scale
                else:
                    weight = 1.0  # raw sums; the gradients are scaled at the boundary
                hooks.progress(i, "backward")
                hooks.backward(loss * weight)
        except torch.OutOfMemoryError:
            if hooks.agree_oom is None:
                raise
            out_of_memory, loss = True, None  # drop the graph; the others learn of it next
            continue
        if mb.items > 0:
            numerators.append(loss.detach())
            counts.append(mb.items if mode == MEAN else count)

    if hooks.agree_oom is not None and hooks.agree_oom(out_of_memory):
        raise MicroBatchOutOfMemory(f"out of memory in the last of {k} micro-steps")
    if hooks.reduce_gradients is not None:
        hooks.progress(None, "reduce")
        hooks.reduce_gradients()
    items = sum(mb.items for mb in real)
    # float64 sums of this rank's numerators (a mean times its items) and counts: a few
    # tensor operations per step, none per micro-step
    if numerators:
        values = torch.stack(numerators).double()
        if mode == MEAN:
            values = values * torch.tensor(counts, dtype=torch.float64, device=values.device)
        numerator = values.sum()
    else:
        numerator = torch.zeros((), dtype=torch.float64, device=device)
    if any(isinstance(c, torch.Tensor) for c in counts):
        local_count = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=numerator.device) for c in counts])
        local_count = local_count.sum()
    else:
        local_count = torch.tensor(float(sum(counts)), dtype=torch.float64, device=numerator.device)
    if mode == SUM and expected_local is not None:
        returned = float(local_count)
        if abs(returned - expected_local) > 1e-6 * max(1.0, abs(expected_local)):
            raise ValueError(
                f"Task.count says this rank's micro-batches hold {expected_local:g} items/tokens but the loss "
                f"returned counts summing to {returned:g}; they must agree (count what the loss sums over)"
            )
    # The only all-reduce of counts when count_fn is absent; the loss sum rides along for
    # the metrics. With count_fn, or for means, it carries the metrics only: with an
    # asynchronous hook it runs in the background and the metrics wait for it when read.
    payload = torch.stack(
        [numerator, local_count, torch.tensor(float(items), dtype=torch.float64, device=numerator.device)]
    )
    gradients_need_totals = mode == SUM and pre_scale is None
    deferred = hooks.all_reduce_sum_async is not None and not gradients_need_totals
    hooks.progress(None, "totals")
    if deferred:
        finish_totals = hooks.all_reduce_sum_async(payload)
    else:
        done = hooks.all_reduce_sum(payload)
        finish_totals = lambda: done  # noqa: E731
        if gradients_need_totals:
            global_count = float(done[1])
            check_global_count(global_count)
            hooks.scale_gradients(dp_factor / global_count)
    hooks.progress(None, "optimizer step")
    norm = hooks.step()

    sizes = [float(count_fn(mb.batch)) for mb in real] if count_fn is not None and mode == MEAN else []
    sizes = sizes or [mb.items for mb in real]
    unequal = len(real) < k or len(set(sizes)) > 1
    if expected_micro_batch_size is not None and mode == MEAN:
        unequal = unequal or any(mb.items != expected_micro_batch_size for mb in real)
    # one micro-batch in the whole step (the reference): its mean is the global batch's mean,
    # also when that batch is a partial last one
    unequal = unequal and k * dp_size > 1

    def resolve() -> tuple[float, int, float, float | None]:
        numer, count_all, items_all = (float(x) for x in finish_totals())
        loss_value = numer / count_all if count_all > 0 else 0.0
        return loss_value, int(round(items_all)), count_all, None if norm is None else float(norm)

    fields = dict(loss_mode=mode, micro_steps=k, unequal_micro_batches=unequal)
    if deferred:
        return StepMetrics.pending(resolve, **fields)
    loss_value, items_all, count_all, norm_value = resolve()
    return StepMetrics(loss=loss_value, items=items_all, count=count_all, grad_norm=norm_value, **fields)
