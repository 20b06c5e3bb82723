"""The contenders: ours, a hand-written loop, Accelerate and Lightning, on the same work.

Every contender builds its model the way the trainers do (seed, then the task's factory),
reads the same micro-batches in the same order (its own `GlobalBatchSampler`, no shuffling),
collates them with the task's collate, and takes an optimizer step every K micro-batches
with the same optimizer, scheduler and clipping. They differ only in the loop itself.
`train_steps(n)` takes n optimizer steps. Lightning owns its loop, so it cannot be called
one step at a time: `LightningRunner.drive` runs one `fit` and calls back at every step
boundary, where the others take their step (see `dist_worker.Context.interleave`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import default_collate

from launcher.plan import BatchPlan
from trainers.sampler import GlobalBatchSampler
from trainers.task import Task


class DataFeed:
    """This rank's collated micro-batches, one optimizer step at a time, exactly as DDPTrainer reads them."""

    def __init__(self, task: Task, plan: BatchPlan, rank: int) -> None:
        self.task = task
        self.collate = task.collate or default_collate
        self.sampler = GlobalBatchSampler(len(task.dataset), plan, rank, seed=task.seed, shuffle=False, drop_last=True)

    def next_indices(self) -> list[list[int]]:
        return self.sampler.next_step()

    def next_step(self) -> list[Any]:
        return [self.collate([self.task.dataset[i] for i in ix]) for ix in self.next_indices()]


class Contender:
    name = "?"
    drives_loop = False  # True: owns its training loop (Lightning), see LightningRunner.drive

    def __init__(self, task: Task, plan: BatchPlan) -> None:
        self.task, self.plan = task, plan
        self.k = plan.gradient_accumulation_steps
        self.steps_done = 0
        self.module: torch.nn.Module

    def train_steps(self, n: int) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"threads": torch.get_num_threads()}


class Ours(Contender):
    """`DDPTrainer.from_task(...).train(n)`: the public API, nothing bypassed, default settings
    (the comm benchmark turns on `count_collectives` for its round counts)."""

    def __init__(
        self,
        task: Task,
        plan: BatchPlan,
        sync_every_micro_step: bool = False,
        count_collectives: bool = False,
        ddp_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from trainers import DDPTrainer

        super().__init__(task, plan)
        self.name = "naive" if sync_every_micro_step else "ours"
        self.trainer = DDPTrainer.from_task(
            task,
            plan,
            shuffle=False,
            drop_last=True,
            log=False,
            sync_every_micro_step=sync_every_micro_step,
            count_collectives=count_collectives,
            ddp_kwargs=ddp_kwargs,
        )
        self.module = self.trainer.module
        self.last_metrics = None

    def train_steps(self, n: int) -> None:
        if n:
            self.last_metrics = self.trainer.train(n)
            self.steps_done += n


class HandLoop(Contender):
    """nanoGPT's loop: `require_backward_grad_sync` on the last micro-step, loss / K, backward, step.

    For (sum, count) losses it does what a careful hand loop must to get the global token
    mean (and what DDPTrainer does): one all-reduce of the step's token count up front,
    then each micro-step's sum times dp / count.
    """

    name = "hand"

    def __init__(self, task: Task, plan: BatchPlan, rank: int) -> None:
        super().__init__(task, plan)
        torch.manual_seed(task.seed)
        self.module = task.model()
        self.model = DDP(self.module)
        self.optimizer = task.optimizer(self.module.parameters())
        self.scheduler = task.scheduler(self.optimizer) if task.scheduler is not None else None
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.feed = DataFeed(task, plan, rank)

    def train_steps(self, n: int) -> None:
        task, k, dp = self.task, self.k, self.plan.data_parallel_size
        for _ in range(n):
            micro = self.feed.next_step()
            scale = 1.0 / k
            if task.count is not None:
                total = torch.tensor([float(sum(task.count(b) for b in micro))], dtype=torch.float64)
                dist.all_reduce(total)
                scale = dp / float(total[0])
            for i, batch in enumerate(micro):
                # only the last micro-step's backward all-reduces the gradients
                self.model.require_backward_grad_sync = i == k - 1
                out = task.loss(self.model, batch)
                loss = out[0] if isinstance(out, tuple) else out
                (loss * scale).backward()
            if task.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, task.clip_grad_norm)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += n


_ACCELERATOR: dict[int, Any] = {}


class AccelerateRunner(Contender):
    """`Accelerator(gradient_accumulation_steps=K)` and `accumulate()`, as its docs show."""

    name = "accelerate"

    def __init__(self, task: Task, plan: BatchPlan, rank: int) -> None:
        from accelerate import Accelerator

        super().__init__(task, plan)
        if self.k not in _ACCELERATOR:  # its state is a per-process singleton: one per K
            _ACCELERATOR[self.k] = Accelerator(gradient_accumulation_steps=self.k, cpu=True)
        self.accelerator = acc = _ACCELERATOR[self.k]
        if acc.num_processes != plan.world_size:
            raise RuntimeError(f"Accelerate runs {acc.num_processes} process(es), the plan {plan.world_size}")
        torch.manual_seed(task.seed)
        self.module = task.model()
        optimizer = task.optimizer(self.module.parameters())
        # The scheduler is stepped by hand at the boundary: a prepared one steps num_processes times.
        self.scheduler = task.scheduler(optimizer) if task.scheduler is not None else None
        self.model, self.optimizer = acc.prepare(self.module, optimizer)
        self.feed = DataFeed(task, plan, rank)

    def train_steps(self, n: int) -> None:
        acc, task = self.accelerator, self.task
        for _ in range(n):
            for batch in self.feed.next_step():
                with acc.accumulate(self.model):
                    acc.backward(task.loss(self.model, batch))  # divides by K
                    if acc.sync_gradients and task.clip_grad_norm is not None:
                        acc.clip_grad_norm_(self.model.parameters(), task.clip_grad_norm)
                    self.optimizer.step()  # a no-op until the boundary
                    if acc.sync_gradients and self.scheduler is not None:
                        self.scheduler.step()
                    self.optimizer.zero_grad()
        self.steps_done += n

    def describe(self) -> dict[str, Any]:
        acc = self.accelerator
        return {**super().describe(), "num_processes": acc.num_processes, "distributed_type": str(acc.distributed_type)}


class _Boundaries:
    """What the Lightning callback needs: K, the function to call at each step boundary, and
    Lightning's own time per step (boundary to boundary, minus the time spent in that function)."""

    def __init__(self, k: int, at_boundary: Callable[[int], None]) -> None:
        self.k, self.at_boundary = k, at_boundary
        self.seconds: list[float] = []
        self.last = 0.0


def _lightning_classes():
    import lightning.pytorch as pl

    class StepBoundaries(pl.Callback):
        def __init__(self, state: _Boundaries) -> None:
            self.state = state

        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            self.state.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            if (batch_idx + 1) % self.state.k == 0:  # the optimizer step of this window is done
                st = self.state
                st.seconds.append(time.perf_counter() - st.last)
                st.at_boundary(len(st.seconds) - 1)
                st.last = time.perf_counter()

    class Wrapped(pl.LightningModule):
        def __init__(self, model, loss, optimizer, scheduler) -> None:  # noqa: ANN001
            super().__init__()
            self.model, self.loss_fn = model, loss
            self._optimizer, self._scheduler = optimizer, scheduler

        def training_step(self, batch, batch_idx):  # noqa: ANN001
            return self.loss_fn(self.model, batch)

        def configure_optimizers(self):
            if self._scheduler is None:
                return self._optimizer
            return {"optimizer": self._optimizer, "lr_scheduler": {"scheduler": self._scheduler, "interval": "step"}}

    return pl, StepBoundaries, Wrapped


class _StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batch indices for `steps` optimizer steps, from the shared feed."""

    def __init__(self, feed: DataFeed, steps: int) -> None:
        self.batches = [ix for _ in range(steps) for ix in feed.next_indices()]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LightningRunner(Contender):
    """`Trainer(accumulate_grad_batches=K, strategy="ddp", accelerator="cpu", devices=2)`.

    Lightning would inject a shuffling DistributedSampler; `use_distributed_sampler=False`
    with our own batch sampler keeps the data identical. One `fit` of one Trainer for the
    whole benchmark, as users run it. Progress bar, logger, checkpoints and the model
    summary are off (pure training, which favours Lightning if anything).
    """

    name = "lightning"
    drives_loop = True

    def __init__(self, task: Task, plan: BatchPlan, rank: int) -> None:
        super().__init__(task, plan)
        self.pl, self.callback_cls, wrapped = _lightning_classes()
        torch.manual_seed(task.seed)
        self.module = task.model()
        optimizer = task.optimizer(self.module.parameters())
        scheduler = task.scheduler(optimizer) if task.scheduler is not None else None
        self.lit = wrapped(self.module, task.loss, optimizer, scheduler)
        self.feed = DataFeed(task, plan, rank)
        self.world_size = None

    def drive(self, steps: int, at_boundary: Callable[[int], None]) -> list[float]:
        """One fit of `steps` optimizer steps; `at_boundary(i)` runs after step i and is not
        counted in Lightning's time. Returns Lightning's seconds per step."""
        state = _Boundaries(self.k, at_boundary)
        loader = torch.utils.data.DataLoader(
            self.task.dataset, batch_sampler=_StepBatches(self.feed, steps), collate_fn=self.feed.collate
        )
        trainer = self.pl.Trainer(
            accelerator="cpu",
            devices=self.plan.world_size,
            strategy="ddp",
            accumulate_grad_batches=self.k,
            gradient_clip_val=self.task.clip_grad_norm,
            max_steps=steps,
            max_epochs=1,
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[self.callback_cls(state)],
        )
        trainer.fit(self.lit, loader)
        self.world_size = trainer.world_size
        if trainer.global_step != steps or len(state.seconds) != steps:
            raise RuntimeError(f"Lightning took {trainer.global_step} optimizer steps, expected {steps}")
        del trainer  # its DDP wrapper hooks the parameters
        gc.collect()
        self.steps_done += steps
        return state.seconds

    def train_steps(self, n: int) -> None:
        if n:
            self.drive(n, lambda i: None)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "world_size": self.world_size}


def make_contender(name: str, task: Task, plan: BatchPlan, rank: int, count_collectives: bool = False) -> Contender:
    if name == "ours":
        return Ours(task, plan, count_collectives=count_collectives)
    if name == "ours-copy":  # an identical second contender: the A/A ratio is the noise floor
        copy = Ours(task, plan)
        copy.name = name
        return copy
    if name == "ours-ddp-defaults":  # ours on PyTorch's DDP defaults: what DDP_DEFAULTS is worth
        plain = Ours(task, plan, ddp_kwargs={"gradient_as_bucket_view": False})
        plain.name = name
        return plain
    if name == "naive":
        return Ours(task, plan, sync_every_micro_step=True, count_collectives=count_collectives)
    if name == "hand":
        return HandLoop(task, plan, rank)
    if name == "accelerate":
        return AccelerateRunner(task, plan, rank)
    if name == "lightning":
        return LightningRunner(task, plan, rank)
    raise ValueError(f"unknown contender {name!r}")
