"""StreamSteps: IterableDataset global batches split exactly as the map-style sampler splits them."""

from __future__ import annotations

import pytest
import torch.utils.data

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.sampler import GlobalBatchSampler
from trainers.stream import StreamSteps, is_stream


class CountingStream(torch.utils.data.IterableDataset):
    """Items 'item-<i>' for i < n, counting how many were ever pulled; records set_epoch."""

    def __init__(self, n: int) -> None:
        self.n, self.pulled, self.epochs = n, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        for i in range(self.n):
            self.pulled += 1
            yield f"item-{i}"


class StatefulStream(CountingStream):
    """Resumable by its own state (like HF streaming datasets): no items re-read on resume."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.pos = 0
        self.start = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.start = state["pos"]

    def __iter__(self):
        self.pos, start, self.start = self.start, self.start, 0
        for i in range(start, self.n):
            self.pulled += 1
            self.pos = i + 1
            yield f"item-{i}"


def plan(g: int, m: int, world: int) -> BatchPlan:
    return BatchPlan(g, m, g // (m * world), world)


def map_style(n: int, p: BatchPlan, rank: int, steps: int) -> list[list[list[str]]]:
    sampler = GlobalBatchSampler(n, p, rank, shuffle=False)
    return [[[f"item-{i}" for i in micro] for micro in sampler.next_step()] for _ in range(steps)]


@pytest.mark.parametrize(("world", "g", "m", "n"), [(1, 12, 2, 40), (2, 12, 2, 40), (3, 12, 2, 40), (3, 12, 4, 29)])
def test_world_splits_equal_the_map_style_sampler(world, g, m, n):
    """Over two passes, including the partial last global batch of each."""
    p = plan(g, m, world)
    steps = 2 * -(-n // g)
    for rank in range(world):
        stream = StreamSteps(CountingStream(n), p, rank)
        assert [stream.next_step() for _ in range(steps)] == map_style(n, p, rank, steps)
    # every item of a step lands on exactly one rank, in stream order
    streams = [StreamSteps(CountingStream(n), p, r) for r in range(world)]
    for t in range(steps):
        flat = [x for s in streams for micro in s.next_step() for x in micro]
        start = (t % -(-n // g)) * g
        assert flat == [f"item-{i}" for i in range(start, min(start + g, n))]


def test_partial_batch_leaves_empty_micro_steps_with_a_filler():
    p = plan(12, 2, 3)  # K = 2
    stream = StreamSteps(CountingStream(13), p, 2)
    stream.next_step()
    last = stream.next_step()  # 1 item for 3 ranks x 2 micro-steps: rank 2 gets nothing
    assert last == [[], []] and stream.filler == "item-12" and stream.last_global_batch_size == 1
    assert stream.epoch == 1 and stream.items_in_epoch == 0
    assert stream.next_step() == map_style(13, p, 2, 1)[0]  # a new pass
    assert stream.dataset.epochs == [0, 1]


def test_read_ahead_is_one_global_batch():
    ds = CountingStream(100)
    stream = StreamSteps(ds, plan(8, 2, 2), 1)
    for t in range(1, 5):
        stream.next_step()
        assert ds.pulled == 8 * t
    assert stream.consumed_samples == 32


@pytest.mark.parametrize("stateful", [False, True])
@pytest.mark.parametrize(("world_a", "world_b"), [(2, 3), (3, 2), (2, 1)])
def test_resume_at_s_times_g_at_another_world_size(stateful, world_a, world_b):
    n, g, steps_before = 50, 12, 3
    make = StatefulStream if stateful else CountingStream
    first = StreamSteps(make(n), plan(g, 2, world_a), 0)
    for _ in range(steps_before):
        first.next_step()
    state = first.state_dict()
    assert state["items_in_epoch"] == steps_before * g and ("dataset_state" in state) == stateful
    p = plan(g, 2, world_b)
    for rank in range(world_b):
        ds = make(n)
        resumed = StreamSteps(ds, p, rank)
        resumed.load_state_dict(state)
        got = [resumed.next_step() for _ in range(3)]
        assert got == map_style(n, p, rank, steps_before + 3)[steps_before:]
        # the dataset's own state skips without reading; otherwise the first S*G items are read and dropped
        assert ds.pulled == (g + 2 + g if stateful else n + g)  # 12 + the partial 2 + 12 of pass 2


def test_resume_with_another_global_batch_continues_at_the_next_item():
    first = StreamSteps(CountingStream(60), plan(12, 2, 2), 1)
    first.next_step()
    first.next_step()
    resumed = StreamSteps(CountingStream(60), plan(8, 2, 2), 0)
    resumed.load_state_dict(first.state_dict())
    assert resumed.next_step() == [["item-24", "item-25"], ["item-26", "item-27"]]


def test_bad_streams_are_clear_errors():
    with pytest.raises(UserError, match="ended after 5 items, before the first global batch of 12"):
        StreamSteps(CountingStream(5), plan(12, 2, 2), 0).next_step()
    with pytest.raises(UserError, match="no items at all"):
        StreamSteps(CountingStream(0), plan(12, 2, 2), 0).next_step()
    with pytest.raises(UserError, match="needs a torch.utils.data.IterableDataset, got list"):
        StreamSteps([1, 2, 3], plan(12, 2, 2), 0)
    stream = StreamSteps(CountingStream(30), plan(12, 2, 2), 0)
    with pytest.raises(UserError, match="written for a map-style dataset"):
        stream.load_state_dict(GlobalBatchSampler(30, plan(12, 2, 2)).state_dict())
    stream.load_state_dict({**stream.state_dict(), "epoch": 0, "items_in_epoch": 40})
    with pytest.raises(UserError, match="ended after 30 items"):
        stream.next_step()
    assert is_stream(CountingStream(1)) and not is_stream([1])
