"""The Strategy interface: what the Trainer core asks of a backend, built once per trainer.

Modelled on Lightning Fabric's Strategy/Precision split: a strategy wraps the model,
adopts or builds the optimizer, knows its device and data-parallel rank/size, and provides
the seams of the accumulation step (trainers/accumulate.py): no_sync (around forward AND
backward of non-boundary micro-steps), backward, all_reduce_sum (and an asynchronous
variant), scale_gradients, an optional reduce_gradients, the optimizer step (returning the
gradient norm or None) and autocast. Precision is a component a strategy uses
(trainers/precision.py MixedPrecision), not a strategy itself.

Checkpoints: `state_dict()` gives the strategy's part of the replicated trainer state
(model, optimizer, scheduler, precision); a backend with its own files (DeepSpeed's engine,
later FSDP's DCP shards) writes them in `write_files(tmp_dir)` on every rank and reads them
back in `read_files(path)`.

Lifecycle: the front-door trainer constructs the strategy with its backend options, the
Trainer calls `setup(model, optimizer, plan, options)` once, then the hot path calls only
bound methods (no per-step allocation here).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launcher.plan import BatchPlan

if TYPE_CHECKING:
    from trainers.precision import MixedPrecision
    from trainers.trainer import CommonOptions


def process_group_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the default process group, in place (a plain torch.distributed call)."""
    dist.all_reduce(tensor)
    return tensor


def process_group_sum_async(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start that sum; the returned function waits for it and returns the tensor."""
    work = dist.all_reduce(tensor, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return tensor

    return finish


class Strategy:
    """Single-process defaults; subclasses override what their backend does differently."""

    #: the name the logs and checkpoints use
    name = "single"
    #: may the micro-batch / global batch change between steps (OOM fallback, ramps)?
    supports_plan_change = True
    #: the gradient reduction SUMS over the ranks (the loop then folds 1/dp into its scales)
    sums_gradients = False

    def __init__(self) -> None:
        self.model: Any = None  # what forward goes through (wrapper, engine or the module)
        self.module: torch.nn.Module | None = None  # the user's module: state_dict without wrapper prefix
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.device = torch.device("cpu")
        self.dp_rank, self.dp_size = 0, 1
        self.precision = "fp32"
        self.amp: MixedPrecision | None = None
        #: a timeout for the hang watchdog (None: no watchdog)
        self.collective_timeout: float | None = None
        #: set when this backend starts the metrics all-reduce in the background
        self.all_reduce_sum_async: Callable[[torch.Tensor], Callable[[], torch.Tensor]] | None = None

    # ------------------------------------------------------------------ set-up
    def device_for(self, plan: BatchPlan) -> torch.device:
        """The device this process trains on (may initialise the process group)."""
        return self.device

    def setup(self, model: Any, optimizer: Any, plan: BatchPlan, options: CommonOptions) -> BatchPlan:
        """Wrap `model`, adopt or build the optimizer, set device and ranks; returns the plan
        the trainer runs (a strategy may fix it, e.g. the reference's one-device plan)."""
        raise NotImplementedError

    def describe(self, plan: BatchPlan) -> str | None:
        """The start-up log line (None: nothing to say)."""
        return None

    # ------------------------------------------------------------ step seams
    def no_sync(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def autocast(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def scale_gradients(self, factor: float) -> None:
        raise NotImplementedError

    def optimizer_step(self) -> float | torch.Tensor | None:
        raise NotImplementedError

    @property
    def reduce_gradients(self) -> Callable[[], None] | None:
        """Set when gradients are reduced once after the last micro-step (see AccumulationHooks)."""
        return None

    def reduce_gradient_mean(self) -> None:
        """Average the accumulated gradients over data-parallel ranks in one flat all-reduce
        (the OOM fallback: every backward ran in no_sync)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)
        self.count_gradient_round()

    # ---------------------------------------------- collective-round counting
    def begin_step(self) -> None:
        """Reset per-step counters."""

    def end_step(self, metrics: Any) -> None:
        """Add what this backend measured to the step's metrics (e.g. all-reduce rounds)."""

    def count_gradient_round(self) -> None:
        """A gradient all-reduce done outside the framework's own hooks."""

    # ------------------------------------------------------- skipped updates
    def step_was_skipped(self) -> bool:
        """Did the last optimizer step skip its update (fp16 overflow)?"""
        return self.amp is not None and self.amp.last_step_skipped

    def describe_skip(self, step: int) -> str:
        if self.amp is not None:
            return self.amp.describe_skip(step)
        return f"gradaccum: step {step}: gradients overflowed, optimizer step skipped; its global batch is consumed"

    def check_oom_fallback(self) -> str | None:
        """Why this strategy cannot retry a step with smaller micro-batches (None: it can)."""
        if self.amp is not None and self.amp.accumulator is not None:
            return "the OOM fallback does not combine with bf16/fp16 parameters (fp32 accumulator); use autocast"
        return None

    # ----------------------------------------------------------------- state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's whole, unsharded state_dict under its own keys (verify's records).
        Every rank calls it: a sharded backend gathers (a collective); here it is local."""
        return self.module.state_dict()

    def replicated_parameters(self) -> list[torch.Tensor]:
        """The parameters every data-parallel rank holds identically (the replica check);
        empty for a backend that shards them."""
        return list(self.module.parameters())

    def state_dict(self) -> dict[str, Any]:
        """This backend's part of trainer.pt: model, optimizer, scheduler, precision."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "precision": self.amp.state_dict() if self.amp is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict(); None entries (kept in the backend's own files) are skipped.
        A checkpoint another backend wrote (its state names it) is refused, naming both."""
        saved = state.get("backend")
        if saved is not None and saved != self.name:
            from trainers.checkpoint import CheckpointError

            raise CheckpointError(
                f"the checkpoint was written by --backend {saved} and this run uses {self.name}: its model and "
                f"optimizer live in {saved}'s own files; resume it with --backend {saved}"
            )
        if state.get("model") is not None:
            self.module.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.amp is not None and state.get("precision"):
            self.amp.load_state_dict(state["precision"])  # the fp16 loss scale goes on where it was

    def write_files(self, tmp_dir: Path) -> None:
        """Every rank, while a checkpoint is written: the backend's own files (default none)."""

    def read_files(self, checkpoint_dir: Path) -> None:
        """Every rank, on resume: read what write_files wrote."""

    def close(self) -> None:
        """Undo what setup installed (hooks, counters); the process group stays."""
