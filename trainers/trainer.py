"""The Trainer core: one loop for every backend, composed of a strategy and components.

    Trainer
      strategy      how to wrap, no-sync, backward, reduce, step, save (trainers/strategies/)
      data          this rank's micro-batches per step (loader.StepLoader: sampler or stream,
                    dataset, collate, worker processes)
      checkpoints   save / resume / periodic / stop on a signal (trainers/resume.py)
      plan_changes  OOM fallback, batch ramp, LR rule (trainers/batching.py)
      hang          the hang watchdog's position (components.HangWatch)
      components    observers: on_train_start / on_step_end / on_train_end (components.py),
                    with a metrics_log.MetricsLogger on rank 0 when log_dir/progress ask for one

The trainer owns the loop (a global batch, this rank's K micro-batches, the accumulation
step of accumulate.py, the metrics) and its own state, {"step": global_step}; each
component owns its state. The accumulation step's seams (AccumulationHooks) are wired once
from the strategy and components, and rewired only when a switch changes (OOM fallback).
DDPTrainer, DeepSpeedTrainer and ReferenceTrainer are thin front doors that pick a strategy.
The data loader's worker processes and the metrics file live as long as the trainer: close()
(or `with trainer:`) stops and closes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from launcher.lr import LRRule
from launcher.plan import BatchPlan
from launcher.ramp import BatchRamp
from trainers.accumulate import (
    MEAN,
    AccumulationHooks,
    MicroBatch,
    MicroBatchOutOfMemory,
    StepMetrics,
    ZeroCountError,
    accumulation_step,
)
from trainers.batching import PlanChanges, agree_any
from trainers.components import HangWatch, StepLog, observers
from trainers.distributed import Watchdog, check_same_work, log_rank0
from trainers.loader import StepLoader, check_loader_options
from trainers.metrics_log import MetricsLogger
from trainers.precision import MixedPrecision, resolve_precision
from trainers.resume import Checkpointing, describe_change, rescale_learning_rate
from trainers.sampler import GlobalBatchSampler
from trainers.stepdata import batch_items, to_device
from trainers.strategies.base import Strategy


@dataclasses.dataclass
class CommonOptions:
    """The keyword arguments every trainer takes (the front doors add their backend's own).

    dataset/count/collate: the data, map-style or a torch IterableDataset (count: items or
    tokens a loss sums over, see Task); num_workers/prefetch_factor/pin_memory: worker
    processes reading and collating the next step while this one computes (0: on the
    training thread; pin_memory only on CUDA), see trainers/loader.py;
    scheduler: an LR scheduler (DeepSpeed also takes a factory); clip_grad_norm;
    track_grad_norm: StepMetrics.grad_norm even without clipping (a pass over every
    gradient); seed/shuffle/drop_last: the GlobalBatchSampler's; precision: fp32, bf16,
    fp16 (default: the plan's); log_every: a log line every N steps; checkpoint_dir,
    checkpoint_every, keep_last: checkpoints; components: observers (components.py);
    log_dir: rank 0 writes metrics.csv (and TensorBoard events when installed) there;
    progress: a progress bar on rank 0 when stderr is a terminal (trainers/metrics_log.py).
    """

    dataset: Sequence[Any] | Any | None = None
    count: Callable[[Any], Any] | None = None
    collate: Callable[[list], Any] | None = None
    scheduler: Any = None
    clip_grad_norm: float | None = None
    track_grad_norm: bool = False
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    precision: str | None = None
    log_every: int = 0
    checkpoint_dir: str | os.PathLike[str] | None = None
    checkpoint_every: int = 0
    keep_last: int | None = None
    components: Sequence[Any] = ()
    num_workers: int = 0
    prefetch_factor: int | None = None
    pin_memory: bool = True
    log_dir: str | os.PathLike[str] | None = None
    progress: bool = True


def build_from_task(
    task: Any, device: torch.device, optimizer_factory: bool = False
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Seed torch, build the task's model on `device` and its optimizer: every rank and the
    reference build the same weights this way. Returns (model, optimizer, trainer keyword
    arguments taken from the task); the scheduler is the caller's (DeepSpeed wants the factory).
    `optimizer_factory=True` returns the task's factory instead of an optimizer, for a
    strategy that builds it after wrapping (sharding) the model."""
    torch.manual_seed(task.seed)
    model = task.model().to(device)
    optimizer = task.optimizer if optimizer_factory else task.optimizer(model.parameters())
    fields = dict(
        dataset=task.dataset,
        count=task.count,
        collate=task.collate,
        clip_grad_norm=task.clip_grad_norm,
        seed=task.seed,
        num_workers=task.num_workers,
        prefetch_factor=task.prefetch_factor,
        pin_memory=task.pin_memory,
    )
    return model, optimizer, fields


def _metrics_logger(log_dir: str | os.PathLike[str] | None, progress: bool) -> MetricsLogger | None:
    """The MetricsLogger for log_dir/progress, or None when neither has anything to do here
    (no directory, and no bar: off, or stderr is not a terminal). It writes on rank 0 only."""
    import sys

    bar = bool(progress) and sys.stderr.isatty()
    if log_dir is None and not bar:
        return None
    return MetricsLogger(log_dir, progress=bar)


class LossNormalisationWarning(UserWarning):
    """A scalar-mean loss met micro-batches of different sizes: the update is not the global mean."""


UNEQUAL_MEAN_WARNING = (
    "the loss returns a scalar mean, but micro-batches of this optimizer step hold different numbers "
    "of items{what}: averaging their means is not the mean over the global batch, so the update differs "
    "from a single-device run. Return (loss_sum, count) from the loss to make it exact."
)


class Trainer:
    """The train loop over a GlobalBatchSampler for one strategy (see the module docstring)."""

    def __init__(
        self,
        strategy: Strategy,
        model: Any,
        optimizer: Any,
        plan: BatchPlan,
        loss: Callable[[Any, Any], Any],
        options: CommonOptions,
        *,
        log: bool = True,
    ) -> None:
        check_loader_options(options.num_workers, options.prefetch_factor)
        precision = resolve_precision(plan.precision, options.precision)
        # the plan records the precision: checkpoints and the cross-rank check carry it
        plan = plan if plan.precision == precision else dataclasses.replace(plan, precision=precision)
        options = dataclasses.replace(options, precision=precision)
        self.strategy = strategy
        self.plan = strategy.setup(model, optimizer, plan, options)
        self.loss = loss
        self.count = options.count
        self.dataset = options.dataset
        self.track_grad_norm = options.track_grad_norm
        self.clip_grad_norm = options.clip_grad_norm
        self.global_step = 0
        self.skipped_steps: list[int] = []  # fp16 overflow: steps whose update was skipped (batch consumed)
        self.data = (
            StepLoader(
                options.dataset,
                self.plan,
                strategy.dp_rank,
                collate=options.collate,
                device=strategy.device,
                num_workers=options.num_workers,
                prefetch_factor=options.prefetch_factor,
                pin_memory=options.pin_memory,
                seed=options.seed,
                shuffle=options.shuffle,
                drop_last=options.drop_last,
            )
            if options.dataset is not None
            else None
        )
        self.checkpoints = Checkpointing(options.checkpoint_dir, options.checkpoint_every, options.keep_last)
        self.plan_changes = PlanChanges()
        # names the rank(s) the others wait for and exits, instead of hanging (None: one process)
        self.hang = HangWatch(Watchdog.for_process_group(strategy.collective_timeout))
        self.metrics_logger = _metrics_logger(options.log_dir, options.progress)
        self.components: list[Any] = (
            ([StepLog(options.log_every)] if options.log_every else [])
            + ([self.metrics_logger] if self.metrics_logger is not None else [])
            + list(options.components)
        )
        self._warned_unequal = False
        self._preflight_done = False
        self._hooks = self._wire()
        if log:
            message = strategy.describe(self.plan)
            if message:
                self.log(message)

    # ------------------------------------------------- what the strategy holds
    @property
    def model(self) -> Any:
        """What forward goes through (DDP wrapper, DeepSpeed engine, plain module)."""
        return self.strategy.model

    @property
    def module(self) -> torch.nn.Module:
        """The user's own module: its state_dict has no wrapper prefix."""
        return self.strategy.module

    @property
    def optimizer(self) -> Any:
        return self.strategy.optimizer

    @property
    def scheduler(self) -> Any:
        return self.strategy.scheduler

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    @property
    def dp_rank(self) -> int:
        return self.strategy.dp_rank

    @property
    def precision(self) -> str:
        return self.strategy.precision

    @property
    def amp(self) -> MixedPrecision | None:
        return self.strategy.amp

    @property
    def watchdog(self) -> Watchdog | None:
        return self.hang.watchdog

    @property
    def sampler(self) -> GlobalBatchSampler | None:
        """The map-style dataset's sampler (None for a stream or without a dataset)."""
        return self.data.sampler if self.data is not None and not self.data.streaming else None

    # ------------------------------------------------ what the components hold
    @property
    def checkpoint_dir(self) -> str | os.PathLike[str] | None:
        return self.checkpoints.directory

    @checkpoint_dir.setter
    def checkpoint_dir(self, directory: str | os.PathLike[str] | None) -> None:
        self.checkpoints.directory = directory

    @property
    def checkpoint_every(self) -> int:
        return self.checkpoints.every

    @checkpoint_every.setter
    def checkpoint_every(self, every: int) -> None:
        self.checkpoints.every = every

    @property
    def keep_last(self) -> int | None:
        return self.checkpoints.keep_last

    @keep_last.setter
    def keep_last(self, keep_last: int | None) -> None:
        self.checkpoints.keep_last = keep_last

    @property
    def last_checkpoint_step(self) -> int | None:
        return self.checkpoints.last_step

    @property
    def stopped(self) -> bool:
        """The loop ended early on request_checkpoint_and_stop()."""
        return self.checkpoints.stopped

    @property
    def oom_fallback(self) -> bool:
        return self.plan_changes.oom_fallback

    @property
    def oom_events(self) -> list[tuple[int, int, int]]:
        """(step, old micro-batch, new micro-batch) for each out-of-memory retry."""
        return self.plan_changes.oom_events

    @property
    def batch_ramp(self) -> BatchRamp | None:
        return self.plan_changes.batch_ramp

    @property
    def lr_scaling(self) -> str | LRRule:
        return self.plan_changes.lr_scaling

    # ------------------------------------------------------------------ wiring
    def _wire(self) -> AccumulationHooks:
        """The accumulation step's seams, from the strategy and components (once per switch)."""
        s = self.strategy
        reduce = s.reduce_gradients
        agree = None
        if self.plan_changes.oom_fallback:
            # Every micro-step in no_sync, OOM agreed across ranks, gradients reduced after.
            agree = agree_any(s.all_reduce_sum, s.device)
            if reduce is None:
                reduce = s.reduce_gradient_mean
        hooks = AccumulationHooks(
            step=s.optimizer_step,
            scale_gradients=s.scale_gradients,
            no_sync=s.no_sync,
            backward=s.backward,
            all_reduce_sum=s.all_reduce_sum,
            all_reduce_sum_async=s.all_reduce_sum_async,
            autocast=s.autocast,
            reduce_gradients=reduce,
            agree_oom=agree,
            sums_gradients=s.sums_gradients,
        )
        if self.hang.watchdog is not None:
            hooks.progress = self.hang.progress
        return hooks

    # ------------------------------------------------------------------ stepping
    def step(self, micro_batches: Sequence[Any]) -> StepMetrics:
        """One optimizer step over this rank's K micro-batches (collated batches or MicroBatch)."""
        k = self.plan.gradient_accumulation_steps
        if len(micro_batches) != k:
            raise ValueError(
                f"step() needs {k} micro-batches (the plan's accumulation steps), got {len(micro_batches)}"
            )
        strategy = self.strategy
        device = strategy.device
        wrapped = [
            mb if isinstance(mb, MicroBatch) else MicroBatch(to_device(mb, device), batch_items(mb))
            for mb in micro_batches
        ]
        optimizer = strategy.optimizer
        lr = optimizer.param_groups[0].get("lr") if optimizer is not None else None
        strategy.begin_step()
        hang = self.hang
        if hang.watchdog is not None:
            hang.begin_step(self.global_step + 1, k)
        try:
            metrics = accumulation_step(
                strategy.model,
                wrapped,
                self.loss,
                self._hooks,
                dp_size=self.plan.data_parallel_size,
                count_fn=self.count,
                expected_micro_batch_size=self.plan.micro_batch_size,
                device=device,
            )
        except ZeroCountError as e:
            raise ZeroCountError(f"step {self.global_step + 1}: {e}") from None
        self.global_step += 1
        metrics.step, metrics.lr = self.global_step, lr
        strategy.end_step(metrics)
        if strategy.step_was_skipped():
            metrics.skipped = True
            self.skipped_steps.append(metrics.step)
            self.log(strategy.describe_skip(metrics.step))
        hang.at(self.global_step, "between steps")
        if metrics.loss_mode == MEAN and metrics.unequal_micro_batches and not self._warned_unequal:
            self._warned_unequal = True
            what = " or tokens" if self.count is not None else ""
            warnings.warn(UNEQUAL_MEAN_WARNING.format(what=what), LossNormalisationWarning, stacklevel=2)
        return metrics

    def work_summary(self, steps: int | None) -> dict[str, Any]:
        """What this rank is about to do; every rank must say the same (see preflight)."""
        position = self.data.state_dict() if self.data is not None else {}
        skip = ("dataset_len", "global_batch_size", "dataset_state")  # dataset_state: the stream's own, may be big
        streaming = self.data is not None and self.data.streaming
        return {
            "plan": self.plan.to_dict(),
            "dataset_length": len(self.dataset) if self.dataset is not None and not streaming else None,
            "steps": steps,
            "start_step": self.global_step,
            "sampler": {k: v for k, v in position.items() if k not in skip},
        }

    def preflight(self, steps: int | None = None) -> None:
        """Once, before the first step: ranks exchange plan, dataset length, steps and position,
        and every rank raises WorkMismatch (naming what differs where) when they disagree.
        train() calls it; call it yourself with the total when you call train() piecewise."""
        if self._preflight_done:
            return
        self._preflight_done = True
        self.hang.start(self.global_step, "preflight")
        check_same_work(self.work_summary(steps))

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate dataset items; an empty list gives a zero-weight filler (see MicroBatch)."""
        return self.data.micro_batch(indices)

    def iter_steps(self, steps: int) -> Iterator[StepMetrics]:
        """Take `steps` optimizer steps, one global batch each (across epochs as needed),
        yielding each step's metrics as the step ends; stops early on an agreed stop request."""
        data = self.data
        if data is None:
            raise ValueError("train() needs a dataset: pass dataset= to the trainer (or call step() yourself)")
        self.preflight(steps)
        for start in observers(self.components, "on_train_start"):
            start(self, steps)
        step_end = observers(self.components, "on_step_end")
        try:
            for _ in range(steps):
                self.hang.at(self.global_step + 1, "data")
                if self.plan_changes.batch_ramp is not None:
                    self._follow_ramp()
                began = time.perf_counter()
                micro_batches = data.next_step()
                while True:
                    try:
                        metrics = self.step(micro_batches)
                        break
                    except MicroBatchOutOfMemory:
                        micro_batches = self._shrink_after_oom()  # same global batch, smaller micro-batches
                if step_end:
                    took = time.perf_counter() - began
                    for observe in step_end:
                        observe(self, metrics, took)
                stop = self.checkpoints.after_step(self, metrics.step)
                yield metrics
                if stop:
                    return
        finally:
            for end in observers(self.components, "on_train_end"):
                end(self)

    def train(self, steps: int, callback: Callable[[StepMetrics], None] | None = None) -> StepMetrics | None:
        """Run `steps` optimizer steps (see iter_steps), calling `callback(metrics)` after each;
        returns the last step's metrics (None for zero steps). No history is kept."""
        last = None
        for last in self.iter_steps(steps):
            if callback is not None:
                callback(last)
        return last

    fit = train

    def log(self, message: str) -> None:
        log_rank0(message)

    def close(self) -> None:
        """Stop the data workers and the watchdog, close the metrics file, undo what the
        strategy installed; the process group stays (trainers.distributed.shutdown).
        Idempotent; `with trainer:` calls it on the way out."""
        if self.data is not None:
            self.data.close()
        if self.metrics_logger is not None:
            self.metrics_logger.close()
        self.strategy.close()
        self.hang.stop()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """In memory: model (no wrapper prefix), optimizer, scheduler, sampler, step, plan, precision
        (the strategy's part first; DeepSpeed's weights live in its own files)."""
        part = self.strategy.state_dict()
        state = {
            "model": part.pop("model"),
            "optimizer": part.pop("optimizer"),
            "scheduler": part.pop("scheduler"),
            "sampler": self.data.state_dict() if self.data is not None else None,
            "step": self.global_step,
            "plan": self.plan.to_dict(),
            "precision": part.pop("precision"),
            "skipped_steps": list(self.skipped_steps),
        }
        state.update(part)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict(); the plan in it may be for another world size.

        `model`/`optimizer` may be None: a DeepSpeed checkpoint keeps them in the engine's files."""
        self.strategy.load_state_dict(state)
        if self.data is not None and state.get("sampler") is not None:
            self.data.load_state_dict(state["sampler"])
        self.global_step = int(state["step"])
        self.skipped_steps = list(state.get("skipped_steps", []))

    # ------------------------------------------------- plan changes between steps
    def enable_oom_fallback(self) -> None:
        """On out-of-memory in a micro-step, halve the micro-batch, double the accumulation
        and retry the step: the global batch and the weights stay exactly the same. Costs
        one tiny all-reduce per micro-step (every rank must learn of an OOM)."""
        self.plan_changes.enable_oom_fallback(type(self).__name__, self.strategy)
        self._hooks = self._wire()

    def _shrink_after_oom(self) -> list[MicroBatch]:
        """Every rank: drop this step's partial gradients and re-cut the global batch smaller."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.plan, message = self.plan_changes.after_oom(self.plan, self.global_step + 1)
        self.log(message)
        return self.data.recut(self.plan)

    def set_plan(self, plan: BatchPlan, lr_scaling: str | LRRule | None = None) -> None:
        """Use `plan` (same world size) from the next step on; a new global batch rescales
        the learning rate by `lr_scaling` (default: `self.lr_scaling`, linear)."""
        old = self.plan
        if plan == old:
            return
        plan = self.plan_changes.check_plan(type(self).__name__, self.strategy, old, plan)
        self.plan = plan
        notes = [f"gradaccum: plan change before step {self.global_step + 1}: {describe_change(old, plan)}"]
        new_global = plan.global_batch_size != old.global_batch_size
        if self.data is not None:
            self.data.change_plan(plan, allow_new_global_batch=new_global)
        if new_global and self.optimizer is not None:
            rule = self.lr_scaling if lr_scaling is None else lr_scaling
            notes.append(
                rescale_learning_rate(
                    self.optimizer, self.scheduler, old.global_batch_size, plan.global_batch_size, rule
                )
            )
        self.log("\n  ".join(notes))

    def set_batch_ramp(self, ramp: BatchRamp | str, lr_scaling: str | LRRule | None = None) -> None:
        """Follow a launcher.ramp.BatchRamp (or its spec, e.g. "8,16@64,32@192") by samples consumed."""
        from launcher.errors import UserError

        if self.data is None:
            raise UserError("a batch ramp needs the trainer's dataset (the ramp follows the samples consumed)")
        self.plan_changes.set_batch_ramp(ramp, self.plan, lr_scaling)
        self._follow_ramp()

    def _follow_ramp(self) -> None:
        """Before a step: take the ramp's plan for the samples consumed so far."""
        target = self.plan_changes.ramp_plan(self.plan, self.data.consumed_samples)
        if target is not None:
            self.set_plan(target)

    # --------------------------------------------------------------- checkpoints
    def save(self, root: str | os.PathLike[str] | None = None) -> Path:
        """Checkpoint now (every rank calls it) into `root` or `checkpoint_dir`; returns step_N."""
        return self.checkpoints.save(self, root)

    def resume(self, path_or_root: str | os.PathLike[str], lr_scaling: str | LRRule | None = None) -> Path | None:
        """Load a checkpoint (a step_N dir, a root: its newest complete one, or "auto":
        `checkpoint_dir`'s newest, None if there is none yet). Another world size is fine;
        another global batch rescales the learning rate by `lr_scaling` (an LRRule or a rule
        name; default `self.lr_scaling`, linear, the rule a batch ramp also uses)."""
        return self.checkpoints.resume(self, path_or_root, self.lr_scaling if lr_scaling is None else lr_scaling)

    def request_checkpoint_and_stop(self) -> None:
        """Ask train() to checkpoint after the current step and return. Safe in a signal
        handler (it only sets a flag); see trainers.resume.install_stop_handlers."""
        self.checkpoints.request_stop()

    # ------------------------------------------------------------- front doors
    @classmethod
    def from_task(cls, task: Any, plan: BatchPlan | int, **kwargs: Any) -> Trainer:
        """Seed torch, build the task's model on this rank's device and its optimizer, and
        construct the trainer (the front door's keyword arguments pass through)."""
        device = cls._task_device(plan, kwargs)
        model, optimizer, fields = build_from_task(task, device, cls._optimizer_factory)
        scheduler = task.scheduler
        if scheduler is not None and not cls._scheduler_factory:
            scheduler = scheduler(optimizer)
        # the caller's keyword arguments win over the task's fields (e.g. --num-workers)
        return cls(model, optimizer, plan, task.loss, scheduler=scheduler, **{**fields, **kwargs})

    #: DeepSpeed takes the task's scheduler factory; the others build the scheduler here
    _scheduler_factory = False
    #: True: from_task hands the strategy the task's optimizer factory (built after sharding)
    _optimizer_factory = False

    @classmethod
    def _task_device(cls, plan: Any, kwargs: dict[str, Any]) -> torch.device:
        """The device from_task builds the model on (may initialise the process group)."""
        raise NotImplementedError
