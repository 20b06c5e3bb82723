"""GlobalBatchSampler: one global batch per optimizer step, the same at every world size."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import BatchPlan, UserError
from trainers.sampler import GlobalBatchSampler, split_evenly


def plan(g: int, m: int, world: int) -> BatchPlan:
    return BatchPlan.solve(g, m, world_size=world)


def all_ranks(n: int, p: BatchPlan, **kw) -> list[GlobalBatchSampler]:
    return [GlobalBatchSampler(n, p, rank=r, **kw) for r in range(p.data_parallel_size)]


def test_without_shuffle_global_batch_t_is_items_t_g_to_t_plus_one_g():
    samplers = all_ranks(100, plan(12, 2, 3), shuffle=False)
    for t in range(3):
        steps = [s.next_step() for s in samplers]
        assert [i for rank in steps for micro in rank for i in micro] == list(range(12 * t, 12 * (t + 1)))
        # 3 ranks × accumulation 2 × micro 2
        assert all(len(micro) == 2 for rank in steps for micro in rank)
        assert all(len(rank) == 2 for rank in steps)


def test_shuffled_batches_are_identical_at_any_world_size():
    def global_batches(world: int, micro: int) -> list[list[int]]:
        samplers = all_ranks(50, plan(12, micro, world), seed=7)
        out = []
        for _ in range(10):  # crosses an epoch boundary (5 steps per epoch, the last partial)
            steps = [s.next_step() for s in samplers]
            out.append(sorted(i for rank in steps for micro_ in rank for i in micro_))
        return out

    one = global_batches(1, 12)
    assert one == global_batches(2, 3) == global_batches(3, 2) == global_batches(4, 1)
    assert sorted(i for b in one[:5] for i in b) == list(range(50))  # each epoch is a permutation
    assert one[:5] != one[5:]  # a new permutation per epoch
    assert one[0] != sorted(one[0]) or one[1] != list(range(12, 24))  # actually shuffled


def test_partial_last_batch_is_spread_evenly_and_ranks_may_get_empty_micro_batches():
    p = plan(12, 2, 2)  # accumulation 3
    samplers = all_ranks(64, p, shuffle=False)
    for _ in range(5):
        [s.next_step() for s in samplers]
    last = [s.next_step() for s in samplers]  # items 60..63
    assert last == [[[60], [61], []], [[62], [63], []]]
    assert len(samplers[0]) == 6


def test_drop_last_skips_the_partial_batch_and_starts_the_next_epoch():
    s = GlobalBatchSampler(30, plan(8, 4, 1), shuffle=False, drop_last=True)
    assert len(s) == 3
    batches = [sum(s.next_step(), []) for _ in range(4)]
    assert batches[3] == list(range(8))
    assert s.epoch == 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 500), parts=st.integers(1, 40))
def test_split_evenly_sums_and_differs_by_at_most_one(n, parts):
    sizes = split_evenly(n, parts)
    assert sum(sizes) == n and len(sizes) == parts and max(sizes) - min(sizes) <= 1


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 200),
    micro=st.integers(1, 4),
    k=st.integers(1, 4),
    world=st.integers(1, 4),
    steps=st.integers(1, 30),
)
def test_every_step_splits_exactly_one_global_batch(n, micro, k, world, steps):
    p = BatchPlan.solve(micro_batch_size=micro, gradient_accumulation_steps=k, world_size=world)
    samplers = all_ranks(n, p, seed=3)
    reference = GlobalBatchSampler(n, BatchPlan.solve(p.global_batch_size, world_size=1), seed=3)
    for _ in range(steps):
        got = [s.next_step() for s in samplers]
        assert all(len(rank) == k for rank in got)
        assert [i for rank in got for m in rank for i in m] == sum(reference.next_step(), [])
        sizes = [len(m) for rank in got for m in rank]
        assert max(sizes) <= micro


def test_resume_at_another_world_size_continues_with_the_next_global_batch():
    p2 = plan(24, 4, 2)
    uninterrupted = GlobalBatchSampler(100, p2.with_world_size(1), seed=1)
    expected = [sum(uninterrupted.next_step(), []) for _ in range(7)]

    first = all_ranks(100, p2, seed=1)
    for _ in range(3):
        [s.next_step() for s in first]
    state = first[0].state_dict()
    assert state["consumed_samples"] == 72

    p3 = p2.with_world_size(3)
    resumed = all_ranks(100, p3, seed=1)
    for s in resumed:
        s.load_state_dict(state)
    for t in range(3, 7):
        got = [s.next_step() for s in resumed]
        assert [i for rank in got for m in rank for i in m] == expected[t]


def test_resume_refuses_a_different_global_batch_or_dataset():
    s = GlobalBatchSampler(100, plan(24, 4, 2), seed=1)
    state = s.state_dict()
    with pytest.raises(UserError, match="global_batch_size"):
        GlobalBatchSampler(100, plan(16, 4, 2), seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="dataset_len"):
        GlobalBatchSampler(99, plan(24, 4, 2), seed=1).load_state_dict(state)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="rank 2"):
        GlobalBatchSampler(10, plan(4, 1, 2), rank=2)
    with pytest.raises(UserError, match="empty"):
        GlobalBatchSampler(0, plan(4, 1, 2))
    with pytest.raises(UserError, match="not one full global batch"):
        GlobalBatchSampler(3, plan(4, 1, 2), drop_last=True)
