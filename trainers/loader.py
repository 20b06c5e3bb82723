"""StepLoader: this rank's micro-batches for each optimizer step, the trainers' one data
component (Trainer.data): the GlobalBatchSampler or the stream, the dataset, the collate
function, the device and, optionally, worker processes reading off the training thread.

`next_step()` returns the next step's K `MicroBatch`es, in exactly the order the sampler
defines, whatever `num_workers` is. With `num_workers=0` items are read and collated on the
calling thread (the trainers' historical behaviour). With `num_workers > 0`:

- map-style datasets go through torch's `DataLoader` with a batch sampler yielding the
  sampler's per-micro-step index lists without end, so `num_workers` processes read and
  collate up to `prefetch_factor` micro-batches each ahead, while the current step computes.
  The DataLoader's iterator is created once and kept, so its workers live as long as the
  loader (across `train()` calls) and stop in `close()`. The loader runs ahead of the
  training; its resumable position is a second sampler advanced only by `next_step()`, so
  `state_dict()` is the position of the steps actually handed out.
- streams (IterableDataset) are read by ONE worker process running StreamSteps: a stream is
  sequential, and two readers would each see the whole stream (or need the dataset's own
  sharding, which would change which rank gets which item). That worker reads the global
  batch, keeps this rank's share, collates it and hands over whole steps, `prefetch_factor`
  steps ahead; each step comes with the stream position after it, which is what
  `state_dict()` returns.

`pin_memory` is used only when `device` is CUDA (pinned pages let the host-to-device copy
run asynchronously, `non_blocking=True`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.accumulate import MicroBatch
from trainers.sampler import GlobalBatchSampler, split_evenly
from trainers.stepdata import to_device
from trainers.stream import StreamSteps, is_stream


def check_loader_options(num_workers: Any, prefetch_factor: Any) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(
            f"num_workers must be a whole number >= 0 (0: read on the training thread), got {num_workers!r}"
        )
    if prefetch_factor is not None and (
        isinstance(prefetch_factor, bool) or not isinstance(prefetch_factor, int) or prefetch_factor < 1
    ):
        raise UserError(
            f"prefetch_factor must be a whole number >= 1 (or None for torch's default), got {prefetch_factor!r}"
        )


class _MicroBatchIndices:
    """Batch sampler for DataLoader: the sampler's micro-batch index lists, step after step.

    An empty micro-batch (partial last global batch) becomes the global batch's first index:
    the filler, which the loader marks with items=0.
    """

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            for micro in self.sampler.next_step():
                yield micro or [self.sampler.last_global_batch[0]]


class _StreamStepsWorker(IterableDataset):
    """Runs in the one worker process: whole collated steps, each with the position after it."""

    def __init__(self, steps: StreamSteps, collate: Callable[[list], Any]) -> None:
        self.steps, self.collate = steps, collate

    def __iter__(self) -> Iterator[tuple[list[tuple[Any, int]], dict[str, Any], tuple[list[Any], Any]]]:
        while True:
            micro = self.steps.next_step()
            out = [(self.collate(m or [self.steps.filler]), len(m)) for m in micro]
            # the raw share and filler too: recut() re-splits them without re-reading the stream
            yield out, self.steps.state_dict(), ([x for m in micro for x in m], self.steps.filler)


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, size) of consecutive chunks."""
    starts = itertools.accumulate([0, *sizes[:-1]])
    return list(zip(starts, sizes, strict=True))


def _collate_step(batch: Any) -> Any:
    return batch  # the worker already collated; keep the step's structure


class StepLoader:
    """This rank's micro-batches per optimizer step, from a map-style dataset or a stream.

    `next_step() -> list[MicroBatch]`; `state_dict()`/`load_state_dict()` is the position
    of the steps handed out (sampler state, or stream state with `"kind": "stream"`);
    `close()` stops the worker processes. Usable as a context manager.
    """

    def __init__(
        self,
        dataset: Any,
        plan: BatchPlan,
        dp_rank: int = 0,
        *,
        collate: Callable[[list], Any] | None = None,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        check_loader_options(num_workers, prefetch_factor)
        self.dataset = dataset
        self.plan = plan
        self.dp_rank = dp_rank
        self.collate = collate or default_collate
        self.device = None if device is None else torch.device(device)
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = bool(pin_memory) and self.device is not None and self.device.type == "cuda"
        self.streaming = is_stream(dataset)
        if self.streaming:
            # shuffle/drop_last do not apply: shuffling a stream is the dataset's business
            self.stream = StreamSteps(dataset, plan, dp_rank)
            self._stream_state: dict[str, Any] | None = None
            self._last_share: tuple[list[Any], Any] = ([], None)  # this rank's items of the last step, filler
        else:
            try:
                n = len(dataset)
                dataset[0]  # noqa: B018 (indexing is what map-style means)
            except (TypeError, NotImplementedError, AttributeError):
                raise UserError(
                    f"the dataset ({type(dataset).__name__}) is neither map-style (len() and indexing) nor a "
                    "torch.utils.data.IterableDataset"
                ) from None
            except (IndexError, KeyError):
                n = len(dataset)
            kw = {"seed": seed, "shuffle": shuffle, "drop_last": drop_last}
            self.sampler = GlobalBatchSampler(n, plan, dp_rank, **kw)  # position of handed-out steps
            self._ahead = GlobalBatchSampler(n, plan, dp_rank, **kw)  # drives the workers
        self._iter: Iterator[Any] | None = None

    # ------------------------------------------------------------------ reading
    def _start(self) -> Iterator[Any]:
        if self.num_workers == 0:
            return iter(())  # unused: next_step reads directly
        extra = {"prefetch_factor": self.prefetch_factor} if self.prefetch_factor is not None else {}
        if self.streaming:
            loader = DataLoader(
                _StreamStepsWorker(self.stream, self.collate),
                batch_size=None,
                collate_fn=_collate_step,
                num_workers=1,
                pin_memory=self.pin_memory,
                **extra,
            )
        else:
            self._ahead.load_state_dict(self.sampler.state_dict())
            loader = DataLoader(
                self.dataset,
                batch_sampler=_MicroBatchIndices(self._ahead),
                collate_fn=self.collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                **extra,
            )
        return iter(loader)

    def _iterator(self) -> Iterator[Any]:
        if self._iter is None:
            self._iter = self._start()
        return self._iter

    def next_step(self) -> list[MicroBatch]:
        """This rank's K micro-batches of the next global batch (collated, on the device)."""
        if self.streaming:
            if self.num_workers == 0:
                micro = self.stream.next_step()
                pairs = [(self.collate(m or [self.stream.filler]), len(m)) for m in micro]
                self._last_share = ([x for m in micro for x in m], self.stream.filler)
            else:
                pairs, self._stream_state, self._last_share = next(self._iterator())
            return [MicroBatch(to_device(b, self.device), n) for b, n in pairs]
        ahead = self._iterator() if self.num_workers else None  # started at the position before this step
        lists = self.sampler.next_step()
        if ahead is None:
            filler = [self.sampler.last_global_batch[0]]
            batches = [self.collate([self.dataset[i] for i in (ix or filler)]) for ix in lists]
        else:
            batches = list(itertools.islice(ahead, len(lists)))
        return [MicroBatch(to_device(b, self.device), len(ix)) for b, ix in zip(batches, lists, strict=True)]

    def micro_batch(self, indices: list[int]) -> MicroBatch:
        """Collate map-style items on this thread; an empty list gives a zero-weight filler
        (the latest global batch's first item, see MicroBatch)."""
        if self.streaming:
            raise TypeError("micro_batch(indices) needs a map-style dataset; a stream has no indices")
        items = indices or [self.sampler.last_global_batch[0]]
        return MicroBatch(to_device(self.collate([self.dataset[i] for i in items]), self.device), len(indices))

    # ------------------------------------------------------------------ plan changes
    def recut(self, plan: BatchPlan) -> list[MicroBatch]:
        """The last global batch again, cut by `plan` (same global batch and data-parallel
        size, e.g. smaller micro-batches after an out-of-memory); read on this thread."""
        if (
            plan.global_batch_size != self.plan.global_batch_size
            or plan.data_parallel_size != self.plan.data_parallel_size
        ):
            raise ValueError("recut() keeps the global batch and the data-parallel size; use change_plan()")
        if self.num_workers:
            self.close()  # the workers read ahead under the old plan: restart them after this step
        self.plan = plan
        if self.streaming:
            self.stream.plan = plan
            share, filler = self._last_share
            micro = [share[a : a + n] for a, n in _offsets(split_evenly(len(share), plan.gradient_accumulation_steps))]
            return [MicroBatch(to_device(self.collate(m or [filler]), self.device), len(m)) for m in micro]
        self.sampler.plan = self._ahead.plan = plan
        lists = self.sampler.split(self.sampler.last_global_batch)[self.dp_rank]
        filler = [self.sampler.last_global_batch[0]]
        return [
            MicroBatch(to_device(self.collate([self.dataset[i] for i in (ix or filler)]), self.device), len(ix))
            for ix in lists
        ]

    def change_plan(self, plan: BatchPlan, allow_new_global_batch: bool = False) -> None:
        """From the next step on, cut global batches by `plan`; read-ahead restarts under it."""
        state = self.state_dict()
        self.close()
        self.plan = plan
        if self.streaming:
            self.stream.plan = plan
            self.stream.load_state_dict(state)
        else:
            self.sampler.plan = self._ahead.plan = plan
            self.sampler.load_state_dict(state, allow_new_global_batch=allow_new_global_batch)

    # ------------------------------------------------------------------ position
    @property
    def consumed_samples(self) -> int:
        if self.streaming:
            return int(self.state_dict()["consumed_samples"])
        return self.sampler.consumed_samples

    def state_dict(self) -> dict[str, Any]:
        if not self.streaming:
            return self.sampler.state_dict()
        if self.num_workers and self._stream_state is not None:
            return dict(self._stream_state)
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any], allow_new_global_batch: bool = False) -> None:
        """Continue at the saved position; read-ahead workers restart from there."""
        self.close()
        if self.streaming:
            self.stream.load_state_dict(state)
            self._stream_state = None
        else:
            if state.get("kind") == "stream":
                raise UserError("cannot resume a map-style dataset from a checkpoint written for a stream")
            self.sampler.load_state_dict(state, allow_new_global_batch=allow_new_global_batch)

    def close(self) -> None:
        """Stop the worker processes (a later next_step() starts new ones at the same position)."""
        it, self._iter = self._iter, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
        if self.streaming and self.num_workers and self._stream_state is not None:
            # the worker read ahead; continue after the last step handed out
            self.stream.load_state_dict(self._stream_state)

    def __enter__(self) -> StepLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
