"""StepData: this rank's micro-batches for the next optimizer step.

One object owns the data side of the loop: the GlobalBatchSampler (which global batch comes
next and this rank's share of it, at any world size), the dataset, the collate function
and the device. `next_step()` returns this rank's K MicroBatches; `recut()` cuts the same
global batch again under a new plan (the OOM fallback). Worker-process prefetching and
iterable streams belong behind this same seam; `state_dict()` is the sampler's position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from launcher.plan import BatchPlan
from trainers.accumulate import MicroBatch
from trainers.sampler import GlobalBatchSampler


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


class StepData:
    """A map-style dataset cut into global batches and this rank's micro-batches."""

    def __init__(
        self,
        dataset: Sequence[Any],
        plan: BatchPlan,
        dp_rank: int,
        device: torch.device,
        *,
        collate: Callable[[list], Any] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.collate = collate or default_collate
        self.device = device
        self.dp_rank = dp_rank
        self.sampler = GlobalBatchSampler(len(dataset), plan, dp_rank, seed=seed, shuffle=shuffle, drop_last=drop_last)

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate dataset items; an empty list gives a zero-weight filler (see MicroBatch)."""
        if not indices:
            filler = self.dataset[self.sampler.last_global_batch[0]]
            return MicroBatch(to_device(self.collate([filler]), self.device), 0)
        return MicroBatch(to_device(self.collate([self.dataset[i] for i in indices]), self.device), len(indices))

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch."""
        return [self.micro_batch(ix) for ix in self.sampler.next_step()]

    def recut(self, plan: BatchPlan) -> list[MicroBatch]:
        """The last global batch again, cut by `plan` (same global batch: the position stays)."""
        self.sampler.plan = plan
        return [self.micro_batch(ix) for ix in self.sampler.split(self.sampler.last_global_batch)[self.dp_rank]]

    def change_plan(self, plan: BatchPlan, allow_new_global_batch: bool) -> None:
        """From the next step on, cut global batches by `plan` (maybe a new global batch size)."""
        state = self.sampler.state_dict()
        self.sampler.plan = plan
        self.sampler.load_state_dict(state, allow_new_global_batch=allow_new_global_batch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any], allow_new_global_batch: bool = False) -> None:
        self.sampler.load_state_dict(state, allow_new_global_batch=allow_new_global_batch)
