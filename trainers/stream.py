"""StreamSteps: a `torch.utils.data.IterableDataset` cut into global batches, at any world size.

The stream contract: optimizer step t consumes stream items [t*G, (t+1)*G) in stream order
(G = the global batch size), whatever the world size and accumulation. Every rank reads the
stream in order and keeps only its share of each global batch, split over ranks and
micro-steps exactly as GlobalBatchSampler.split splits a map-style global batch (the same
code: a sampler over positions 0..G-1 of the global batch). Read-ahead is bounded: one
global batch is read per step, and a prefetching loader (trainers.loader) holds at most its
prefetch depth of steps.

When the stream ends, its last, partial global batch is spread as for map-style datasets;
the next step starts a new pass (`set_epoch(epoch)` first, when the dataset has it, which
is how HF streaming datasets reshuffle). Shuffling is the dataset's business. A stream that
ends before one full global batch is an error: the run could not take a single full step.

The position is kept in items consumed in the current pass, so a checkpoint taken after S
steps resumes at stream item S*G at any world size (and any global batch size): by the
dataset's own `load_state_dict()` when it has `state_dict()`/`load_state_dict()`, else by
reading and dropping the first S*G items of a fresh pass.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.sampler import GlobalBatchSampler


def is_stream(dataset: Any) -> bool:
    import torch.utils.data

    return isinstance(dataset, torch.utils.data.IterableDataset)


def _stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


class StreamSteps:
    """Yields, per optimizer step, this rank's K micro-batches of stream *items* (not indices).

    `next_step()` -> `[micro_step] -> list of items`; an empty list is a micro-step with no
    data for this rank (only in a partial last global batch). `filler` is the first item of
    the latest global batch, for running such a micro-step with weight zero.
    `use_dataset_state`: None = use the dataset's state_dict() when it has one.
    """

    def __init__(
        self,
        dataset: Any,
        plan: BatchPlan,
        dp_rank: int = 0,
        *,
        use_dataset_state: bool | None = None,
    ) -> None:
        if not is_stream(dataset):
            raise UserError(
                f"StreamSteps needs a torch.utils.data.IterableDataset, got {type(dataset).__name__}; "
                "map-style datasets (len() and indexing) go through GlobalBatchSampler"
            )
        self.dataset = dataset
        self.dp_rank = dp_rank
        self.use_dataset_state = _stateful(dataset) if use_dataset_state is None else use_dataset_state
        self._splitter: GlobalBatchSampler  # set by the plan setter
        self.plan = plan
        self.epoch = 0
        self.items_in_epoch = 0  # items of this pass consumed by completed steps
        self.consumed_samples = 0  # over all passes
        self.steps = 0
        self.filler: Any = None
        self.last_global_batch_size = 0
        self._iter: Iterator[Any] | None = None
        self._dataset_state: Any = None  # the dataset's own state after the latest step

    # ------------------------------------------------------------------ the split
    @property
    def plan(self) -> BatchPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: BatchPlan) -> None:
        # A sampler over the positions of one global batch: its split() is the map-style split.
        self._splitter = GlobalBatchSampler(plan.global_batch_size, plan, self.dp_rank, shuffle=False)
        self._plan = plan

    @property
    def global_batch_size(self) -> int:
        return self.plan.global_batch_size

    def split(self, items: list[Any]) -> list[list[Any]]:
        """This rank's micro-batches of one global batch of items (map-style rule)."""
        share = self._splitter.split(list(range(len(items))))[self.dp_rank]
        return [[items[i] for i in micro] for micro in share]

    # ------------------------------------------------------------------ reading
    def _start_pass(self, skip: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        if skip and self.use_dataset_state and self._dataset_state is not None:
            self.dataset.load_state_dict(self._dataset_state)
            self._iter = iter(self.dataset)
            return
        self._iter = iter(self.dataset)
        if skip:
            dropped = sum(1 for _ in itertools.islice(self._iter, skip))
            if dropped < skip:
                raise UserError(
                    f"cannot resume the stream at item {skip} of pass {self.epoch}: it ended after {dropped} items; "
                    "is it the same dataset as in the checkpoint?"
                )

    def _read(self, n: int) -> list[Any]:
        if self._iter is None:
            self._start_pass(self.items_in_epoch)
        return list(itertools.islice(self._iter, n))

    def next_global_batch(self) -> list[Any]:
        """The next global batch of stream items (all ranks'); moves past it."""
        g = self.global_batch_size
        items = self._read(g)
        if not items:
            if self.items_in_epoch == 0:
                raise UserError("the stream yielded no items at all; nothing to train on")
            self.epoch, self.items_in_epoch, self._iter = self.epoch + 1, 0, None
            self._dataset_state = None
            items = self._read(g)
            if not items:
                raise UserError(f"pass {self.epoch} of the stream yielded no items (the previous pass did)")
        if self.epoch == 0 and self.items_in_epoch == 0 and len(items) < g:
            raise UserError(
                f"the stream ended after {len(items)} items, before the first global batch of {g}: "
                "use a smaller global batch or a longer stream"
            )
        self.items_in_epoch += len(items)
        self.consumed_samples += len(items)
        self.steps += 1
        self.filler, self.last_global_batch_size = items[0], len(items)
        if self.use_dataset_state:
            self._dataset_state = copy.deepcopy(self.dataset.state_dict())
        if len(items) < g:  # the stream ended inside this batch: the next step starts a new pass
            self.epoch, self.items_in_epoch, self._iter = self.epoch + 1, 0, None
            self._dataset_state = None
        return items

    def next_step(self) -> list[list[Any]]:
        """This rank's K micro-batches of the next global batch."""
        return self.split(self.next_global_batch())

    def __iter__(self) -> Iterator[list[list[Any]]]:
        """Steps without end (passes repeat); take as many as you train."""
        while True:
            yield self.next_step()

    # ------------------------------------------------------------------ position
    def state_dict(self) -> dict[str, Any]:
        """The position in items: valid at any world size and global batch size."""
        state = {
            "kind": "stream",
            "epoch": self.epoch,
            "items_in_epoch": self.items_in_epoch,
            "consumed_samples": self.consumed_samples,
            "steps": self.steps,
            "global_batch_size": self.global_batch_size,
        }
        if self.use_dataset_state and self._dataset_state is not None:
            state["dataset_state"] = self._dataset_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved item; the next read starts a fresh pass and skips ahead."""
        if state.get("kind") != "stream":
            raise UserError(
                "cannot resume a stream from this checkpoint: it was written for a map-style dataset "
                "(the task's dataset changed kind)"
            )
        self.epoch = int(state["epoch"])
        self.items_in_epoch = int(state["items_in_epoch"])
        self.consumed_samples = int(state["consumed_samples"])
        self.steps = int(state["steps"])
        self._dataset_state = state.get("dataset_state") if self.use_dataset_state else None
        self._iter = None
