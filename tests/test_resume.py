"""Trainer checkpoints in one process: bit-for-bit resume, new global batch, damaged files,
stop requests, plans for another world size, and the CLI checks of verify's resume flags.

The multi-process runs (SIGKILL, elastic resume, torchrun restarts) are in
tests/test_resume_processes.py.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from functools import partial

import pytest
import torch

from launcher import BatchPlan, PlanError, UserError
from tests.conftest import REPO, run_cli
from trainers import GlobalBatchSampler, ReferenceTrainer
from trainers.checkpoint import CheckpointError, list_checkpoints
from trainers.example import mlp_sum_task, mlp_task, warmup
from trainers.resume import check_checkpoint_args, install_stop_handlers, plan_for_resume, rescale_learning_rate


def adam_task():
    # the MLP with what a checkpoint must carry beyond the weights: AdamW moments and step
    # counts, a LambdaLR warm-up; gradients clipped; a (sum, count) loss; 40 items
    task = mlp_sum_task(40)
    task.optimizer = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)
    task.scheduler = warmup
    task.clip_grad_norm = 1.0
    return task


def states_equal(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            if not (isinstance(y, dict) and states_equal(x, y)):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


# ------------------------------------------------------------------ bit for bit
def test_resume_continues_bit_for_bit(tmp_path):
    """6 steps straight == 4 steps, save, a new trainer resumes, 2 steps (model, Adam, LR schedule)."""
    straight = ReferenceTrainer.from_task(adam_task(), 8)
    straight.train(6)

    first = ReferenceTrainer.from_task(adam_task(), 8)
    first.checkpoint_dir, first.checkpoint_every = tmp_path, 2
    first.train(4)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    torch.manual_seed(1234)  # whatever the new process's RNG did, the checkpoint's comes back
    second = ReferenceTrainer.from_task(adam_task(), 8)
    assert second.resume(tmp_path).name == "step_00000004"
    assert second.global_step == 4 and second.sampler.step_in_epoch == 4
    second.train(2)

    assert states_equal(straight.module.state_dict(), second.module.state_dict())
    assert states_equal(straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"])
    assert straight.scheduler.get_last_lr() == second.scheduler.get_last_lr()


def test_resume_auto_without_a_checkpoint_starts_at_step_zero(tmp_path, capsys):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.checkpoint_dir = tmp_path / "none-yet"
    assert trainer.resume("auto") is None and trainer.global_step == 0
    assert "no checkpoint under" in capsys.readouterr().err


def test_rng_states_come_back(tmp_path):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.train(1)
    trainer.save(tmp_path)
    expected = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    ReferenceTrainer.from_task(mlp_task(), 12).resume(tmp_path)
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]


# ------------------------------------------------------------- new global batch
@pytest.mark.parametrize(("rule", "factor"), [("linear", 0.5), ("sqrt", 0.5**0.5), ("none", 1.0)])
def test_new_global_batch_rescales_lr_and_continues_at_the_next_item(tmp_path, capsys, rule, factor):
    old = ReferenceTrainer.from_task(adam_task(), 8)
    old.train(3)  # 24 of 40 items
    old.save(tmp_path)
    lr_before = old.optimizer.param_groups[0]["lr"]
    base_before = old.scheduler.base_lrs[0]

    new = ReferenceTrainer.from_task(adam_task(), 4)
    new.resume(tmp_path, lr_scaling=rule)
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(lr_before * factor)
    assert new.scheduler.base_lrs[0] == pytest.approx(base_before * factor)
    log = capsys.readouterr().err
    assert f"global batch 8 -> 4: learning rate {lr_before:.6g} -> {lr_before * factor:.6g}" in log
    assert f"{rule} scaling" in log
    # the data continues with item 24 of the epoch's order, now 4 at a time
    order = new.sampler.order(0)
    new.train(1)
    assert new.sampler.last_global_batch == order[24:28]
    assert new.global_step == 4 and new.sampler.consumed_samples == 28


def test_sampler_stream_is_unbroken_across_a_global_batch_change():
    """Cut anywhere in an epoch, the new global batch size continues with the next item."""
    for drop_last in (False, True):
        for steps_before in range(4):  # 50 items, global 12: 4 full steps (+ 2 items)
            a = GlobalBatchSampler(50, BatchPlan.solve(12, world_size=1), seed=5, drop_last=drop_last)
            seen = [i for _ in range(steps_before) for i in a.next_step()[0]]
            b = GlobalBatchSampler(50, BatchPlan.solve(8, world_size=1), seed=5, drop_last=drop_last)
            b.load_state_dict(a.state_dict(), allow_new_global_batch=True)
            seen += [i for micro in b for i in micro[0]]
            left = 50 - 12 * steps_before
            assert seen == a.order(0)[: 50 if not drop_last else 50 - left % 8], (drop_last, steps_before)
            assert b.consumed_samples == len(seen) and b.epoch == 0
    finished = GlobalBatchSampler(50, BatchPlan.solve(12, world_size=1), seed=5)
    for _ in range(5):
        finished.next_step()
    b = GlobalBatchSampler(50, BatchPlan.solve(8, world_size=1), seed=5)
    b.load_state_dict(finished.state_dict(), allow_new_global_batch=True)
    b.next_step()
    assert (b.epoch, b.last_global_batch) == (1, b.order(1)[:8])


def test_rescale_learning_rate_with_a_tuned_rule():
    from launcher.lr import LRRule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    message = rescale_learning_rate(opt, None, 32, 128, LRRule("linear", base_lr=0.1, base_batch_size=32))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4) and "× 4" in message


# ----------------------------------------------------------------- damaged files
def test_damaged_newest_checkpoint_falls_back_and_an_explicit_one_is_named(tmp_path, capsys):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.checkpoint_dir, trainer.checkpoint_every = tmp_path, 1
    trainer.train(3)
    damaged = tmp_path / "step_00000003" / "trainer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    fresh = ReferenceTrainer.from_task(mlp_task(), 12)
    fresh.checkpoint_dir = tmp_path
    assert fresh.resume("auto").name == "step_00000002"
    assert fresh.global_step == 2
    log = capsys.readouterr().err
    assert "gradaccum: warning: skipping checkpoint step_00000003: " in log and "trainer.pt is truncated" in log
    with pytest.raises(CheckpointError, match=r"step_00000003/trainer.pt is truncated"):
        ReferenceTrainer.from_task(mlp_task(), 12).resume(tmp_path / "step_00000003")


@pytest.mark.timeout(60)
def test_train_script_names_the_damaged_file_and_exits_2(tmp_path):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    path = trainer.save(tmp_path)
    (path / "rng_rank00000.pt").write_bytes(b"not a tensor file")
    env = {k: v for k, v in os.environ.items() if k != "GRADACCUM_PLAN"}
    argv = [sys.executable, "examples/train.py", "--task=trainers.example:mlp_task", "--global-batch-size=12"]
    r = subprocess.run([*argv, f"--resume={path}"], capture_output=True, text=True, timeout=50, cwd=REPO, env=env)
    assert r.returncode == 2, r.stderr
    assert "rng_rank00000.pt is truncated or altered" in r.stderr and "Traceback" not in r.stderr


def _train_script(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRADACCUM_PLAN"}
    argv = [sys.executable, "examples/train.py", "--task=trainers.example:mlp_task", "--global-batch-size=12", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.timeout(200)
def test_resume_auto_when_every_checkpoint_is_damaged_is_an_error_unless_asked_to_start_over(tmp_path):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.checkpoint_dir, trainer.checkpoint_every = tmp_path, 1
    trainer.train(2)
    (tmp_path / "step_00000001" / "trainer.pt").write_bytes(b"garbage")
    (tmp_path / "step_00000002" / "manifest.json").unlink()
    flags = (f"--checkpoint-dir={tmp_path}", "--resume=auto", "--steps=3", f"--output={tmp_path / 'final.pt'}")

    r = _train_script(*flags)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "holds 2 checkpoint(s) and none can be loaded" in errors[0]
    assert "step_00000002: " in errors[0] and "manifest.json is missing" in errors[0]  # each one, and why
    assert "step_00000001: " in errors[0] and "trainer.pt is truncated or altered" in errors[0]
    assert "--start-over-if-corrupt" in errors[0]
    assert not (tmp_path / "final.pt").exists() and not (tmp_path / "step_00000003").exists()

    r = _train_script(*flags, "--start-over-if-corrupt")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("gradaccum: warning: skipping checkpoint") == 2
    assert "none is left: starting over at step 0" in r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("step ")] == ["1", "2", "3"]
    assert (tmp_path / "final.pt").exists()


def test_checkpoint_flags_are_checked():
    import argparse

    from trainers.resume import add_checkpoint_args

    p = argparse.ArgumentParser()
    add_checkpoint_args(p)
    for argv, message in [
        (["--resume", "auto"], "--resume auto needs --checkpoint-dir"),
        (["--checkpoint-every", "2"], "--checkpoint-every needs --checkpoint-dir"),
        (["--checkpoint-dir", "d", "--keep-last", "0"], "--keep-last must be at least 1"),
        (["--checkpoint-dir", "d", "--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
        (["--checkpoint-dir", "d", "--start-over-if-corrupt"], "--start-over-if-corrupt goes with --resume auto"),
    ]:
        with pytest.raises(UserError, match=message):
            check_checkpoint_args(p.parse_args(argv))
    kwargs = check_checkpoint_args(p.parse_args(["--checkpoint-dir", "d", "--checkpoint-every", "5"]))
    assert kwargs == {"checkpoint_dir": "d", "checkpoint_every": 5, "keep_last": None}


# ------------------------------------------------------------------ stop requests
def test_signal_stops_after_the_current_step_with_a_checkpoint(tmp_path, capsys):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.checkpoint_dir = tmp_path
    loss, sent = trainer.loss, []

    def loss_that_signals_in_step_2(model, batch):
        if trainer.global_step == 1 and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm would, in the middle of a step
        return loss(model, batch)

    trainer.loss = loss_that_signals_in_step_2
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        install_stop_handlers(trainer)
        history = list(trainer.iter_steps(10))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert len(history) == 2 and trainer.stopped and trainer.global_step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert "stop requested: stopping after step 2 (checkpoint step 2 written)" in capsys.readouterr().err
    again = ReferenceTrainer.from_task(mlp_task(), 12)
    again.resume(tmp_path)
    assert again.global_step == 2 and not again.stopped


# ---------------------------------------------------------------- plans to resume with
def test_plan_for_resume_keeps_the_global_batch_or_names_the_world_sizes():
    saved = BatchPlan.solve(24, 4, world_size=2)  # 24 = 4 × 3 × 2
    one = plan_for_resume(saved, 1)
    assert (one.micro_batch_size, one.gradient_accumulation_steps, one.world_size) == (4, 6, 1)
    three = plan_for_resume(saved, 3, 24, 4)  # the original flags repeated: re-solved, not refused
    assert (three.micro_batch_size, three.gradient_accumulation_steps) == (4, 2)
    four = plan_for_resume(saved, 4)  # 6 per rank: the micro-batch shrinks to one that divides
    assert (four.micro_batch_size, four.gradient_accumulation_steps) == (3, 2)
    with pytest.raises(PlanError, match=r"world sizes that keep it: 1, 2, 3, 4, 6, 8, 12, 24"):
        plan_for_resume(saved, 5)
    new = plan_for_resume(saved, 2, global_batch_size=48)  # micro never above the saved one
    assert (new.global_batch_size, new.micro_batch_size, new.gradient_accumulation_steps) == (48, 4, 6)
    assert plan_for_resume(saved, 2, micro_batch_size=2).gradient_accumulation_steps == 6


def test_verify_resume_flags_are_checked_before_anything_runs(tmp_path):
    out = str(tmp_path / "v")
    r = run_cli("verify", "--resume-nproc-per-node", "1", "--output-dir", out)
    assert r.returncode == 2 and "--resume-nproc-per-node needs --interrupt-at-step" in r.stderr
    r = run_cli("verify", "--steps", "3", "--interrupt-at-step", "3", "--output-dir", out)
    assert r.returncode == 2 and "between 1 and 2" in r.stderr
    r = run_cli("verify", "--global-batch-size=12", "--interrupt-at-step=1", "--resume-nproc-per-node=5")
    assert r.returncode == 2 and "world sizes that keep it: 1, 2, 3, 4, 6, 12" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "v").exists()


def test_inspect_shows_a_trainer_checkpoint(tmp_path):
    trainer = ReferenceTrainer.from_task(mlp_task(), 12)
    trainer.train(2)
    trainer.save(tmp_path)
    r = run_cli("checkpoint", "inspect", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["step"] == 2 and info["complete"] and info["world_size"] == 1
    assert info["backend"] == "ReferenceTrainer" and info["samples_consumed"] == 24
    assert info["plan"]["global_batch_size"] == 12
