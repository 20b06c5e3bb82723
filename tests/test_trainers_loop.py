"""The per-step loop: iter_steps yields each step's metrics as the step ends, train returns the last.

Every trainer runs the same Trainer core; these tests record the order in which the loss
is called and the metrics arrive, so a loop that ran all steps before yielding fails.
"""

import pytest
import torch
import torch.distributed as dist

from launcher import BatchPlan
from trainers import DDPTrainer, ReferenceTrainer
from trainers.components import Component
from trainers.example import make_task, mlp_sum_task, mlp_task
from trainers.registry import trainer_class


@pytest.fixture
def world_of_one():
    """A real gloo process group of one process, without ports or launcher variables."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def recording(task, events: list):
    """The task with a loss that appends ("loss", items) to `events` on every call."""
    inner = task.loss

    def loss(model, batch):
        events.append(("loss", int(batch[0].shape[0])))
        return inner(model, batch)

    task.loss = loss
    return task


def assert_streams(trainer, events: list, steps: int) -> list:
    """Drive iter_steps; every step's metrics must arrive before the next step's first loss."""
    seen = []
    for metrics in trainer.iter_steps(steps):
        events.append(("metrics", metrics.step))
        seen.append(metrics)
    marks = [i for i, e in enumerate(events) if e[0] == "metrics"]
    assert [events[i][1] for i in marks] == list(range(1, steps + 1))
    # the first metrics came after step 1's losses and before any loss of step 2
    assert marks[0] > 0 and all(e[0] == "loss" for e in events[: marks[0]])
    assert any(e[0] == "loss" for e in events[marks[0] + 1 : marks[1]])
    return seen


def test_reference_streams_metrics_step_by_step():
    events: list = []
    trainer = ReferenceTrainer.from_task(recording(mlp_task(), events), 8)
    seen = assert_streams(trainer, events, 3)
    assert [e for e in events if e[0] == "loss"][:1] == [("loss", 8)]  # one micro-batch of the global batch
    assert [m.step for m in seen] == [1, 2, 3] and trainer.global_step == 3


def test_ddp_streams_metrics_step_by_step(world_of_one):
    events: list = []
    plan = BatchPlan.solve(8, 2, world_size=1)  # accumulation 4: four losses per step
    trainer = DDPTrainer.from_task(recording(mlp_task(), events), plan, log=False, count_collectives=True)
    seen = assert_streams(trainer, events, 2)
    first = events.index(("metrics", 1))
    assert events[:first] == [("loss", 2)] * 4
    assert [m.allreduce_rounds for m in seen] == [1, 1]


def test_train_returns_the_last_metrics_and_calls_back_each_step():
    trainer = ReferenceTrainer.from_task(mlp_task(), 8)
    assert trainer.train(0) is None
    called = []
    last = trainer.train(3, callback=lambda m: called.append(m.step))
    assert called == [1, 2, 3] and last.step == 3
    assert trainer.fit(1).step == 4


def test_the_same_weights_step_by_step_and_all_at_once():
    straight = ReferenceTrainer.from_task(mlp_task(), 8)
    straight.train(4)
    stepped = ReferenceTrainer.from_task(mlp_task(), 8)
    for _ in stepped.iter_steps(4):
        pass
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, stepped.module.state_dict()[name]), name


def test_oom_fallback_streams_and_retries_inside_the_step():
    events: list = []
    task = make_task("sum", with_count=True)
    inner = task.loss

    def loss(model, batch):
        if batch[0].shape[0] > 4:
            raise torch.OutOfMemoryError(f"simulated: micro-batch of {batch[0].shape[0]} > 4")
        return inner(model, batch)

    task.loss = loss
    trainer = ReferenceTrainer.from_task(recording(task, events), 16, shuffle=False)
    trainer.enable_oom_fallback()
    seen = assert_streams(trainer, events, 2)
    assert trainer.oom_events == [(1, 16, 8), (1, 8, 4)]
    first = events.index(("metrics", 1))
    assert events[:first] == [("loss", 16), ("loss", 8), ("loss", 4), ("loss", 4), ("loss", 4), ("loss", 4)]
    assert [m.items for m in seen] == [16, 16]


def test_batch_ramp_streams_each_stage():
    events: list = []
    trainer = ReferenceTrainer.from_task(recording(mlp_sum_task(256), events), BatchPlan.solve(32, world_size=1))
    trainer.set_batch_ramp("8,16@16,32@48")
    seen = assert_streams(trainer, events, 5)
    assert [m.items for m in seen] == [8, 8, 16, 16, 32]
    assert [e[1] for e in events if e[0] == "loss"] == [8, 8, 16, 16, 32]


class Recorder(Component):
    def __init__(self, events: list) -> None:
        self.events = events

    def on_train_start(self, trainer, steps):
        self.events.append(("start", steps))

    def on_step_end(self, trainer, metrics, step_time_s):
        assert step_time_s > 0
        self.events.append(("step", metrics.step))

    def on_train_end(self, trainer):
        self.events.append(("end", trainer.global_step))


def test_components_observe_the_loop_in_order():
    events: list = []
    trainer = ReferenceTrainer.from_task(mlp_task(), 8, components=[Recorder(events)])
    for metrics in trainer.iter_steps(2):
        events.append(("yield", metrics.step))
    assert events == [("start", 2), ("step", 1), ("yield", 1), ("step", 2), ("yield", 2), ("end", 2)]


def test_reference_takes_the_checkpoint_options(tmp_path):
    trainer = ReferenceTrainer.from_task(mlp_task(), 8, checkpoint_dir=tmp_path, checkpoint_every=2, keep_last=1)
    trainer.train(4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_")] == ["step_00000004"]
    again = ReferenceTrainer.from_task(mlp_task(), 8, checkpoint_dir=tmp_path)
    assert again.resume("auto").name == "step_00000004" and again.global_step == 4


def test_registry_imports_the_trainer_classes():
    assert trainer_class("ddp") is DDPTrainer
    assert trainer_class("deepspeed").__name__ == "DeepSpeedTrainer"


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_deepspeed_streams_metrics_step_by_step(world_of_one, monkeypatch):
    from trainers.deepspeed_trainer import DeepSpeedTrainer

    monkeypatch.setenv("LOCAL_RANK", "0")  # what a launcher sets; DeepSpeed asserts it

    events: list = []
    plan = BatchPlan.solve(8, 2, world_size=1)
    trainer = DeepSpeedTrainer.from_task(recording(mlp_task(), events), plan, log=False, zero_stage=0)
    try:
        assert_streams(trainer, events, 2)
        assert events[: events.index(("metrics", 1))] == [("loss", 2)] * 4
        assert trainer.train(0) is None and trainer.train(1).step == 3
    finally:
        trainer.close()
