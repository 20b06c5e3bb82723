"""Mixed precision: bf16 autocast, the fp32 gradient accumulator, fp16 loss scaling and skipped steps.

In-process checks use a real gloo group of one process (as test_trainers_accumulate.py);
the 2-process checks run `gradaccum verify --precision bf16` and workers under torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from launcher import BatchPlan, UserError
from tests.conftest import REPO, run_cli
from trainers import DDPTrainer, ReferenceTrainer
from trainers.example import TinyGPT, make_task, mlp_task, pad_collate, text_sequences, token_loss_sum
from trainers.precision import MixedPrecision, accumulation_roundoff, micro_step_gradients, resolve_precision
from trainers.reference import reference_plan

INJECT_STEP = "GRADACCUM_TEST_INF_STEP"


@pytest.fixture
def world_of_one():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ------------------------------------------------------------ tasks the workers load
def overflow_on_rank1_task():
    """MLP task whose loss overflows on rank 1 only, in step $GRADACCUM_TEST_INF_STEP (K=2)."""
    task = mlp_task()
    inner, calls, step = task.loss, [0], int(os.environ.get(INJECT_STEP, "0"))

    def loss(model, batch):
        calls[0] += 1
        out = inner(model, batch)
        if os.environ.get("RANK") == "1" and (calls[0] + 1) // 2 == step:
            return out * float("inf")  # one rank's gradients hold inf; the other rank's are finite
        return out

    task.loss = loss
    return task


# ------------------------------------------------------------------------ bf16 paths
def test_bf16_autocasts_the_forward_and_keeps_fp32_gradients(world_of_one):
    seen = []
    task = make_task("sum")

    def loss(model, batch):
        out = token_loss_sum(model, batch)
        seen.append(model.module.head(torch.zeros(1, 64)).dtype)  # a layer's output inside the forward
        return out

    task.loss = loss
    plan = BatchPlan.solve(8, 2, world_size=1)
    trainer = DDPTrainer.from_task(task, plan, log=False, precision="bf16", count_collectives=True)
    assert trainer.plan.precision == "bf16"  # the plan records what runs
    grads = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: grads.extend(p.grad.dtype for p in trainer.module.parameters())
    )
    metrics = trainer.train(1)
    assert seen and set(seen) == {torch.bfloat16}
    assert set(grads) == {torch.float32}  # fp32 parameters: autograd accumulates fp32 gradients
    assert metrics.allreduce_rounds == 1 and metrics.loss > 3


def test_fp32_accumulator_round_off_stays_flat_while_bf16_sum_grows():
    torch.manual_seed(0)
    model = TinyGPT().to(torch.bfloat16)
    seqs = text_sequences()
    loss = lambda m, b: token_loss_sum(m, b)  # noqa: E731
    rows = {}
    for k in (1, 8, 32):
        batches = [pad_collate(seqs[2 * i : 2 * i + 2]) for i in range(k)]
        rows[k] = accumulation_roundoff(micro_step_gradients(model, batches, loss))
    assert rows[1]["bf16_sum"] == rows[1]["fp32_accumulator"]  # one micro-step: nothing to accumulate
    for k in (8, 32):
        assert rows[k]["fp32_accumulator"] < rows[k]["bf16_sum"], rows
        assert rows[k]["fp32_before_cast"] < 1e-5, rows
    # measured here: bf16 sum 2.8e-3 (K=8), 6.3e-3 (K=32); accumulator 1.6e-3 for both
    assert rows[32]["fp32_accumulator"] < rows[32]["bf16_sum"] / 2, rows
    assert rows[32]["bf16_sum"] > rows[8]["bf16_sum"], rows  # K roundings: grows with K
    assert rows[32]["fp32_accumulator"] < 2 * rows[8]["fp32_accumulator"], rows  # one rounding: flat


def test_trainer_with_bf16_parameters_accumulates_in_fp32(world_of_one):
    """The gradient the optimizer sees is the fp32 sum of the 8 micro-steps, rounded once."""
    plan = BatchPlan.solve(32, 4, world_size=1)  # accumulation 8
    task = mlp_task()
    task.model = lambda: torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(
        torch.bfloat16
    )
    task.dataset = [(x.bfloat16(), y.bfloat16()) for x, y in task.dataset]
    trainer = DDPTrainer.from_task(task, plan, log=False, precision="bf16", count_collectives=True)
    params = list(trainer.module.parameters())
    micro = [trainer.micro_batch(ix) for ix in trainer.sampler.next_step()]
    per_micro = micro_step_gradients(trainer.module, [mb.batch for mb in micro], task.loss)
    exact = [sum(g[j].double() for g in per_micro) for j in range(len(params))]
    fp32_once = [sum(g[j].float() for g in per_micro).bfloat16() for j in range(len(params))]
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: seen.extend(p.grad.clone() for p in params))
    metrics = trainer.step(micro)
    assert [g.dtype for g in seen] == [torch.bfloat16] * len(params)
    assert all(torch.equal(a, b) for a, b in zip(seen, fp32_once, strict=True))
    err = accumulation_roundoff(per_micro)
    assert err["fp32_accumulator"] < err["bf16_sum"]
    got = sum(float((a.double() - e).pow(2).sum()) for a, e in zip(seen, exact, strict=True)) ** 0.5
    assert got / sum(float(e.pow(2).sum()) for e in exact) ** 0.5 == pytest.approx(err["fp32_accumulator"])
    assert metrics.allreduce_rounds == 1  # the accumulator's one fp32 all-reduce


# ------------------------------------------------------------------------ fp16 paths
def test_fp16_unscales_once_before_clipping(world_of_one):
    plan = BatchPlan.solve(16, 4, world_size=1)
    ref = list(ReferenceTrainer.from_task(mlp_task(), plan, track_grad_norm=True).iter_steps(3))
    fp16 = DDPTrainer.from_task(mlp_task(), plan, log=False, precision="fp16", track_grad_norm=True)
    history = list(fp16.iter_steps(3))
    assert fp16.amp.scaler.get_scale() == 65536.0  # no overflow, no growth yet
    for a, b in zip(ref, history, strict=True):
        # a norm measured before unscaling would be 65536 times larger
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-2)
        assert not b.skipped


def test_fp16_overflow_skips_the_update_and_keeps_the_books(world_of_one, capsys):
    task = mlp_task()
    inner, calls = task.loss, [0]
    task.loss = lambda m, b: (
        calls.__setitem__(0, calls[0] + 1),
        inner(m, b) * (float("inf") if 4 < calls[0] <= 8 else 1),
    )[1]
    task.scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    plan = BatchPlan.solve(16, 4, world_size=1)  # accumulation 4: loss calls 5..8 are step 2
    trainer = DDPTrainer.from_task(task, plan, log=False, precision="fp16")
    first = trainer.train(1)
    before = [p.detach().clone() for p in trainer.module.parameters()]
    second = trainer.train(1)
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters(), strict=True))
    third = trainer.train(1)
    metrics = [first, second, third]
    assert [m.skipped for m in metrics] == [False, True, False]
    assert trainer.skipped_steps == [2] and trainer.amp.skipped_steps == 1
    assert trainer.global_step == 3 and trainer.sampler.step_in_epoch == 3  # the batch is consumed
    assert trainer.scheduler.last_epoch == 2  # two applied updates: the schedule counts those
    assert [m.lr for m in metrics] == [0.05, 0.025, 0.025]
    assert trainer.amp.scaler.get_scale() == 32768.0
    err = capsys.readouterr().err
    assert "step 2: fp16 gradients overflowed (inf/nan), optimizer step skipped" in err
    assert "global batch of step 2 is consumed, not retried" in err

    # the scaler's state and the skipped steps travel with the trainer's state
    state = trainer.state_dict()
    fresh = DDPTrainer.from_task(mlp_task(), plan, log=False, precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.amp.scaler.get_scale() == 32768.0 and fresh.skipped_steps == [2]


def test_fp16_refuses_low_precision_parameters():
    model = torch.nn.Linear(2, 2).half()
    with pytest.raises(UserError, match="precision fp16 needs fp32 parameters"):
        MixedPrecision("fp16", "cpu", model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_precision_comes_from_the_plan_and_conflicts_are_refused():
    assert resolve_precision("bf16", None) == "bf16"
    assert resolve_precision("fp32", "fp16") == "fp16"  # the plan's default gives way
    with pytest.raises(UserError, match="the plan says precision bf16 but the trainer was given precision='fp16'"):
        resolve_precision("bf16", "fp16")
    with pytest.raises(UserError, match="precision must be one of fp32, bf16, fp16"):
        resolve_precision("fp32", "fp8")
    plan = BatchPlan.solve(24, 4, world_size=2, precision="bf16")
    assert reference_plan(plan).precision == "bf16"
    assert dataclasses.replace(plan, precision="fp16").with_world_size(3).precision == "fp16"


def test_bad_precision_flag_exits_2(tmp_path):
    result = run_cli("verify", "--precision", "fp8", "--output-dir", str(tmp_path / "v"))
    assert result.returncode == 2
    assert "invalid choice: 'fp8'" in result.stderr
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------------- real runs
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_verify_bf16_against_fp32_reference_passes_and_reports_the_difference(tmp_path):
    result = run_cli("verify", "--precision", "bf16", "--json", "--output-dir", str(tmp_path / "v"), timeout=220)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] and report["precision"] == "bf16"
    assert report["plan"]["precision"] == "bf16"  # the workers read it from the plan
    assert report["tolerance"] == 1.0
    # bf16 really ran: the parameters differ from fp32 by far more than fp32 round-off,
    # yet the losses agree closely
    assert 1e-3 < report["max_rel_diff"] <= 1.0
    assert report["loss_max_rel_diff"] < 1e-3
    assert report["allreduce_rounds_per_step"] == 1
    assert "bf16 run against the fp32 reference" not in result.stdout  # --json: one object only


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_fp16_overflow_on_one_rank_is_skipped_on_every_rank(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    argv += ["-m", "trainers.worker", "--task=tests.test_precision:overflow_on_rank1_task", "--steps=3"]
    argv += ["--global-batch-size=16", "--micro-batch-size=4", "--precision=fp16", "--no-shuffle"]
    argv += ["--output-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{INJECT_STEP: "2"})
    env.pop("GRADACCUM_PLAN", None)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=140, env=env, cwd=REPO)
    # exit 0: the worker's final replica check found both ranks' parameters identical, so
    # rank 0 (finite gradients of its own) skipped step 2 exactly as rank 1 did
    assert result.returncode == 0, result.stderr
    records = [torch.load(tmp_path / f"step-00000{i}.pt", weights_only=True) for i in range(4)]
    assert [r["metrics"]["skipped"] for r in records[1:]] == [False, True, False]
    assert all(torch.equal(records[1]["model"][k], records[2]["model"][k]) for k in records[1]["model"])
    assert not all(torch.equal(records[2]["model"][k], records[3]["model"][k]) for k in records[2]["model"])
    assert "step 2: fp16 gradients overflowed" in result.stderr
