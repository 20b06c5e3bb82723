"""Plan changes between steps: the OOM fallback and batch-size ramps keep the update exact."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from launcher import BatchPlan
from launcher.ramp import BatchRamp
from tests.conftest import REPO, free_port
from trainers import ReferenceTrainer
from trainers.batching import smaller_plan
from trainers.example import make_task, mlp_sum_task
from trainers.verify import compare_states


def test_smaller_plan_halves_micro_and_keeps_global():
    p = smaller_plan(BatchPlan.solve(48, 8, world_size=2))
    assert (p.global_batch_size, p.micro_batch_size, p.gradient_accumulation_steps) == (48, 4, 6)
    p = smaller_plan(BatchPlan.solve(36, 6, world_size=2))  # 18 per rank: 6 -> 3
    assert (p.micro_batch_size, p.gradient_accumulation_steps) == (3, 6)
    with pytest.raises(ValueError, match="out of memory even at micro-batch 1"):
        smaller_plan(BatchPlan.solve(4, 1, world_size=2))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_oom_on_one_rank_halves_micro_batch_and_weights_equal_the_reference(tmp_path):
    steps = 3
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         str(REPO / "tests" / "scripts" / "oom_train.py"), str(out), str(steps)],
        capture_output=True, text=True, timeout=200, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "run.json").read_text())
    # 8 -> 4 -> 2 in the first step (rank 1 fails above 2 items), then it stays at 2.
    assert summary["oom_events"] == [[1, 8, 4], [1, 4, 2]]
    assert (summary["plan"]["micro_batch_size"], summary["plan"]["gradient_accumulation_steps"]) == (2, 4)
    assert summary["rounds"] == [1, 1, 1]  # one gradient all-reduce per step, retries included
    assert "out of memory in step 1 at micro-batch 8: micro 8 -> 4" in r.stderr + r.stdout
    reference = ReferenceTrainer.from_task(
        make_task("sum", with_count=True), BatchPlan.solve(16, world_size=1), shuffle=False
    )
    ref_losses = [m.loss for m in reference.iter_steps(steps)]
    cmp = compare_states(reference.module.state_dict(), torch.load(tmp_path / "run.pt", weights_only=True))
    assert cmp["max_rel_diff"] <= 1e-5, cmp
    assert summary["losses"] == pytest.approx(ref_losses, rel=1e-5)


def _ramp_trainer(n=256):
    return ReferenceTrainer.from_task(mlp_sum_task(n), BatchPlan.solve(32, world_size=1), shuffle=False)


def test_ramp_consumes_exactly_the_scheduled_samples_and_scales_the_lr():
    trainer = _ramp_trainer()
    base_lr = trainer.optimizer.param_groups[0]["lr"]  # right for the final global batch, 32
    trainer.set_batch_ramp("8,16@16,32@48", lr_scaling="linear")
    seen, sizes, lrs = [], [], []
    for _ in range(6):
        trainer.train(1)
        batch = trainer.sampler.last_global_batch
        seen.extend(batch)
        sizes.append(len(batch))
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    ramp = trainer.batch_ramp
    assert sizes == ramp.batches(6) == [8, 8, 16, 16, 32, 32]
    assert seen == list(range(sum(sizes)))  # no shuffle: items in order, none skipped or repeated
    assert lrs == pytest.approx([base_lr / 4] * 2 + [base_lr / 2] * 2 + [base_lr] * 2)


def test_ramp_resumes_mid_ramp_to_the_same_weights(tmp_path):
    straight = _ramp_trainer()
    straight.set_batch_ramp("8,16@16,32@48")
    straight.train(5)

    first = _ramp_trainer()
    first.set_batch_ramp("8,16@16,32@48")
    first.train(3)  # stops inside the 16 stage
    first.save(tmp_path)

    second = _ramp_trainer()
    second.set_batch_ramp("8,16@16,32@48")
    second.resume(tmp_path)
    second.train(2)
    assert second.global_step == 5
    for name, value in straight.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[name]), name
    assert math.isclose(straight.optimizer.param_groups[0]["lr"], second.optimizer.param_groups[0]["lr"])
    assert (
        second.sampler.consumed_samples
        == straight.sampler.consumed_samples
        == sum(BatchRamp.parse("8,16@16,32@48", BatchPlan.solve(32, 32, world_size=1)).batches(5))
    )
