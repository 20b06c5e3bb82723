"""The accumulation step in one process: loss contract, graphs freed, fillers, resume.

The multi-process checks (real DDP over gloo) are in test_trainers_ddp.py and
test_verify.py; here a world of one process (in-memory store) keeps them fast.
"""

from __future__ import annotations

import warnings
import weakref

import pytest
import torch
import torch.distributed as dist

from launcher import BatchPlan
from trainers import DDPTrainer, ReferenceTrainer
from trainers.accumulate import (
    AccumulationHooks,
    MicroBatch,
    StepMetrics,
    accumulation_step,
    gradient_scaler,
    split_loss,
)
from trainers.base import LossNormalisationWarning
from trainers.example import make_task, mlp_task, pad_collate
from trainers.verify import compare_states


@pytest.fixture
def world_of_one():
    """A real gloo process group of one process, without ports or launcher variables."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def train_pair(task_factory, steps: int, plan: BatchPlan, **kwargs):
    ref = ReferenceTrainer.from_task(task_factory(), plan, **kwargs)
    ref.train(steps)
    ddp = DDPTrainer.from_task(task_factory(), plan, log=False, count_collectives=True, **kwargs)
    history = list(ddp.iter_steps(steps))
    return ref, ddp, history


@pytest.mark.parametrize("with_count", [True, False], ids=["count", "no-count"])
def test_sum_count_loss_matches_reference_with_padded_variable_lengths(world_of_one, with_count):
    plan = BatchPlan.solve(12, 2, world_size=1)  # accumulation 6, micro-batches of different token counts
    ref, ddp, history = train_pair(lambda: make_task("sum", with_count=with_count), 3, plan)
    cmp = compare_states(ref.module.state_dict(), ddp.module.state_dict())
    assert cmp["max_rel_diff"] <= 1e-5, cmp
    assert all(m.loss_mode == "sum" and m.allreduce_rounds == 1 and m.items == 12 for m in history)


def test_scalar_mean_loss_differs_and_warns_once(world_of_one):
    plan = BatchPlan.solve(12, 2, world_size=1)
    with pytest.warns(LossNormalisationWarning) as caught:
        ref, ddp, _ = train_pair(lambda: make_task("mean", with_count=True), 3, plan)
    assert len([w for w in caught if issubclass(w.category, LossNormalisationWarning)]) == 1
    assert "(loss_sum, count)" in str(caught[0].message)
    assert compare_states(ref.module.state_dict(), ddp.module.state_dict())["max_rel_diff"] > 1e-3


def test_one_micro_batch_per_step_never_warns_even_when_the_last_batch_is_partial(world_of_one):
    """The reference (one micro-batch, one rank) takes the mean over the whole global batch, a
    partial last one included: exact, so no LossNormalisationWarning. Accumulating over 4
    micro-batches, the same partial batch does warn (3 empty micro-steps)."""
    plan = BatchPlan.solve(16, 4, world_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = list(ReferenceTrainer.from_task(mlp_task(n=100), plan, shuffle=False).iter_steps(7))
    assert [m.items for m in history] == [16] * 6 + [4]
    assert not any(m.unequal_micro_batches for m in history)
    assert not [w for w in caught if issubclass(w.category, LossNormalisationWarning)]
    with pytest.warns(LossNormalisationWarning):
        list(DDPTrainer.from_task(mlp_task(n=100), plan, log=False, shuffle=False).iter_steps(7))


@pytest.mark.parametrize("with_count", [True, False], ids=["Task.count", "loss-count"])
def test_a_step_whose_global_count_is_zero_is_an_error_naming_it(world_of_one, with_count):
    from trainers.accumulate import ZeroCountError

    task = make_task("sum", with_count=with_count)
    inner = task.loss
    task.loss = lambda model, batch: (inner(model, batch)[0], 0)
    if with_count:
        task.count = lambda batch: 0
    plan = BatchPlan.solve(12, 2, world_size=1)
    for trainer in (ReferenceTrainer.from_task(task, plan), DDPTrainer.from_task(task, plan, log=False)):
        before = {k: v.clone() for k, v in trainer.module.state_dict().items()}
        with pytest.raises(ZeroCountError, match=r"^step 1: the optimizer step's global count is 0 "):
            trainer.train(1)
        assert compare_states(before, trainer.module.state_dict())["max_abs_diff"] == 0.0


def test_reported_loss_is_the_global_mean_not_divided_by_k(world_of_one):
    plan = BatchPlan.solve(16, 4, world_size=1)  # accumulation 4, equal micro-batches: mean loss exact
    ref, ddp, history = train_pair(mlp_task, 3, plan, track_grad_norm=True)
    ref_history = ReferenceTrainer.from_task(mlp_task(), plan, track_grad_norm=True).iter_steps(3)
    for a, b in zip(ref_history, history, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
        assert b.loss > 0.05  # the MLP's MSE starts near 0.5; a loss divided by K=4 would be ~4x smaller
    assert compare_states(ref.module.state_dict(), ddp.module.state_dict())["max_rel_diff"] <= 1e-6


def _ce(logits, batch):
    y = batch[1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return loss, (y != -100).sum()


def _graph_probe(backward=None):
    """Run 4 micro-steps; return, per micro-step, how many earlier activations were alive."""
    task = make_task("sum")
    torch.manual_seed(0)
    model = task.model()
    saved, alive_at_forward = [], []

    def pack(t):
        if not t.is_leaf:  # activations saved for backward (parameters are leaves)
            saved.append(weakref.ref(t))
        return t

    def loss(m, batch):
        alive_at_forward.append(sum(ref() is not None for ref in saved))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return _ce(m(batch[0]), batch)

    micro = [MicroBatch(pad_collate(task.dataset[i : i + 2]), 2) for i in range(0, 8, 2)]
    params = list(model.parameters())
    hooks = AccumulationHooks(step=lambda: None, scale_gradients=gradient_scaler(params))
    if backward is not None:
        hooks.backward = backward
    metrics = accumulation_step(model, micro, loss, hooks)
    return alive_at_forward, metrics


def test_each_micro_step_frees_its_graph_and_runs_one_forward():
    """No K live graphs and no second forward: activation memory stays flat in K."""
    alive, metrics = _graph_probe()
    assert alive == [0, 0, 0, 0]  # one forward per micro-step, nothing left of the earlier ones
    assert metrics.items == 8
    # the probe itself works: keeping the losses (as stacking K outputs does) keeps the graphs
    kept = []
    alive, _ = _graph_probe(backward=kept.append)
    assert alive[0] == 0 and alive[1] > 0 and alive[3] == 3 * alive[1]


def test_a_filler_micro_batch_contributes_nothing():
    task = make_task("sum")
    data = [pad_collate(task.dataset[i : i + 3]) for i in (0, 3)]

    def grads(micro):
        torch.manual_seed(0)
        model = task.model()
        params = list(model.parameters())
        hooks = AccumulationHooks(step=lambda: None, scale_gradients=gradient_scaler(params))
        accumulation_step(model, micro, task.loss, hooks)
        return [p.grad.clone() for p in params]

    plain = grads([MicroBatch(data[0], 3)])
    with_filler = grads([MicroBatch(data[0], 3), MicroBatch(data[1], 0)])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(plain, with_filler, strict=True))


def test_task_count_must_agree_with_the_loss():
    task = make_task("sum")
    micro = [MicroBatch(pad_collate(task.dataset[:2]), 2)]
    torch.manual_seed(0)
    model = task.model()
    hooks = AccumulationHooks(step=lambda: None, scale_gradients=gradient_scaler(model.parameters()))
    with pytest.raises(ValueError, match="must agree"):
        accumulation_step(model, micro, task.loss, hooks, count_fn=lambda b: 1)


def test_loss_return_values_are_checked():
    assert split_loss(torch.tensor(1.0))[2] == "mean"
    assert split_loss((torch.tensor(2.0), 3))[2] == "sum"
    with pytest.raises(TypeError, match="scalar tensor"):
        split_loss(torch.ones(3))
    with pytest.raises(TypeError, match="loss_sum, count"):
        split_loss((torch.tensor(1.0), 2, 3))


def test_state_dict_resume_gives_the_same_run():
    plan = BatchPlan.solve(8, 4, world_size=1)
    straight = ReferenceTrainer.from_task(make_task("sum"), plan)
    straight.train(4)
    first = ReferenceTrainer.from_task(make_task("sum"), plan)
    first.train(2)
    state = first.state_dict()
    assert not any(k.startswith("module.") for k in state["model"])
    resumed = ReferenceTrainer.from_task(make_task("sum", seed=0), plan)
    resumed.load_state_dict(state)
    resumed.train(2)
    assert resumed.global_step == 4
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, resumed.module.state_dict()[name]), name


@pytest.mark.parametrize("mode", ["mean", "sum-count", "sum"])
def test_background_metrics_all_reduce_waits_only_when_read(mode):
    """With an asynchronous all-reduce the metrics sum is started at the end of the step and
    waited for on the first read of loss/items/count; the values equal the synchronous ones.
    A (sum, count) loss without Task.count needs the totals to scale the gradients: no deferral."""
    task = make_task("mean" if mode == "mean" else "sum", with_count=mode == "sum-count")
    micro = [MicroBatch(pad_collate(task.dataset[i : i + 2]), 2) for i in range(0, 8, 2)]

    def run(asynchronous: bool):
        torch.manual_seed(0)
        model = task.model()
        params = list(model.parameters())
        events = []

        def start(tensor):
            events.append("start")

            def finish():
                events.append("wait")
                return tensor * 2  # as if a second rank held the same

            return finish

        hooks = AccumulationHooks(
            step=lambda: events.append("optimizer step") or 0.25,
            scale_gradients=gradient_scaler(params),
            all_reduce_sum=lambda t: (events.append("sync"), t * 2)[1],
            all_reduce_sum_async=start if asynchronous else None,
        )
        metrics = accumulation_step(model, micro, task.loss, hooks, dp_size=2, count_fn=task.count)
        return metrics, events

    eager, eager_events = run(False)
    lazy, events = run(True)
    if mode == "sum":
        assert events == eager_events and "start" not in events
        return
    assert events[-2:] == ["start", "optimizer step"]  # started before the step, not waited for
    assert lazy.grad_norm == eager.grad_norm and lazy.step == 0  # the other fields are there
    assert lazy.loss == eager.loss and events[-1] == "wait"  # the first read waits, once
    assert (lazy.items, lazy.count) == (eager.items, eager.count) == (16, eager.count)
    assert events.count("wait") == 1
    assert lazy.to_dict() == eager.to_dict() and lazy == eager


def test_pending_metrics_pickle_and_compare_after_resolving():
    import pickle

    reads = []
    metrics = StepMetrics.pending(lambda: reads.append(1) or (1.5, 8, 20.0, 0.5), loss_mode="sum", micro_steps=2)
    clone = pickle.loads(pickle.dumps(metrics))  # pickling reads the sums first
    assert reads == [1] and (clone.loss, clone.items, clone.count, clone.grad_norm) == (1.5, 8, 20.0, 0.5)
    assert metrics.items == 8 and reads == [1]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        metrics.nope  # noqa: B018


def test_ddp_trainer_counts_rounds_only_when_asked(world_of_one):
    plan = BatchPlan.solve(8, 2, world_size=1)
    plain = DDPTrainer.from_task(mlp_task(), plan, log=False)
    assert plain.rounds is None and plain.model.logger is not None
    assert all(m.allreduce_rounds is None for m in plain.iter_steps(2))
    counted = DDPTrainer.from_task(mlp_task(), plan, log=False, count_collectives=True)
    assert [m.allreduce_rounds for m in counted.iter_steps(2)] == [1, 1]
    assert compare_states(plain.module.state_dict(), counted.module.state_dict())["max_abs_diff"] == 0


def test_gradient_norm_is_measured_when_clipping_or_asked(world_of_one):
    """No clipping: no pass over the gradients unless track_grad_norm (grad_norm None).
    Clipping measures it anyway; asking for it gives the same number the clipping would."""
    plan = BatchPlan.solve(8, 2, world_size=1)
    assert all(m.grad_norm is None for m in DDPTrainer.from_task(mlp_task(), plan, log=False).iter_steps(2))
    asked = list(DDPTrainer.from_task(mlp_task(), plan, log=False, track_grad_norm=True).iter_steps(2))
    clipping = mlp_task()
    clipping.clip_grad_norm = 1e6  # never binds: the same updates, the norm measured by the clip
    clipped = DDPTrainer.from_task(clipping, plan, log=False).iter_steps(2)
    assert all(m.grad_norm > 0 for m in asked)
    assert [m.grad_norm for m in clipped] == pytest.approx([m.grad_norm for m in asked], rel=1e-6)
