"""StepLoader: worker processes give exactly the batches (and weights) of num_workers=0."""

from __future__ import annotations

import psutil
import pytest
import torch
import torch.utils.data

from launcher.errors import UserError
from launcher.plan import BatchPlan
from trainers.example import mlp_sum_task, pad_collate, text_sequences
from trainers.loader import StepLoader
from trainers.reference import ReferenceTrainer

PLAN = BatchPlan(12, 2, 3, 2)  # G 12 = micro 2 x K 3 x dp 2


class TensorStream(torch.utils.data.IterableDataset):
    """A stream of the example's variable-length token sequences."""

    def __init__(self, seqs):
        self.seqs = seqs

    def __iter__(self):
        yield from self.seqs


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _steps(loader, n):
    return [[(mb.batch, mb.items) for mb in loader.next_step()] for _ in range(n)]


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_workers_yield_exactly_the_batches_of_num_workers_0(streaming):
    seqs = text_sequences()[:49]  # 49 items, G 12: the 5th global batch holds 1 item (fillers)
    dataset = TensorStream(seqs) if streaming else seqs
    steps = 2 * 5  # two passes over the data
    for rank in (0, 1):
        kw = {"collate": pad_collate, "shuffle": True, "seed": 7}
        with StepLoader(dataset, PLAN, rank, num_workers=0, **kw) as plain:
            expected = _steps(plain, steps)
        before = _children()
        with StepLoader(dataset, PLAN, rank, num_workers=2, prefetch_factor=2, **kw) as loader:
            got = _steps(loader, steps)
            workers = _children() - before
            assert len(workers) == (1 if streaming else 2)
            more = _steps(loader, 2)  # later calls reuse the same worker processes
            assert _children() - before == workers
        assert _same(got, expected)
        assert [n for _, n in expected[4]] == ([1, 0, 0] if rank == 0 else [0, 0, 0])
        assert len(more) == 2
        # close() stopped them
        psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=30)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in workers)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_state_is_the_position_handed_out_and_resumes_with_workers(streaming):
    seqs = text_sequences()[:60]
    dataset = TensorStream(seqs) if streaming else seqs
    with StepLoader(dataset, PLAN, 1, collate=pad_collate, num_workers=0) as plain:
        reference = _steps(plain, 7)
    with StepLoader(dataset, PLAN, 1, collate=pad_collate, num_workers=2, prefetch_factor=3) as loader:
        _steps(loader, 3)
        state = loader.state_dict()  # the workers have read ahead; the state has not
        assert loader.consumed_samples == 36
        # the same loader, restarted at its own position (close() then next_step())
        loader.close()
        assert _same(_steps(loader, 1), reference[3:4])
    # another world size's rank resumes from it (the position is in global batches/items)
    other = BatchPlan(12, 2, 2, 3)
    with StepLoader(dataset, other, 2, collate=pad_collate, num_workers=2) as resumed:
        resumed.load_state_dict(state)
        got = _steps(resumed, 2)
    with StepLoader(dataset, other, 2, collate=pad_collate, num_workers=0) as plain:
        _steps(plain, 3)
        assert _same(got, _steps(plain, 2))


@pytest.mark.timeout(240)
def test_weights_identical_with_and_without_workers():
    task = mlp_sum_task(56)
    finals = []
    for workers in (0, 2):
        trainer = ReferenceTrainer.from_task(task, 16)
        with StepLoader(task.dataset, trainer.plan, 0, num_workers=workers, seed=task.seed) as loader:
            for _ in range(6):
                trainer.step(loader.next_step())
        finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_bad_options_and_datasets():
    with pytest.raises(UserError, match="num_workers must be a whole number >= 0.*-1"):
        StepLoader([1, 2], PLAN, num_workers=-1)
    with pytest.raises(UserError, match="prefetch_factor must be"):
        StepLoader([1, 2], PLAN, num_workers=1, prefetch_factor=0)
    with pytest.raises(UserError, match="neither map-style .* nor a torch.utils.data.IterableDataset"):
        StepLoader((x for x in range(40)), PLAN)
    with pytest.raises(UserError, match="checkpoint written for a stream"):
        StepLoader(list(range(40)), PLAN).load_state_dict({"kind": "stream"})


@pytest.mark.timeout(240)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_recut_and_change_plan_match_a_loader_built_with_the_new_plan(streaming):
    seqs = text_sequences()[:60]
    dataset = TensorStream(seqs) if streaming else seqs
    smaller = BatchPlan(12, 1, 6, 2)  # same G and dp, micro 2 -> 1 (the out-of-memory fallback)
    with StepLoader(dataset, PLAN, 1, collate=pad_collate, num_workers=2) as loader:
        _steps(loader, 2)
        before = loader.state_dict()
        _steps(loader, 1)
        recut = [(mb.batch, mb.items) for mb in loader.recut(smaller)]
        with StepLoader(dataset, smaller, 1, collate=pad_collate) as fresh:
            fresh.load_state_dict(before)
            assert _same(recut, _steps(fresh, 1)[0])
            assert len(recut) == 6
            # a new plan from the next step on (here a new global batch too, map-style)
            new = BatchPlan(8, 2, 2, 2)
            at = loader.state_dict()
            loader.change_plan(new, allow_new_global_batch=True)
            got = _steps(loader, 2)
        with StepLoader(dataset, new, 1, collate=pad_collate) as fresh:
            if streaming:
                fresh.load_state_dict(at)
            else:
                fresh.load_state_dict(at, allow_new_global_batch=True)
            assert _same(got, _steps(fresh, 2))


@pytest.mark.timeout(120)
def test_io_benchmark_runs_and_reports_both_ratios(capsys):
    import json

    from benchmarks.loader_io import main

    assert main(["--rounds", "1", "--steps", "2", "--wait-ms", "0.5"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["median_s"]) == {"hand", "ours", "ours-0"}
    assert result["ours_over_hand"] > 0 and result["speedup_over_num_workers_0"] > 0


# ------------------------------------------------------------------ inside the trainer
@pytest.mark.timeout(240)
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "stream"])
def test_trainer_workers_live_across_train_calls_stop_with_close_and_change_nothing(streaming):
    from trainers.example import stream_task, task

    make = stream_task if streaming else task
    finals = []
    for workers in (0, 2):
        before = _children()
        trainer = ReferenceTrainer.from_task(make(), 24, num_workers=workers, log=False)
        trainer.train(2)
        started = _children() - before
        trainer.train(2)  # the same worker processes serve the second call
        assert _children() - before == started
        assert len(started) == (0 if workers == 0 else 1 if streaming else workers)
        finals.append({k: v.clone() for k, v in trainer.module.state_dict().items()})
        trainer.close()
        assert not (_children() & started)  # stopped with the trainer
        trainer.close()  # idempotent
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_task_fields_reach_the_loader_and_bad_values_are_refused():
    task = mlp_sum_task(56)
    task.num_workers, task.prefetch_factor = 1, 3
    with ReferenceTrainer.from_task(task, 16, log=False) as trainer:
        assert (trainer.data.num_workers, trainer.data.prefetch_factor) == (1, 3)
        assert trainer.data.pin_memory is False  # CPU: nothing to pin for
    with pytest.raises(UserError, match="num_workers must be a whole number >= 0.*-2"):
        ReferenceTrainer.from_task(task, 16, num_workers=-2, log=False)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_negative_num_workers_on_the_command_line_exits_2():
    import subprocess
    import sys

    from tests.conftest import REPO

    r = subprocess.run(
        [sys.executable, "examples/train.py", "--steps", "1", "--num-workers", "-1"],
        cwd=REPO, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert r.returncode == 2 and "--num-workers: must be a whole number >= 0" in r.stderr
    assert "Traceback" not in r.stderr
