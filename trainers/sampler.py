"""GlobalBatchSampler: optimizer step t consumes exactly one global batch, at any world size.

Without shuffling, global batch t of an epoch is items [t*G, (t+1)*G); with shuffling, a
permutation seeded by (seed, epoch) that does not depend on the world size. Each global
batch is then split over data-parallel ranks and micro-steps. Because the position is
kept in global batches, a run saved at one world size resumes at another on the very
next item. Pure Python: no torch, so it is cheap to test exhaustively.
"""

from __future__ import annotations

import math
import random
from typing import Any

from launcher.errors import UserError
from launcher.plan import BatchPlan


def split_evenly(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous chunks of `n` items, differing by at most one, larger first."""
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


class GlobalBatchSampler:
    """Yields, per optimizer step, this rank's K micro-batches of dataset indices.

    `rank` is the data-parallel rank (0 .. plan.data_parallel_size - 1). A full global
    batch gives every rank K micro-batches of exactly `plan.micro_batch_size` items. The
    last, partial global batch of an epoch (drop_last=False) is spread as evenly as
    possible over ranks, then over micro-steps; a micro-batch may then be empty, and the
    trainers still run it (with weight zero) so that every rank joins every collective.
    """

    def __init__(
        self,
        dataset_len: int,
        plan: BatchPlan,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if dataset_len <= 0:
            raise UserError(f"the dataset is empty (length {dataset_len}); nothing to train on")
        dp = plan.data_parallel_size
        if not 0 <= rank < dp:
            raise UserError(f"data-parallel rank {rank} is outside 0..{dp - 1} (data-parallel size {dp})")
        if drop_last and dataset_len < plan.global_batch_size:
            raise UserError(
                f"drop_last=True with {dataset_len} items and global batch {plan.global_batch_size}: "
                "not one full global batch; use a smaller global batch or drop_last=False"
            )
        self.dataset_len = dataset_len
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.step_in_epoch = 0
        #: items of epoch `offset_epoch` consumed before a resume with another global batch
        #: size; that epoch's global batches start after them (0: a plain epoch)
        self.offset_epoch = 0
        self.epoch_offset = 0
        #: the global batch of the latest next_step() (all ranks' items), for filler items
        self.last_global_batch: list[int] = []
        self._order_epoch = -1
        self._order: list[int] = []

    # ---------------------------------------------------------------- pure parts
    @property
    def global_batch_size(self) -> int:
        return self.plan.global_batch_size

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        g = self.global_batch_size
        return self.dataset_len // g if self.drop_last else math.ceil(self.dataset_len / g)

    def order(self, epoch: int) -> list[int]:
        """Dataset indices in the order epoch `epoch` visits them (same at every world size)."""
        if epoch != self._order_epoch:
            order = list(range(self.dataset_len))
            if self.shuffle:
                # string seeds hash deterministically (sha512), unlike tuples
                random.Random(f"gradaccum:{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def _start(self, epoch: int) -> int:
        return self.epoch_offset if epoch == self.offset_epoch else 0

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in `epoch`: len(self), or fewer after a resume with a new global batch."""
        n, g = self.dataset_len - self._start(epoch), self.global_batch_size
        return n // g if self.drop_last else math.ceil(n / g)

    def global_batch(self, epoch: int, step: int) -> list[int]:
        g = self.global_batch_size
        start = self._start(epoch) + step * g
        return self.order(epoch)[start : start + g]

    def split(self, global_indices: list[int]) -> list[list[list[int]]]:
        """[rank][micro_step] -> indices. Contiguous: rank r's items precede rank r+1's."""
        k = self.plan.gradient_accumulation_steps
        out, start = [], 0
        for share in split_evenly(len(global_indices), self.plan.data_parallel_size):
            micro, pos = [], start
            for size in split_evenly(share, k):
                micro.append(global_indices[pos : pos + size])
                pos += size
            out.append(micro)
            start += share
        return out

    # ------------------------------------------------------------------ position
    def next_step(self) -> list[list[int]]:
        """This rank's K micro-batches for the next optimizer step; moves past it."""
        if self.step_in_epoch >= self.steps_in_epoch(self.epoch):
            self.epoch += 1
            self.step_in_epoch = 0
        batch = self.global_batch(self.epoch, self.step_in_epoch)
        self.step_in_epoch += 1
        self.last_global_batch = batch
        return self.split(batch)[self.rank]

    def __iter__(self):
        """The remaining steps of the current epoch (a new epoch if this one is done)."""
        if self.step_in_epoch >= self.steps_in_epoch(self.epoch):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        while self.step_in_epoch < self.steps_in_epoch(self.epoch):
            yield self.next_step()

    @property
    def consumed_samples(self) -> int:
        g = self.global_batch_size
        per_epoch = self.dataset_len if not self.drop_last else len(self) * g
        return self.epoch * per_epoch + min(self._start(self.epoch) + self.step_in_epoch * g, self.dataset_len)

    def state_dict(self) -> dict[str, Any]:
        """The position in global batches: valid at any world size."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "consumed_samples": self.consumed_samples,
            "dataset_len": self.dataset_len,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "offset_epoch": self.offset_epoch,
            "epoch_offset": self.epoch_offset,
        }

    def load_state_dict(self, state: dict[str, Any], allow_new_global_batch: bool = False) -> None:
        """Continue at the saved position. With `allow_new_global_batch`, a checkpoint written
        with another global batch size continues at the first item it had not consumed."""
        # Anything that changes which items a global batch holds would silently skip or
        # repeat data after the resume: refuse it.
        keys = ("dataset_len", "seed", "shuffle", "drop_last")
        for key in keys if allow_new_global_batch else (*keys, "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the sampler: the checkpoint has {key}={state[key]!r} but this run has "
                    f"{getattr(self, key)!r}; the data order would change. Keep {key} when resuming "
                    "(the world size, micro-batch and accumulation steps may change)."
                )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.offset_epoch = int(state.get("offset_epoch", 0))
        self.epoch_offset = int(state.get("epoch_offset", 0))
        old_g = int(state.get("global_batch_size", self.global_batch_size))
        if old_g != self.global_batch_size:
            # The position is kept in items: the old run's epoch, re-cut into new global batches.
            start = self._start(self.epoch)
            left = self.dataset_len - start
            old_steps = left // old_g if self.drop_last else math.ceil(left / old_g)
            used = start + self.step_in_epoch * old_g
            if self.step_in_epoch >= old_steps:
                self.epoch, used = self.epoch + 1, 0
            self.offset_epoch, self.epoch_offset, self.step_in_epoch = self.epoch, used, 0
