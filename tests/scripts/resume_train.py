"""Worker for tests/test_resume_processes.py: DDPTrainer with checkpoints and `resume("auto")`,
and two ways to be interrupted at a chosen point:

  --die-at-step S         rank 1 SIGKILLs itself in the middle of step S (first attempt of a
                          torchrun --max-restarts job only: the restarted workers carry on)
  --hang-in-save-at-step S  the checkpoint of step S stops half-written (through the
                          strategy's `write_files` seam that DeepSpeed uses) and touches
                          --marker, until the test SIGKILLs the run

`slow_task` is the MLP task of trainers.example with a pause in the loss, so that a kill from
outside lands in the middle of the run (the arithmetic is unchanged).

    torchrun --nproc-per-node 2 tests/scripts/resume_train.py --steps 10 --checkpoint-dir D --output F
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

SLOW_LOSS_S = float(os.environ.get("RESUME_TEST_SLOW_LOSS_S", "0.05"))


def slow_task():
    from trainers.example import mlp_task

    task = mlp_task()
    loss = task.loss

    def slow_loss(model, batch):
        time.sleep(SLOW_LOSS_S)
        return loss(model, batch)

    task.loss = slow_loss
    task.name = "MLP regression (mean loss), slowed down"
    return task


def main() -> int:
    from trainers.startup import add_worker_args, run_worker

    p = argparse.ArgumentParser()
    add_worker_args(p, steps_default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--die-at-step", type=int)
    p.add_argument("--hang-in-save-at-step", type=int)
    p.add_argument("--marker")
    # the plan G=12, M=2 at the live world size; a checkpoint every step; resume when one exists
    p.set_defaults(global_batch_size=12, micro_batch_size=2, checkpoint_every=1, resume="auto")
    args = p.parse_args()

    import torch.distributed as dist

    from trainers import DDPTrainer

    def write(tmp_dir: Path) -> None:
        step = int(tmp_dir.name.rsplit("_", 1)[1])  # .tmp-step_00000003
        (tmp_dir / f"extra_rank{dist.get_rank()}.txt").write_text(f"step {step}\n")
        if step == args.hang_in_save_at_step:
            Path(args.marker).write_text(str(step))
            time.sleep(600)  # the test kills us here, with the save half done

    def train(session) -> None:
        from trainers.startup import save_atomic

        trainer = session.trainer
        trainer.strategy.write_files = write  # the seam where DeepSpeed writes its engine files
        if args.die_at_step is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            loss, start, calls = trainer.loss, trainer.global_step, [0]

            def dying_loss(model, batch):
                calls[0] += 1  # K = 3 micro-steps per optimizer step at world size 2
                step, micro = start + (calls[0] - 1) // 3 + 1, (calls[0] - 1) % 3 + 1
                if session.info.rank == 1 and step == args.die_at_step and micro == 2:
                    print(f"rank 1: SIGKILL to myself in step {step}, micro-step 2", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
                return loss(model, batch)

            trainer.loss = dying_loss
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        trainer.log(f"attempt {attempt}: starting at step {trainer.global_step}")
        trainer.train(session.steps_left)
        if session.rank0:
            save_atomic(trainer.module.state_dict(), args.output)

    return run_worker(args, train, prog="resume_train.py", task=slow_task(), trainer_class=DDPTrainer)


if __name__ == "__main__":
    from trainers.distributed import exit_worker

    exit_worker(main())  # no teardown abort after the work is done
