"""What the DDP, DeepSpeed and reference trainers share: data, the train loop, state.

Subclasses provide `_hooks()` (how to no-sync, backward, step: see accumulate.py) and the
model that forward goes through; everything else (sampling a global batch, collating this
rank's micro-batches, empty micro-batches, metrics, the warning for scalar-mean losses,
in-memory state for checkpoints) lives here once.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import default_collate

from launcher.plan import BatchPlan
from trainers.accumulate import (
    MEAN,
    AccumulationHooks,
    MicroBatch,
    MicroBatchOutOfMemory,
    StepMetrics,
    accumulation_step,
)
from trainers.precision import MixedPrecision, resolve_precision
from trainers.sampler import GlobalBatchSampler


def build_from_task(task: Any, device: torch.device) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Seed torch, build the task's model on `device` and its optimizer: every rank and the
    reference build the same weights this way. Returns (model, optimizer, trainer keyword
    arguments taken from the task); the scheduler is the caller's (DeepSpeed wants the factory)."""
    torch.manual_seed(task.seed)
    model = task.model().to(device)
    optimizer = task.optimizer(model.parameters())
    fields = dict(
        dataset=task.dataset,
        count=task.count,
        collate=task.collate,
        clip_grad_norm=task.clip_grad_norm,
        seed=task.seed,
    )
    return model, optimizer, fields


class LossNormalisationWarning(UserWarning):
    """A scalar-mean loss met micro-batches of different sizes: the update is not the global mean."""


UNEQUAL_MEAN_WARNING = (
    "the loss returns a scalar mean, but micro-batches of this optimizer step hold different numbers "
    "of items{what}: averaging their means is not the mean over the global batch, so the update differs "
    "from a single-device run. Return (loss_sum, count) from the loss to make it exact."
)


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None or device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_items(batch: Any) -> int:
    """Items in a collated batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        try:
            return batch_items(value)
        except TypeError:
            continue
    raise TypeError(f"cannot tell how many items a batch of type {type(batch).__name__} holds; pass MicroBatch")


class BaseTrainer:
    """The train loop over a GlobalBatchSampler; subclasses say how to sync and step."""

    #: whether the micro-batch / global batch may change between steps (OOM fallback, ramps)
    _supports_plan_change = False

    def __init__(
        self,
        model: Any,
        module: torch.nn.Module,
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
        device: torch.device | None = None,
        dp_rank: int = 0,
        precision: str | None = None,
        log_every: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        keep_last: int | None = None,
    ) -> None:
        self.model = model  # what forward goes through (DDP wrapper, DeepSpeed engine, plain module)
        self.module = module  # the user's own module: its state_dict has no wrapper prefix
        self.optimizer = optimizer
        self.precision = resolve_precision(plan.precision, precision)
        # the plan records the precision: checkpoints and the cross-rank check carry it
        self.plan = plan if plan.precision == self.precision else dataclasses.replace(plan, precision=self.precision)
        self.loss = loss
        self.dataset = dataset
        self.count = count
        self.collate = collate or default_collate
        self.scheduler = scheduler
        self.clip_grad_norm = clip_grad_norm
        # StepMetrics.grad_norm: measured when clipping anyway, or when asked (a pass over every gradient)
        self.track_grad_norm = track_grad_norm
        self.device = device or torch.device("cpu")
        self.dp_rank = dp_rank
        self.log_every = log_every
        self.global_step = 0
        self._warned_unequal = False
        self.amp: MixedPrecision | None = None  # set by trainers that run precision themselves (not DeepSpeed)
        self.watchdog: Any = None  # a trainers.distributed.Watchdog, set by distributed trainers
        self.skipped_steps: list[int] = []  # fp16 overflow: steps whose update was skipped (batch consumed)
        self._preflight_done = False
        # checkpoints (trainers/resume.py): every `checkpoint_every` steps into `checkpoint_dir`
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.keep_last = keep_last
        self.last_checkpoint_step: int | None = None
        self.stop_agreement = False  # all-reduce stop requests at each step (set by install_stop_handlers)
        self.stopped = False  # train() ended early on request_checkpoint_and_stop()
        self._stop_requested = False
        # plan changes between steps (trainers/batching.py): OOM fallback, batch ramp
        self.oom_fallback = False
        self.oom_events: list[tuple[int, int, int]] = []  # (step, old micro, new micro)
        self.batch_ramp: Any = None
        self.lr_scaling: Any = "linear"  # rule for a new global batch: ramp stages, resumes
        self.sampler = (
            GlobalBatchSampler(len(dataset), plan, dp_rank, seed=seed, shuffle=shuffle, drop_last=drop_last)
            if dataset is not None
            else None
        )

    # -------------------------------------------------------------- subclass API
    def _hooks(self) -> AccumulationHooks:
        raise NotImplementedError

    def _after_step(self, metrics: StepMetrics) -> None:
        """Subclasses add what they measure (e.g. all-reduce rounds)."""

    def _before_step(self) -> None:
        """Subclasses reset per-step counters."""

    # ------------------------------------------------------------------ stepping
    def step(self, micro_batches: Sequence[Any]) -> StepMetrics:
        """One optimizer step over this rank's K micro-batches (collated batches or MicroBatch)."""
        k = self.plan.gradient_accumulation_steps
        if len(micro_batches) != k:
            raise ValueError(
                f"step() needs {k} micro-batches (the plan's accumulation steps), got {len(micro_batches)}"
            )
        wrapped = [
            mb if isinstance(mb, MicroBatch) else MicroBatch(to_device(mb, self.device), batch_items(mb))
            for mb in micro_batches
        ]
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer is not None else None
        self._before_step()
        hooks = self._hooks()
        if self.oom_fallback:
            # Every micro-step in no_sync, OOM agreed across ranks, gradients reduced after.
            from trainers.batching import agree_any, all_reduce_gradient_mean

            hooks.agree_oom = agree_any(hooks.all_reduce_sum, self.device)
            if hooks.reduce_gradients is None:
                hooks.reduce_gradients = lambda: all_reduce_gradient_mean(self)
        if self.watchdog is not None:
            step_no, watchdog = self.global_step + 1, self.watchdog.start()
            hooks.progress = lambda micro, phase: watchdog.progress(step_no, micro, phase, k)
        metrics = accumulation_step(
            self.model,
            wrapped,
            self.loss,
            hooks,
            dp_size=self.plan.data_parallel_size,
            count_fn=self.count,
            expected_micro_batch_size=self.plan.micro_batch_size,
            device=self.device,
        )
        self.global_step += 1
        metrics.step, metrics.lr = self.global_step, lr
        self._after_step(metrics)
        if self._step_was_skipped():
            metrics.skipped = True
            self.skipped_steps.append(metrics.step)
            self.log(self._skip_message(metrics.step))
        if self.watchdog is not None:
            self.watchdog.progress(self.global_step, None, "between steps")
        if metrics.loss_mode == MEAN and metrics.unequal_micro_batches and not self._warned_unequal:
            self._warned_unequal = True
            what = " or tokens" if self.count is not None else ""
            warnings.warn(UNEQUAL_MEAN_WARNING.format(what=what), LossNormalisationWarning, stacklevel=2)
        return metrics

    def _step_was_skipped(self) -> bool:
        """Did the last optimizer step skip its update (fp16 overflow)? DeepSpeed overrides."""
        return self.amp is not None and self.amp.last_step_skipped

    def _skip_message(self, step: int) -> str:
        if self.amp is not None:
            return self.amp.describe_skip(step)
        return f"gradaccum: step {step}: gradients overflowed, optimizer step skipped; its global batch is consumed"

    def work_summary(self, steps: int | None) -> dict[str, Any]:
        """What this rank is about to do; every rank must say the same (see preflight)."""
        sampler = self.sampler.state_dict() if self.sampler is not None else {}
        return {
            "plan": self.plan.to_dict(),
            "dataset_length": len(self.dataset) if self.dataset is not None else None,
            "steps": steps,
            "start_step": self.global_step,
            "sampler": {k: v for k, v in sampler.items() if k not in ("dataset_len", "global_batch_size")},
        }

    def preflight(self, steps: int | None = None) -> None:
        """Once, before the first step: ranks exchange plan, dataset length, steps and position,
        and every rank raises WorkMismatch (naming what differs where) when they disagree.
        train() calls it; call it yourself with the total when you call train() piecewise."""
        if self._preflight_done:
            return
        self._preflight_done = True
        if self.watchdog is not None:
            self.watchdog.start().progress(self.global_step, None, "preflight")
        from trainers.distributed import check_same_work

        check_same_work(self.work_summary(steps))

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate dataset items; an empty list gives a zero-weight filler (see MicroBatch)."""
        if not indices:
            filler = self.dataset[self.sampler.last_global_batch[0]]
            return MicroBatch(to_device(self.collate([filler]), self.device), 0)
        return MicroBatch(to_device(self.collate([self.dataset[i] for i in indices]), self.device), len(indices))

    def train(self, steps: int, callback: Callable[[StepMetrics], None] | None = None) -> list[StepMetrics]:
        """Take `steps` optimizer steps, one global batch each (across epochs as needed)."""
        if self.sampler is None:
            raise ValueError("train() needs a dataset: pass dataset= to the trainer (or call step() yourself)")
        self.preflight(steps)
        history = []
        for _ in range(steps):
            if self.watchdog is not None:
                self.watchdog.progress(self.global_step + 1, None, "data")
            if self.batch_ramp is not None:
                self._follow_ramp()
            micro_indices = self.sampler.next_step()
            while True:
                try:
                    metrics = self.step([self.micro_batch(ix) for ix in micro_indices])
                    break
                except MicroBatchOutOfMemory:
                    from trainers.batching import shrink_after_oom

                    shrink_after_oom(self)  # same global batch, cut into smaller micro-batches
                    micro_indices = self.sampler.split(self.sampler.last_global_batch)[self.dp_rank]
            history.append(metrics)
            if self.log_every and metrics.step % self.log_every == 0:
                norm = f"grad-norm {metrics.grad_norm:.4g}  " if metrics.grad_norm is not None else ""
                self.log(
                    f"step {metrics.step:>5}  loss {metrics.loss:.6f}  items {metrics.items}  {norm}lr {metrics.lr:.3g}"
                )
            stop = self._after_train_step(metrics.step)
            if callback is not None:
                callback(metrics)
            if stop:
                break
        return history

    fit = train

    def log(self, message: str) -> None:
        from trainers.distributed import log_rank0

        log_rank0(message)

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """In memory: model (no wrapper prefix), optimizer, scheduler, sampler, step, plan."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "step": self.global_step,
            "plan": self.plan.to_dict(),
            "precision": self.amp.state_dict() if self.amp is not None else None,
            "skipped_steps": list(self.skipped_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); the plan in it may be for another world size.

        `model`/`optimizer` may be None: a DeepSpeed checkpoint keeps them in the engine's files."""
        if state.get("model") is not None:
            self.module.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        self.global_step = int(state["step"])
        if self.amp is not None and state.get("precision"):
            self.amp.load_state_dict(state["precision"])  # the fp16 loss scale goes on where it was
        self.skipped_steps = list(state.get("skipped_steps", []))

    # ------------------------------------------------- plan changes between steps
    # The logic lives in trainers/batching.py.
    def enable_oom_fallback(self) -> None:
        """On out-of-memory in a micro-step, halve the micro-batch, double the accumulation
        and retry the step: the global batch and the weights stay exactly the same. Costs
        one tiny all-reduce per micro-step (every rank must learn of an OOM)."""
        from trainers.batching import enable_oom_fallback

        enable_oom_fallback(self)

    def set_plan(self, plan: BatchPlan, lr_scaling: Any = None) -> None:
        """Use `plan` (same world size) from the next step on; a new global batch rescales
        the learning rate by `lr_scaling` (default: `self.lr_scaling`, linear)."""
        from trainers.batching import set_plan

        set_plan(self, plan, lr_scaling)

    def set_batch_ramp(self, ramp: Any, lr_scaling: Any = None) -> None:
        """Follow a launcher.ramp.BatchRamp (or its spec, e.g. "8,16@64,32@192") by samples consumed."""
        from trainers.batching import set_batch_ramp

        set_batch_ramp(self, ramp, lr_scaling)

    def _follow_ramp(self) -> None:
        from trainers.batching import follow_ramp

        follow_ramp(self)

    def _count_gradient_round(self) -> None:
        """A gradient all-reduce done outside the framework's own hooks (trainers count rounds)."""

    # --------------------------------------------------------------- checkpoints
    # The logic lives in trainers/resume.py; these are the trainer's public face.
    def save(self, root: str | os.PathLike[str] | None = None) -> Path:
        """Checkpoint now (every rank calls it) into `root` or `checkpoint_dir`; returns step_N."""
        from trainers.resume import save_trainer

        return save_trainer(self, root)

    def resume(self, path_or_root: str | os.PathLike[str], lr_scaling: Any = None) -> Path | None:
        """Load a checkpoint (a step_N dir, a root: its newest complete one, or "auto":
        `checkpoint_dir`'s newest, None if there is none yet). Another world size is fine;
        another global batch rescales the learning rate by `lr_scaling` (an LRRule or a rule
        name; default `self.lr_scaling`, linear, the rule a batch ramp also uses)."""
        from trainers.resume import resume_trainer

        return resume_trainer(self, path_or_root, self.lr_scaling if lr_scaling is None else lr_scaling)

    def request_checkpoint_and_stop(self) -> None:
        """Ask train() to checkpoint after the current step and return. Safe in a signal
        handler (it only sets a flag); see trainers.resume.install_stop_handlers."""
        self._stop_requested = True

    def _after_train_step(self, step: int) -> bool:
        """Periodic checkpoint and agreed stop after optimizer step `step`; True: stop."""
        from trainers.resume import after_train_step

        return after_train_step(self, step)

    def _checkpoint_state(self) -> dict[str, Any]:
        """The replicated state rank 0 writes to trainer.pt (DeepSpeed: without model/optimizer)."""
        return self.state_dict()

    def _checkpoint_extra_writer(self) -> Callable[[Path], None] | None:
        """A callable run on every rank with the temporary checkpoint dir (DeepSpeed's own save)."""
        return None

    def _load_checkpoint_extra(self, checkpoint_dir: Path) -> None:
        """Counterpart of _checkpoint_extra_writer on resume (every rank)."""
