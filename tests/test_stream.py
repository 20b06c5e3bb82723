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


# ------------------------------------------------------------------ through the trainers
def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


def test_a_stream_trains_as_the_same_items_unshuffled_and_resumes_from_a_checkpoint(tmp_path):
    """Step t of a stream is items [t*G, (t+1)*G): the map-style run without shuffling; a
    checkpoint records the stream position and a resume continues there."""
    from trainers.example import stream_task, task
    from trainers.reference import ReferenceTrainer

    straight = ReferenceTrainer.from_task(task(), 24, shuffle=False, log=False)
    straight.train(3)
    with ReferenceTrainer.from_task(stream_task(), 24, shuffle=True, log=False) as first:  # shuffle: no effect
        assert first.sampler is None and first.data.streaming
        first.train(2)
        first.save(tmp_path)
    with ReferenceTrainer.from_task(stream_task(), 24, log=False) as resumed:
        resumed.resume(tmp_path)
        assert resumed.data.consumed_samples == 2 * 24
        resumed.train(1)
        assert resumed.data.state_dict()["items_in_epoch"] == 3 * 24
        ref, got = _weights(straight), _weights(resumed)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def _bad_task_module(tmp_path):
    (tmp_path / "bad_tasks.py").write_text(
        "from trainers.example import SequenceStream, make_task\n"
        "class Bag:\n"
        "    def __iter__(self):\n"
        "        return iter(())\n"
        "def neither():\n"
        "    t = make_task()\n"
        "    t.dataset = Bag()\n"
        "    return t\n"
        "def short_stream():\n"
        "    t = make_task()\n"
        "    t.dataset = SequenceStream(t.dataset[:5])\n"
        "    return t\n"
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("function", "message"),
    [
        (
            "neither",
            "the dataset (Bag) is neither map-style (len() and indexing) nor a torch.utils.data.IterableDataset",
        ),
        ("short_stream", "the stream ended after 5 items, before the first global batch of 24"),
    ],
)
def test_bad_datasets_exit_2_from_the_cli_and_write_nothing(tmp_path, function, message):
    import os

    from tests.conftest import run_cli

    _bad_task_module(tmp_path)
    out = tmp_path / "out"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = run_cli("verify", "--task", f"bad_tasks:{function}", "--output-dir", str(out), env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3])
def test_verify_on_a_stream_equals_the_reference(tmp_path, world):
    import json

    from tests.conftest import run_cli

    r = run_cli(
        "verify", "--task", "trainers.example:stream_task", "--nproc-per-node", str(world), "--steps", "3",
        "--no-shuffle", "--json", "--output-dir", str(tmp_path), timeout=280,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is True and report["world_sizes"] == [world]
    assert report["max_rel_diff"] <= 1e-5 and len(report["steps"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_verify_on_a_stream_interrupted_and_resumed_at_another_world_size(tmp_path):
    import json

    from tests.conftest import run_cli

    r = run_cli(
        "verify", "--task", "trainers.example:stream_task", "--steps", "4", "--interrupt-at-step", "2",
        "--resume-nproc-per-node", "3", "--json", "--output-dir", str(tmp_path), timeout=380,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is True and report["world_sizes"] == [2, 3]
    assert report["interrupted_at_step"] == 2 and len(report["steps"]) == 4
    # metrics.csv: the first run's rows, then the resumed run's, appended
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2", "3", "4"]
